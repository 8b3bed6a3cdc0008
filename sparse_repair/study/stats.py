"""Statistics over study rows: cell summaries, paired bootstrap confidence intervals, preferred
allocations and the transition regime. Pure functions on lists of dicts."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

ACTIVATION_REPAIRS = ("layerwise", "channelwise", "asr", "clipped_asr")


def cells(rows: list[dict]) -> list[dict]:
    """mean, std (ddof=1; 0 for one seed) and n over seeds per (model, dataset, allocation,
    sparsity, repair)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["dataset"], r["allocation"], r["sparsity"], r["repair"])].append(
            r["top1"])
    out = []
    for (m, d, a, s, rep), vals in sorted(groups.items()):
        v = np.asarray(vals)
        out.append({"model": m, "dataset": d, "allocation": a, "sparsity": s, "repair": rep,
                    "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "n": len(v)})
    return out


def bootstrap_ci(diffs: np.ndarray, level: float = 0.95, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences (resampling seeds)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if len(diffs) == 1:
        return float(diffs[0]), float(diffs[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(resamples, len(diffs)))
    means = diffs[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass
class PairedDiff:
    key: tuple
    label: str
    mean: float
    lo: float
    hi: float
    n: int

    @property
    def significant(self) -> bool:
        return self.n > 1 and (self.lo > 0 or self.hi < 0)


def paired_diffs(rows: list[dict], field: str, a: str, b: str, by: tuple[str, ...]
                 ) -> list[PairedDiff]:
    """a - b for ``field`` (allocation or repair), paired on seed, grouped by ``by``."""
    table: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        table[tuple(r[k] for k in by) + (r["seed"],)][r[field]] = r["top1"]
    groups: dict[tuple, list[float]] = defaultdict(list)
    for key, vals in table.items():
        if a in vals and b in vals:
            groups[key[:-1]].append(vals[a] - vals[b])
    out = []
    for key, d in sorted(groups.items()):
        lo, hi = bootstrap_ci(np.asarray(d))
        out.append(PairedDiff(key, f"{a} - {b}", float(np.mean(d)), lo, hi, len(d)))
    return out


def transition_points(curve: dict[float, dict[str, float]], num_classes: int,
                      fail: float | None = None, recovery_margin: float = 5.0) -> list[float]:
    """The sparsities of ``curve`` (sparsity -> {repair: mean top-1}) where bn_recal < fail
    (default twice chance) while the best activation-statistic repair is >= fail and
    >= bn_recal + margin, in increasing order."""
    fail = 2 * 100.0 / num_classes if fail is None else fail
    hits = []
    for s in sorted(curve):
        c = curve[s]
        acts = [c[r] for r in ACTIVATION_REPAIRS if r in c]
        if "bn_recal" in c and acts:
            best = max(acts)
            if c["bn_recal"] < fail and best >= fail and best >= c["bn_recal"] + recovery_margin:
                hits.append(s)
    return hits


def transition_interval(curve: dict[float, dict[str, float]], num_classes: int,
                        fail: float | None = None, recovery_margin: float = 5.0
                        ) -> tuple[float, float] | None:
    """(lowest, highest) sparsity of `transition_points`, or None where none qualifies."""
    return span(transition_points(curve, num_classes, fail, recovery_margin))


def span(hits: list[float]) -> tuple[float, float] | None:
    """(first, last) of sorted qualifying sparsities, or None for none."""
    return (hits[0], hits[-1]) if hits else None


def describe_interval(grid: list[float], hits: list[float]) -> str:
    """A transition interval in words, as far as the sampled ``grid`` supports it.

    The regime's true edges lie between the outermost qualifying grid points and their
    non-qualifying neighbours, so a one-point interval has width 0 on the grid but not in
    fact; a reader needs the neighbours (or "grid end") to judge it, and needs to know when
    grid points inside the interval do not qualify (the curve dips out and back in)."""
    if not hits:
        return "none found"
    grid = sorted(grid)
    lo, hi = hits[0], hits[-1]
    inside = [s for s in grid if lo <= s <= hi]
    i_lo, i_hi = grid.index(lo), grid.index(hi)
    below = f"between {grid[i_lo - 1]} and {lo}" if i_lo > 0 \
        else f"at or below the grid's start {lo}"
    above = f"between {hi} and {grid[i_hi + 1]}" if i_hi + 1 < len(grid) \
        else f"at or beyond the grid's end {hi}"
    gaps = "" if len(hits) == len(inside) else \
        f"; {len(inside) - len(hits)} grid point(s) inside do not qualify: " \
        f"{', '.join(str(s) for s in inside if s not in hits)}"
    return (f"sparsity {lo} to {hi} (width {hi - lo:.3f} on the grid, {len(hits)} of "
            f"{len(grid)} sparsities; lower edge {below}, upper edge {above}{gaps})")
