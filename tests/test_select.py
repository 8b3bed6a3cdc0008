"""Label-free selection (sparse_repair.select, `sparse-repair select`; issue #19): the config is
the one source of defaults and refuses unknown keys; no label reaches the choice; calibration
and scoring images are disjoint train images; the dense scoring pass runs once; a failing
candidate is reported and never chosen; the result is deterministic; the regrets add up.

All runs use the digits data set and the checked-in ResNet-8 (as tests/test_cli.py), with 64
calibration and 100 scoring images, so each selection takes seconds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_repair.allocation import list_allocators
from sparse_repair.cli import build_parser, main
from sparse_repair.repair import list_repairs
from sparse_repair.run import RunConfig
from sparse_repair.select import SelectConfig, SelectResult, select
from sparse_repair.select import api as select_api

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "baselines" / "checkpoints" / "resnet8-digits.pt")
BASE = {"model": "resnet8", "dataset": "digits", "weights": DIGITS, "sparsity": 0.8,
        "allocations": ["erk", "lamp"], "repairs": ["none", "bn_recal", "asr"], "calib": 64,
        "scoring": 100}
SCORES = ("allocation", "repair", "method", "agreement", "kl", "collapsed", "error")


def _cfg(**kw) -> SelectConfig:
    return SelectConfig.from_dict({**BASE, **kw})


def _label_free(result: SelectResult) -> tuple:
    """Everything the choice may depend on: the choice and each candidate's label-free part."""
    return result.choice, [{k: c[k] for k in SCORES} for c in result.candidates]


@pytest.fixture(scope="module")
def evaluated() -> SelectResult:
    return select(_cfg(evaluate=True))


@pytest.fixture(scope="module")
def blind():
    """The same selection as ``evaluated`` with every label of the data layer replaced by random
    labels (the digits source itself, so every path to a label sees them), load_split raising
    until the choice is fixed, the decoded train/test indices recorded, and the dense model's
    forwards on the scoring images counted."""
    from sparse_repair.data import datasets, splits, subsets

    mp = pytest.MonkeyPatch()
    rec = {"phase": "choosing", "splits": [], "decoded": [], "dense_scoring_forwards": 0}
    spec = datasets.DATASETS["digits"]

    def random_labels_source(split, root, download=False):
        src = spec.source(split, root, download)
        rec["splits"].append((rec["phase"], split))
        rng = np.random.default_rng(123)
        return dataclasses.replace(src, labels=rng.integers(0, 10, len(src)).astype(np.int64))

    real_decode = subsets._decode_many

    def recording_decode(source, indices, *a, **kw):
        rec["decoded"].append(np.array(indices))
        return real_decode(source, indices, *a, **kw)

    real_load_split = splits.load_split

    def guarded_load_split(*a, **kw):
        if rec["phase"] == "choosing":
            raise AssertionError("load_split (images with labels) called before the choice")
        return real_load_split(*a, **kw)

    real_choose = select_api.choose

    def choose_then_allow_labels(*a, **kw):
        out = real_choose(*a, **kw)
        if rec["phase"] == "choosing":
            rec["phase"] = "evaluating"
        return out

    scoring = select_api.scoring_set

    def recording_scoring_set(*a, **kw):
        rec["scoring_images"] = scoring(*a, **kw)
        return rec["scoring_images"]

    mp.setitem(datasets.DATASETS, "digits", dataclasses.replace(spec,
                                                                source=random_labels_source))
    mp.setattr(splits, "_MEMO", {})  # a cached split with the true labels must not be reused
    mp.setattr(subsets, "_decode_many", recording_decode)
    mp.setattr(splits, "load_split", guarded_load_split)
    mp.setattr("sparse_repair.data.load_split", guarded_load_split)
    mp.setattr("sparse_repair.evaluate.load_split", guarded_load_split)
    mp.setattr(select_api, "choose", choose_then_allow_labels)
    mp.setattr(select_api, "scoring_set", recording_scoring_set)

    from sparse_repair.run import load_dense

    cfg = _cfg(evaluate=True)
    dense = load_dense(cfg.run_config())

    def count(module, args):
        # deepcopy copies this hook into every pruned copy: count the dense model's own calls.
        x = args[0]
        if module is dense and "scoring_images" in rec and x.shape == rec["scoring_images"].shape \
                and torch.equal(x, rec["scoring_images"]):
            rec["dense_scoring_forwards"] += 1

    dense.register_forward_pre_hook(count)
    try:
        rec["result"] = select(cfg, dense=dense)
    finally:
        mp.undo()
    return rec


