"""Repair-aware allocation search (sparse_repair.select.search, issue #19): the ERK-to-LAMP
family is exact at every point and is the anchors at its ends; the search chooses the best
point it evaluated by its label-free criterion, reads no label, is deterministic and leaves the
dense model unchanged; with anchors="auto" the fixed candidates are evaluated first, the family
runs between the two best, and the choice is never worse by the criterion than any of them;
bad input is refused before any work.

Kept fast for CI: ResNet-8 on digits (baselines/checkpoints/resnet8-digits.pt), 64 calibration
and 100 scoring images, grid 3 + 1 refinement round (at most 5 repairs per search)."""

from __future__ import annotations

import copy
import json
import signal
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_repair import data as data_pkg
from sparse_repair.allocation import allocate
from sparse_repair.evaluate import label_free_scores, predict_logits
from sparse_repair.select import search as search_mod
from sparse_repair.select.search import interpolate, search_allocation
from sparse_repair.weights import load_trained

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "baselines" / "checkpoints" / "resnet8-digits.pt")
SMALL = {"grid": 3, "refine": 1, "criterion": "kl"}  # these checks rank by KL
PAIR = ("erk", "lamp")  # the original family, given explicitly (the default is "auto")
CANDIDATES = ("erk", "lamp", "uniform", "global_magnitude")
pytestmark = pytest.mark.filterwarnings("ignore::sparse_repair.allocation.LayerCollapseWarning")


def _no_labels(monkeypatch):
    """Every way the data layer reaches labels raises: whole splits (load_split, wherever it was
    imported) and each data set's source (a Source carries the labels)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a label source was read during the search")

    import sparse_repair.data.splits as splits
    import sparse_repair.evaluate as evaluate_mod
    for mod in (splits, data_pkg, evaluate_mod):
        monkeypatch.setattr(mod, "load_split", refuse)
    for name, spec in data_pkg.DATASETS.items():
        monkeypatch.setitem(data_pkg.DATASETS, name, type(spec)(
            **{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "source": refuse}))


@pytest.fixture(scope="module")
def setting():
    dense = load_trained(DIGITS)[0].eval()
    calib = data_pkg.calibration_set("digits", 64, 0)
    scoring = data_pkg.scoring_set("digits", 100, 0, calib=64)
    return dense, calib, scoring


@pytest.fixture(scope="module")
def searched(setting):
    """One search at 0.9 (bn_recal, KL) with every label source refusing, and the dense
    model's state before and after it."""
    dense, calib, scoring = setting
    before = copy.deepcopy(dense.state_dict())
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        _no_labels(mp)
        result = search_allocation(dense, 0.9, calib, scoring, anchors=PAIR,
                                   observe=lambda p, m: seen.append(p.t), **SMALL)
    return result, before, seen


@pytest.fixture(scope="module")
def auto_searched(setting):
    """One anchors="auto" search (the default) at 0.9 (bn_recal, KL) with every label source
    refusing, and the dense model's state before it; ``seen`` the observed points."""
    dense, calib, scoring = setting
    before = copy.deepcopy(dense.state_dict())
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        _no_labels(mp)
        result = search_allocation(dense, 0.9, calib, scoring,
                                   observe=lambda p, m: seen.append((p.method, p.t)), **SMALL)
    return result, before, seen


