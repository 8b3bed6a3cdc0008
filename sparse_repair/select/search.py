"""Repair-aware allocation: search a one-parameter family of layer allocations, each point
pruned, repaired and scored without labels against the dense model (issue #19, "Beyond
choosing"). A separate entry point from the shape-only allocators of ``allocation.py``: it
needs images (calibration images for the repair, disjoint scoring images for the score).

The family (docs/search.md). Two anchor allocations A and B (default ERK and LAMP, the two
published rules whose order flips with architecture, data and sparsity: docs/cifar10/report.md
measures six flips on ResNet-20 between 0.6 and 0.97) define, for t in [0, 1], per-layer
densities

    d_i(t) proportional to d_A,i ** (1 - t) * d_B,i ** t        (d = keep / size)

made exact by ``allocation.densities_to_keep`` (one common scale capped at density 1, per-layer
floors, largest remainder: the counting machinery of every allocator). Why this family:

- its endpoints *are* the anchors, count for count (t = 0 gives A's keep counts, t = 1 B's), so
  the search evaluates both fixed rules and can only choose something else when the label-free
  criterion prefers it;
- densities differ between layers by orders of magnitude (ERK keeps ResNet-20's first conv
  nearly dense and its largest convs at a few percent), so they are interpolated on a log scale:
  a linear mix of keep counts would be dominated by whichever anchor keeps more in a layer;
- the geometric mean never undercuts both anchors: by the weighted AM-GM inequality the
  unscaled counts sum to at most the budget, so the common scale is >= 1 and every layer's real
  target is >= min(d_A,i, d_B,i) * size_i (before integer rounding);
- one parameter keeps the number of repair + score evaluations small (below), which matters
  because one evaluation costs a full repair (seconds for bn_recal, about a minute for
  reconstruct on ResNet-20 on two CPU cores).

A layer that one anchor empties (ERK at extreme sparsity) stays empty for every t < 1: zeros
propagate through a geometric mean. ``min_keep`` prevents it (it is passed to both anchors and
used as the floor of every point).

The search: a grid of ``grid`` equally spaced t (default 5: 0, 1/4, 1/2, 3/4, 1), then
``refine`` rounds (default 2) that evaluate the two neighbours of the best point at half the
previous spacing (1/8, then 1/16): at most grid + 2 * refine = 9 repair + score evaluations,
plus one dense forward pass over the scoring images. Points whose integer counts equal an
already evaluated point's reuse its scores (not counted as evaluations). The criterion:
"kl" (default), the lowest mean KL(p_dense || p_pruned) over the scoring images; "agreement",
the highest top-1 agreement with the dense model. Ties go to the other criterion, then the
lower t. Labels are never read: the inputs are image tensors only.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..allocation import (
    ALLOCATORS,
    Allocation,
    LayerCollapseWarning,
    allocate,
    check_sparsity,
    densities_to_keep,
)
from ..evaluate import label_free_scores, predict_logits
from ..progress import progress_bar
from ..pruning import prune_
from ..repair import REPAIRS, as_image_tensor, check_model
from ..repair import repair as run_repair  # the ``repair`` argument names the method
from ..repair.engine import batchnorms

CRITERIA = ("kl", "agreement")
DEFAULT_ANCHORS = ("erk", "lamp")


@dataclass
class SearchPoint:
    """One evaluated point of the family: ``t`` in [0, 1]; ``keep`` the int keep count per
    layer (allocation order); ``agreement`` (percent, 0-100) and ``kl`` (nats, mean
    KL(p_dense || p_pruned)) on the scoring images after the repair; ``collapsed`` the layers
    left with zero weights; ``seconds`` wall time of prune + repair + score (0 when
    ``reused``: same integer counts as an earlier point, scores copied)."""

    t: float
    keep: list[int]
    agreement: float
    kl: float
    collapsed: list[str]
    seconds: float
    reused: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SearchResult:
    """What ``search_allocation`` returns.

    ``allocation``: the chosen exact-count Allocation (the type ``allocate`` returns; ``method``
    reads ``search(A,B,t=...)``); ``t`` its parameter; ``criterion`` the one it was chosen by;
    ``anchors`` (A, B); ``repair`` and ``repair_options`` as run; ``points`` every evaluated
    point in evaluation order; ``evaluations`` the repairs run (reused points excluded);
    ``seconds`` the whole search; ``model`` the pruned and repaired model at the choice (None
    when ``keep_model=False``)."""

    allocation: Allocation
    t: float
    criterion: str
    anchors: tuple[str, str]
    repair: str
    repair_options: dict
    points: list[SearchPoint]
    evaluations: int
    seconds: float
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def best(self) -> SearchPoint:
        return next(p for p in self.points if p.t == self.t)

    def to_dict(self) -> dict:
        """JSON-ready: everything but the model; the allocation as ``Allocation.to_dict``."""
        return {"t": self.t, "criterion": self.criterion, "anchors": list(self.anchors),
                "repair": self.repair, "repair_options": self.repair_options,
                "evaluations": self.evaluations, "seconds": self.seconds,
                "points": [p.to_dict() for p in self.points],
                "allocation": self.allocation.to_dict()}


def _rank(point: SearchPoint, criterion: str) -> tuple:
    """Sort key, lower is better: the criterion, then the other one, then the lower t."""
    if criterion == "kl":
        return (point.kl, -point.agreement, point.t)
    return (-point.agreement, point.kl, point.t)


def _digests(x: torch.Tensor) -> set[bytes]:
    return {hashlib.blake2b(img.numpy().tobytes(), digest_size=16).digest()
            for img in x.detach().cpu().contiguous()}


def _check_inputs(dense, sparsity, calibration, scoring, repair_name, repair_options, criterion,
                  anchors, grid, refine):
    """Every input check, before any work; returns (calibration, scoring, resolved options)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    anchors = tuple(anchors)
    if len(anchors) != 2 or anchors[0] == anchors[1]:
        raise ValueError(f"anchors must be two different allocators, got {anchors!r}")
    unknown = [a for a in anchors if a not in ALLOCATORS]
    if unknown:
        raise ValueError(f"unknown allocator(s) {unknown} in anchors; choose from "
                         f"{', '.join(ALLOCATORS)}")
    if repair_name not in REPAIRS:
        raise ValueError(f"unknown repair method {repair_name!r}; choose one of "
                         f"{', '.join(REPAIRS)}")
    impl = REPAIRS[repair_name]
    opts = impl.resolve(**dict(repair_options or {}))  # TypeError names the valid options
    for name, value, least in (("grid", grid, 2), ("refine", refine, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    check_sparsity(sparsity)
    check_model(dense, "dense")
    if impl.needs_bn and not batchnorms(dense):
        raise ValueError(f"{repair_name} repairs BatchNorm statistics but the model has no "
                         "BatchNorm layer; use a model with BatchNorm or repair 'none'")
    calib = as_image_tensor(calibration)
    try:
        score = as_image_tensor(scoring)
    except (TypeError, ValueError) as e:
        raise type(e)(f"scoring images: {e}".replace("calibration", "scoring")) from None
    if calib.shape[1:] != score.shape[1:]:
        raise ValueError(f"calibration images are {tuple(calib.shape[1:])} but scoring images "
                         f"{tuple(score.shape[1:])}; draw both from one data set and resolution")
    shared = len(_digests(calib) & _digests(score))
    if shared:
        raise ValueError(f"{shared} scoring image(s) are also calibration images; a repair "
                         "fitted to an image scores well on it, so the score would be biased. "
                         "Draw them with sparse_repair.data.scoring_set(dataset, n, seed, "
                         "calib=<calibration size>), disjoint by construction")
    return calib, score, opts


def search_allocation(dense: nn.Module, sparsity: float, calibration: torch.Tensor,
                      scoring: torch.Tensor, *, repair: str = "bn_recal",
                      repair_options: dict | None = None, criterion: str = "kl",
                      anchors: Sequence[str] = DEFAULT_ANCHORS, exclude: Sequence[str] = (),
                      min_keep: int = 0, grid: int = 5, refine: int = 2,
                      keep_model: bool = True, chunk_size: int = 256,
                      observe: Callable[[SearchPoint, nn.Module], None] | None = None,
                      progress: bool = False) -> SearchResult:
    """The allocation of the ERK-to-LAMP family (module docstring; docs/search.md) that the
    label-free criterion prefers after the given repair.

    Args:
        dense: the unpruned model (any device; never modified: every point prunes a copy).
        sparsity: global pruned fraction in [0, 1), exact as in ``allocate``.
        calibration: float [N, C, H, W] normalized images (no labels), on any device; the
            repair's input (``sparse_repair.data.calibration_set``).
        scoring: float [M, C, H, W] normalized images disjoint from ``calibration``
            (``sparse_repair.data.scoring_set``); the criterion is computed on them.
        repair: a registered repair method (``repair.REPAIRS``); ``repair_options`` its options.
        criterion: "kl" (lowest mean KL(p_dense || p_pruned), default) or "agreement" (highest
            top-1 agreement with the dense model), ``evaluate.label_free_scores``.
        anchors: the two allocators at t = 0 and t = 1 (default ("erk", "lamp")).
        exclude, min_keep: as in ``allocate``; passed to both anchors, ``min_keep`` is also the
            floor of every interior point.
        grid, refine: grid points (>= 2) and refinement rounds (>= 0); at most
            grid + 2 * refine repair + score evaluations.
        keep_model: return the repaired model at the choice as ``result.model``.
        chunk_size: the repair's chunk size (images per forward).
        observe: called as observe(point, model) after each new evaluation with the pruned and
            repaired model (for reporting only, e.g. a labeled accuracy in a measurement
            script; it must not modify the model, which may become ``result.model``).
        progress: a progress bar with ETA on stderr.
    Returns:
        SearchResult; ``allocation.keep`` sums exactly to N - round(S * N) with every layer
        within [min(min_keep, size), size] (excluded layers dense).
    Raises (before any pruning or repair): ValueError for an unknown criterion, anchor or
        repair, a sparsity outside [0, 1) (TypeError for a non-number), grid < 2 or refine < 0,
        a dense model that ``repair.check_model`` refuses or without BatchNorm for a BN repair,
        empty or non-4-D images, calibration and scoring images of different [C, H, W], or a
        scoring image bit-for-bit equal to a calibration image; TypeError for images given as a
        tuple or list (what a labeled loader yields) or an option the repair does not take.
        Overlap is checked only as exact equality: a scoring image that is an augmented or
        re-encoded calibration image cannot be detected, so draw the two with
        ``data.calibration_set`` and ``data.scoring_set`` (disjoint by construction). The
        errors of ``allocate`` (e.g. min_keep above the budget) and of ``repair`` propagate.
    Warns:
        LayerCollapseWarning when the chosen allocation leaves a layer with zero weights.
    """
    start = time.perf_counter()
    calib, score, opts = _check_inputs(dense, sparsity, calibration, scoring, repair,
                                       repair_options, criterion, anchors, grid, refine)
    anchors = (anchors[0], anchors[1])
    options = dataclasses.asdict(opts)
    device = next(t.device for t in [*dense.parameters(), *dense.buffers()])
    calib, score = calib.to(device), score.to(device)
    with warnings.catch_warnings():
        # The anchors' own collapse warnings would name allocations that may not be chosen;
        # the choice is warned about below.
        warnings.simplefilter("ignore", LayerCollapseWarning)
        ends = [allocate(dense, a, sparsity, exclude=exclude, min_keep=min_keep)
                for a in anchors]
    a, b = ends
    dense_logits = predict_logits(dense, score)
    max_evals = grid + 2 * refine
    bar = progress_bar(max_evals, f"search {anchors[0]}->{anchors[1]} {repair}",
                       enabled=progress, unit="eval")
    points: dict[float, SearchPoint] = {}
    by_keep: dict[bytes, SearchPoint] = {}
    best: list = [None, None]  # [SearchPoint, model]
    evaluations = 0

    def visit(t: float) -> None:
        nonlocal evaluations
        if t in points:
            return
        alloc = interpolate(a, b, t)
        key = alloc.keep.tobytes()
        if key in by_keep:
            old = by_keep[key]
            points[t] = dataclasses.replace(old, t=t, seconds=0.0, reused=True)
            return
        tic = time.perf_counter()
        model = copy.deepcopy(dense)
        prune_(model, alloc)
        run_repair(model, repair, calib, dense=dense, chunk_size=chunk_size,
                   **dict(repair_options or {}))
        s = label_free_scores(predict_logits(model, score), dense_logits)
        point = SearchPoint(t, [int(k) for k in alloc.keep], s["agreement"], s["kl"],
                            alloc.collapsed, time.perf_counter() - tic)
        points[t] = by_keep[key] = point
        evaluations += 1
        if observe is not None:
            observe(point, model)
        if best[0] is None or _rank(point, criterion) < _rank(best[0], criterion):
            best[:] = [point, model if keep_model else None]
        bar.update(1)

    for t in np.linspace(0.0, 1.0, grid).tolist():
        visit(float(t))
    step = 1.0 / (grid - 1) / 2
    for _ in range(refine):
        centre = min(points.values(), key=lambda p: _rank(p, criterion)).t
        for t in (centre - step, centre + step):
            if 0.0 <= t <= 1.0:
                visit(t)
        step /= 2
    bar.close()
    chosen = min(points.values(), key=lambda p: _rank(p, criterion))
    model = best[1] if keep_model and best[0].keep == chosen.keep else None
    alloc = _allocation(a, np.array(chosen.keep, dtype=np.int64), anchors, chosen.t)
    if alloc.collapsed:
        warnings.warn(LayerCollapseWarning(
            f"the searched allocation (t={chosen.t:g}) keeps 0 weights in "
            f"{len(alloc.collapsed)} layer(s): {', '.join(alloc.collapsed)}; pass min_keep=1 "
            "(or more) to keep weights in every layer"), stacklevel=2)
    return SearchResult(alloc, chosen.t, criterion, anchors, repair, options,
                        list(points.values()),
                        evaluations, time.perf_counter() - start, model)


def _allocation(like: Allocation, keep: np.ndarray, anchors: tuple[str, str], t: float
                ) -> Allocation:
    return Allocation(f"search({anchors[0]},{anchors[1]},t={t:g})", like.sparsity,
                      list(like.names), list(like.shapes), like.sizes.copy(),
                      keep.astype(np.int64), tuple(like.excluded), like.min_keep,
                      dict(like.aliases))


def interpolate(a: Allocation, b: Allocation, t: float) -> Allocation:
    """The family's point t: per free layer density proportional to
    d_a ** (1 - t) * d_b ** t (d = keep / size), made exact by
    ``allocation.densities_to_keep`` with the floor min(min_keep, size); excluded layers dense.

    Args:
        a, b: allocations of the same layers at the same sparsity, exclusions and min_keep
            (``allocate(model, "erk", S)`` and ``allocate(model, "lamp", S)``).
        t: float in [0, 1]; t = 0 returns a's keep counts, t = 1 b's, exactly.
    Returns:
        Allocation (int64 ``keep``, same total as a and b, ``method`` "search(A,B,t=...)").
    Raises:
        ValueError: t outside [0, 1] or NaN; a and b differ in layers, sizes, total, exclusions
            or min_keep.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1] (0 = {a.method}, 1 = {b.method}), got {t!r}")
    if (a.names != b.names or not np.array_equal(a.sizes, b.sizes)
            or a.keep_total != b.keep_total or tuple(a.excluded) != tuple(b.excluded)
            or a.min_keep != b.min_keep):
        raise ValueError(f"{a.method} and {b.method} allocations differ in layers, sizes, kept "
                         "total, exclusions or min_keep; allocate both on one model with the "
                         "same sparsity, exclude and min_keep")
    free = np.array([n not in a.excluded for n in a.names])
    sizes = a.sizes
    keep = sizes.copy()
    if free.any():
        da = a.keep[free].astype(np.float64) / sizes[free]
        db = b.keep[free].astype(np.float64) / sizes[free]
        # numpy: x ** 1.0 == x and x ** 0.0 == 1.0 (0 ** 0 included), so the ends are the
        # anchors' densities exactly, which densities_to_keep turns back into their counts.
        keep[free] = densities_to_keep(da ** (1.0 - t) * db ** t, sizes[free],
                                       a.keep_total - int(sizes[~free].sum()),
                                       np.minimum(a.min_keep, sizes[free]))
    return _allocation(a, keep, (a.method, b.method), float(t))