# ----------------------------------------------------------------------------- configuration

def test_config_refuses_unknown_keys_and_bad_values_before_any_work():
    with pytest.raises(ValueError, match=r"'scoring_images'.*valid settings: model, dataset"):
        SelectConfig.from_dict({"scoring_images": 10})
    with pytest.raises(ValueError, match="unknown criterion 'accuracy'"):
        SelectConfig.from_dict({"criterion": "accuracy"})
    with pytest.raises(ValueError, match=r"unknown allocation\(s\) \['ekr'\]; choose from"):
        SelectConfig.from_dict({"allocations": ["erk", "ekr"]})
    with pytest.raises(ValueError, match="not a registered method"):
        SelectConfig.from_dict({"repairs": ["bn_recall"]})
    with pytest.raises(TypeError):  # an option asr does not take, refused by its registry
        SelectConfig.from_dict({"repairs": ["asr"], "repair_options": {"asr": {"shrink": 1}}})
    with pytest.raises(ValueError, match="scoring must be a number of images >= 1"):
        SelectConfig.from_dict({"scoring": 0})
    with pytest.raises(ValueError, match="more than once"):
        SelectConfig.from_dict({"allocations": ["erk", "erk"]})


def test_shared_settings_are_runconfig_s_own_and_defaults_cover_every_candidate():
    run = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name in ("model", "weights", "pretrained", "resolution", "exclude", "sparsity",
                 "repair_options", "calib", "device"):
        f = next(f for f in dataclasses.fields(SelectConfig) if f.name == name)
        assert f.metadata["help"] == run[name].metadata["help"], name
        assert getattr(SelectConfig(), name) == getattr(RunConfig(), name), name
    cfg = SelectConfig()
    assert cfg.allocations == list_allocators() and cfg.repairs == list_repairs()
    assert (cfg.calib, cfg.scoring, cfg.criterion, cfg.evaluate, cfg.n_eval) == \
        (1024, 1000, "agreement", False, None)


def test_choose_breaks_ties_by_the_other_score_then_candidate_order():
    def c(agreement, kl, error=None):
        return {"agreement": agreement, "kl": kl, "error": error}

    cands = [c(90.0, 0.2), c(95.0, 0.2), c(95.0, 0.1, error="refused"), c(95.0, 0.3),
             c(90.0, 0.2)]
    assert select_api.choose(cands, "kl") == 1          # kl tie 0.2: higher agreement wins
    assert select_api.choose(cands, "agreement") == 1   # agreement tie 95: lower kl wins
    assert select_api.choose([c(90.0, 0.2), c(90.0, 0.2)], "kl") == 0  # full tie: order
    assert select_api.choose([c(None, None, "x")], "kl") is None


def test_choice_margin_pairs_the_choice_with_the_runner_up_image_by_image():
    """Agreement: the choice (candidate 1) agrees with the dense model on images 0-2 of 4, the
    runner-up (candidate 0) on 0-1, a third candidate on none. The difference is image by
    image (+25 pt here, the means' difference), signed so that > 0 favours the choice; the
    interval of 4 paired images includes 0. KL is signed the other way round (lower is
    better). A single scored candidate has no margin."""
    import torch

    def c(agreement, kl, error=None):
        return {"allocation": "a", "repair": "r", "agreement": agreement, "kl": kl,
                "error": error}

    cands = [c(50.0, 0.5), c(75.0, 0.4), c(0.0, 2.0), c(None, None, "failed")]
    each = [{"agreement": torch.tensor([100.0, 100, 0, 0]),
             "kl": torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)},
            {"agreement": torch.tensor([100.0, 100, 100, 0]),
             "kl": torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)},
            {"agreement": torch.zeros(4), "kl": torch.full((4,), 2.0, dtype=torch.float64)},
            None]
    m = select_api.choice_margin(cands, each, 1, "agreement")
    assert m["runner_up"] == {"allocation": "a", "repair": "r"} and m["n"] == 4
    assert m["difference"] == pytest.approx(25.0) and m["criterion"] == "agreement"
    assert m["ci95"][0] < 0 < m["ci95"][1] and m["resolved"] is False
    k = select_api.choice_margin(cands, each, 1, "kl")  # 0.1 nats lower on every image
    assert k["difference"] == pytest.approx(0.1) and k["ci95"] == pytest.approx([0.1, 0.1])
    assert k["resolved"] is True
    assert select_api.choice_margin(cands[:1], each[:1], 0, "kl") is None
    assert select_api.choice_margin(cands, each, None, "kl") is None
    # one infinite per-image KL: no difference and no interval, not an exact [0, 0]
    each[0]["kl"] = torch.tensor([0.2, float("inf"), 0.6, 0.8], dtype=torch.float64)
    inf = select_api.choice_margin(cands, each, 1, "kl")
    assert (inf["difference"], inf["ci95"], inf["resolved"]) == (None, None, False)


