"""Allocator specification: exact global counts, bounds, exclusions, determinism, and the
defining property of each method, checked on generated layer lists; the exact decimal counting
rule, tied layers, the per-layer floor ``min_keep`` and layer-collapse reporting (issue #18)."""

from __future__ import annotations

import contextlib
import math
import warnings
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from sparse_repair import allocation
from sparse_repair.allocation import (
    LayerCollapseWarning,
    LayerSpec,
    allocate,
    lamp_scores,
    list_allocators,
    prune_count,
    topk_mask,
)

SPARSITIES = [0.0, 0.5, 0.9, 0.955, 0.99, 0.999]
# Generated layer lists collapse layers often; the tests that are about collapse record the
# warning themselves (catch_warnings / pytest.warns take precedence over this filter).
pytestmark = pytest.mark.filterwarnings("ignore::sparse_repair.allocation.LayerCollapseWarning")


@st.composite
def layer_shapes(draw):
    kind = draw(st.sampled_from(["conv", "1x1", "depthwise", "grouped", "linear"]))
    side = st.integers(1, 64)
    k = draw(st.sampled_from([1, 3, 5]))
    if kind == "conv":
        return (draw(side), draw(side), k, k)
    if kind == "1x1":
        return (draw(side), draw(side), 1, 1)
    if kind == "depthwise":
        return (draw(side), 1, k, k)
    if kind == "grouped":
        groups = draw(st.sampled_from([2, 4]))
        return (groups * draw(st.integers(1, 16)), draw(st.integers(1, 16)), k, k)
    return (draw(side), draw(side))


@st.composite
def layer_lists(draw, max_layers=12):
    shapes = draw(st.lists(layer_shapes(), min_size=1, max_size=max_layers))
    seed = draw(st.integers(0, 2**16))
    integer = draw(st.booleans())  # integer weights create many exact ties
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, shape in enumerate(shapes):
        w = (torch.randint(-20, 21, shape, generator=g).float() if integer
             else torch.randn(shape, generator=g))
        layers.append(LayerSpec(f"l{i}", shape, w))
    return layers


