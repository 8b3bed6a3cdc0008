"""Exact sparsity allocation: spread a global sparsity over layers.

Pure functions on layer specs (name, weight shape, optional weight values); a model is accepted
only as a convenience and is read once into specs. Imports nothing else of the package.

Counting convention, used everywhere in the project (docs/allocation.md):
    N          = total weight count of all prunable layers (excluded layers included, kept
                 dense); a weight shared by several layers (tied) is counted once
    prune      = round_half_up(S * N), computed exactly on the decimal S as written
                 (S = global sparsity, the pruned fraction: 0.7 means 7/10, not the binary
                 double 0.6999999999999999556 that the literal 0.7 is stored as)
    keep_total = N - prune
Every method returns integer keep counts (int64) whose sum is exactly keep_total.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

import numpy as np
import torch
from torch import nn


class LayerCollapseWarning(UserWarning):
    """An allocation keeps zero weights in a layer (layer collapse: Lee et al., ICLR 2021;
    Tanaka et al., NeurIPS 2020). Filter it with ``warnings.simplefilter``, or prevent it with
    ``allocate(..., min_keep=1)``."""


@dataclass(frozen=True)
class LayerSpec:
    """One prunable layer: ``shape`` of its weight, the values (only score-based methods need
    them: lamp, global_magnitude) and ``aliases``, the other module names that share this very
    weight (tied weights; the weight is one layer, named by its first module)."""

    name: str
    shape: tuple[int, ...]
    weight: torch.Tensor | None = None
    aliases: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class Allocation:
    """Integer keep counts per layer, in layer order (``allocate`` builds it).

    ``sizes`` and ``keep`` are int64 arrays of shape (layers,); ``shapes`` the weight shapes;
    ``excluded`` the names asked to stay dense; ``aliases`` {layer: other module names} for
    tied weights only; ``min_keep`` the per-layer floor asked for.
    """

    method: str
    sparsity: float                    # requested global pruned fraction
    names: list[str]
    shapes: list[tuple[int, ...]]
    sizes: np.ndarray                  # int64 weights per layer
    keep: np.ndarray                   # int64 kept weights per layer
    excluded: tuple[str, ...] = field(default_factory=tuple)
    min_keep: int = 0                  # per-layer floor asked for (see ``allocate``)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # tied layers only

    @property
    def total(self) -> int:
        return int(self.sizes.sum())

    @property
    def keep_total(self) -> int:
        return int(self.keep.sum())

    @property
    def prune_total(self) -> int:
        return self.total - self.keep_total

    @property
    def achieved_sparsity(self) -> float:
        return self.prune_total / self.total

    @property
    def collapsed(self) -> list[str]:
        """Layers left with zero kept weights (their output is the bias alone), in layer order."""
        return [n for n, k, s in zip(self.names, self.keep, self.sizes) if k == 0 and s > 0]

    def keep_of(self, name: str) -> int:
        """Kept weights of layer ``name`` (a tied layer may be named by any of its modules)."""
        for i, n in enumerate(self.names):
            if name == n or name in self.aliases.get(n, ()):
                return int(self.keep[i])
        raise ValueError(f"{name!r} is not a layer of this allocation")

    def densities(self) -> dict[str, float]:
        return {n: float(k) / float(s) for n, k, s in zip(self.names, self.keep, self.sizes)}

    def to_dict(self) -> dict:
        return {
            "method": self.method, "sparsity": self.sparsity, "excluded": list(self.excluded),
            "min_keep": self.min_keep, "total": self.total, "keep_total": self.keep_total,
            "prune_total": self.prune_total, "collapsed": self.collapsed,
            "layers": [{"name": n, "shape": list(sh), "weights": int(s), "keep": int(k),
                        "collapsed": bool(k == 0 and s > 0),
                        "aliases": list(self.aliases.get(n, ()))}
                       for n, sh, s, k in zip(self.names, self.shapes, self.sizes, self.keep)],
        }


# ----------------------------------------------------------------------------- helpers

def exact_sparsity(sparsity: float | int | Fraction | Decimal) -> Fraction:
    """The sparsity as the user wrote it, as an exact fraction.

    A float is read from its shortest round-trip text (``str(0.7) == "0.7"``, the text the user
    typed or that Python prints), so 0.7 is exactly 7/10; int, Fraction and Decimal are exact
    already. Raises ValueError for NaN or infinity.
    """
    if isinstance(sparsity, (numbers.Rational, Decimal)):
        return Fraction(sparsity)
    return Fraction(str(sparsity))  # float or numpy floating: the decimal it prints as


def prune_count(sparsity: float | Fraction | Decimal, total: int) -> int:
    """Weights to prune: round(S * N) with halves rounded up, in exact rational arithmetic.

    ``S`` is taken as written (``exact_sparsity``): binary floating point would turn 0.7 * 45
    into 31.499999999999996 and round it down, where the rule says 31.5 -> 32. Python's round()
    is banker's rounding, so the rule is written out: floor(S * N + 1/2).
    """
    return math.floor(exact_sparsity(sparsity) * int(total) + Fraction(1, 2))


def check_sparsity(sparsity: float) -> float:
    """Validate a global sparsity; return it as a float. Any real number type is accepted
    (int, float, numpy scalar, Fraction, Decimal). Raises TypeError for a non-number (bool
    included), ValueError outside [0, 1) or NaN."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (numbers.Real, Decimal)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if not math.isfinite(value) or not (0 <= exact_sparsity(sparsity) < 1):
        raise ValueError(
            f"sparsity is the pruned fraction and must lie in [0, 1), got {sparsity}; "
            "for 95% sparsity pass 0.95 (a percentage like 95 is not accepted)")
    return value