def test_choice_margin_is_not_resolved_by_rounding_and_never_holds_nan():
    """Found by an edge-case pass: per-image KL differences that were all within rounding of
    each other but not exactly 0 (1e-17 nats) took the "same difference on every image" path
    and came out resolved, claiming the scoring images separate two practically identical
    models; and an overflowing t-interval put NaN/Inf into ci95, which the JSON never holds."""
    def c(kl):
        return {"allocation": "a", "repair": "r", "agreement": 100.0, "kl": kl, "error": None}

    def each(kl):
        return {"agreement": torch.full((4,), 100.0, dtype=torch.float64),
                "kl": torch.tensor(kl, dtype=torch.float64)}

    kl = [0.5, 0.7, 0.1, 0.3]
    m = select_api.choice_margin([c(0.4), c(0.4 + 1e-17)],
                                 [each(kl), each(kl[:3] + [kl[3] + 4e-17])], 0, "kl")
    assert m["ci95"] == [0.0, 0.0] and m["resolved"] is False
    same = select_api.choice_margin([c(0.4), c(0.4)], [each(kl), each(kl)], 0, "kl")
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0] and not same["resolved"]
    with np.errstate(all="ignore"):  # scipy's overflow warnings
        huge = select_api.choice_margin([c(1.0), c(1e300)],
                                        [each([0.0, 0.0, 1.0, 0.0]),
                                         each([1.7e308, 1.7e308, 1e308, 0.0])], 0, "kl")
    json.dumps(huge, allow_nan=False)
    assert huge["ci95"] is None and huge["resolved"] is False


# ----------------------------------------------------------------------------- results

def test_json_has_the_required_fields_and_regrets_add_up(evaluated):
    d = json.loads(json.dumps(evaluated.to_dict(), allow_nan=False))  # no NaN anywhere
    assert set(d) >= {"choice", "criterion", "candidates", "seconds", "config", "regret",
                      "fixed_rules", "best", "dense_top1", "n_eval"}
    assert d["criterion"] == "agreement" and d["n_eval"] == 364  # the full digits test split
    assert [(c["allocation"], c["repair"]) for c in d["candidates"]] == \
        [(a, r) for a in BASE["allocations"] for r in BASE["repairs"]]
    for c in d["candidates"]:
        assert c["error"] is None and 0 <= c["agreement"] <= 100 and c["kl"] >= 0
        assert c["seconds"] > 0 and 0 <= c["top1"] <= 100
    chosen = next(c for c in d["candidates"]
                  if {"allocation": c["allocation"], "repair": c["repair"]} == d["choice"])
    assert chosen["agreement"] == max(c["agreement"] for c in d["candidates"])
    best = max(c["top1"] for c in d["candidates"])
    assert d["best"]["top1"] == best
    assert d["regret"] >= 0 and d["regret"] == pytest.approx(best - chosen["top1"])
    # no float noise: a regret is a difference of two percentages with few decimals
    assert all(len(repr(r["regret"]).split(".")[-1]) <= 10
               for r in [d, *d["fixed_rules"].values()] if r["regret"] is not None)
    # Pruning without repair at 0.8 breaks ResNet-8 (under 35% top-1 on 10 classes), so the
    # label-free scores must tell the repaired candidates from the unrepaired ones.
    assert d["choice"]["repair"] != "none"
    rules = d["fixed_rules"]
    assert set(rules) == {"always erk", "always lamp", "always bn_recal", "always reconstruct",
                          "erk+bn_recal", "lamp+bn_recal"}
    assert rules["always reconstruct"] == {"choice": None, "top1": None, "regret": None,
                                           "note": "not among the candidates"}
    for name, r in rules.items():
        if name != "always reconstruct":
            assert r["regret"] >= 0 and r["regret"] == pytest.approx(best - r["top1"]), name
    assert rules["erk+bn_recal"]["choice"] == {"allocation": "erk", "repair": "bn_recal"}
    assert rules["always lamp"]["choice"]["allocation"] == "lamp"
    assert rules["always bn_recal"]["choice"]["repair"] == "bn_recal"
    # the margin: the runner-up is the best of the others by the same rule, and the paired
    # difference of means equals the difference of the candidates' own scores
    m = d["margin"]
    others = [c for c in d["candidates"] if {"allocation": c["allocation"],
                                              "repair": c["repair"]} != d["choice"]]
    runner = min(others, key=lambda c: (-c["agreement"], c["kl"]))
    assert m["runner_up"] == {"allocation": runner["allocation"], "repair": runner["repair"]}
    assert m["n"] == BASE["scoring"] and m["difference"] >= 0
    assert m["difference"] == pytest.approx(chosen["agreement"] - runner["agreement"])
    assert m["ci95"][0] <= m["difference"] <= m["ci95"][1]
    assert m["resolved"] == (m["ci95"][0] > 0)