def specs(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [LayerSpec(f"l{i}", s, torch.randn(s, generator=g)) for i, s in enumerate(shapes)]


EXAMPLES = [
    specs((1, 1)),                                   # a one-weight layer
    specs((16, 3, 3, 3), (64, 16, 3, 3), (1000, 64)),  # huge classifier
    specs((32, 1, 3, 3), (32, 1, 3, 3), (32, 1, 3, 3), (64, 32, 1, 1)),  # depthwise stack
]


def _feasible(layers, method, sparsity):
    total = sum(layer.size for layer in layers)
    keep = total - prune_count(sparsity, total)
    if method == "lamp" and keep < len(layers):
        return False
    if method == "uniform_plus":
        if len(layers) == 1:  # one layer is the last layer only: it must keep >= 20%
            return not keep / layers[0].size < 0.2
        return keep >= layers[0].size + math.ceil(0.2 * layers[-1].size)
    return True


@pytest.mark.parametrize("method", list_allocators())
def test_every_allocator_states_its_rule_and_source(method):
    """help(ALLOCATORS[name]) gives the rule; a published rule names its paper (year)."""
    doc = allocation.ALLOCATORS[method].__doc__ or ""
    assert len(doc.split()) >= 5, f"{method} has no docstring"
    if method != "uniform":  # uniform is the definition itself, not a published rule
        assert any(str(y) in doc for y in range(2015, 2027)), f"{method} cites no source"


@pytest.mark.parametrize("method", list_allocators())
@given(layers=layer_lists(), sparsity=st.sampled_from(SPARSITIES) | st.floats(0, 0.999))
@example(layers=EXAMPLES[0], sparsity=0.0)
@example(layers=EXAMPLES[1], sparsity=0.99)
@example(layers=EXAMPLES[2], sparsity=0.955)
@example(layers=EXAMPLES[1], sparsity=0.999)
@example(layers=EXAMPLES[2], sparsity=0.9)
def test_exact_total_and_bounds(method, layers, sparsity):
    if not _feasible(layers, method, sparsity):
        with pytest.raises(ValueError):
            allocate(layers, method, sparsity)
        return
    a = allocate(layers, method, sparsity)
    assert a.keep.dtype == np.int64, "keep counts must be int64, never float"
    assert a.prune_total == prune_count(sparsity, a.total), \
        f"{method}: pruned {a.prune_total}, target round(S*N) = {prune_count(sparsity, a.total)}"
    assert (a.keep >= 0).all() and (a.keep <= a.sizes).all(), f"{method}: keep outside [0, size]"


@pytest.mark.parametrize("method", list_allocators())
@given(layers=layer_lists(max_layers=6).filter(lambda ls: len(ls) >= 2),
       sparsity=st.sampled_from([0.5, 0.8, 0.9]), data=st.data())
def test_excluded_layers_stay_dense(method, layers, sparsity, data):
    name = data.draw(st.sampled_from([layer.name for layer in layers[1:-1]] or [layers[0].name]))
    total = sum(layer.size for layer in layers)
    excluded_size = next(layer.size for layer in layers if layer.name == name)
    try:
        a = allocate(layers, method, sparsity, exclude=[name])
    except ValueError:
        # only acceptable when the exclusion (or method constraint) makes the target unreachable
        rest_min = len(layers) - 1 if method == "lamp" else 0
        assert excluded_size + rest_min > total - prune_count(sparsity, total) or \
            not _feasible(layers, method, sparsity) or method == "uniform_plus"
        return
    assert a.keep_of(name) == excluded_size, f"{method}: excluded layer {name} was pruned"
    assert a.prune_total == prune_count(sparsity, total)


@pytest.mark.parametrize("method", list_allocators())
@given(layers=layer_lists(), sparsity=st.sampled_from([0.5, 0.9, 0.99]))
def test_deterministic(method, layers, sparsity):
    if not _feasible(layers, method, sparsity):
        return
    a = allocate(layers, method, sparsity)
    b = allocate([LayerSpec(x.name, x.shape, x.weight.clone()) for x in layers], method, sparsity)
    assert np.array_equal(a.keep, b.keep), f"{method}: two calls gave different keep counts"


@given(layers=layer_lists(), sparsity=st.sampled_from([0.5, 0.9, 0.99, 0.999]))
def test_lamp_keeps_one_weight_per_layer(layers, sparsity):
    if not _feasible(layers, "lamp", sparsity):
        return
    assert (allocate(layers, "lamp", sparsity).keep >= 1).all(), "lamp emptied a layer"


@given(layers=layer_lists(max_layers=6), sparsity=st.sampled_from([0.5, 0.9]), data=st.data())
def test_lamp_invariant_to_scaling_one_layer(layers, sparsity, data):
    # A power of two keeps the float arithmetic exact, so the invariance must hold bit for bit.
    i = data.draw(st.integers(0, len(layers) - 1))
    scale = data.draw(st.sampled_from([0.25, 2.0, 1024.0]))
    scaled = [LayerSpec(x.name, x.shape, x.weight * (scale if j == i else 1.0))
              for j, x in enumerate(layers)]
    if not _feasible(layers, "lamp", sparsity):
        return
    assert np.array_equal(allocate(layers, "lamp", sparsity).keep,
                          allocate(scaled, "lamp", sparsity).keep), \
        "LAMP scores are scale-free per layer, so scaling one layer must not move counts"


def _brute_force_keep(layers, keep_total, score, min_one, min_keep=0):
    entries = []  # (score, layer index, flat index)
    for li, layer in enumerate(layers):
        for fi, s in enumerate(score(layer.weight.flatten().tolist())):
            entries.append((s, li, fi))
    forced = set()
    floor = max(min_keep, 1 if min_one else 0)
    for li in range(len(layers)):  # each layer's top-`floor` scores first, ties by index
        mine = sorted((e for e in entries if e[1] == li), key=lambda e: (-e[0], e[2]))
        forced.update(mine[:floor])
    rest = sorted((e for e in entries if e not in forced), key=lambda e: (-e[0], e[1], e[2]))
    kept = list(forced) + rest[: keep_total - len(forced)]
    counts = np.zeros(len(layers), dtype=np.int64)
    for _, li, _ in kept:
        counts[li] += 1
    return counts


def _lamp_exact(ws):
    sq = [Fraction(int(w)) ** 2 for w in ws]
    return [s / sum(t for t in sq if t >= s) if s > 0 else Fraction(0) for s in sq]


small_integer_layers = st.lists(
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)), min_size=1, max_size=5
).flatmap(lambda shapes: st.tuples(st.just(shapes), st.integers(0, 1000)))