def _check_min_keep(min_keep: int) -> int:
    if isinstance(min_keep, bool) or not isinstance(min_keep, numbers.Integral):
        raise TypeError(f"min_keep must be a non-negative int, got {min_keep!r}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0 (kept weights per layer), got {min_keep}")
    return int(min_keep)


# ----------------------------------------------------------------------------- model reading

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


def weight_problem(module: nn.Module, name: str = "") -> str | None:
    """Why zeros written into ``module.weight`` would not stay, with how to prepare the model;
    None when the weight is a plain ``nn.Parameter`` that pruning can zero in place.

    Recognized: torch.nn.utils.parametrize (parametrizations.weight_norm, spectral_norm,
    orthogonal, custom), torch.nn.utils.prune masks, the hook-based torch.nn.utils.weight_norm
    and spectral_norm, lazy (uninitialized) weights, and any other ``weight`` that is not a
    registered Parameter of the module.
    """
    from torch.nn.utils import parametrize, prune

    where = f"layer {name!r}" if name else f"{type(module).__name__}"
    get = f"model.get_submodule({name!r})" if name else "module"
    if parametrize.is_parametrized(module, "weight"):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])
        return (f"{where}: its weight is parametrized ({kinds}), so it is recomputed from "
                "parametrizations.weight.original* at every access and zeros written into it "
                "are lost. Bake the parametrization in first: "
                f"torch.nn.utils.parametrize.remove_parametrizations({get}, 'weight') "
                "(or exclude the layer)")
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == "weight":
            return (f"{where} carries a torch.nn.utils.prune mask: weight_orig and weight_mask "
                    "with a forward pre-hook that recomputes weight = weight_orig * weight_mask "
                    "at every forward, which would undo any other pruning. Make its mask "
                    f"permanent first: torch.nn.utils.prune.remove({get}, 'weight') (the "
                    "zeros it made stay), or exclude the layer")
        kind = type(hook).__name__
        if kind in ("WeightNorm", "SpectralNorm") and getattr(hook, "name", None) == "weight":
            fix = "remove_weight_norm" if kind == "WeightNorm" else "remove_spectral_norm"
            return (f"{where} has a hook-based {kind} (torch.nn.utils.{kind.lower()[:-4]}_norm) "
                    "that recomputes its weight at every forward, undoing any pruning. Remove "
                    f"it first: torch.nn.utils.{fix}({get}), or exclude the layer")
    param = module._parameters.get("weight")
    if isinstance(param, nn.parameter.UninitializedParameter):
        return (f"{where} is a lazy module whose weight is not materialized yet; run one "
                "forward pass (any input of the right channel count) before allocating")
    if not isinstance(param, nn.Parameter):
        return (f"{where}: weight is a {type(getattr(module, 'weight', None)).__name__}, not a "
                "registered nn.Parameter of the module (something computes or wraps it), so "
                "zeros written into it may not stay. Make it a plain nn.Parameter, or exclude "
                "the layer")
    return None


def _memory(param: torch.Tensor) -> tuple | None:
    """(device, first byte, end byte, layout) of a weight's memory; None when it has no
    addressable memory (meta device, empty, tensor subclasses without a data pointer)."""
    try:
        if param.device.type == "meta" or param.numel() == 0 or param.data_ptr() == 0:
            return None
        start = param.data_ptr()
        span = sum((s - 1) * st for s, st in zip(param.shape, param.stride())) + 1
        layout = (tuple(param.shape), tuple(param.stride()), param.dtype)
        return (str(param.device), start, start + span * param.element_size(), layout)
    except (RuntimeError, NotImplementedError):
        return None