def test_no_label_reaches_the_choice(evaluated, blind):
    """Random labels everywhere in the data layer and load_split refused until the choice is
    fixed: the choice and every label-free score are identical; only the top-1 columns move."""
    assert _label_free(blind["result"]) == _label_free(evaluated)
    assert blind["phase"] == "evaluating"  # the guard was live and the evaluation ran after
    top1 = [c["top1"] for c in blind["result"].candidates]
    assert top1 != [c["top1"] for c in evaluated.candidates]  # the random labels took effect


def test_choosing_reads_only_disjoint_train_images(blind):
    """During the choice only the train split is opened; the calibration and scoring draws
    are disjoint index sets of it; the test split is opened only by the evaluation."""
    choosing = {s for phase, s in blind["splits"] if phase == "choosing"}
    assert choosing == {"train"}
    assert ("evaluating", "test") in blind["splits"]
    assert sorted(len(d) for d in blind["decoded"]) == [64, 100]  # one draw of each
    score_idx, calib_idx = sorted(blind["decoded"], key=len, reverse=True)
    assert not set(calib_idx.tolist()) & set(score_idx.tolist())


def test_the_dense_scoring_pass_runs_once(blind):
    assert len(blind["result"].candidates) == 6
    assert blind["dense_scoring_forwards"] == 1


def test_a_failing_candidate_is_reported_and_never_chosen(evaluated, monkeypatch):
    """The repair the evaluated run chose now raises: its candidates carry the error and no
    scores, and the choice falls to the best of the rest, whose scores are unchanged."""
    failing = evaluated.choice["repair"]
    real = select_api.repair

    def refuse(model, method, *a, **kw):
        if method == failing:
            raise RuntimeError("refused on this architecture (test)")
        return real(model, method, *a, **kw)

    monkeypatch.setattr(select_api, "repair", refuse)
    result = select(_cfg())
    failed = [c for c in result.candidates if c["repair"] == failing]
    assert len(failed) == 2 and all(
        c["error"] == "RuntimeError: refused on this architecture (test)"
        and c["agreement"] is None and c["kl"] is None for c in failed)
    assert result.choice is not None and result.choice["repair"] != failing
    rest = [c for c in evaluated.candidates if c["repair"] != failing]
    want = min(rest, key=lambda c: (-c["agreement"], c["kl"]))
    assert result.choice == {"allocation": want["allocation"], "repair": want["repair"]}
    assert "top1" not in result.candidates[0] and "regret" not in result.to_dict()


# ----------------------------------------------------------------------------- CLI

def _select_parser():
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return action.choices["select"]


def test_select_flags_take_every_default_from_selectconfig():
    defaults = vars(_select_parser().parse_args([]))
    for f in dataclasses.fields(SelectConfig):
        want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert defaults[f.name] == want, f"--{f.name}: CLI default differs from SelectConfig"
    args = vars(_select_parser().parse_args(["--allocations", "erk,lamp", "--repairs",
                                             "bn_recal,asr", "--n-eval", "full"]))
    assert (args["allocations"], args["repairs"], args["n_eval"]) == \
        (["erk", "lamp"], ["bn_recal", "asr"], None)


CLI = ["select", "--model", "resnet8", "--dataset", "digits", "--weights", DIGITS,
       "--sparsity", "0.8", "--allocations", "lamp", "--repairs", "bn_recal,channelwise",
       "--calib", "64", "--scoring", "100"]


