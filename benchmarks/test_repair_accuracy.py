"""Accuracy gate: every repair of every regime must stay within tolerance of its stored
baseline, and transition regimes must keep the asr-over-bn_recal margin that defines them. A
repair of REPAIRS that a regime's baseline lacks fails with the command that records it."""

from __future__ import annotations

import pytest
import torch
from regimes import ALL, REPAIRS, Regime

from conftest import (
    ACCURACY_FILE,
    PARTIAL,
    ROOT,
    UPDATES,
    VERDICTS,
    assets_present,
    environment,
    load_json,
)
from sparse_repair.data import get_spec
from sparse_repair.gate import classify_regime, compare
from sparse_repair.run import RunConfig, run_config

_CACHE: dict[str, dict] = {}
# Where a data set lives under the asset root, where its folder is not named after it.
_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_DENSE: dict = {}   # run_config's dense cache: one load and evaluation per checkpoint


def measure(r: Regime, repairs: list[str] | None = None) -> dict:
    """The regime as one `sparse_repair.run.run_config` run (what `sparse-repair run` and the
    study measure): prune once, repair a copy per method on the same calibration images,
    evaluate each. The dense model and its accuracy are shared by regimes of one checkpoint.
    ``repairs``: a subset of REPAIRS (--update-repairs); each repair works on its own copy from
    the same images, so its number does not depend on which others run."""
    repairs = list(REPAIRS) if repairs is None else list(repairs)
    key = (r.id, tuple(repairs))
    if key not in _CACHE:
        cfg = RunConfig(model=r.model, dataset=r.dataset, allocation=r.allocation,
                        sparsity=r.sparsity, repairs=repairs, calib=r.calib, seed=r.seed,
                        n_eval=r.n_eval, weights=str(ROOT / r.weights) if r.weights else None,
                        resolution=r.resolution)
        rows, dense_top1, _ = run_config(cfg, _DENSE)
        _CACHE[key] = {"dense": dense_top1, "top1": {row["repair"]: row["top1"] for row in rows}}
    return _CACHE[key]


def _add_repairs(regime: Regime, base: dict | None, names: list[str], num_classes: int) -> dict:
    """``base`` with the measured top-1 of ``names`` added or replaced (--update-repairs) and
    the class recomputed from the stored numbers plus those; everything else kept. Fails when
    the regime has no entry yet (record it whole) or its dense top-1 no longer matches the
    stored one (then every number may have moved: record it whole, on purpose)."""
    unknown = sorted(set(names) - set(REPAIRS))
    if unknown:
        pytest.fail(f"--update-repairs names {unknown}, which are not in regimes.REPAIRS")
    if base is None:
        pytest.fail(f"regime {regime.id} has no baseline to add {names} to; record it whole "
                    f"with: pytest benchmarks/test_repair_accuracy.py --update-baselines "
                    f"-k '{regime.id}'")
    got = measure(regime, names)
    if abs(got["dense"] - base["dense_top1"]) > 1e-9:
        pytest.fail(f"regime {regime.id}: dense top-1 {got['dense']} differs from the stored "
                    f"{base['dense_top1']}; the other repairs' numbers would be stale too, so "
                    "record the regime whole (--update-baselines without --update-repairs)")
    top1 = {**base["top1"], **got["top1"]}
    stamp = environment() | {"command": "pytest benchmarks/test_repair_accuracy.py "
                                        f"--update-baselines --update-repairs {','.join(names)}"}
    return {**base, "top1": top1, "class": classify_regime(base["dense_top1"], top1, num_classes),
            "recorded_repairs": {**base.get("recorded_repairs", {}),
                                 **{n: stamp for n in names}}}


def _regimes(full: bool, nightly: bool):
    out = []
    for r in ALL:
        if r.nightly_only and not nightly:
            continue
        if full and r.n_eval is not None:
            r = Regime(**{**r.__dict__, "n_eval": None})
        out.append(r)
    return out


def pytest_generate_tests(metafunc):
    if "regime" in metafunc.fixturenames:
        full = metafunc.config.getoption("--full")
        regimes = _regimes(full, metafunc.config.getoption("--nightly"))
        metafunc.parametrize("regime", regimes, ids=[r.id for r in regimes])


@torch.inference_mode(False)
def test_regime_against_baseline(regime: Regime, update_baselines: bool,
                                 update_repairs: list[str] | None):
    need_weights = regime.weights is None  # published weights live under the asset root
    if regime.needs_assets and not (assets_present(_FOLDERS.get(regime.dataset, regime.dataset))
                                    and (assets_present("weights") or not need_weights)):
        pytest.skip(f"{regime.dataset}{' and weights' if need_weights else ''} not under the "
                    "asset root: set SPARSE_REPAIR_ASSETS (../shared/assets/unpack.sh .assets)")
    num_classes = get_spec(regime.dataset).num_classes
    baselines = load_json(ACCURACY_FILE).get("regimes", {})
    if update_repairs is not None:
        UPDATES[regime.id] = _add_repairs(regime, baselines.get(regime.id), update_repairs,
                                          num_classes)
        PARTIAL.append(regime.id)
        return
    got = measure(regime)
    regime_class = classify_regime(got["dense"], got["top1"], num_classes)
    if update_baselines:
        UPDATES[regime.id] = {"dense_top1": got["dense"], "top1": got["top1"],
                              "class": regime_class, "tolerance_pt": 0.5,
                              "margin_asr_over_bn_recal":
                                  got["top1"]["asr"] - got["top1"]["bn_recal"]}
        return
    if regime.id not in baselines:
        pytest.fail(f"no baseline for regime {regime.id}; record it on purpose with:\n"
                    f"  pytest benchmarks/test_repair_accuracy.py --update-baselines "
                    f"-k '{regime.id}'")
    base = baselines[regime.id]
    unrecorded = [m for m in REPAIRS if m not in base["top1"]]
    if unrecorded:   # compare() gates only stored repairs: a new one would pass unseen
        pytest.fail(f"regime {regime.id} has no baseline for {unrecorded} (measured "
                    f"{ {m: got['top1'][m] for m in unrecorded} }); record them on purpose "
                    f"with:\n  pytest benchmarks/test_repair_accuracy.py --update-baselines "
                    f"--update-repairs {','.join(unrecorded)} -k '{regime.id}'")
    verdicts = compare(regime.id, got["top1"], base)
    VERDICTS.extend(verdicts)
    bad = [v.message() for v in verdicts if not v.ok]
    assert not bad, "\n".join(bad)
    assert regime_class == base["class"] or base["class"] != "transition", \
        f"regime {regime.id} is no longer a transition regime (now {regime_class})"