@given(case=small_integer_layers, sparsity=st.sampled_from([0.3, 0.5, 0.8, 0.9]),
       min_keep=st.sampled_from([0, 0, 1, 2]))
def test_lamp_and_global_magnitude_match_brute_force(case, sparsity, min_keep):
    shapes, seed = case
    g = torch.Generator().manual_seed(seed)
    layers = [LayerSpec(f"l{i}", (o, c, k, k), torch.randint(-6, 7, (o, c, k, k),
              generator=g).float()) for i, (o, c, k) in enumerate(shapes)]
    total = sum(x.size for x in layers)
    keep_total = total - prune_count(sparsity, total)
    for method, score, min_one in (("global_magnitude", lambda ws: [abs(w) for w in ws], False),
                                   ("lamp", _lamp_exact, True)):
        floor = sum(min(max(min_keep, int(min_one)), x.size) for x in layers)
        if floor > keep_total:
            with pytest.raises(ValueError, match="min_keep|lamp keeps"):
                allocate(layers, method, sparsity, min_keep=min_keep)
            continue
        got = allocate(layers, method, sparsity, min_keep=min_keep).keep
        want = _brute_force_keep(layers, keep_total, score, min_one, min_keep)
        assert np.array_equal(got, want), f"{method} min_keep={min_keep}: {got} != {want}"
        if method == "lamp":  # again with every layer scored only at its top first
            with _lamp_partial_everywhere():
                got = allocate(layers, method, sparsity, min_keep=min_keep).keep
            assert np.array_equal(got, want), f"partial lamp {got} != brute force {want}"


@contextlib.contextmanager
def _lamp_partial_everywhere():
    """Run LAMP's partial scoring (large layers scored at their top first) on every layer."""
    saved = allocation.LAMP_PARTIAL_ABOVE, allocation.LAMP_PARTIAL_SLACK
    allocation.LAMP_PARTIAL_ABOVE, allocation.LAMP_PARTIAL_SLACK = 0, 0
    try:
        yield
    finally:
        allocation.LAMP_PARTIAL_ABOVE, allocation.LAMP_PARTIAL_SLACK = saved


@given(layers=layer_lists(max_layers=6), sparsity=st.sampled_from([0.3, 0.5, 0.9, 0.99]),
       min_keep=st.sampled_from([0, 1, 4]))
def test_lamp_partial_scoring_equals_full(layers, sparsity, min_keep):
    try:
        full = allocate(layers, "lamp", sparsity, min_keep=min_keep).keep
    except ValueError:
        return
    with _lamp_partial_everywhere():
        assert np.array_equal(allocate(layers, "lamp", sparsity, min_keep=min_keep).keep, full)


@given(layers=layer_lists(), sparsity=st.sampled_from([0.5, 0.9, 0.955, 0.99]))
def test_erk_densities_follow_raw_scores(layers, sparsity):
    a = allocate(layers, "erk", sparsity)
    raw = [sum(x.shape) / math.prod(x.shape) for x in layers]
    dens = a.keep / a.sizes
    free = [i for i in range(len(layers)) if a.keep[i] < a.sizes[i]]
    for i in free:
        for j in free:
            if raw[i] > raw[j]:
                slack = 1.0 / a.sizes[i] + 1.0 / a.sizes[j]  # one weight of rounding each
                assert dens[i] >= dens[j] - slack, \
                    f"erk: layer {i} (score {raw[i]:.4f}) got density {dens[i]:.4f} < " \
                    f"layer {j} (score {raw[j]:.4f}) at {dens[j]:.4f}"