def test_cli_json_is_deterministic(capsys):
    outs = []
    for _ in range(2):
        assert main(CLI + ["--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        d.pop("seconds")
        for c in d["candidates"]:
            assert c.pop("seconds") > 0
        outs.append(d)
    assert outs[0] == outs[1]
    assert outs[0]["config"]["allocations"] == ["lamp"] and len(outs[0]["candidates"]) == 2


def test_cli_table_marks_the_choice_and_reports_regrets(capsys):
    assert main(CLI + ["--evaluate", "--n-eval", "100"]) == 0
    out = capsys.readouterr().out
    marked = [line for line in out.splitlines() if line.startswith("* ")]
    assert len(marked) == 1 and "lamp" in marked[0]
    assert "regret of the choice" in out and "lamp+bn_recal" in out
    assert "margin over the runner-up lamp + " in out and "scoring images: " in out
    # rules about candidates not asked for (only LAMP here) are one line, not a row each
    assert "  (no candidate for always erk, always reconstruct, erk+bn_recal)" in out, out
    assert "not among the candidates" not in out and "  always lamp " in out


@pytest.mark.parametrize("bad, message", [
    (["--criterion", "accuracy"], "unknown criterion"),
    (["--allocations", "erk,ekr"], "unknown allocation"),
    (["--repairs", "bn_recall"], "--repairs names 'bn_recall', which is not a registered"),
    (["--scoring", "2000"], "would overlap"),  # 64 + 2000 > the 1,433 digits train images
    (["--n-eval", "100"], "no effect without evaluate"),  # was ignored, yet recorded
])
def test_cli_bad_input_exits_2_with_a_clear_message(bad, message, capsys):
    assert main(CLI + bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparse-repair: error:") and message in err


def test_the_callers_model_keeps_its_mode_and_bad_settings_fail_before_work():
    """Found by a bad-input pass: select left a train-mode model in eval mode; an unknown
    exclude name failed every candidate instead of the call; a float seed or a string where a
    list belongs failed late or was split into characters."""
    from sparse_repair.weights import load_trained

    dense = load_trained(DIGITS)[0].train()
    select(_cfg(allocations=["erk"], repairs=["none"]), dense=dense)
    assert dense.training, "select changed the caller's model mode"
    with pytest.raises(ValueError, match="nosuchlayer"):
        select(_cfg(exclude=["nosuchlayer"]), dense=dense)
    for bad, match in [({"seed": 1.5}, "seed"), ({"repairs": "asr"}, "list of names"),
                       ({"allocations": "erk"}, "list of names"),
                       ({"device": "cuda:x"}, "device")]:
        with pytest.raises((ValueError, TypeError), match=match):
            _cfg(**bad)


def test_an_allocator_that_refuses_the_sparsity_fails_its_candidates_even_listed_first():
    """Found by an edge-case pass: the up-front exclude check allocated with the first listed
    allocation, so uniform_plus (or lamp) refusing this sparsity, when listed first, aborted
    the whole selection (CLI exit 2) instead of failing its own candidates; listed second it
    was reported as a candidate error and the other allocation chosen."""
    from sparse_repair.weights import load_trained

    dense = load_trained(DIGITS)[0]
    result = select(_cfg(sparsity=0.999, allocations=["uniform_plus", "erk"], repairs=["none"]),
                    dense=dense)
    failed, scored = result.candidates
    assert failed["error"].startswith("allocation failed: ValueError: uniform_plus")
    assert scored["error"] is None and result.margin is None
    assert result.choice == {"allocation": "erk", "repair": "none"}
    alone = select(_cfg(sparsity=0.999, allocations=["uniform_plus"], repairs=["none"]),
                   dense=dense)
    assert alone.choice is None and alone.margin is None
    json.dumps(alone.to_dict(), allow_nan=False)


def test_search_keeps_its_work_when_the_anchors_share_no_kept_layer():
    from sparse_repair.allocation import allocate
    from sparse_repair.select.search import EmptyMixError, interpolate

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    a = allocate(model, "uniform", 0.5)
    b = dataclasses.replace(a, keep=a.keep.copy())
    a.keep[:] = [8, 0]
    b.keep[:] = [0, 8]
    with pytest.raises(EmptyMixError, match="no common layer"):
        interpolate(a, b, 0.5)
    assert interpolate(a, b, 0.0).keep.tolist() == [8, 0]


def test_a_dense_model_that_is_not_the_configured_one_is_refused_before_anything_runs():
    """select(cfg, dense=...) used the model it was given whatever cfg.model said, and reported
    a random ResNet-20's numbers under resnet8's name; a float64 dense failed inside torch."""
    from sparse_repair.models import create_model

    cfg = _cfg(allocations=["erk"], repairs=["none"])
    other = create_model("resnet20", 10)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="not a resnet8 for digits.*pass a resnet8"):
        select(cfg, dense=other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match=r"torch.float64 tensors.*dense.float\(\)"):
        select(cfg, dense=create_model("resnet8", 10).double())
