"""Repair-aware allocation: search a one-parameter family of layer allocations, each point
pruned, repaired and scored without labels against the dense model (issue #19, "Beyond
choosing"). A separate entry point from the shape-only allocators of ``allocation.py``: it
needs images (calibration images for the repair, disjoint scoring images for the score).

The family (docs/search.md). Two anchor allocations A and B (by default the two best fixed
allocations by the criterion, below; the first design fixed them to ERK and LAMP, the two
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

Anchors chosen by the criterion (``anchors="auto"``, the default). The ERK-to-LAMP family does
not contain uniform or global magnitude, and global magnitude was the best fixed rule at
ResNet-20 0.9 with bn_recal (docs/search.md: the ERK-LAMP search lost 0.70 pt to it while KL
ranked the fixed rules correctly). So by default every candidate fixed allocator (``candidates``,
default ERK, LAMP, uniform, global magnitude) is first pruned, repaired and scored; the two
best by the criterion (with different keep counts, when any two differ) become A and B, and the
family between them is searched as below. Its ends are those two evaluations (reused, not
repaired again), so the choice is the best evaluated point overall and is never worse by the
criterion than any candidate fixed allocation.

The search: a grid of ``grid`` equally spaced t (default 5: 0, 1/4, 1/2, 3/4, 1), then
``refine`` rounds (default 2) that evaluate the two neighbours of the best point at half the
previous spacing (1/8, then 1/16): at most grid + 2 * refine = 9 repair + score evaluations
(with "auto": the candidates first, len(candidates) = 4 evaluations, then at most 9 family
points whose two ends are candidates already evaluated, so at most 4 + 7 = 11 repairs), plus one
dense forward pass over the scoring images. Points whose integer counts equal an
already evaluated point's reuse its scores (not counted as evaluations). The criterion:
"agreement" (default, ``DEFAULT_CRITERION``), the highest top-1 agreement with the dense model
over the scoring images; "kl", the lowest mean KL(p_dense || p_pruned). Ties go to the other
criterion, then the lower t. Labels are never read: the inputs are image tensors only.

Layer moves (``layer_sweeps``, default 0: off). The family is one-dimensional, and its best
point by true top-1 was at most 1.35 pt above the best fixed allocation in the first
measurements (docs/search.md section 3), so a search confined to it cannot gain much more.
After the family, ``layer_sweeps`` sweeps of greedy best-improvement moves free every layer's
budget: a proposal multiplies one free layer's density by the factor f or 1/f (capped at 1; the
others rescaled by ``densities_to_keep`` to the exact budget), each sweep evaluates every such
proposal (``2 x free layers`` repairs) and accepts the best when it is strictly better by the
criterion than the current point; a sweep without one sets f to sqrt(f). Scoring a whole
neighbourhood of per-layer changes by KL to the dense model after compression is the approach
of EvoPress (Sieberling et al., ICML 2025: a (1 + lambda) evolutionary search over per-layer levels
with KL fitness); this is its deterministic greedy form, one move per sweep, scored by the
search's criterion (agreement by default: it followed top-1 where KL did not,
``DEFAULT_CRITERION``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import numbers
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

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
from ..repair.engine import batchnorms, check_image_channels
from ..runtime import user_stacklevel

CRITERIA = ("kl", "agreement")
# The default criterion: agreement since 2026-11-30, KL before. Evidence: (1) choosing the
# allocation after a fixed repair (the "auto" candidates step) in the evidence study's complete
# selections, agreement is within 0.5 pt of the best allocation in at least as many regimes as
# KL after every repair (more after every repair but reconstruct, where both hit every regime;
# the study report's "Choosing the allocation with the repair fixed" table; docs/search.md,
# section 5); (2) the full search with layer moves, ResNet-20, seed 0,
# full test split: agreement +2.57 / +3.12 pt over the best fixed allocation at 0.9 / 0.95
# with bn_recal, KL +2.25 / +0.08 (docs/search.md, section 5).
DEFAULT_CRITERION = "agreement"
DEFAULT_ANCHORS = ("erk", "lamp")  # the fixed pair of the original family (anchors=...)
DEFAULT_CANDIDATES = ("erk", "lamp", "uniform", "global_magnitude")  # anchors="auto"


@dataclass
class SearchPoint:
    """One evaluated allocation: a point of the family (``t`` in [0, 1]) or, with
    ``anchors="auto"``, a candidate fixed allocation (``t`` None). ``method`` the allocation's
    method ("search(A,B,t=...)" or the candidate's allocator name); ``keep`` the int keep count
    per layer (allocation order); ``agreement`` (percent, 0-100) and ``kl`` (nats, mean
    KL(p_dense || p_pruned)) on the scoring images after the repair; ``collapsed`` the layers
    left with zero weights; ``seconds`` wall time of prune + repair + score (0 when
    ``reused``: same integer counts as an earlier point, scores copied)."""

    t: float | None
    keep: list[int]
    agreement: float
    kl: float
    collapsed: list[str]
    seconds: float
    reused: bool = False
    method: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SearchResult:
    """What ``search_allocation`` returns.

    ``allocation``: the chosen exact-count Allocation (the type ``allocate`` returns; ``method``
    reads ``search(A,B,t=...)``, with ``+1 layer move`` / ``+N layer moves`` after moves);
    ``t`` the family's parameter; ``criterion`` the one it was chosen by;
    ``anchors`` (A, B) as searched (with "auto", the two best candidates by the criterion);
    ``repair`` and ``repair_options`` as run; ``points`` every evaluated point of the family in
    evaluation order; ``fixed`` the candidate fixed allocations evaluated before the family, in
    ``candidates`` order (``anchors="auto"``; empty for a given pair); ``evaluations`` the
    repairs run (reused points excluded, candidates included); ``seconds`` the whole search;
    ``model`` the pruned and repaired model at the choice (None when ``keep_model=False``);
    ``moves`` the accepted layer moves in order (``layer_sweeps``; the last one is the choice,
    ``t`` stays the family point they started from), ``proposals`` every move evaluated (method
    ``"move(<layer>,x<factor>)"``, ``t`` None); ``settings`` the search's other inputs as run
    (sparsity, candidates, exclude, min_keep, grid, refine, layer_sweeps, move_factor), so a
    saved ``to_dict()`` says how it was produced."""

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
    fixed: list[SearchPoint] = field(default_factory=list)
    moves: list[SearchPoint] = field(default_factory=list)
    proposals: list[SearchPoint] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def best(self) -> SearchPoint:
        """The chosen point: the last accepted layer move, else the family point at ``t``."""
        return self.moves[-1] if self.moves else next(p for p in self.points if p.t == self.t)

    def to_dict(self) -> dict:
        """JSON-ready: everything but the model; the allocation as ``Allocation.to_dict``."""
        return {"settings": self.settings,
                "t": self.t, "criterion": self.criterion, "anchors": list(self.anchors),
                "repair": self.repair, "repair_options": self.repair_options,
                "evaluations": self.evaluations, "seconds": self.seconds,
                "points": [p.to_dict() for p in self.points],
                "fixed": [p.to_dict() for p in self.fixed],
                "moves": [p.to_dict() for p in self.moves],
                "proposals": [p.to_dict() for p in self.proposals],
                "allocation": self.allocation.to_dict()}


def _rank(point: SearchPoint, criterion: str, tie: float | None = None) -> tuple:
    """Sort key, lower is better: the criterion, then the other one, then ``tie`` (default
    the point's t: the lower t wins; candidates pass their position in ``candidates``)."""
    last = point.t if tie is None else tie
    if criterion == "kl":
        return (point.kl, -point.agreement, last)
    return (-point.agreement, point.kl, last)


def _digests(x: torch.Tensor) -> set[bytes]:
    # the raw bytes, viewed as uint8: numpy has no bfloat16
    return {hashlib.blake2b(img.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
            for img in x.detach().cpu().contiguous()}


def _check_anchors(anchors, candidates) -> tuple[str, ...]:
    """The allocators to evaluate first ("auto": ``candidates``, default DEFAULT_CANDIDATES) or
    the given pair; ValueError for anything else."""
    if isinstance(anchors, str):
        if anchors != "auto":
            raise ValueError(f"anchors must be 'auto' or two different allocators, got "
                             f"{anchors!r}")
        names = tuple(DEFAULT_CANDIDATES if candidates is None else candidates)
        if any(not isinstance(n, str) for n in names) or len(set(names)) != len(names) \
                or len(names) < 2:
            raise ValueError(f"candidates must be two or more different allocators, got "
                             f"{names!r}")
        what = "candidates"
    else:
        names = tuple(anchors)
        if len(names) != 2 or names[0] == names[1]:
            raise ValueError(f"anchors must be 'auto' or two different allocators, got "
                             f"{names!r}")
        if candidates is not None:
            raise ValueError("candidates are the allocators anchors='auto' chooses from; with "
                             f"a given pair {names!r} pass candidates=None")
        what = "anchors"
    unknown = [a for a in names if a not in ALLOCATORS]
    if unknown:
        raise ValueError(f"unknown allocator(s) {unknown} in {what}; choose from "
                         f"{', '.join(ALLOCATORS)}")
    return names


def _check_inputs(dense, sparsity, calibration, scoring, repair_name, repair_options, criterion,
                  anchors, candidates, grid, refine, layer_sweeps=0, move_factor=2.0):
    """Every input check, before any work; returns (calibration, scoring, resolved options)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    _check_anchors(anchors, candidates)
    if repair_name not in REPAIRS:
        raise ValueError(f"unknown repair method {repair_name!r}; choose one of "
                         f"{', '.join(REPAIRS)}")
    impl = REPAIRS[repair_name]
    opts = impl.resolve(**dict(repair_options or {}))  # TypeError names the valid options
    counts = _check_search_numbers(grid, refine, layer_sweeps, move_factor)
    check_sparsity(sparsity)
    check_model(dense, "dense")
    if impl.needs_bn and not batchnorms(dense):
        raise ValueError(f"{repair_name} repairs BatchNorm statistics but the model has no "
                         "BatchNorm layer; use a model with BatchNorm or repair 'none'")
    calib = as_image_tensor(calibration)
    try:
        score = as_image_tensor(scoring)
    except (TypeError, ValueError) as e:
        # The message names "calibration" (as_image_tensor serves repair): renamed, not
        # prefixed, so it does not read "scoring images: scoring set is empty".
        raise type(e)(str(e).replace("calibration", "scoring")) from None
    if calib.shape[1:] != score.shape[1:]:
        raise ValueError(f"calibration images are {tuple(calib.shape[1:])} but scoring images "
                         f"{tuple(score.shape[1:])}; draw both from one data set and resolution")
    shared = len(_digests(calib) & _digests(score))
    if shared:
        raise ValueError(f"{shared} scoring image(s) are also calibration images; a repair "
                         "fitted to an image scores well on it, so the score would be biased. "
                         "Draw them with sparse_repair.data.scoring_set(dataset, n, seed, "
                         "calib=<calibration size>), disjoint by construction")
    return calib, score, opts, counts


def _check_search_numbers(grid, refine, layer_sweeps, move_factor) -> tuple[int, int, int, float]:
    """(grid, refine, layer_sweeps) as ints and move_factor as a float, or ValueError. Any
    integer type counts as an int (numpy's included, bool not), any real number as a number
    (numpy's, Fraction, Decimal); a factor whose float is not finite and above 1 is refused."""
    ints = []
    for name, value, least in (("grid", grid, 2), ("refine", refine, 0),
                               ("layer_sweeps", layer_sweeps, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        ints.append(int(value))
    factor = math.nan
    if not isinstance(move_factor, bool) and isinstance(move_factor, numbers.Real | Decimal):
        try:
            factor = float(move_factor)
        except (OverflowError, ValueError):  # beyond float range, or Decimal("sNaN")
            factor = math.nan
    if not (math.isfinite(factor) and factor > 1.0):
        raise ValueError(f"move_factor must be a finite number > 1 (a layer's density is "
                         f"multiplied and divided by it, as a float), got {move_factor!r}")
    return ints[0], ints[1], ints[2], factor


def search_allocation(dense: nn.Module, sparsity: float, calibration: torch.Tensor,
                      scoring: torch.Tensor, *, repair: str = "bn_recal",
                      repair_options: dict | None = None,
                      criterion: str = DEFAULT_CRITERION,
                      anchors: str | Sequence[str] = "auto",
                      candidates: Sequence[str] | None = None, exclude: Sequence[str] = (),
                      min_keep: int = 0, grid: int = 5, refine: int = 2,
                      layer_sweeps: int = 0, move_factor: float = 2.0,
                      keep_model: bool = True, chunk_size: int = 256,
                      observe: Callable[[SearchPoint, nn.Module], None] | None = None,
                      progress: bool = False) -> SearchResult:
    """The allocation that the label-free criterion prefers after the given repair, among the
    candidate fixed allocations and the geometric family between the two best of them, then
    optionally improved by greedy layer moves (``layer_sweeps``; module docstring;
    docs/search.md).

    Args:
        dense: the unpruned model (any device; never modified: every point prunes a copy).
        sparsity: global pruned fraction in [0, 1), exact as in ``allocate``.
        calibration: float [N, C, H, W] normalized images (no labels), on any device; the
            repair's input (``sparse_repair.data.calibration_set``).
        scoring: float [M, C, H, W] normalized images disjoint from ``calibration``
            (``sparse_repair.data.scoring_set``); the criterion is computed on them.
        repair: a registered repair method (``repair.REPAIRS``); ``repair_options`` its options.
        criterion: "agreement" (highest top-1 agreement with the dense model, default;
            ``DEFAULT_CRITERION`` gives the evidence) or "kl" (lowest mean KL(p_dense ||
            p_pruned), the default before 2026-11-30), ``evaluate.label_free_scores``.
        anchors: "auto" (default): evaluate every allocator of ``candidates`` after the
            repair, then search the family between the two best by the criterion (two with
            different keep counts when any two differ; ties go to the other criterion, then to
            the earlier candidate); or a pair of allocators at t = 0 and t = 1, e.g.
            ("erk", "lamp"), the family searched without the candidate step.
        candidates: the allocators "auto" evaluates, two or more (default
            ("erk", "lamp", "uniform", "global_magnitude")); only with ``anchors="auto"``.
        exclude, min_keep: as in ``allocate``; passed to every anchor and candidate,
            ``min_keep`` is also the floor of every interior point.
        grid, refine: grid points (>= 2) and refinement rounds (>= 0); at most
            grid + 2 * refine family evaluations (with "auto", plus len(candidates), less the
            family's two ends, which are candidates already evaluated), plus at most
            ``layer_sweeps * 2 * free layers`` for the layer moves.
        layer_sweeps: after the family, this many sweeps of greedy layer moves (default 0:
            off; docs/search.md "Layer moves"): each sweep multiplies and divides one free
            layer's density at a time by the current factor (the others rescaled to the exact
            budget), evaluates all ``2 x free layers`` proposals and accepts the best one when
            it is strictly better by the criterion than the current choice; a sweep without
            one takes the square root of the factor. Never worse by the criterion than the
            family's choice. The sweeps stop early once the factor's square roots reach 1.0 in
            float (no proposal is left), so a huge value means "until nothing moves".
        move_factor: the first sweep's factor (> 1, default 2; any real number type, finite
            and above 1 as a float).
        keep_model: return the repaired model at the choice as ``result.model``.
        chunk_size: the repair's chunk size (images per forward).
        observe: called as observe(point, model) after each new evaluation (candidates
            and layer-move proposals included, ``point.t`` None for them; a proposal's
            ``method`` starts with "move(") with the pruned and repaired model (for
            reporting only, e.g. a labeled accuracy in a measurement script; it must not modify
            the model, which may become ``result.model``).
        progress: a progress bar with ETA on stderr.
    Returns:
        SearchResult; ``allocation.keep`` sums exactly to N - round_half_up(S * N)
        (docs/allocation.md) with every layer within [min(min_keep, size), size] (excluded
        layers dense). With "auto" the chosen point is never worse by the criterion than any
        candidate in ``result.fixed``.
    Raises (before any pruning or repair): ValueError for an unknown criterion, anchor,
        candidate or repair, anchors neither "auto" nor two different allocators, fewer than
        two different candidates or candidates given with a pair of anchors, a sparsity outside
        [0, 1) (TypeError for a non-number), grid, refine or layer_sweeps not an int (any
        integer type, bool refused) or below 2, 0, 0, move_factor not a real number that is
        finite and > 1 as a float, a dense model that
        ``repair.check_model`` refuses or without BatchNorm for a BN repair, empty or non-4-D
        images, calibration and scoring images of different [C, H, W], a channel count the
        model's first layer does not take (the message names the layer), images that overflow
        the model's dtype, or a scoring image
        bit-for-bit equal to a calibration image; TypeError for a dense model that is not an
        nn.Module (``check_model``) or images given as a tuple or list
        (what a labeled loader yields) or an option the repair does not take.
        Overlap is checked only as exact equality: a scoring image that is an augmented or
        re-encoded calibration image cannot be detected, so draw the two with
        ``data.calibration_set`` and ``data.scoring_set`` (disjoint by construction). The
        errors of ``allocate`` (e.g. min_keep above the budget) and of ``repair`` propagate.
    Warns:
        LayerCollapseWarning when the chosen allocation leaves a layer with zero weights.
    """
    start = time.perf_counter()
    calib, score, opts, counts = _check_inputs(dense, sparsity, calibration, scoring, repair,
                                               repair_options, criterion, anchors, candidates,
                                               grid, refine, layer_sweeps, move_factor)
    grid, refine, layer_sweeps, move_factor = counts
    auto = isinstance(anchors, str)
    names = _check_anchors(anchors, candidates)
    options = dataclasses.asdict(opts)
    first = next(t for t in [*dense.parameters(), *dense.buffers()])
    # Scoring images go through the dense model directly (repair casts its own calibration
    # input), so float64/float16 images are cast to the model's dtype as repair's are.
    calib, score = calib.to(first.device), score.to(first.device, first.dtype)
    for what, x in (("calibration", calib), ("scoring", score)):
        # finite as given (checked above) but not in the model's dtype: refused before any work
        if not torch.isfinite(x.to(first.dtype)).all():
            raise ValueError(f"{what} images overflow the model's dtype {first.dtype} (largest "
                             f"|value| {float(x.abs().max()):.3g}); pass normalized images")
    # Images with a channel count the model's first layer does not take would fail inside
    # torch's conv with a message about weights: the engine's probe (two images, eval mode,
    # no_grad, nothing written) names the layer first.
    was_training = dense.training
    dense.eval()
    try:
        check_image_channels(dense, calib[:2].to(first.dtype), "dense")
    finally:
        dense.train(was_training)
    with warnings.catch_warnings():
        # The anchors' own collapse warnings would name allocations that may not be chosen;
        # the choice is warned about below.
        warnings.simplefilter("ignore", LayerCollapseWarning)
        allocs = {n: allocate(dense, n, sparsity, exclude=exclude, min_keep=min_keep)
                  for n in names}
    dense_logits = predict_logits(dense, score)
    max_evals = (len(names) + grid + 2 * refine - 2) if auto else grid + 2 * refine
    free = np.array([n not in allocs[names[0]].excluded for n in allocs[names[0]].names])
    max_evals += layer_sweeps * 2 * int(free.sum())
    label = "auto " + ",".join(names) if auto else f"{names[0]}->{names[1]}"
    desc = f"search {label} {repair}"
    bar = progress_bar(max_evals, f"{desc}: candidates" if auto else f"{desc}: family",
                       enabled=progress, unit="eval")
    by_keep: dict[bytes, SearchPoint] = {}
    best: list = [None, None, None]  # [SearchPoint, rank, model]
    evaluations = 0

    def evaluate_at(alloc: Allocation, t: float | None, method: str,
                    rank_tie: float | None = None) -> SearchPoint:
        """Prune a copy to ``alloc``, repair, score; or reuse the scores of equal counts."""
        nonlocal evaluations
        key = alloc.keep.tobytes()
        if key in by_keep:
            return dataclasses.replace(by_keep[key], t=t, method=method, seconds=0.0,
                                       reused=True)
        tic = time.perf_counter()
        model = copy.deepcopy(dense)
        prune_(model, alloc)
        run_repair(model, repair, calib, dense=dense, chunk_size=chunk_size,
                   **dict(repair_options or {}))
        s = label_free_scores(predict_logits(model, score), dense_logits)
        point = SearchPoint(t, [int(k) for k in alloc.keep], s["agreement"], s["kl"],
                            alloc.collapsed, time.perf_counter() - tic, method=method)
        by_keep[key] = point
        evaluations += 1
        if observe is not None:
            observe(point, model)
        rank = _rank(point, criterion, rank_tie)
        if best[0] is None or rank < best[1]:
            best[:] = [point, rank, model if keep_model else None]
        bar.update(1)
        return point

    fixed: list[SearchPoint] = []
    if auto:
        for i, n in enumerate(names):
            fixed.append(evaluate_at(allocs[n], None, n, rank_tie=float(i)))
        order = sorted(range(len(names)), key=lambda i: _rank(fixed[i], criterion, float(i)))
        first = order[0]
        second = next((i for i in order[1:] if fixed[i].keep != fixed[first].keep), order[1])
        pair = (names[first], names[second])
    else:
        pair = (names[0], names[1])
    a, b = allocs[pair[0]], allocs[pair[1]]
    points: dict[float, SearchPoint] = {}
    bar.set_description(f"{desc}: family {pair[0]}-{pair[1]}")

    def visit(t: float) -> None:
        if t not in points:
            # The ends are the anchors themselves (interpolate reproduces them count for count;
            # taking them directly makes "never worse than the anchors" structural).
            try:
                alloc = a if t == 0.0 else b if t == 1.0 else interpolate(a, b, t)
            except EmptyMixError:
                # No interior point exists; the ends (already scored) remain the choices, and
                # the work done so far is kept rather than lost to an error.
                return
            points[t] = evaluate_at(alloc, t, f"search({pair[0]},{pair[1]},t={t:g})")

    for t in np.linspace(0.0, 1.0, grid).tolist():
        visit(float(t))
    step = 1.0 / (grid - 1) / 2
    for _ in range(refine):
        centre = min(points.values(), key=lambda p: _rank(p, criterion)).t
        for t in (centre - step, centre + step):
            if 0.0 <= t <= 1.0:
                visit(t)
        step /= 2
    family = min(points.values(), key=lambda p: _rank(p, criterion))
    if layer_sweeps:
        bar.set_description(f"{desc}: layer moves")
    moves, proposals = _layer_moves(a, family, free, layer_sweeps, move_factor, criterion,
                                    evaluate_at)
    # The total was an upper bound (reused points, refinement steps outside [0, 1], moves that
    # stopped early): end the bar at what was done, not below 100%.
    bar.total = bar.n
    bar.refresh()
    bar.close()
    chosen = moves[-1] if moves else family
    alloc = _allocation(a, np.array(chosen.keep, dtype=np.int64), pair, family.t, len(moves))
    model = best[2] if keep_model and best[0].keep == chosen.keep else None
    if keep_model and model is None:
        # Only on an exact tie of both scores between two evaluated points with other counts:
        # rebuild the choice (prune + repair are deterministic).
        model = copy.deepcopy(dense)
        prune_(model, alloc)
        run_repair(model, repair, calib, dense=dense, chunk_size=chunk_size,
                   **dict(repair_options or {}))
        evaluations += 1
    if alloc.collapsed:
        warnings.warn(LayerCollapseWarning(
            f"the searched allocation ({alloc.method}) keeps 0 weights in "
            f"{len(alloc.collapsed)} layer(s): {', '.join(alloc.collapsed)}; pass min_keep=1 "
            "(or more) to keep weights in every layer"), stacklevel=user_stacklevel())
    settings = {"sparsity": float(sparsity), "candidates": list(names) if auto else None,
                "exclude": list(exclude), "min_keep": int(min_keep), "grid": grid,
                "refine": refine, "layer_sweeps": layer_sweeps, "move_factor": move_factor}
    return SearchResult(alloc, family.t, criterion, pair, repair, options,
                        list(points.values()), evaluations, time.perf_counter() - start, model,
                        fixed, moves, proposals, settings)


def _layer_moves(like: Allocation, start: SearchPoint, free: np.ndarray, sweeps: int,
                 factor: float, criterion: str,
                 evaluate_at: Callable[..., SearchPoint]
                 ) -> tuple[list[SearchPoint], list[SearchPoint]]:
    """Greedy best-improvement moves from ``start`` (``search_allocation``'s ``layer_sweeps``):
    returns (accepted moves in order, every proposal evaluated). A proposal multiplies one free
    layer's density by ``factor`` or ``1 / factor`` (capped at 1) and rescales all free layers
    to the exact budget with ``densities_to_keep`` (floors ``min(min_keep, size)``); proposals
    whose counts equal the current ones are skipped. Ties keep the current point: a move must
    be strictly better by the criterion (then the other criterion)."""
    sizes = like.sizes[free]
    budget = int(like.keep_total - like.sizes[~free].sum())
    floor = np.minimum(like.min_keep, sizes)
    names = [n for n, f in zip(like.names, free) if f]
    current, moves, proposals = start, [], []
    for _ in range(sweeps):
        if factor == 1.0:
            # sqrt has converged to 1 in float: d * 1 == d, so no proposal is left in any later
            # sweep; stopping here returns what running them all would (a huge
            # ``layer_sweeps`` means "until nothing moves", not hours of empty sweeps).
            break
        keep = np.array(current.keep, dtype=np.int64)
        dens = keep[free] / sizes
        tried = []
        for j, name in enumerate(names):
            for f in (factor, 1.0 / factor):
                d = dens.copy()
                d[j] = min(d[j] * f, 1.0)
                if d[j] == dens[j]:
                    continue  # at density 1 going up, or empty
                new = keep.copy()
                new[free] = densities_to_keep(d, sizes, budget, floor)
                if np.array_equal(new, keep):
                    continue
                alloc = dataclasses.replace(like, keep=new)
                point = evaluate_at(alloc, None, f"move({name},x{f:.4g})",
                                    rank_tie=2.0 + len(proposals))
                proposals.append(point)
                tried.append(point)
        best = min(tried, key=lambda p: _rank(p, criterion, 0.0), default=None)
        if best is not None and _rank(best, criterion, 0.0) < _rank(current, criterion, 0.0):
            current = best
            moves.append(best)
        else:
            factor = math.sqrt(factor)
    return moves, proposals


def _allocation(like: Allocation, keep: np.ndarray, anchors: tuple[str, str], t: float,
                moves: int = 0) -> Allocation:
    suffix = f"+{moves} layer move{'s' * (moves != 1)}" if moves else ""
    return Allocation(f"search({anchors[0]},{anchors[1]},t={t:g}){suffix}", like.sparsity,
                      list(like.names), list(like.shapes), like.sizes.copy(),
                      keep.astype(np.int64), tuple(like.excluded), like.min_keep,
                      dict(like.aliases))


class EmptyMixError(ValueError):
    """The geometric mix of two allocations is zero in every layer (they share no kept layer,
    possible at extreme sparsity with min_keep=0): that family has no interior points."""


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
        mix = da ** (1.0 - t) * db ** t
        if not (mix > 0).any():
            raise EmptyMixError(f"{a.method} and {b.method} keep weights in no common layer, so "
                                f"their geometric mix at t={t:g} is empty; use min_keep=1 (every "
                                f"layer keeps weights) or other anchors")
        keep[free] = densities_to_keep(mix, sizes[free],
                                       a.keep_total - int(sizes[~free].sum()),
                                       np.minimum(a.min_keep, sizes[free]))
    return _allocation(a, keep, (a.method, b.method), float(t))
