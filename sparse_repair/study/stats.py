"""Statistics over study rows: cell summaries, paired t-intervals and t-tests over seeds,
preferred allocations and the transition regime. Pure functions on lists of dicts."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..regime import RECOVERY_MARGIN_PT, is_transition


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


# A significance flag needs at least this many seeds. With 3 seeds a percentile bootstrap of the
# mean is [min, max] of the differences, so "excludes 0" meant "same sign in every seed", a sign
# test at p = 2 * 0.5**3 = 0.25; the t-interval is honest at n = 3 but its quantile
# (t_{0.975,2} = 4.30) makes it so wide that a flag would be rare and fragile to one seed.
# Source: review of study/stats.py, issue "Canonical CIFAR-10 as the ground truth", section
# "Statistics that mean what they say".
MIN_SEEDS_FOR_SIGNIFICANCE = 5


def paired_t_interval(diffs, level: float = 0.95
                      ) -> tuple[float | None, float | None, float | None]:
    """(lo, hi, p) for the mean of paired differences over seeds: the ``level`` t-interval
    mean ± t_{(1+level)/2, n-1} * sd / sqrt(n) and the two-sided p-value of the paired t-test
    of mean 0, both from ``scipy.stats.ttest_1samp`` (Student 1908; any statistics text, e.g.
    Wasserman, *All of Statistics*, 10.4).

    One difference gives no interval and no test: (None, None, None), never NaN, so a report
    prints "n/a". Differences that are all equal (sd 0; e.g. two repairs both at chance in
    every seed) have the point interval [mean, mean] and p = 1 for mean 0, else 0, where
    scipy would return NaN (0/0) or an infinite t."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    if len(d) < 2:
        return None, None, None
    mean = float(d.mean())
    # equal up to float rounding counts as equal: top-1 differences such as 3.02 and
    # 3.0200000000000005 (sums of 0.05-pt steps) gave scipy's t = 4e14 and p = 1.5e-15
    if np.ptp(d) <= 1e-9 * max(1.0, float(np.abs(d).max())):
        return mean, mean, (1.0 if abs(mean) <= 1e-9 else 0.0)
    res = stats.ttest_1samp(d, 0.0)
    ci = res.confidence_interval(confidence_level=level)
    return float(ci.low), float(ci.high), float(res.pvalue)


@dataclass
class PairedDiff:
    """Mean of paired differences ``label`` over ``n`` seeds for one group ``key``, with its
    95% paired t-interval [lo, hi] and paired t-test p-value (None for one seed)."""
    key: tuple
    label: str
    mean: float
    lo: float | None
    hi: float | None
    p: float | None
    n: int

    @property
    def significant(self) -> bool:
        """The t-interval excludes 0, and only with >= MIN_SEEDS_FOR_SIGNIFICANCE seeds (see
        there for why fewer are never flagged)."""
        if self.n < MIN_SEEDS_FOR_SIGNIFICANCE or self.lo is None or self.hi is None:
            return False
        return self.lo > 0 or self.hi < 0


def paired_diffs(rows: list[dict], field: str, a: str, b: str, by: tuple[str, ...],
                 level: float = 0.95) -> list[PairedDiff]:
    """a - b for ``field`` (allocation or repair), paired on seed, grouped by ``by``, with the
    ``level`` paired t-interval of `paired_t_interval`."""
    table: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        table[tuple(r[k] for k in by) + (r["seed"],)][r[field]] = r["top1"]
    groups: dict[tuple, list[float]] = defaultdict(list)
    for key, vals in table.items():
        if a in vals and b in vals:
            groups[key[:-1]].append(vals[a] - vals[b])
    out = []
    for key, d in sorted(groups.items()):
        lo, hi, p = paired_t_interval(d, level)
        out.append(PairedDiff(key, f"{a} - {b}", float(np.mean(d)), lo, hi, p, len(d)))
    return out


def transition_points(curve: dict[float, dict[str, float]], num_classes: int,
                      fail: float | None = None,
                      recovery_margin: float = RECOVERY_MARGIN_PT) -> list[float]:
    """The sparsities of ``curve`` (sparsity -> {repair: mean top-1}) that are transition
    regimes by `sparse_repair.regime.is_transition` (the gate's rule), in increasing order."""
    return [s for s in sorted(curve)
            if is_transition(curve[s], num_classes, fail, recovery_margin)]


def transition_interval(curve: dict[float, dict[str, float]], num_classes: int,
                        fail: float | None = None,
                        recovery_margin: float = RECOVERY_MARGIN_PT
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