def test_lamp_scores_share_denominator_on_ties():
    s = lamp_scores(torch.tensor([1.0, 2.0, 2.0, 3.0]))
    assert torch.allclose(s, torch.tensor([1 / 18, 4 / 17, 4 / 17, 9 / 9], dtype=s.dtype))


def test_topk_mask_breaks_ties_by_index():
    mask = topk_mask(torch.tensor([1.0, 5.0, 5.0, 5.0, 0.0]), 2)
    assert mask.tolist() == [False, True, True, False, False]


@pytest.mark.parametrize("bad", [1.2, -0.1, 1.0, float("nan"), float("inf"), 95])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(ValueError, match="sparsity"):
        allocate(specs((4, 4)), "erk", bad)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="erk.*lamp"):
        allocate(specs((4, 4)), "magic", 0.5)


def test_no_prunable_layers():
    with pytest.raises(ValueError, match="no prunable layers"):
        allocate(torch.nn.Sequential(torch.nn.ReLU()), "erk", 0.5)


def test_unreachable_exclusion():
    with pytest.raises(ValueError, match="exclude fewer"):
        allocate(specs((100, 100), (2, 2)), "erk", 0.9, exclude=["l0"])


def test_nan_weights_refused():
    layers = specs((4, 4))
    layers[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        allocate(layers, "lamp", 0.5)


# ----------------------------------------------------------------------------- exact decimal rule

def _half_up(sparsity, total):
    """The documented rule, computed independently: ROUND_HALF_UP(Decimal(str(S)) * N)."""
    return int((Decimal(str(sparsity)) * total).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@pytest.mark.parametrize("method", list_allocators())
def test_linear_9x5_at_0_7_prunes_32(method):
    # 0.7 * 45 is 31.499999999999996 in binary floating point (the old count, 31); the exact
    # product is 31.5, which rounds half up to 32.
    a = allocate(torch.nn.Linear(9, 5), method, 0.7)
    assert a.total == 45 and a.prune_total == 32, f"{method}: pruned {a.prune_total}, want 32"


@pytest.mark.parametrize("method", list_allocators())
def test_0_955_of_100_prunes_96(method):
    # 0.955 * 100 is 95.49999999999999 in floating point (old count 95); exactly 95.5 -> 96.
    assert prune_count(0.955, 100) == 96
    layers = specs((2, 1), (9, 10), (8, 1))  # N = 100; feasible for uniform_plus and lamp
    assert allocate(layers, method, 0.955).prune_total == 96


@pytest.mark.parametrize("sparsity", [0.7, Fraction(7, 10), Decimal("0.7"), np.float64(0.7),
                                      np.float32(0.7)])
def test_sparsity_types_are_read_as_written(sparsity):
    assert prune_count(sparsity, 45) == 32
    assert allocate(specs((5, 9)), "erk", sparsity).prune_total == 32


decimal_sparsities = st.integers(0, 9999).map(lambda k: k / 10000)  # every S with <= 4 decimals


@pytest.mark.parametrize("method", list_allocators())
@given(layers=layer_lists(), sparsity=decimal_sparsities)
@example(layers=specs((5, 9)), sparsity=0.7)
@example(layers=specs((10, 10)), sparsity=0.955)
@example(layers=specs((2, 1), (9, 10), (8, 1)), sparsity=0.955)
def test_pruned_count_is_exact_decimal_half_up(method, layers, sparsity):
    total = sum(x.size for x in layers)
    if not _feasible(layers, method, sparsity):
        return
    a = allocate(layers, method, sparsity)
    assert a.prune_total == _half_up(sparsity, total), \
        f"{method}: S={sparsity} N={total} pruned {a.prune_total}, " \
        f"ROUND_HALF_UP(S*N) = {_half_up(sparsity, total)}"


# ----------------------------------------------------------------------------- tied layers

def test_tied_layer_is_counted_once_and_excluded_whole():
    w = torch.randn(8, 8)
    layers = [LayerSpec("enc", (8, 8), w, aliases=("dec",)), LayerSpec("mid", (8, 4), w[:, :4])]
    a = allocate(layers, "erk", 0.5)
    assert a.total == 96 and a.prune_total == 48 and a.aliases == {"enc": ("dec",)}
    assert a.keep_of("dec") == a.keep_of("enc")
    with pytest.raises(ValueError, match="tied.*Exclude all of them or none"):
        allocate(layers, "erk", 0.5, exclude=["dec"])
    both = allocate(layers, "erk", 0.3, exclude=["enc", "dec"])
    assert both.keep_of("enc") == 64 and both.prune_total == prune_count(0.3, 96)


def test_duplicate_layer_names_are_refused():
    with pytest.raises(ValueError, match="appears twice"):
        allocate([LayerSpec("a", (2, 2), torch.ones(2, 2)),
                  LayerSpec("b", (2, 2), torch.ones(2, 2), aliases=("a",))], "erk", 0.5)


# ----------------------------------------------------------------------------- layer collapse

def _collapsing():
    """global_magnitude at 0.9 empties l1: its weights are 1000x smaller than the others'."""
    layers = specs((16, 8), (16, 16), (4, 16), (16, 4))
    return [LayerSpec(x.name, x.shape, x.weight * (1e-3 if x.name in ("l1", "l3") else 1.0))
            for x in layers]


def test_collapse_is_reported_once_per_call_naming_the_layers():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = allocate(_collapsing(), "global_magnitude", 0.9)
    collapse = [w for w in caught if issubclass(w.category, LayerCollapseWarning)]
    assert a.collapsed == ["l1", "l3"]
    assert len(collapse) == 1 and "l1, l3" in str(collapse[0].message)
    assert "min_keep" in str(collapse[0].message)
    d = a.to_dict()
    assert d["collapsed"] == ["l1", "l3"]
    assert [x["collapsed"] for x in d["layers"]] == [False, True, False, True]


def test_min_keep_prevents_collapse_and_keeps_the_total():
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerCollapseWarning)
        a = allocate(_collapsing(), "global_magnitude", 0.9, min_keep=3)
    assert a.collapsed == [] and a.keep_of("l1") == 3 and a.keep_of("l3") == 3
    assert a.prune_total == prune_count(0.9, a.total) and a.min_keep == 3


@pytest.mark.parametrize("method", list_allocators())
@given(layers=layer_lists(), sparsity=st.sampled_from([0.5, 0.9, 0.99, 0.999]),
       min_keep=st.integers(0, 6))
def test_min_keep_floor_exact_total_and_collapse_flag(method, layers, sparsity, min_keep):
    total = sum(x.size for x in layers)
    keep_total = total - prune_count(sparsity, total)
    floor = np.array([min(max(min_keep, 1 if method == "lamp" else 0), x.size) for x in layers])
    if not _feasible(layers, method, sparsity) or floor.sum() > keep_total:
        with pytest.raises(ValueError):
            allocate(layers, method, sparsity, min_keep=min_keep)
        return
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = allocate(layers, method, sparsity, min_keep=min_keep)
    except ValueError as e:  # the floors leave uniform_plus too little after its dense layer
        assert method == "uniform_plus" and "uniform_plus" in str(e)
        return
    assert a.prune_total == prune_count(sparsity, total)
    assert (a.keep >= floor).all(), f"{method}: keep {a.keep} below floor {floor}"
    empty = [x.name for x, k in zip(layers, a.keep) if k == 0]
    assert a.collapsed == empty
    warned = [w for w in caught if issubclass(w.category, LayerCollapseWarning)]
    assert len(warned) == (1 if empty else 0)
    if method == "uniform" and min_keep:
        # Layers above the floor keep one common density (rounding: one weight each).
        dens = [k / s for k, s, f in zip(a.keep, a.sizes, floor) if k > f]
        slack = max([2.0 / s for k, s, f in zip(a.keep, a.sizes, floor) if k > f] + [0])
        assert not dens or max(dens) - min(dens) <= slack + 1e-12


def test_min_keep_zero_changes_nothing():
    layers = _collapsing()
    for method in list_allocators():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LayerCollapseWarning)
            assert np.array_equal(allocate(layers, method, 0.5).keep,
                                  allocate(layers, method, 0.5, min_keep=0).keep)


