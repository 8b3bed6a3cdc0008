"""Exact sparsity allocation: spread a global sparsity over layers.

Pure functions on layer specs (name, weight shape, optional weight values); a model is accepted
only as a convenience and is read once into specs. Imports nothing else of the package.

Counting convention, used everywhere in the project:
    N          = total weight count of all prunable layers (excluded layers included, kept dense)
    prune      = round_half_up(S * N)           (S = global sparsity, the pruned fraction)
    keep_total = N - prune
Every method returns integer keep counts (int64) whose sum is exactly keep_total.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    name: str
    shape: tuple[int, ...]
    weight: torch.Tensor | None = None  # only score-based methods need it (lamp, global_magnitude)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class Allocation:
    method: str
    sparsity: float                    # requested global pruned fraction
    names: list[str]
    shapes: list[tuple[int, ...]]
    sizes: np.ndarray                  # int64 weights per layer
    keep: np.ndarray                   # int64 kept weights per layer
    excluded: tuple[str, ...] = field(default_factory=tuple)

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

    def keep_of(self, name: str) -> int:
        return int(self.keep[self.names.index(name)])

    def densities(self) -> dict[str, float]:
        return {n: float(k) / float(s) for n, k, s in zip(self.names, self.keep, self.sizes)}

    def to_dict(self) -> dict:
        return {
            "method": self.method, "sparsity": self.sparsity, "excluded": list(self.excluded),
            "total": self.total, "keep_total": self.keep_total, "prune_total": self.prune_total,
            "layers": [{"name": n, "shape": list(sh), "weights": int(s), "keep": int(k)}
                       for n, sh, s, k in zip(self.names, self.shapes, self.sizes, self.keep)],
        }


# ----------------------------------------------------------------------------- helpers

def prune_count(sparsity: float, total: int) -> int:
    """round(S * N) with halves rounded up (Python's round() is banker's rounding)."""
    return int(math.floor(sparsity * total + 0.5))


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not (0.0 <= float(sparsity) < 1.0) or math.isnan(sparsity):
        raise ValueError(
            f"sparsity is the pruned fraction and must lie in [0, 1), got {sparsity}; "
            "for 95% sparsity pass 0.95 (a percentage like 95 is not accepted)")
    return float(sparsity)


def prunable_layers(model: nn.Module) -> list[LayerSpec]:
    """Every Conv2d and Linear weight in forward-definition order, first conv and classifier
    included (the setting of the LAMP reference code)."""
    return [LayerSpec(name, tuple(m.weight.shape), m.weight.detach())
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor, ties broken by lower index.

    Deterministic on every device: kthvalue gives the threshold *value* (which is unique), and
    ties at the threshold are resolved by position, never by topk/kthvalue's index order.
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    threshold = torch.kthvalue(scores.cpu() if scores.dtype == torch.float16 else scores,
                               n - k + 1).values.to(scores.device)
    above = scores > threshold
    need = k - int(above.sum())
    tied = scores == threshold
    tied_kept = tied & (torch.cumsum(tied.to(torch.int64), 0) <= need)
    return above | tied_kept


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
# Each method gets the free (non-excluded) layers, their sizes and the number of weights they
# must keep in total, and returns real-valued or integer keep counts for them.

Method = Callable[[Sequence[LayerSpec], np.ndarray, int, dict], np.ndarray]


def _uniform(layers, sizes, keep_free, ctx):
    return sizes * (keep_free / sizes.sum())


def _uniform_plus(layers, sizes, keep_free, ctx):
    # Gale et al. (2019): first conv dense, last layer keeps >= 20%, others uniform.
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


def _erk_like(dims_of: Callable[[tuple[int, ...]], tuple[int, ...]]) -> Method:
    def method(layers, sizes, keep_free, ctx):
        raw = np.array([sum(dims_of(layer.shape)) / math.prod(dims_of(layer.shape))
                        for layer in layers], dtype=np.float64)
        dense = np.zeros(len(sizes), dtype=bool)
        # RigL's capped ERK: saturate layers whose density exceeds 1 and re-solve eps.
        while True:
            budget = keep_free - sizes[dense].sum()
            denom = (raw * sizes)[~dense].sum()
            eps = budget / denom if denom > 0 else 0.0
            over = (~dense) & (eps * raw > 1.0)
            if not over.any():
                break
            dense |= over
        return np.where(dense, sizes.astype(np.float64), eps * raw * sizes)
    return method


def _scores_keep(layers, keep_free, score_fn, min_one: bool) -> np.ndarray:
    """Keep the globally highest scores; ties by (layer order, flat index)."""
    scores = []
    for layer in layers:
        if layer.weight is None:
            raise ValueError(f"layer {layer.name!r} has no weight values; score-based "
                             "methods (lamp, global_magnitude) need them")
        s = score_fn(layer.weight.detach().flatten().float())
        if min_one:  # LAMP's guarantee: each layer keeps its top-scored weight
            s = s.clone()
            s[torch.argmax(s)] = math.inf  # argmax returns the first maximum: deterministic
        scores.append(s)
    flat = torch.cat(scores)
    mask = topk_mask(flat, keep_free)
    counts = [int(m.sum()) for m in torch.split(mask, [s.numel() for s in scores])]
    return np.array(counts, dtype=np.int64)


def lamp_scores(w: torch.Tensor) -> torch.Tensor:
    """LAMP score w^2 / sum_{|w'| >= |w|} w'^2 (Lee et al. 2021); tied |w| share the sum."""
    # Sort |w| in float32 (twice as fast as float64); the order among equal values does not
    # matter because tied values share one denominator below. Sums are taken in float64.
    sorted_abs, order = torch.sort(w.abs().float())
    sorted_sq = sorted_abs.double() ** 2
    suffix = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
    # Equal values must share the denominator of the first of their group.
    _, inverse, counts = torch.unique_consecutive(sorted_sq, return_inverse=True,
                                                  return_counts=True)
    group_start = torch.cumsum(counts, 0) - counts
    suffix = suffix[group_start][inverse]
    score_sorted = torch.where(suffix > 0, sorted_sq / suffix.clamp_min(1e-300),
                               torch.zeros_like(sorted_sq))
    out = torch.empty_like(score_sorted)
    out[order] = score_sorted
    return out


def _lamp(layers, sizes, keep_free, ctx):
    if keep_free < len(layers):
        raise ValueError(f"lamp keeps at least one weight per layer, but only {keep_free} "
                         f"weights may be kept over {len(layers)} layers; lower the sparsity")
    return _scores_keep(layers, keep_free, lamp_scores, min_one=True)


def _global_magnitude(layers, sizes, keep_free, ctx):
    return _scores_keep(layers, keep_free, torch.abs, min_one=False)


ALLOCATORS: dict[str, Method] = {
    "uniform": _uniform,
    "uniform_plus": _uniform_plus,
    "er": _erk_like(lambda s: s[:2]),
    "erk": _erk_like(lambda s: s),
    "lamp": _lamp,
    "global_magnitude": _global_magnitude,
}


def list_allocators() -> list[str]:
    return list(ALLOCATORS)


# ----------------------------------------------------------------------------- entry point

def allocate(model_or_layers: nn.Module | Iterable[LayerSpec], method: str, sparsity: float,
             *, exclude: Iterable[str] = ()) -> Allocation:
    """Integer keep counts per layer whose total prunes exactly round(S * N) weights."""
    if method not in ALLOCATORS:
        raise ValueError(f"unknown allocation method {method!r}; choose one of "
                         f"{', '.join(ALLOCATORS)}")
    sparsity = check_sparsity(sparsity)
    layers = (prunable_layers(model_or_layers) if isinstance(model_or_layers, nn.Module)
              else list(model_or_layers))
    if not layers:
        raise ValueError("no prunable layers (Conv2d or Linear weights) found; nothing to "
                         "allocate")
    names = [layer.name for layer in layers]
    exclude = tuple(exclude)
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise ValueError(f"excluded layer(s) {unknown} are not prunable layers; valid names "
                         f"include {names[:5]}...")
    for layer in layers:
        if layer.weight is not None and not torch.isfinite(layer.weight).all():
            raise ValueError(f"layer {layer.name!r} has NaN or Inf weights; fix the checkpoint "
                             "before pruning")
    sizes = np.array([layer.size for layer in layers], dtype=np.int64)
    total = int(sizes.sum())
    keep_total = total - prune_count(sparsity, total)
    is_free = np.array([n not in exclude for n in names])
    keep_free = keep_total - int(sizes[~is_free].sum())
    if keep_free < 0:
        raise ValueError(f"excluded layers hold {int(sizes[~is_free].sum())} weights, more than "
                         f"the {keep_total} that sparsity {sparsity} keeps; exclude fewer layers "
                         "or lower the sparsity")
    if not is_free.any():
        if keep_free != 0:
            raise ValueError("every layer is excluded, so no weight can be pruned")
        keep = sizes.copy()
    else:
        free_layers = [layer for layer, f in zip(layers, is_free) if f]
        ctx = {"first_free": bool(is_free[0]), "last_free": bool(is_free[-1])}
        real = ALLOCATORS[method](free_layers, sizes[is_free], keep_free, ctx)
        minimum = np.ones(int(is_free.sum()), dtype=np.int64) if method == "lamp" else None
        keep = sizes.copy()
        keep[is_free] = largest_remainder(np.asarray(real), sizes[is_free], keep_free, minimum)
    assert int(keep.sum()) == keep_total
    return Allocation(method, sparsity, names, [layer.shape for layer in layers], sizes,
                      keep.astype(np.int64), exclude)
