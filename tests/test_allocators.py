"""Allocator specification: exact global counts, bounds, exclusions, determinism, and the
defining property of each method, checked on generated layer lists."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from sparse_repair.allocation import (
    LayerSpec,
    allocate,
    lamp_scores,
    list_allocators,
    prune_count,
    topk_mask,
)

SPARSITIES = [0.0, 0.5, 0.9, 0.955, 0.99, 0.999]


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
        return keep >= layers[0].size + (math.ceil(0.2 * layers[-1].size) if len(layers) > 1
                                         else 0)
    return True


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


def _brute_force_keep(layers, keep_total, score, min_one):
    entries = []  # (score, layer index, flat index)
    for li, layer in enumerate(layers):
        for fi, s in enumerate(score(layer.weight.flatten().tolist())):
            entries.append((s, li, fi))
    forced = set()
    if min_one:
        for li in range(len(layers)):
            best = max((e for e in entries if e[1] == li), key=lambda e: (e[0], -e[2]))
            forced.add(best)
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


@given(case=small_integer_layers, sparsity=st.sampled_from([0.3, 0.5, 0.8, 0.9]))
def test_lamp_and_global_magnitude_match_brute_force(case, sparsity):
    shapes, seed = case
    g = torch.Generator().manual_seed(seed)
    layers = [LayerSpec(f"l{i}", (o, c, k, k), torch.randint(-6, 7, (o, c, k, k),
              generator=g).float()) for i, (o, c, k) in enumerate(shapes)]
    total = sum(x.size for x in layers)
    keep_total = total - prune_count(sparsity, total)
    got = allocate(layers, "global_magnitude", sparsity).keep
    want = _brute_force_keep(layers, keep_total, lambda ws: [abs(w) for w in ws], False)
    assert np.array_equal(got, want), f"global_magnitude {got} != brute force {want}"
    if keep_total >= len(layers):
        got = allocate(layers, "lamp", sparsity).keep
        want = _brute_force_keep(layers, keep_total, _lamp_exact, True)
        assert np.array_equal(got, want), f"lamp {got} != brute force {want}"


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


@pytest.mark.parametrize("bad", [1.2, -0.1, 1.0, float("nan"), 95])
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