@pytest.mark.parametrize(("bad", "error"), [(-1, ValueError), (1.5, TypeError),
                                            (True, TypeError), ("2", TypeError)])
def test_bad_min_keep_is_refused(bad, error):
    with pytest.raises(error, match="min_keep"):
        allocate(specs((4, 4)), "erk", 0.5, min_keep=bad)


def test_min_keep_over_budget_is_refused():
    # 4 layers x 3 = 12 > the 10 weights that 0.96 keeps of N = 256
    with pytest.raises(ValueError, match="min_keep=3 asks for 12"):
        allocate(specs((8, 8), (8, 8), (8, 8), (8, 8)), "global_magnitude", 0.96, min_keep=3)


# ----------------------------------------------------------------------------- densities_to_keep
# The exact-count step for densities computed outside the allocators (select/search.py).

@pytest.mark.parametrize("method", list_allocators())
@given(layers=layer_lists(), sparsity=st.sampled_from(SPARSITIES) | st.floats(0, 0.999),
       min_keep=st.sampled_from([0, 1, 3]))
def test_densities_to_keep_gives_an_exact_allocation_back_unchanged(method, layers, sparsity,
                                                                    min_keep):
    """keep / size of any allocation, fed back with its total and floors, returns its counts:
    what makes the ends of the searched family the anchors themselves."""
    try:
        a = allocate(layers, method, sparsity, min_keep=min_keep)
    except ValueError:
        return  # infeasible here (lamp's floor, uniform_plus): covered above
    floor = np.minimum(min_keep, a.sizes)
    if int(a.keep.sum()) > int(floor.sum()) and not (a.keep > 0).any():
        return
    got = allocation.densities_to_keep(a.keep / a.sizes, a.sizes, a.keep_total, floor)
    assert got.dtype == np.int64
    assert np.array_equal(got, a.keep)


