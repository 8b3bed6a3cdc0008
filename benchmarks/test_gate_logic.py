"""The gate itself: a doctored measurement must fail with a message naming the regime."""

from sparse_repair.gate import Verdict, classify_regime, compare

BASE = {"class": "transition", "tolerance_pt": 0.5,
        "top1": {"none": 10.0, "bn_recal": 15.0, "asr": 30.0, "clipped_asr": 31.0}}
REGIME = "resnet20/cifar10-jpeg/erk/0.95/c1024s0/n2000"


def test_measurement_at_baseline_passes():
    assert all(v.ok for v in compare(REGIME, dict(BASE["top1"]), BASE))


def test_broken_asr_fails_naming_the_regime():
    # asr with its shrinkage turned off falls to channelwise accuracy: a doctored 22.0
    doctored = dict(BASE["top1"], asr=22.0)
    bad = [v for v in compare(REGIME, doctored, BASE) if not v.ok]
    assert {v.check for v in bad} == {"asr", "margin asr-bn_recal"}
    assert REGIME in bad[0].message() and "-8.00 pt" in bad[0].message()


def test_drop_within_tolerance_passes():
    assert Verdict(REGIME, "asr", 29.6, 30.0, 0.5).ok
    assert not Verdict(REGIME, "asr", 29.4, 30.0, 0.5).ok


def test_transition_margin_of_the_best_recovering_repair_is_gated_too():
    """A transition regime that exists only through reconstruct (ResNet-20 ERK 0.97: bn_recal
    12.25, asr 15.60, reconstruct 42.60) loses it if reconstruct's margin shrinks, whatever asr
    does."""
    base = {"class": "transition", "tolerance_pt": 0.5,
            "top1": {"bn_recal": 12.25, "asr": 15.60, "reconstruct": 42.60}}
    checks = {v.check for v in compare(REGIME, dict(base["top1"]), base)}
    assert checks >= {"margin asr-bn_recal", "margin reconstruct-bn_recal"}
    broken = dict(base["top1"], bn_recal=20.0, reconstruct=42.60)  # reconstruct margin -7.75
    bad = {v.check for v in compare(REGIME, broken, base) if not v.ok}
    assert "margin reconstruct-bn_recal" in bad


def test_margin_checked_only_for_transition_regimes():
    mild = dict(BASE, **{"class": "mild"})
    checks = {v.check for v in compare(REGIME, dict(BASE["top1"]), mild)}
    assert "margin asr-bn_recal" not in checks


def test_regime_classes():
    assert classify_regime(81.0, {"bn_recal": 78.0, "asr": 78.5}, 10) == "mild"
    assert classify_regime(81.0, {"bn_recal": 15.0, "asr": 30.0}, 10) == "transition"
    assert classify_regime(81.0, {"bn_recal": 11.0, "asr": 12.0}, 10) == "collapse"
    assert classify_regime(81.0, {"bn_recal": 40.0, "asr": 44.0}, 10) == "degraded"


def test_gate_and_study_report_share_one_transition_rule():
    """A point is a transition regime for the gate exactly when the study report's detector
    lists it: both call sparse_repair.regime (issue #16: one rule, not three copies)."""
    from sparse_repair.regime import recovering_repairs
    from sparse_repair.study.stats import transition_points

    # issue #17: reconstruction counts as a repair that can recover where bn_recal fails
    assert recovering_repairs() == ["layerwise", "channelwise", "asr", "clipped_asr",
                                    "reconstruct"]
    curve = {0.80: {"bn_recal": 60.0, "asr": 62.0}, 0.90: {"bn_recal": 15.0, "asr": 30.0},
             0.93: {"bn_recal": 15.0, "clipped_asr": 19.0}, 0.95: {"bn_recal": 11.0, "asr": 12.0},
             0.97: {"bn_recal": 19.9, "layerwise": 25.0}}
    gate = [s for s, top1 in curve.items() if classify_regime(81.0, top1, 10) == "transition"]
    assert gate == transition_points(curve, 10) == [0.90, 0.97]


def _partial(monkeypatch, measured: dict, base: dict | None):
    """_add_repairs (--update-repairs) on a doctored measurement: no model runs."""
    import test_repair_accuracy as acc
    from regimes import Regime

    monkeypatch.setattr(acc, "measure", lambda r, repairs=None: measured)
    return acc._add_repairs(Regime("resnet20", "cifar10-jpeg", "erk", 0.95), base,
                            ["reconstruct"], 10)


def test_partial_update_adds_one_repair_and_keeps_the_rest(monkeypatch):
    base = dict(BASE, dense_top1=81.0, **{"class": "collapse"},
                top1={"none": 10.0, "bn_recal": 11.0, "asr": 12.0})
    entry = _partial(monkeypatch, {"dense": 81.0, "top1": {"reconstruct": 40.0}}, base)
    assert entry["top1"] == {"none": 10.0, "bn_recal": 11.0, "asr": 12.0, "reconstruct": 40.0}
    # reconstruct counts as recovering: bn_recal fails, reconstruct recovers -> transition
    assert entry["class"] == "transition"
    assert entry["recorded_repairs"]["reconstruct"]["command"].endswith(
        "--update-repairs reconstruct")
    assert {k: v for k, v in entry.items() if k not in ("top1", "class", "recorded_repairs")} \
        == {k: v for k, v in base.items() if k not in ("top1", "class")}


def test_partial_update_refuses_a_moved_dense_model_or_a_missing_entry(monkeypatch):
    import pytest

    base = dict(BASE, dense_top1=81.0)
    with pytest.raises(pytest.fail.Exception, match="dense top-1 81.5 differs"):
        _partial(monkeypatch, {"dense": 81.5, "top1": {"reconstruct": 40.0}}, base)
    with pytest.raises(pytest.fail.Exception, match="has no baseline to add"):
        _partial(monkeypatch, {"dense": 81.0, "top1": {"reconstruct": 40.0}}, None)