def prunable_modules(model: nn.Module) -> list[tuple[str, nn.Module, tuple[str, ...]]]:
    """Every Conv2d and Linear as (name, module, aliases), in forward-definition order; first
    conv and classifier included (the setting of the LAMP reference code).

    A weight shared by several modules (the same Parameter, one module registered under two
    names, or two Parameters viewing the same memory in the same layout) is listed once, under
    the first name; the other names are its aliases.
    Raises ValueError for a lazy module (no shape yet) and for two weights that overlap in
    memory in different layouts (pruning one would silently prune part of the other).
    """
    groups: dict[object, list] = {}   # key -> [name, module, [aliases], memory]
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        param = module._parameters.get("weight")
        if isinstance(param, nn.parameter.UninitializedParameter):
            raise ValueError(weight_problem(module, name))
        mem = _memory(param) if isinstance(param, nn.Parameter) else None
        # Plain weights are keyed by their memory (identity of storage and layout), so that a
        # shared Parameter and two Parameters over the same memory are both one layer; computed
        # weights (parametrizations, hooks) by their module.
        key = (mem[0], mem[1], mem[3]) if mem else ("object", id(param) if param is not None
                                                     else id(module))
        if key in groups:
            groups[key][2].append(name)
        else:
            groups[key] = [name, module, [], mem]
    spans = sorted((g[3][0], g[3][1], g[3][2], g[0]) for g in groups.values() if g[3])
    for (dev_a, _, end_a, name_a), (dev_b, start_b, _, name_b) in zip(spans, spans[1:]):
        if dev_a == dev_b and start_b < end_a:
            raise ValueError(
                f"layers {name_a!r} and {name_b!r} have weights that overlap in memory in "
                "different layouts, so pruning one would prune part of the other; give each its "
                "own Parameter (.clone()) or tie them with the very same Parameter")
    return [(name, module, tuple(aliases)) for name, module, aliases, _ in groups.values()]