@given(dens=st.lists(st.floats(0, 10), min_size=1, max_size=12),
       data=st.data())
def test_densities_to_keep_exact_sum_bounds_and_order(dens, data):
    n = len(dens)
    sizes = np.array(data.draw(st.lists(st.integers(1, 500), min_size=n, max_size=n)))
    floor = np.minimum(np.array(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))),
                       sizes)
    total = data.draw(st.integers(int(floor.sum()), int(sizes.sum())))
    d = np.array(dens)
    if total > floor.sum() and not (d > 0).any():
        with pytest.raises(ValueError, match="every density is 0"):
            allocation.densities_to_keep(d, sizes, total, floor)
        return
    keep = allocation.densities_to_keep(d, sizes, total, floor)
    assert int(keep.sum()) == total
    assert (keep >= floor).all() and (keep <= sizes).all()
    # Proportional: between layers above their floor and below their size, a higher density
    # never gets a lower one, up to one weight of rounding each.
    mid = [i for i in range(n) if floor[i] < keep[i] < sizes[i]]
    for i in mid:
        for j in mid:
            if d[i] > d[j]:
                assert keep[i] / sizes[i] >= keep[j] / sizes[j] - 1 / sizes[i] - 1 / sizes[j]


def test_densities_to_keep_caps_at_dense_and_rescales():
    # Densities 1 : 1 : 0.1 of sizes 10, 10, 100 with 30 to keep: eps = 30 / 30 = 1.
    assert allocation.densities_to_keep([1, 1, 0.1], [10, 10, 100], 30).tolist() == [10, 10, 10]
    # With 60 to keep eps = 2 would give the first two 20 of 10: capped, the rest re-solved.
    assert allocation.densities_to_keep([1, 1, 0.1], [10, 10, 100], 60).tolist() == [10, 10, 40]


@pytest.mark.parametrize("args, match", [
    (([0.5, -1], [10, 10], 5), "finite and >= 0"),
    (([0.5, float("nan")], [10, 10], 5), "finite and >= 0"),
    (([0.5], [10, 10], 5), "1-D arrays"),
    (([0.5, 0.5], [10, 0], 5), "sizes must be >= 1"),
    (([0.5, 0.5], [10, 10], 21), "outside"),
    (([0.0, 0.0], [10, 10], 5), "every density is 0"),
])
def test_densities_to_keep_refuses_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        allocation.densities_to_keep(*args)