def _target_keep(alloc, sparsity):
    n = alloc.total
    return n - int((Decimal(str(sparsity)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# ----------------------------------------------------------------------------- the family

@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("min_keep", [0, 2])
def test_family_is_exact_within_bounds_and_its_ends_are_erk_and_lamp(setting, sparsity,
                                                                     min_keep):
    dense = setting[0]
    erk = allocate(dense, "erk", sparsity, min_keep=min_keep)
    lamp = allocate(dense, "lamp", sparsity, min_keep=min_keep)
    assert np.array_equal(interpolate(erk, lamp, 0.0).keep, erk.keep)
    assert np.array_equal(interpolate(erk, lamp, 1.0).keep, lamp.keep)
    interior = []
    for t in np.linspace(0, 1, 17).tolist():
        a = interpolate(erk, lamp, t)
        assert a.keep.dtype == np.int64
        assert a.keep_total == _target_keep(a, sparsity), (t, a.keep_total)
        assert (a.keep <= a.sizes).all() and (a.keep >= np.minimum(min_keep, a.sizes)).all()
        # Weighted AM-GM: the geometric mean never undercuts both anchors (up to rounding).
        assert (a.keep >= np.minimum(erk.keep, lamp.keep) - 1).all()
        interior.append(a.keep.tobytes())
    if not np.array_equal(erk.keep, lamp.keep):
        assert len(set(interior)) > 2, "the family does not move between its ends"


def test_family_keeps_excluded_layers_dense(setting):
    dense = setting[0]
    names = [n for n, _ in dense.named_modules() if isinstance(_, torch.nn.Conv2d)]
    ex = (names[0],)
    erk = allocate(dense, "erk", 0.9, exclude=ex)
    lamp = allocate(dense, "lamp", 0.9, exclude=ex)
    a = interpolate(erk, lamp, 0.5)
    assert a.keep_of(names[0]) == a.sizes[0] and a.keep_total == erk.keep_total


def test_family_refuses_mismatched_anchors_and_t_outside(setting):
    dense = setting[0]
    erk, lamp = allocate(dense, "erk", 0.9), allocate(dense, "lamp", 0.8)
    with pytest.raises(ValueError, match="differ in layers, sizes, kept total"):
        interpolate(erk, lamp, 0.5)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        interpolate(erk, erk, 1.5)


# ----------------------------------------------------------------------------- the search

def test_search_returns_an_exact_allocation(searched, setting):
    result = searched[0]
    alloc = result.allocation
    assert alloc.keep_total == _target_keep(alloc, 0.9)
    assert (alloc.keep >= 0).all() and (alloc.keep <= alloc.sizes).all()
    assert alloc.keep.tolist() == result.best.keep
    assert np.array_equal(alloc.keep, interpolate(allocate(setting[0], "erk", 0.9),
                                                  allocate(setting[0], "lamp", 0.9),
                                                  result.t).keep)
    assert 1 <= result.evaluations <= SMALL["grid"] + 2 * SMALL["refine"]


def test_the_choice_is_the_best_evaluated_point_by_kl(searched):
    result, _, seen = searched
    kls = [p.kl for p in result.points]
    assert result.best.kl == min(kls)
    assert result.t == min((p for p in result.points), key=lambda p: (p.kl, -p.agreement, p.t)).t
    # The grid's ends are evaluated: the search has seen the ERK and LAMP pipelines.
    assert {0.0, 1.0} <= {p.t for p in result.points}
    assert seen == [p.t for p in result.points if not p.reused]


def test_the_returned_model_is_the_choice_and_its_scores_are_reproduced(searched, setting):
    dense, _, scoring = setting
    result = searched[0]
    s = label_free_scores(predict_logits(result.model, scoring), predict_logits(dense, scoring))
    assert s == {"agreement": result.best.agreement, "kl": result.best.kl}
    kept = sum(int(torch.count_nonzero(m.weight)) for m in result.model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert kept <= result.allocation.keep_total  # a kept weight may itself be 0


def test_agreement_criterion_picks_the_highest_agreement_and_is_the_default(setting):
    dense, calib, scoring = setting
    r = search_allocation(dense, 0.9, calib, scoring, criterion="agreement", grid=2, refine=0,
                          keep_model=False)
    assert r.model is None and r.criterion == "agreement"
    assert r.best.agreement == max(p.agreement for p in r.points + r.fixed)
    default = search_allocation(dense, 0.9, calib, scoring, grid=2, refine=0, keep_model=False)
    assert default.criterion == "agreement"
    assert [(p.method, p.keep, p.agreement, p.kl) for p in default.points] == \
        [(p.method, p.keep, p.agreement, p.kl) for p in r.points]


def test_dense_model_is_unchanged(searched, setting):
    dense = setting[0]
    _, before, _ = searched
    after = dense.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert searched[0].model is not dense


def test_search_is_deterministic(searched, setting):
    dense, calib, scoring = setting
    again = search_allocation(dense, 0.9, calib, scoring, anchors=PAIR, keep_model=False,
                              **SMALL)
    first = searched[0]
    assert again.t == first.t
    assert np.array_equal(again.allocation.keep, first.allocation.keep)
    assert [(p.t, p.keep, p.kl, p.agreement) for p in again.points] == \
        [(p.t, p.keep, p.kl, p.agreement) for p in first.points]


def test_no_label_is_read(searched):
    """The module fixture ran the whole search with every label source raising; it finished
    and evaluated points, so no label reached it."""
    assert searched[0].evaluations >= 2


# ----------------------------------------------------------------------------- anchors="auto"

def _kl_rank(p):
    return (p.kl, -p.agreement)


def test_auto_evaluates_every_candidate_as_the_fixed_pipeline(auto_searched, setting):
    """The candidates are the fixed allocations themselves, each pruned and repaired as a fixed
    pipeline would be: counts equal ``allocate``'s and scores are reproduced independently."""
    from sparse_repair.pruning import prune_
    from sparse_repair.repair import repair

    dense, calib, scoring = setting
    result = auto_searched[0]
    assert [p.method for p in result.fixed] == list(CANDIDATES)
    assert all(p.t is None for p in result.fixed)
    dense_logits = predict_logits(dense, scoring)
    for p in result.fixed:
        alloc = allocate(dense, p.method, 0.9)
        assert p.keep == alloc.keep.tolist(), p.method
        model = copy.deepcopy(dense)
        prune_(model, alloc)
        repair(model, "bn_recal", calib, dense=dense)
        s = label_free_scores(predict_logits(model, scoring), dense_logits)
        assert s == {"agreement": p.agreement, "kl": p.kl}, p.method


def test_auto_is_never_worse_by_the_criterion_than_any_fixed_candidate(auto_searched):
    result = auto_searched[0]
    assert len(result.fixed) == len(CANDIDATES)
    for p in result.fixed:
        assert _kl_rank(result.best) <= _kl_rank(p), p.method
    # ... and it is the best point evaluated at all, family and candidates together.
    assert _kl_rank(result.best) == min(_kl_rank(p) for p in result.points + result.fixed)
    alloc = result.allocation
    assert alloc.keep_total == _target_keep(alloc, 0.9)
    assert (alloc.keep >= 0).all() and (alloc.keep <= alloc.sizes).all()
    assert alloc.keep.tolist() == result.best.keep


def test_auto_anchors_are_the_two_best_candidates_and_the_family_ends(auto_searched, setting):
    result, _, seen = auto_searched
    ranked = sorted(range(len(result.fixed)),
                    key=lambda i: (*_kl_rank(result.fixed[i]), i))
    assert result.fixed[ranked[0]].keep != result.fixed[ranked[1]].keep  # this setting
    assert result.anchors == (CANDIDATES[ranked[0]], CANDIDATES[ranked[1]])
    assert result.allocation.method.startswith(f"search({result.anchors[0]},{result.anchors[1]},")
    # The family's ends are those two evaluations, reused (no second repair), scores included.
    for t, name in ((0.0, result.anchors[0]), (1.0, result.anchors[1])):
        end = next(p for p in result.points if p.t == t)
        fixed = next(p for p in result.fixed if p.method == name)
        assert end.reused and (end.keep, end.kl, end.agreement) == \
            (fixed.keep, fixed.kl, fixed.agreement)
    # Interior points are the interpolation between the chosen anchors.
    a, b = (allocate(setting[0], n, 0.9) for n in result.anchors)
    for p in result.points:
        assert p.keep == interpolate(a, b, p.t).keep.tolist()
    new = [p for p in result.fixed + result.points if not p.reused]
    assert result.evaluations == len(new) == len(seen)
    assert len(CANDIDATES) <= result.evaluations <= \
        len(CANDIDATES) + SMALL["grid"] + 2 * SMALL["refine"] - 2
    assert seen == [(p.method, p.t) for p in new]


def test_auto_pairs_two_different_allocations(setting, monkeypatch):
    """A candidate with the same counts as a better one is reused (not repaired again) and is
    skipped as the second anchor: the family runs between different allocations."""
    dense, calib, scoring = setting
    real = search_mod.allocate

    def clone_lamp(model, method, *args, **kwargs):  # "uniform" becomes a copy of LAMP
        return real(model, "lamp" if method == "uniform" else method, *args, **kwargs)

    monkeypatch.setattr(search_mod, "allocate", clone_lamp)
    r = search_allocation(dense, 0.9, calib, scoring, candidates=("lamp", "uniform", "erk"),
                          grid=2, refine=0, keep_model=False)
    lamp, twin, erk = r.fixed
    assert twin.reused and not lamp.reused and (twin.kl, twin.keep) == (lamp.kl, lamp.keep)
    # LAMP ranks first here (by either criterion), so its twin ranks second and the rule is
    # exercised.
    assert r.anchors == ("lamp", "erk")  # never ("lamp", "uniform"): same counts
    assert r.evaluations == 2


def test_auto_returns_the_choice_model_and_leaves_the_dense_model(auto_searched, setting):
    dense, _, scoring = setting
    result, before, _ = auto_searched
    s = label_free_scores(predict_logits(result.model, scoring), predict_logits(dense, scoring))
    assert s == {"agreement": result.best.agreement, "kl": result.best.kl}
    after = dense.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_auto_is_deterministic(auto_searched, setting):
    dense, calib, scoring = setting
    again = search_allocation(dense, 0.9, calib, scoring, keep_model=False, **SMALL)
    first = auto_searched[0]
    assert (again.anchors, again.t) == (first.anchors, first.t)
    assert np.array_equal(again.allocation.keep, first.allocation.keep)
    key = [(p.method, p.t, p.keep, p.kl, p.agreement, p.reused)
           for p in first.fixed + first.points]
    assert [(p.method, p.t, p.keep, p.kl, p.agreement, p.reused)
            for p in again.fixed + again.points] == key


def test_auto_reads_no_label(auto_searched):
    """The auto fixture ran the whole search, candidates included, with every label source
    raising (test_the_label_guard_itself_fires shows the guard is live)."""
    assert auto_searched[0].evaluations >= len(CANDIDATES)


# ----------------------------------------------------------------------------- layer moves

@pytest.fixture(scope="module")
def moved(setting):
    """anchors="auto" plus 2 sweeps of layer moves at 0.9, stem conv excluded, every label
    source refusing; the dense state before it."""
    dense, calib, scoring = setting
    before = copy.deepcopy(dense.state_dict())
    with pytest.MonkeyPatch.context() as mp:
        _no_labels(mp)
        result = search_allocation(dense, 0.9, calib, scoring, layer_sweeps=2,
                                   exclude=[EXCLUDED], **SMALL)
    return result, before


EXCLUDED = "conv1"


def test_layer_moves_keep_the_allocation_exact_and_excluded_layers_dense(moved, setting):
    result = moved[0]
    alloc = result.allocation
    i = alloc.names.index(EXCLUDED)
    assert alloc.keep_total == _target_keep(alloc, 0.9)
    for p in [*result.proposals, *result.moves]:
        keep = np.array(p.keep)
        assert keep.sum() == alloc.keep_total and (keep >= 0).all()
        assert (keep <= alloc.sizes).all() and keep[i] == alloc.sizes[i]
    assert alloc.keep.tolist() == result.best.keep


def test_layer_moves_only_accept_strict_improvements_by_the_criterion(moved):
    """Each accepted move is the best proposal of its sweep and strictly lowers KL (or ties KL
    and raises agreement) from the point before it, starting at the family's choice; so the
    choice is never worse by the criterion than the family's or any candidate's."""
    result = moved[0]
    family = min(result.points, key=_kl_rank)
    chain = [family, *result.moves]
    assert all(_kl_rank(b) < _kl_rank(a) for a, b in zip(chain, chain[1:]))
    assert _kl_rank(result.best) <= min(map(_kl_rank, [*result.fixed, *result.points]))
    assert all(_kl_rank(result.best) <= _kl_rank(p) for p in result.proposals)
    assert result.t == family.t
    assert result.moves, "no move accepted in this setting: the checks above prove nothing"
    n = len(result.moves)
    assert result.allocation.method.endswith(f"+{n} layer move{'s' * (n != 1)}")
    free = len(result.allocation.names) - 1
    assert len(result.proposals) <= 2 * 2 * free


def test_layer_moves_return_the_choice_model_and_leave_the_dense_model(moved, setting):
    dense, _, scoring = setting
    result, before = moved
    s = label_free_scores(predict_logits(result.model, scoring), predict_logits(dense, scoring))
    assert s == {"agreement": result.best.agreement, "kl": result.best.kl}
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


def test_layer_moves_are_deterministic_and_off_by_default(moved, setting, auto_searched):
    dense, calib, scoring = setting
    again = search_allocation(dense, 0.9, calib, scoring, layer_sweeps=2, exclude=[EXCLUDED],
                              keep_model=False, **SMALL)
    first = moved[0]
    assert [(p.method, p.keep, p.kl) for p in again.proposals] == \
        [(p.method, p.keep, p.kl) for p in first.proposals]
    assert np.array_equal(again.allocation.keep, first.allocation.keep)
    assert auto_searched[0].moves == [] and auto_searched[0].proposals == []


def test_layer_move_numbers_may_be_any_integer_and_real_type(moved, setting):
    """numpy integers count as ints and numpy floats (float32 included) or Fractions as
    numbers, as for sparsity and min_keep: the same search as with Python's int and float."""
    from fractions import Fraction

    dense, calib, scoring = setting
    first = moved[0]
    for sweeps, factor in ((np.int64(2), np.float32(2.0)), (np.int8(2), Fraction(2))):
        again = search_allocation(dense, 0.9, calib, scoring, layer_sweeps=sweeps,
                                  move_factor=factor, exclude=[EXCLUDED], keep_model=False,
                                  grid=np.int64(SMALL["grid"]), refine=np.int32(SMALL["refine"]),
                                  criterion="kl")
        assert [(p.method, p.keep, p.kl) for p in again.proposals] == \
            [(p.method, p.keep, p.kl) for p in first.proposals]
        assert np.array_equal(again.allocation.keep, first.allocation.keep)


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM (POSIX)")
def test_a_huge_layer_sweeps_stops_when_nothing_can_move(setting):
    """layer_sweeps is an upper bound: once the factor's square roots reach 1.0 in float no
    proposal is left, and the search returns rather than run the remaining sweeps empty
    (10**18 of them would take years; an alarm fails the test instead of hanging it). At
    sparsity 0 every layer is dense, so every proposal is skipped."""
    dense, calib, scoring = setting

    def too_long(*_):
        raise AssertionError("the sweeps go on after nothing can move")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, 60.0)  # the search takes well under a second
    try:
        r = search_allocation(dense, 0.0, calib, scoring, layer_sweeps=10**18,
                              keep_model=False, grid=2, refine=0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)
    assert r.proposals == [] and r.moves == []
    assert np.array_equal(r.allocation.keep, r.allocation.sizes)


def test_a_saved_result_says_how_it_was_produced(moved):
    d = json.loads(json.dumps(moved[0].to_dict()))
    assert d["settings"] == {"sparsity": 0.9, "candidates": list(CANDIDATES),
                             "exclude": [EXCLUDED], "min_keep": 0, "grid": SMALL["grid"],
                             "refine": SMALL["refine"], "layer_sweeps": 2, "move_factor": 2.0}
    assert d["criterion"] == SMALL["criterion"]
    assert [m["keep"] for m in d["moves"]] == [m.keep for m in moved[0].moves]
    assert [ly["keep"] for ly in d["allocation"]["layers"]] == moved[0].allocation.keep.tolist()


def test_layer_moves_read_no_label(moved):
    """The fixture ran the moves with every label source raising."""
    assert moved[0].proposals, "no layer move was evaluated: the test would prove nothing"


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def no_work(monkeypatch):
    """Pruning or repairing raises: an error must come from the checks before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the input was refused")
    monkeypatch.setattr(search_mod, "prune_", refuse)
    monkeypatch.setattr(search_mod, "run_repair", refuse)
    monkeypatch.setattr(search_mod, "allocate", refuse)


@pytest.mark.parametrize("change, error, match", [
    ({"sparsity": 1.0}, ValueError, "sparsity"),
    ({"sparsity": -0.1}, ValueError, "sparsity"),
    ({"repair": "bn_recall"}, ValueError, "unknown repair method 'bn_recall'"),
    ({"repair_options": {"shrinkag": "x"}, "repair": "asr"}, TypeError, "shrinkag"),
    ({"anchors": ("erk", "lampp")}, ValueError, r"unknown allocator\(s\) \['lampp'\]"),
    ({"anchors": ("erk", "erk")}, ValueError, "two different allocators"),
    ({"anchors": "erk"}, ValueError, "'auto' or two different allocators, got 'erk'"),
    ({"candidates": ("erk",)}, ValueError, "two or more different allocators"),
    ({"candidates": ("erk", "erk")}, ValueError, "two or more different allocators"),
    ({"candidates": ("erk", "lamq")}, ValueError, r"\['lamq'\] in candidates"),
    ({"anchors": PAIR, "candidates": CANDIDATES}, ValueError, "pass candidates=None"),
    ({"criterion": "accuracy"}, ValueError, "unknown criterion 'accuracy'"),
    ({"grid": 1}, ValueError, "grid must be an int >= 2"),
    ({"layer_sweeps": -1}, ValueError, "layer_sweeps must be an int >= 0"),
    ({"layer_sweeps": 1.5}, ValueError, "layer_sweeps must be an int >= 0"),
    ({"move_factor": 1.0}, ValueError, "move_factor must be a finite number > 1"),
    ({"move_factor": float("nan")}, ValueError, "move_factor must be a finite number > 1"),
    ({"move_factor": True}, ValueError, "move_factor must be a finite number > 1"),
    ({"move_factor": "2"}, ValueError, "move_factor must be a finite number > 1"),
    ({"move_factor": 10**400}, ValueError, "move_factor must be a finite number > 1"),
    ({"layer_sweeps": True}, ValueError, "layer_sweeps must be an int >= 0"),
    ({"calibration": torch.zeros(0, 3, 8, 8)}, ValueError, "empty"),
    ({"scoring": torch.zeros(0, 3, 8, 8)}, ValueError, "^scoring set is empty"),
    ({"scoring": "overlap"}, ValueError, "also calibration images.*scoring_set"),
    ({"scoring": torch.zeros(4, 3, 16, 16)}, ValueError, "draw both from one data set"),
    ({"calibration": "labeled"}, TypeError, "label-free"),
    ({"calibration": "huge"}, ValueError, "calibration images overflow the model's dtype"),
    ({"scoring": "huge"}, ValueError, "scoring images overflow the model's dtype"),
    ({"calibration": "gray", "scoring": "gray"}, ValueError,
     "images have 1 channel but the dense model's first layer 'conv1' .* expects 3"),
])
def test_bad_input_is_refused_before_any_work(setting, no_work, change, error, match):
    dense, calib, scoring = setting
    kw = {"sparsity": 0.9, "calibration": calib, "scoring": scoring, **change}
    for key, images in (("calibration", calib), ("scoring", scoring)):
        if kw[key] == "huge":  # finite in float64, Inf in the model's float32
            kw[key] = images.double() * 1e300
        if kw[key] == "gray":  # one channel in both sets: they agree, the model does not
            kw[key] = images[:, :1].clone()
    if isinstance(kw["scoring"], str):  # "overlap": one calibration image among them
        kw["scoring"] = torch.cat([scoring[:5], calib[3:4]])
    if isinstance(kw["calibration"], str):  # "labeled": what a labeled loader yields
        kw["calibration"] = (calib, torch.zeros(len(calib), dtype=torch.long))
    with pytest.raises(error, match=match):
        search_allocation(dense, kw.pop("sparsity"), kw.pop("calibration"), kw.pop("scoring"),
                          **kw)


def test_bfloat16_images_are_searched(setting):
    dense, calib, scoring = setting
    r = search_allocation(dense, 0.9, calib.bfloat16(), scoring.bfloat16(), keep_model=False,
                          grid=2, refine=0)
    assert r.allocation.keep_total == _target_keep(r.allocation, 0.9)


def test_the_label_guard_itself_fires(setting, monkeypatch):
    """The guard of test_no_label_is_read is live: a labeled evaluation under it raises."""
    from sparse_repair.evaluate import evaluate

    _no_labels(monkeypatch)
    with pytest.raises(AssertionError, match="label source was read"):
        evaluate(setting[0], "digits", 50)
    with pytest.raises(AssertionError, match="label source was read"):
        data_pkg.get_spec("digits").source("train", None)


def test_the_measurement_names_the_fixed_allocation_its_criterion_ranks_first():
    """scripts/search_measure.py's "fixed by <criterion>" column: the record's criterion ranks
    the fixed allocations (ties: the other criterion, then the earlier one), as the search
    ranks its candidates; here KL and agreement disagree, so a KL-only choice would show."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("search_measure",
                                                  ROOT / "scripts" / "search_measure.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = {"erk": {"kl": 2.2, "agreement": 47.0}, "lamp": {"kl": 2.0, "agreement": 45.0},
            "uniform": {"kl": 2.1, "agreement": 47.0}}
    assert script.fixed_choice(rows, "kl") == "lamp"
    assert script.fixed_choice(rows, "agreement") == "uniform"  # tie at 47: lower KL
    rows["uniform"]["kl"] = 2.2
    assert script.fixed_choice(rows, "agreement") == "erk"  # full tie: the earlier one