def read_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` detached, read without side effects (same shape and dtype).

    A parametrized weight is computed on access, and some parametrizations update state when
    they run in training mode (spectral_norm's power iteration rewrites its ``_u``/``_v``
    buffers); they are evaluated in eval mode under no_grad and their modes restored.
    """
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module, "weight"):
        return module.weight.detach()
    plist = module.parametrizations["weight"]
    modes = [(m, m.training) for m in plist.modules()]
    try:
        plist.eval()
        with torch.no_grad():
            return module.weight.detach()
    finally:
        for m, training in modes:
            m.training = training


def prunable_layers(model: nn.Module) -> list[LayerSpec]:
    """LayerSpecs of ``prunable_modules(model)``: name, weight shape, detached weight values (as
    the module computes them, ``read_weight``) and the aliases of tied weights."""
    return [_spec(name, m, aliases) for name, m, aliases in prunable_modules(model)]


def _spec(name: str, module: nn.Module, aliases: tuple[str, ...]) -> LayerSpec:
    weight = read_weight(module)
    return LayerSpec(name, tuple(weight.shape), weight, aliases)


# ----------------------------------------------------------------------------- selection

def _kth_largest(values: torch.Tensor, k: int, scratch: bool = False) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor (1 <= k <= numel), as a 0-d tensor on its device.

    On CPU numpy's introselect (np.partition) is used: ~15x faster than torch.kthvalue on 100M
    floats here (0.19 s vs 2.8 s, one thread); the k-th value is unique as a value, so both give
    the same threshold and the same masks. ``scratch``: ``values`` may be reordered in place
    (saves a copy: 1 GB for the float64 scores of a 128M-weight model).
    """
    n = values.numel()
    if values.device.type == "cpu":
        arr = values.numpy() if values.dtype != torch.bfloat16 else values.float().numpy()
        if not scratch:
            return torch.tensor(np.partition(arr, n - k)[n - k], dtype=values.dtype)
        arr.partition(n - k)
        return torch.tensor(arr[n - k], dtype=values.dtype)
    if values.dtype == torch.float16:  # CUDA kthvalue has no float16 kernel in older torch
        return torch.kthvalue(values.float(), n - k + 1).values.to(values)
    return torch.kthvalue(values, n - k + 1).values


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor, ties broken by lower index.

    Deterministic on every device: the threshold is the k-th largest *value* (which is
    unique), and ties at the threshold are resolved by position, never by topk/kthvalue's index
    order.
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    threshold = _kth_largest(scores.detach(), k).to(scores.device)
    above = scores > threshold
    # count_nonzero, not bool .sum(): 15x faster on CPU (0.035 s vs 0.53 s for 100M).
    need = k - int(torch.count_nonzero(above))
    tied = scores == threshold
    if int(torch.count_nonzero(tied)) > need:  # keep only the first `need` tied positions
        tied[torch.nonzero(tied).flatten()[need:]] = False
    return above | tied


def _topk_counts(scores: Sequence[torch.Tensor], k: int) -> np.ndarray:
    """Per-tensor counts of ``topk_mask(torch.cat(scores), k)`` without building the mask:
    everything above the k-th largest value, then ties at it in tensor order."""
    sizes = np.array([s.numel() for s in scores], dtype=np.int64)
    n = int(sizes.sum())
    if k <= 0:
        return np.zeros(len(scores), dtype=np.int64)
    if k >= n:
        return sizes
    threshold = _kth_largest(torch.cat(scores), k, scratch=True)
    above = np.array([int(torch.count_nonzero(s > threshold.to(s.device))) for s in scores],
                     dtype=np.int64)
    tied = np.array([int(torch.count_nonzero(s == threshold.to(s.device))) for s in scores],
                    dtype=np.int64)
    need = k - int(above.sum())
    # Ties go to the earliest tensors first, as topk_mask's lower-index rule does on the concat.
    before = np.concatenate([[0], np.cumsum(tied)[:-1]])
    return above + np.clip(need - before, 0, tied)


def largest_remainder(real_keep: np.ndarray, sizes: np.ndarray, total: int,
                      minimum: np.ndarray | None = None) -> np.ndarray:
    """Integer keep counts close to ``real_keep`` with an exact sum, inside [minimum, sizes].

    Floors first, then hands the missing units to the largest fractional remainders (ties by
    layer order); if rounding overshot, takes units from the smallest remainders.
    """
    lo = np.zeros_like(sizes) if minimum is None else minimum.astype(np.int64)
    real = np.clip(real_keep.astype(np.float64), lo, sizes)
    keep = np.clip(np.floor(real).astype(np.int64), lo, sizes)
    frac = real - keep
    order_up = sorted(range(len(keep)), key=lambda i: (-frac[i], i))
    order_down = sorted(range(len(keep)), key=lambda i: (frac[i], i))
    deficit = int(total - keep.sum())
    while deficit != 0:
        moved = 0
        for i in (order_up if deficit > 0 else order_down):
            if deficit > 0 and keep[i] < sizes[i]:
                keep[i] += 1
                deficit -= 1
                moved += 1
            elif deficit < 0 and keep[i] > lo[i]:
                keep[i] -= 1
                deficit += 1
                moved += 1
            if deficit == 0:
                break
        if moved == 0:
            raise ValueError(f"cannot place {total} kept weights within layer bounds")
    return keep


# ----------------------------------------------------------------------------- methods
# Each method gets the free (non-excluded) layers, their sizes, the number of weights they
# must keep in total, and ctx = {"first_free", "last_free": whether the model's first / last
# layer is among them, "floor": int64 per-layer minimum kept count}, and returns real-valued or
# integer keep counts for them.

Method = Callable[[Sequence[LayerSpec], np.ndarray, int, dict], np.ndarray]


def _with_floor(rule: Method) -> Method:
    """A density rule under per-layer floors: layers whose real target falls below their floor
    are held at it, and the rule is re-solved over the other layers for what is left (as ERK's
    dense cap and exclusions are handled). Layers above the floor keep the rule's ratios."""
    def method(layers, sizes, keep_free, ctx):
        floor = ctx["floor"]
        held = np.zeros(len(sizes), dtype=bool)
        while True:
            active = ~held
            real = floor.astype(np.float64)
            if not active.any():
                return real
            sub = {"first_free": ctx["first_free"] and bool(active[0]),
                   "last_free": ctx["last_free"] and bool(active[-1]),
                   "floor": np.zeros(int(active.sum()), dtype=np.int64)}
            real[active] = rule([x for x, a in zip(layers, active) if a], sizes[active],
                                keep_free - int(floor[held].sum()), sub)
            low = active & (real < floor)
            if not low.any():
                return real
            held |= low
    method.__doc__ = rule.__doc__
    return method


def _uniform(layers, sizes, keep_free, ctx):
    """Every free layer at the same density."""
    return sizes * (keep_free / sizes.sum())


def _uniform_plus(layers, sizes, keep_free, ctx):
    """Gale et al. (2019): first layer dense, last layer keeps >= 20%, the others uniform."""
    real = sizes.astype(np.float64)
    fixed = np.zeros(len(sizes), dtype=bool)
    if ctx["first_free"]:
        fixed[0] = True
    for _ in range(2):
        rest = keep_free - real[fixed].sum()
        free = ~fixed
        if rest < 0:
            raise ValueError("uniform_plus: keeping the first conv dense already exceeds the "
                             "weight budget; lower the sparsity or use another method")
        d = rest / sizes[free].sum() if free.any() else 0.0
        real[free] = sizes[free] * d
        last = len(sizes) - 1
        if ctx["last_free"] and not fixed[last] and d < 0.2:
            fixed[last] = True
            real[last] = math.ceil(0.2 * sizes[last])
        else:
            break
    return real


def _capped_scale(raw: np.ndarray, sizes: np.ndarray, keep_free: int) -> np.ndarray:
    """Real keep counts eps * raw * sizes summing to ``keep_free``, with layers whose density
    eps * raw would exceed 1 made dense and eps re-solved until none does (RigL's capped ERK)."""
    dense = np.zeros(len(sizes), dtype=bool)
    while True:
        budget = keep_free - sizes[dense].sum()
        denom = (raw * sizes)[~dense].sum()
        eps = budget / denom if denom > 0 else 0.0
        over = (~dense) & (eps * raw > 1.0)
        if not over.any():
            break
        dense |= over
    return np.where(dense, sizes.astype(np.float64), eps * raw * sizes)


def _erk_like(dims_of: Callable[[tuple[int, ...]], tuple[int, ...]], doc: str) -> Method:
    def method(layers, sizes, keep_free, ctx):
        raw = np.array([sum(dims_of(layer.shape)) / math.prod(dims_of(layer.shape))
                        for layer in layers], dtype=np.float64)
        return _capped_scale(raw, sizes, keep_free)
    method.__doc__ = doc
    return method


def _proportional(densities, sizes, keep_free, ctx):
    """Density proportional to the given per-layer values (``densities_to_keep``); the
    "layers" passed in are those values, one float per layer."""
    return _capped_scale(np.asarray(densities, dtype=np.float64), sizes, keep_free)


def densities_to_keep(densities: Sequence[float] | np.ndarray, sizes: Sequence[int] | np.ndarray,
                      keep_total: int, floor: Sequence[int] | np.ndarray | None = None
                      ) -> np.ndarray:
    """Exact integer keep counts for layers whose densities should be proportional to
    ``densities``: the counting machinery of ``allocate``, for densities computed elsewhere
    (``sparse_repair.select.search`` interpolates between two allocations this way).

    Args:
        densities: float, shape (layers,), finite and >= 0; only their ratios matter.
        sizes: int, shape (layers,), weights per layer (>= 1).
        keep_total: the exact number of weights to keep over these layers.
        floor: int, shape (layers,), per-layer minimum keep count (default 0); must be <= sizes.
    Returns:
        int64, shape (layers,), with ``floor <= keep <= sizes`` and ``keep.sum() == keep_total``.
        The real targets are eps * density * size with one eps (capped at density 1 and
        re-solved, as ERK: RigL's capped ERK; layers below their floor held at it and the rest
        re-solved, as ``allocate(min_keep=...)``), made integer by ``largest_remainder``. Counts
        of an exact allocation given back as densities (keep / size) come back unchanged.
    Raises:
        ValueError: shapes differ; a density negative, NaN or Inf; a size < 1; a floor outside
            [0, size]; keep_total outside [sum(floor), sum(sizes)]; every density 0 with
            keep_total above the floors (no ratio to follow).
    """
    d = np.asarray(densities, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    lo = np.zeros_like(sizes) if floor is None else np.asarray(floor, dtype=np.int64)
    if d.ndim != 1 or d.shape != sizes.shape or lo.shape != sizes.shape:
        raise ValueError(f"densities {d.shape}, sizes {sizes.shape} and floor {lo.shape} must be "
                         "1-D arrays of one entry per layer")
    if not np.isfinite(d).all() or (d < 0).any():
        raise ValueError("densities must be finite and >= 0")
    if (sizes < 1).any() or (lo < 0).any() or (lo > sizes).any():
        raise ValueError("sizes must be >= 1 and every floor in [0, size]")
    keep_total = int(keep_total)
    if not int(lo.sum()) <= keep_total <= int(sizes.sum()):
        raise ValueError(f"keep_total {keep_total} is outside [{int(lo.sum())}, "
                         f"{int(sizes.sum())}] (the floors' sum, the weight count)")
    if keep_total > int(lo.sum()) and not (d > 0).any():
        raise ValueError("every density is 0, so there is no ratio to spread the kept weights "
                         "by; give at least one layer a positive density")
    ctx = {"first_free": False, "last_free": False, "floor": lo}
    real = _with_floor(_proportional)(list(d), sizes, keep_total, ctx)
    return largest_remainder(np.asarray(real), sizes, keep_total, lo)


def _weight_of(layer: LayerSpec) -> torch.Tensor:
    if layer.weight is None:
        raise ValueError(f"layer {layer.name!r} has no weight values; score-based "
                         "methods (lamp, global_magnitude) need them")
    return layer.weight.detach().flatten()


def _scores_keep(score_lists: list[torch.Tensor], keep_free: int, floor: np.ndarray,
                 presorted: bool) -> np.ndarray:
    """Keep counts per layer: each layer first keeps its ``floor`` top-scored weights, then the
    rest of the budget goes to the globally highest scores, ties by (layer order, flat index).

    Only counts are returned, and counts depend only on each layer's multiset of scores, so the
    scores may come in any order within a layer (``presorted``: descending). The score tensors
    are modified in place (callers pass fresh ones; a copy of 100M+ scores costs 1 GB).
    """
    scores = []
    for s, m in zip(score_lists, floor):
        m = int(m)
        if m > 0:  # forced weights: +inf sorts them first in the global selection
            if presorted:
                s[:m] = math.inf
            else:
                s[topk_mask(s, m)] = math.inf
        scores.append(s)
    return _topk_counts(scores, keep_free)


def _sorted_desc(values: torch.Tensor) -> torch.Tensor:
    """Non-negative values sorted in descending order (numpy's SIMD sort on CPU: ~8x
    torch.sort here)."""
    if values.device.type == "cpu":
        # Sort the negated values in place: one copy, and no reversed (negative-stride) view,
        # which torch cannot wrap and numpy copies slowly.
        out = np.negative(values.numpy())
        out.sort()
        np.negative(out, out=out)
        return torch.from_numpy(out)
    return torch.sort(values, descending=True).values


def _lamp_sorted(abs_desc: torch.Tensor) -> torch.Tensor:
    """LAMP scores (float64) of magnitudes sorted in descending order, in that order."""
    # In place where possible: on a 100M-weight layer every fresh float64 temporary costs
    # 0.8 GB and, on a busy machine, seconds of page faults.
    scores = abs_desc.double()
    scores.mul_(scores)  # w^2, exact: a float32 square fits in a double's mantissa
    denom = torch.cumsum(scores, 0)  # sum of w'^2 over |w'| >= |w|, summed from the largest
    n = scores.numel()
    if n > 1:
        new = torch.ones(n, dtype=torch.bool, device=scores.device)
        new[1:] = abs_desc[1:] != abs_desc[:-1]
        if not bool(new.all()):
            # Tied |w| share one denominator: the sum up to the last member of their group.
            # (Random float32 weights tie often: 65% of a 4096x25088 layer's |w| repeat.)
            # Group ids by a cumulative count of group starts and one gather (torch.cummin
            # over indices took 27 s on that layer).
            last = torch.ones(n, dtype=torch.bool, device=scores.device)
            last[:-1] = new[1:]
            group = torch.cumsum(new, 0)
            group.sub_(1)
            torch.index_select(denom[last], 0, group, out=denom)
    scores.div_(denom)
    return scores.masked_fill_(denom == 0, 0.0)  # a leading run of zero weights: 0/0


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score w^2 / sum_{|w'| >= |w|} w'^2 of each weight (Lee et al., ICLR 2021), float64,
    flat, in the order of ``w.flatten()``; tied |w| share the sum."""
    # Sorted in float32 (twice as fast as float64); sums are taken in float64.
    abs_desc, order = torch.sort(w.detach().flatten().abs().float(), descending=True)
    out = torch.empty(abs_desc.numel(), dtype=torch.float64, device=abs_desc.device)
    out[order] = _lamp_sorted(abs_desc)
    return out


# LAMP sorts layers up to LAMP_PARTIAL_ABOVE weights whole; larger ones first only at their top
# (2x the average kept fraction + LAMP_PARTIAL_SLACK weights). Tests set both to 0 to run the
# partial path on small layers.
LAMP_PARTIAL_ABOVE = 1 << 16
LAMP_PARTIAL_SLACK = 1024


def _lamp_top(mag: torch.Tensor, want: int) -> tuple[torch.Tensor, float]:
    """LAMP scores, descending, of the ``want`` largest magnitudes and every magnitude tied with
    the smallest of them; and a strict upper bound on the scores of the rest (-inf if none).

    The included scores are exact: a weight's denominator sums only magnitudes >= its own, all
    included. The LAMP score increases strictly with |w| (a^2/(a^2+S) < a^2/S < b^2/S for
    a < b), so every excluded weight scores below the smallest included one.
    """
    if want < mag.numel():
        top = mag[mag >= _kth_largest(mag, want)]
        if top.numel() < mag.numel():
            scores = _lamp_sorted(_sorted_desc(top))
            return scores, float(scores[-1])
    return _lamp_sorted(_sorted_desc(mag)), -math.inf


def _lamp(layers, sizes, keep_free, ctx):
    """Counts of the globally highest LAMP scores (Lee et al., ICLR 2021), floors first.

    Within a layer the score increases with |w|, so sorted magnitudes give the layer's scores
    in descending order, and only counts are needed (no scatter back to weight positions).
    Large layers are scored only at their top (2x the average kept fraction, at least twice
    the floor); if the global threshold falls below the bound of a layer's unscored rest, that
    layer is scored whole and the selection repeated, so the counts are those of scoring
    every weight. (vgg11_bn at 0.9 keeps 4% of its 103M-weight classifier.0: scoring its top
    20% instead of sorting it halves LAMP's time there.)
    """
    floor = ctx["floor"]
    mags = [_weight_of(x).abs().float() for x in layers]
    share = keep_free / max(int(sizes.sum()), 1)
    want = [n if n <= LAMP_PARTIAL_ABOVE else
            min(n, max(1, 2 * m, math.ceil(2 * share * n) + LAMP_PARTIAL_SLACK))
            for n, m in zip(sizes.tolist(), floor.tolist())]
    tops: list = [None] * len(layers)
    bounds = [-math.inf] * len(layers)
    while True:
        for i, mag in enumerate(mags):
            if tops[i] is None:
                tops[i], bounds[i] = _lamp_top(mag, want[i])
                tops[i][:int(floor[i])] = math.inf  # forced: the layer's top-floor weights
        scored = sum(t.numel() for t in tops)
        if keep_free <= 0 or all(b == -math.inf for b in bounds):
            break
        threshold = float(_kth_largest(torch.cat(tops), keep_free, scratch=True)) \
            if scored >= keep_free else -math.inf
        deeper = [i for i, b in enumerate(bounds) if b > threshold]
        if not deeper:
            break
        for i in deeper:  # straight to the whole layer: a second partial try costs more
            want[i] = int(sizes[i])
            tops[i] = None
    return _topk_counts(tops, keep_free)


def _global_magnitude(layers, sizes, keep_free, ctx):
    """Counts of the globally largest abs(w) over all free layers, floors first: one
    magnitude threshold for the whole model (global magnitude pruning, as compared in Blalock
    et al., MLSys 2020, and Lee et al., ICLR 2021)."""
    scores = [_weight_of(x).abs().float() for x in layers]
    return _scores_keep(scores, keep_free, ctx["floor"], presorted=False)


ALLOCATORS: dict[str, Method] = {
    "uniform": _with_floor(_uniform),
    "uniform_plus": _with_floor(_uniform_plus),
    "er": _with_floor(_erk_like(
        lambda s: s[:2], "Erdos-Renyi (Mocanu et al., Nature Communications 2018): density "
        "proportional to (n_out + n_in) / (n_out * n_in), capped at 1 (``_capped_scale``).")),
    "erk": _with_floor(_erk_like(
        lambda s: s, "Erdos-Renyi-Kernel (Evci et al., RigL, ICML 2020): density proportional "
        "to the sum of all weight dims over their product, capped at 1 (``_capped_scale``).")),
    "lamp": _lamp,
    "global_magnitude": _global_magnitude,
}


def list_allocators() -> list[str]:
    """Names of the registered allocators, in registration order."""
    return list(ALLOCATORS)


# ----------------------------------------------------------------------------- entry point

def _tie_groups(groups: Sequence[tuple[str, tuple[str, ...]]]) -> dict[str, str]:
    """Every layer name and alias -> the layer (first name) it belongs to. Raises ValueError
    for a name that appears twice."""
    owner: dict[str, str] = {}
    for name, aliases in groups:
        for n in (name, *aliases):
            if n in owner:
                raise ValueError(f"layer name {n!r} appears twice in the layer list")
            owner[n] = name
    return owner


def allocate(model_or_layers: nn.Module | Iterable[LayerSpec], method: str, sparsity: float,
             *, exclude: Iterable[str] = (), min_keep: int = 0) -> Allocation:
    """Integer keep counts per layer whose total prunes exactly round(S * N) weights.

    Args:
        model_or_layers: a model (its Conv2d and Linear weights, ``prunable_modules``) or
            LayerSpecs. A weight shared by several modules is one layer, counted once.
        method: a name in ``ALLOCATORS`` (docs/allocation.md gives each rule and its source).
        sparsity: global pruned fraction S in [0, 1), taken exactly as written
            (``prune_count``: round half up of the exact decimal S * N).
        exclude: layer names kept dense (still counted in N). A tied weight is excluded by
            naming all of its modules or none.
        min_keep: every non-excluded layer keeps at least min(min_keep, its size) weights
            (lamp: at least 1 in any case). The floor is placed first and the rest of the
            budget follows the method's rule; 0 (default) leaves each method's rule unchanged.

    Returns:
        Allocation with ``keep`` (int64, one count per layer) summing to N - round(S * N);
        ``collapsed`` lists the layers left with zero kept weights.

    Raises:
        ValueError: unknown method; sparsity outside [0, 1) or NaN; negative min_keep; no
            prunable layers; a layer name listed twice; unknown or half-excluded tied layer
            names; a non-excluded weight that is not a plain Parameter (``weight_problem``:
            parametrized, torch.nn.utils.prune mask, hook-based weight_norm, lazy); weights
            that overlap in memory in different layouts, or a lazy weight even if excluded
            (``prunable_modules``); NaN/Inf weights; a 0-element weight; a LayerSpec without
            weight values under lamp or global_magnitude (``_weight_of``); a target that
            exclusions, min_keep or the method's own constraints (lamp, uniform_plus) make
            unreachable.
        TypeError: sparsity or min_keep of the wrong type; ``exclude`` given as a string or
            not iterable; input that is neither a Module nor a list of LayerSpec.
    Warns:
        LayerCollapseWarning: once per call, naming every layer left with zero kept weights.

    Nothing is modified: a model is only read.
    """
    if not isinstance(method, str) or method not in ALLOCATORS:
        raise ValueError(f"unknown allocation method {method!r}; choose one of "
                         f"{', '.join(ALLOCATORS)}")
    requested = sparsity
    sparsity = check_sparsity(sparsity)
    min_keep = _check_min_keep(min_keep)
    if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
        raise TypeError(f"exclude must be a list of layer names (() for none), got "
                        f"{exclude!r}" + (f"; e.g. exclude=[{exclude!r}]"
                                          if isinstance(exclude, str) else ""))
    if isinstance(model_or_layers, nn.Module):
        modules = prunable_modules(model_or_layers)
        groups = [(name, aliases) for name, _, aliases in modules]
    else:
        if isinstance(model_or_layers, (str, bytes)) or not isinstance(model_or_layers,
                                                                         Iterable):
            raise TypeError(f"allocate takes a torch.nn.Module or a list of LayerSpec, got "
                            f"{type(model_or_layers).__name__}")
        modules, layers = None, list(model_or_layers)
        wrong = [type(x).__name__ for x in layers if not isinstance(x, LayerSpec)]
        if wrong:
            raise TypeError(f"allocate takes a torch.nn.Module or a list of LayerSpec, got a "
                            f"list holding {wrong[0]}; build layers with prunable_layers(model)")
        groups = [(layer.name, tuple(layer.aliases)) for layer in layers]
    if not groups:
        raise ValueError("no prunable layers (Conv2d or Linear weights) found; nothing to "
                         "allocate")
    names = [name for name, _ in groups]
    owner = _tie_groups(groups)
    exclude = tuple(exclude)
    unknown = [e for e in exclude if e not in owner]
    if unknown:
        raise ValueError(f"excluded layer(s) {unknown} are not prunable layers; valid names "
                         f"include {names[:5]}...")
    for name, aliases in groups:
        group = (name, *aliases)
        named = [n for n in group if n in exclude]
        if named and len(named) < len(group):
            raise ValueError(
                f"layers {list(group)} share one weight (tied), but only {named} is excluded: "
                "pruning the others would prune the excluded one through the tie. Exclude all "
                "of them or none")
    is_free = np.array([n not in exclude for n in names])
    if modules is not None:
        # Refuse before any weight is read: reading a parametrized weight runs its code.
        for (name, module, _), free in zip(modules, is_free):
            problem = weight_problem(module, name) if free else None
            if problem:
                raise ValueError(problem)
        layers = [_spec(name, module, aliases) for name, module, aliases in modules]
    for layer in layers:
        # A finite sum proves every weight finite (NaN and Inf propagate) in one fast pass;
        # only a non-finite sum, which overflow can also cause, is checked weight by weight.
        w = layer.weight
        if w is not None and not torch.isfinite(w.sum()) and not torch.isfinite(w).all():
            raise ValueError(f"layer {layer.name!r} has NaN or Inf weights; fix the checkpoint "
                             "before pruning")
    sizes = np.array([layer.size for layer in layers], dtype=np.int64)
    empty = [n for n, size in zip(names, sizes) if size == 0]
    if empty:
        raise ValueError(f"layer(s) {empty} have an empty weight (0 elements): nothing to "
                         "prune and no density (keep / size is 0 / 0); remove them from the "
                         "model (or allocate over the other layers' LayerSpecs)")
    total = int(sizes.sum())
    keep_total = total - prune_count(requested, total)
    keep_free = keep_total - int(sizes[~is_free].sum())
    if keep_free < 0:
        raise ValueError(f"excluded layers hold {int(sizes[~is_free].sum())} weights, more than "
                         f"the {keep_total} that sparsity {sparsity} keeps; exclude fewer layers "
                         "or lower the sparsity")
    floor = np.minimum(max(min_keep, 1 if method == "lamp" else 0), sizes[is_free])
    if int(floor.sum()) > keep_free:
        if method == "lamp" and min_keep <= 1:
            raise ValueError(f"lamp keeps at least one weight per layer, but only {keep_free} "
                             f"weights may be kept over {int(is_free.sum())} layers; lower "
                             "the sparsity")
        raise ValueError(f"min_keep={min_keep} asks for {int(floor.sum())} kept weights over "
                         f"{int(is_free.sum())} free layers, but sparsity {sparsity} keeps only "
                         f"{keep_free} there; lower min_keep or the sparsity")
    if not is_free.any():
        if keep_free != 0:
            raise ValueError("every layer is excluded, so no weight can be pruned")
        keep = sizes.copy()
    else:
        free_layers = [layer for layer, f in zip(layers, is_free) if f]
        # A one-layer model has no first layer distinct from its last: only the last-layer
        # rule of uniform_plus applies (keeping it dense would forbid any pruning).
        ctx = {"first_free": bool(is_free[0]) and len(layers) > 1,
               "last_free": bool(is_free[-1]), "floor": floor}
        real = ALLOCATORS[method](free_layers, sizes[is_free], keep_free, ctx)
        keep = sizes.copy()
        keep[is_free] = largest_remainder(np.asarray(real), sizes[is_free], keep_free, floor)
    assert int(keep.sum()) == keep_total
    alloc = Allocation(method, sparsity, names, [layer.shape for layer in layers], sizes,
                       keep.astype(np.int64), exclude, min_keep,
                       {x.name: tuple(x.aliases) for x in layers if x.aliases})
    if alloc.collapsed:
        warnings.warn(LayerCollapseWarning(
            f"{method} at sparsity {sparsity} keeps 0 weights in {len(alloc.collapsed)} "
            f"layer(s): {', '.join(alloc.collapsed)}. Their outputs are constant and the network "
            "may be cut (layer collapse: Lee et al. ICLR 2021; Tanaka et al. NeurIPS 2020); "
            "pass min_keep=1 (or more; `--min-keep 1` on the command line) to keep weights "
            "in every layer"), stacklevel=2)
    return alloc
