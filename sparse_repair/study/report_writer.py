"""Study report, from the result store alone: markdown and CSV tables (pandas), paired
differences, transition regimes, and plots (matplotlib; pandas and matplotlib are the `plot`
extra). Nothing here loads, prunes or repairs a model: the per-layer plots read the per-layer
tables of the store (``store.py``), and a store without them gets a report that says which
plots it lacks and why."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

try:
    import pandas as pd
except ImportError as e:  # pragma: no cover - the `plot` extra is installed in CI
    raise ModuleNotFoundError("the study report needs pandas, which is not installed: "
                              "pip install 'sparse-repair[plot]'") from e

from ..regime import FAIL_FACTOR, RECOVERY_MARGIN_PT, fail_threshold, recovering_repairs
from ..select import evidence as selection_evidence
from .spec import Study, layer_plot_runs
from .stats import (
    MIN_SEEDS_FOR_SIGNIFICANCE,
    describe_interval,
    paired_diffs,
    paired_t_interval,
    span,
    transition_points,
)

LEVEL = 0.95               # coverage of the paired t-intervals (CSV keys ci95_lo / ci95_hi)

# The paired differences of the report (a - b of field, paired on calibration seed), each read
# per group of DIFF_GROUPS[field]: the allocation question of arXiv 2605.21972 (LAMP - ERK after
# each repair), what its activation-statistics backend adds to BatchNorm recalibration (asr -
# bn_recal), and what layer-wise reconstruction (issue #17) adds to bn_recal and to the best
# activation-statistics repair on the canonical data (clipped_asr, docs/RESULTS.md section 0).
# A comparison whose allocations or repairs the rows lack is left out.
COMPARISONS = (("allocation", "lamp", "erk"), ("repair", "asr", "bn_recal"),
               ("repair", "reconstruct", "bn_recal"), ("repair", "reconstruct", "clipped_asr"))
# Both groupings start with (model, dataset): _diff_pivot reads a group's planned seeds there.
AHEAD_MIN_SEEDS = 3  # LAMP - ERK "ahead" column: fewer seeds can tie by coincidence
DIFF_GROUPS = {"allocation": ("model", "dataset", "sparsity", "repair"),
               "repair": ("model", "dataset", "allocation", "sparsity")}

# What an interval and a "*" mean, printed in every report so a reader need not look it up.
INTERVALS_NOTE = (
    f"Intervals: {LEVEL:.0%} paired t-interval over calibration seeds of the mean difference "
    f"(scipy.stats.t, n-1 degrees of freedom); p = two-sided paired t-test of mean 0; "
    f"* = interval excludes 0, only flagged with >= {MIN_SEEDS_FOR_SIGNIFICANCE} seeds; "
    f"n/a = one seed, no interval.")


def _fmt(x: float | None, spec: str) -> str:
    """A number for the markdown tables; None (no interval or test at one seed) as "n/a"."""
    return "n/a" if x is None else format(x, spec)


def _significance_note(diffs) -> list[str]:
    """Header lines saying which differences cannot be flagged for too few seeds, and why."""
    few = [d for d in diffs if d.n < MIN_SEEDS_FOR_SIGNIFICANCE]
    if not few:
        return []
    ns = "/".join(map(str, sorted({d.n for d in few})))
    why = ("at 3 seeds a percentile bootstrap interval is [min, max] of the differences, i.e. a "
           "sign test at p = 0.25, and a t-interval rests on a standard deviation with 2 "
           "degrees of freedom; intervals and p-values are shown, unflagged")
    if len(few) == len(diffs):
        return [f"**Significance is not flagged: {_seeds(ns)}, fewer than the "
                f"{MIN_SEEDS_FOR_SIGNIFICANCE} needed** ({why})", ""]
    return [f"**Significance is not flagged for {len(few)} of {len(diffs)} differences: "
            f"{_seeds(ns)}, fewer than the {MIN_SEEDS_FOR_SIGNIFICANCE} needed** ({why})", ""]


def _seeds(ns: str) -> str:
    """'1 seed', '3 seeds', '2/3 seeds' (the seed counts of the differences concerned)."""
    return f"{ns} seed{'' if ns == '1' else 's'}"


CELL_KEYS = ["model", "dataset", "allocation", "sparsity", "repair"]
DIFF_COLUMNS = ["group", "difference", "mean", "ci95_lo", "ci95_hi", "p_value", "n_seeds",
                "significant"]
# Columns write_report reads from a result row (what Store.rows returns has them all).
ROW_COLUMNS = [*CELL_KEYS, "seed", "top1", "dense_top1", "run_id"]


# Run settings that a [[models]] entry may override and that change the numbers without being a
# cell key (calibration size, evaluation size, input resolution). Where the rows of a study
# differ in one, the model label carries it ("resnet20-calib256"), so cells, differences, regimes
# and plots never pool runs of different settings (the reconstruct ablation's 256 / 1,024 /
# 4,096 calibration images once fell into one cell).
SETTING_KEYS = ("calib", "n_eval", "resolution")


def split_settings(rows: list[dict]) -> list[dict]:
    """``rows`` with ``model`` relabelled ``<model>-<key><value>...`` for every key of
    ``SETTING_KEYS`` whose value (from each row's ``config`` JSON) is not the same in all rows;
    the rows unchanged when none differs or the rows carry no config."""
    if not rows or any("config" not in r or not r["config"] for r in rows):
        return rows
    configs = [json.loads(r["config"]) for r in rows]
    varying = [k for k in SETTING_KEYS if len({json.dumps(c.get(k)) for c in configs}) > 1]
    if not varying:
        return rows
    return [{**r, "model": r["model"] + "".join(f"-{k.replace('_', '')}{c.get(k)}"
                                                for k in varying)}
            for r, c in zip(rows, configs)]


def cell_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Top-1 over seeds per cell: a frame with columns model, dataset, allocation, sparsity,
    repair (str/float keys, sorted), mean, std (float; ddof=1, 0 for one seed) and n (int).
    Same numbers as ``stats.cells``, which works on lists of dicts."""
    out = rows.groupby(CELL_KEYS, sort=True)["top1"].agg(mean="mean", std="std", n="count")
    out = out.reset_index()
    out["std"] = out["std"].fillna(0.0)  # one seed: no spread (pandas gives NaN for ddof=1)
    return out


def _md_table(df: pd.DataFrame) -> list[str]:
    """A pipe table of ``df``'s cells as strings (pandas' own to_markdown needs tabulate)."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return lines


def _num_classes(dataset: str) -> int:
    from ..data import get_spec

    return get_spec(dataset).num_classes


def write_report(study: Study, rows: list[dict], out: Path, store=None) -> dict:
    """Write ``report.md``, ``cells.csv``, ``differences.csv`` and plots for ``rows`` (result
    rows of ``study``'s runs, as ``Store.rows`` returns them) into the folder ``out``.

    ``store`` (a ``Store``) supplies the per-layer data of the per-layer plots; without it, or
    for runs without stored per-layer data, those plots are skipped and the report says why.
    Returns {"report", "plots", "skipped", "runs_done", "runs_total", "transition",
    "transition_by_repair", "fails_from", "best_allocation", "selection",
    "allocation_choice"} as ``api.report`` documents ("selection": ``select.evidence.summarize``
    per criterion, "allocation_choice": ``select.evidence.allocation_choice``; each None when
    no row has label-free scores)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = split_settings(rows)
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=ROW_COLUMNS)
    cells = cell_table(df)
    cells.to_csv(out / "cells.csv", index=False)
    planned = _planned_seeds(study, rows)
    by_comparison = {c: paired_diffs(rows, c[0], c[1], c[2], DIFF_GROUPS[c[0]], LEVEL)
                     for c in COMPARISONS}
    alloc_diffs = by_comparison[("allocation", "lamp", "erk")]
    diffs = [d for ds in by_comparison.values() for d in ds]
    # ci95_lo / ci95_hi / p_value are empty in the CSV where one seed gives no interval.
    diff_table = pd.DataFrame(
        [{"group": "/".join(map(str, d.key)), "difference": d.label, "mean": d.mean,
          "ci95_lo": d.lo, "ci95_hi": d.hi, "p_value": d.p, "n_seeds": d.n,
          "significant": d.significant} for d in diffs], columns=DIFF_COLUMNS)
    diff_table.to_csv(out / "differences.csv", index=False)

    dense = df.groupby(["model", "dataset"])["dense_top1"].last().to_dict()
    curves: dict[tuple, dict[float, dict[str, float]]] = {}
    for key, g in cells.groupby(["model", "dataset", "allocation"], sort=True):
        wide = g.pivot(index="sparsity", columns="repair", values="mean")
        curves[key] = {float(s): {r: float(v) for r, v in row.items() if pd.notna(v)}
                       for s, row in wide.iterrows()}
    regimes, hits, by_repair, fails = {}, {}, {}, {}
    for key, curve in curves.items():
        k = _num_classes(key[1])
        fail = fail_threshold(k)
        hits[key] = transition_points(curve, k, fail, RECOVERY_MARGIN_PT)
        regimes[key] = span(hits[key])
        # The same rule with one recovering repair at a time: where *that* repair recovers
        # while bn_recal fails (the seed paper's transition regime, read per backend).
        by_repair[key] = {
            r: transition_points({s: {q: v for q, v in top1.items() if q in ("bn_recal", r)}
                                  for s, top1 in curve.items()}, k, fail,
                                 RECOVERY_MARGIN_PT)
            for r in recovering_repairs() if any(r in top1 for top1 in curve.values())}
        fails[key] = {r: _fails_from(curve, r, fail)
                      for r in sorted({q for top1 in curve.values() for q in top1})}

    runs_done, runs_total = int(df["run_id"].nunique()), len(study.runs)
    md = [f"# Study `{study.name}`", "",
          f"{len(rows)} result rows from `{study.path}`; every cell also in `cells.csv`.", "",
          INTERVALS_NOTE, ""]
    md += _significance_note(diffs)
    if runs_done < runs_total:
        # A report of a sweep in progress is useful, but must not pass for the finished one.
        md += [f"**Incomplete: {runs_done} of {runs_total} runs done.** Missing cells, cells "
               f"with n below the study's seed count and the transition regimes are provisional; "
               f"resume with `sparse-repair study run {study.path}`.", ""]
    md += _accuracy_tables(cells, dense, _repair_order(study, cells))
    counts = sorted(set(planned.values())) or [len({cfg.seed for _, cfg in study.runs})]
    of = (f"the study's {counts[0]} seeds" if len(counts) == 1 else
          f"the seeds the study plans for that model and data set ({'/'.join(map(str, counts))})")
    md += ["", f"## Paired differences (mean over calibration seeds [{LEVEL:.0%} paired "
           f"t-interval]; * = interval excludes 0 with >= {MIN_SEEDS_FOR_SIGNIFICANCE} seeds; "
           f"(n=k) = only k of {of}; p-values in differences.csv)"]
    for (field, a, b), ds in by_comparison.items():
        if ds:
            md += [""] + _diff_pivot(ds, field, a, b, planned)
    if not diffs:  # say so rather than leave a heading over nothing
        md += ["", f"- no pairs in these rows for any of "
                   f"{', '.join(f'{a} - {b}' for _, a, b in COMPARISONS)}"]
    md += ["", f"## Preferred allocation (only where LAMP - ERK is significant: {LEVEL:.0%} "
           f"t-interval excludes 0 with >= {MIN_SEEDS_FOR_SIGNIFICANCE} seeds)", ""]
    md += _preferred(alloc_diffs)
    best = best_allocations(rows)
    md += _best_allocation_section(best, _repair_order(study, cells))
    md += _transition_section(curves, hits, by_repair, fails, _repair_order(study, cells))
    # Where the runs recorded label-free scores (scoring > 0), how well choosing by them works.
    plan = _planned_candidates(study, rows)
    md += [""] + selection_evidence.markdown(rows, complete=runs_done >= runs_total, plan=plan)
    skipped: list[str] = []
    plots = _plots(study, cells, dense, regimes, out, df=df, store=store, skipped=skipped)
    if plots or skipped:
        md += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
        md += [""] * bool(plots and skipped) + [f"- not drawn: {why}" for why in skipped]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return {"report": str(out / "report.md"), "plots": plots, "skipped": skipped,
            "runs_done": runs_done, "runs_total": runs_total,
            "transition": {"/".join(k): v for k, v in regimes.items()},
            # None where the curve has no bn_recal: no transition can be read there, which an
            # empty list ("found nowhere") would misstate; a repair not run has no key.
            "transition_by_repair": {"/".join(k): (v if any("bn_recal" in t for t in
                                                            curves[k].values()) else None)
                                     for k, v in by_repair.items()},
            "fails_from": {"/".join(k): v for k, v in fails.items()},
            "best_allocation": {"/".join(k): v for k, v in best.items()},
            "selection": ({c: selection_evidence.summarize(rows, c, plan)
                           for c in selection_evidence.CRITERIA}
                          if selection_evidence.selections(rows) else None),
            "allocation_choice": (selection_evidence.allocation_choice(rows, plan)
                                  if selection_evidence.selections(rows) else None)}


def _config_key(cfg, without: tuple[str, ...]) -> str:
    """A run's configuration without the fields ``without``, as a hashable key: runs with the
    same key differ only in those fields."""
    return json.dumps({k: v for k, v in asdict(cfg).items() if k not in without},
                      sort_keys=True, default=str)


def _changes(labels: list[str]) -> int:
    """How often consecutive labels differ (flips of a preference along the sparsity axis)."""
    return sum(a != b for a, b in zip(labels, labels[1:]))


def _planned_seeds(study: Study, rows: list[dict]) -> dict[tuple[str, str], int]:
    """How many seeds the study file plans per (model, data set) of ``rows`` (model labels as
    ``split_settings`` gives them; every row needs ``run_id``): the seeds of the study's runs
    that differ from a row's run in the seed alone. A [[models]] table may set its own seed
    list, so one study-wide count would call a finished model's cells short of seeds. A row
    of a run the study does not list counts every seed of the study."""
    same_but_seed: dict[str, set] = defaultdict(set)
    ids = {}
    for rid, cfg in study.runs:
        key = _config_key(cfg, ("seed", "repairs"))
        same_but_seed[key].add(cfg.seed)
        ids[rid] = key
    every = {cfg.seed for _, cfg in study.runs}
    planned: dict[tuple[str, str], set] = defaultdict(set)
    for r in rows:
        planned[(r["model"], r["dataset"])] |= same_but_seed[ids[r["run_id"]]] \
            if r["run_id"] in ids else every
    return {k: len(v) for k, v in planned.items()}


def _planned_candidates(study: Study, rows: list[dict]) -> dict[tuple[str, str], set]:
    """{(model, data set): {(allocation, repair label)}} as the study file plans it for the
    (model, data set) of ``rows`` (labels as ``split_settings`` gives them; every row needs
    ``run_id``): the candidates of the study's runs that differ from a row's run only in the
    seed, the allocation and the repair list. The selection evidence counts a seed's
    selection only once all of these are in, and this plan also knows the allocations that
    no run has reached yet. Only rows with label-free scores plan: a run without them (e.g.
    of a [[models]] table with scoring = 0) never yields a candidate, so the candidates it
    plans would leave every selection incomplete."""
    by_key: dict[str, set] = defaultdict(set)
    ids = {}
    for rid, cfg in study.runs:
        key = _config_key(cfg, ("seed", "allocation", "repairs"))
        by_key[key] |= {(cfg.allocation, label) for label, _, _ in cfg.repair_calls()}
        ids[rid] = key
    plan: dict[tuple[str, str], set] = defaultdict(set)
    for r in rows:
        if r["run_id"] in ids and r.get("agreement") is not None and r.get("kl") is not None:
            plan[(r["model"], r["dataset"])] |= by_key[ids[r["run_id"]]]
    return dict(plan)


def _diff_pivot(diffs, field: str, a: str, b: str, planned: dict[tuple[str, str], int]
                ) -> list[str]:
    """One comparison as a table: a row per group (its key without the sparsity), a column per
    sparsity, cells ``mean [lo, hi]`` in points (``[n/a]``: one seed, no interval; ``*`` when
    flagged; ``(n=k)`` when fewer than the seeds the study plans for the group's (model, data
    set), ``planned`` as `_planned_seeds` gives it; ``-`` where the pair is missing). For
    LAMP - ERK two more columns read the allocation question: which allocation is ahead where
    the interval excludes 0 with at least ``AHEAD_MIN_SEEDS`` seeds (a reader's summary, not
    a significance flag) and how often that preference flips along the sparsity axis."""
    at = DIFF_GROUPS[field].index("sparsity")
    groups: dict[str, dict[float, object]] = {}
    for d in diffs:
        groups.setdefault("/".join(map(str, d.key[:at] + d.key[at + 1:])), {})[d.key[at]] = d
    grid = sorted({d.key[at] for d in diffs})
    table = []
    for group, cells in groups.items():
        row: dict[str, object] = {"group": group}
        for s in grid:
            d = cells.get(s)
            row[str(s)] = "-" if d is None else (
                f"{d.mean:+.2f}" + (" [n/a]" if d.lo is None else f" [{d.lo:+.2f}, {d.hi:+.2f}]")
                + (f" (n={d.n})" if d.n < planned[d.key[:2]] else "")
                + (" *" if d.significant else ""))
        if field == "allocation":
            # From 3 seeds on: top-1 on 10,000 images moves in 0.01-pt steps, so two seeds can
            # give the same difference and a zero-width interval by coincidence (the evidence
            # store's ResNet-20 asr at 0.85: -1.17 in both seeds of LAMP - ERK).
            ahead = [(s, a if d.lo > 0 else b) for s, d in sorted(cells.items())
                     if d.n >= AHEAD_MIN_SEEDS and d.lo is not None and (d.lo > 0 or d.hi < 0)]
            row[f"ahead where the interval excludes 0 (>= {AHEAD_MIN_SEEDS} seeds)"] = \
                ", ".join(f"{w} {s}" for s, w in ahead) or "nowhere"
            row["flips"] = _changes([w for _, w in ahead])
        table.append(row)
    title = (f"### {a} - {b} after each repair (pt)" if field == "allocation" else
             f"### {a} - {b} per allocation (pt)")
    return [title, ""] + _md_table(pd.DataFrame(table))


def _fails_from(curve: dict[float, dict[str, float]], repair: str, fail: float) -> str:
    """The first sparsity of the grid where ``repair``'s mean top-1 is below ``fail``, as text:
    "<= s" when it fails at the grid's start, "> s" when it never fails on the grid, and a
    note when it is back above the line at a higher sparsity (a non-monotone curve)."""
    points = [(s, top1[repair]) for s, top1 in sorted(curve.items()) if repair in top1]
    failed = [s for s, v in points if v < fail]
    if not points:
        return "-"
    if not failed:
        return f"> {points[-1][0]}"
    first = failed[0]
    text = f"<= {first}" if first == points[0][0] else f"{first}"
    back = [s for s, v in points if s > first and v >= fail]
    return text + (f" (above again at {', '.join(map(str, back))})" if back else "")


def _compact(hits: list[float], grid: list[float]) -> str:
    """Transition sparsities in a table cell: "lo-hi" for a run of consecutive grid points, the
    points themselves otherwise, "-" for none."""
    if not hits:
        return "-"
    i, j = grid.index(hits[0]), grid.index(hits[-1])
    if len(hits) == j - i + 1:
        return str(hits[0]) if i == j else f"{hits[0]}-{hits[-1]}"
    return ", ".join(map(str, hits))


def _transition_section(curves: dict, hits: dict, by_repair: dict, fails: dict,
                        repairs: list[str]) -> list[str]:
    """The transition regime, read three ways from the cell means: with every recovering
    repair at once (the gate's rule, with its edges in words), with each recovering repair on
    its own (where that backend recovers while bn_recal fails), and where each repair's curve
    crosses the failure line (how wide the recoverable span above bn_recal's failure is).
    A curve without bn_recal, or without a given repair, says so instead of "-" (no regime
    found), since the rule cannot be read there."""
    recovering = [r for r in recovering_repairs()
                  if any(r in per for per in by_repair.values())]
    # "none" is also a repair's name: the empty case names what is missing instead.
    which = ", ".join(recovering) or f"none of {', '.join(recovering_repairs())} in these rows"
    md = ["", f"## Transition regime (bn_recal < {FAIL_FACTOR:g} x chance; a recovering repair "
          f"({which}) >= {FAIL_FACTOR:g} x chance and >= bn_recal + {RECOVERY_MARGIN_PT:g} pt; "
          f"on the mean top-1 over seeds)", ""]
    if not hits:  # no finished cell yet (a report of a study just started): no empty tables
        return md + ["- no finished cells in these rows"]
    no_bn = {key for key, curve in curves.items()
             if not any("bn_recal" in top1 for top1 in curve.values())}
    for key in hits:
        md.append(f"- {'/'.join(key)}: " + (
            "not read: no bn_recal in these rows" if key in no_bn else
            describe_interval(list(curves[key]), hits[key])))

    def cell(key, found: list[float] | None) -> str:
        if key in no_bn:
            return "no bn_recal"
        return "not run" if found is None else _compact(found, sorted(curves[key]))

    md += ["", "### By repair (grid sparsities where that repair alone recovers while bn_recal "
           "fails; \"-\": nowhere on the grid)", ""]
    md += _md_table(pd.DataFrame(
        [{"model/dataset/allocation": "/".join(key),
          **{r: cell(key, by_repair[key].get(r)) for r in recovering},
          "any": cell(key, hits[key])} for key in hits]))
    md += ["", f"### Where each repair fails (first grid sparsity with mean top-1 < "
           f"{FAIL_FACTOR:g} x chance; \"<= s\": already at its first sparsity s; \"> s\": "
           f"not up to s, its last sparsity; \"above again\": back above the line there; "
           f"\"-\": not run)", ""]
    md += _md_table(pd.DataFrame(
        [{"model/dataset/allocation": "/".join(key),
          **{r: fails[key].get(r, "-") for r in repairs}} for key in hits]))
    return md


def _preferred(alloc_diffs) -> list[str]:
    """The preferred allocation per group where LAMP - ERK is significant, and why the others
    are not listed: too few seeds to flag (see `MIN_SEEDS_FOR_SIGNIFICANCE`) or an interval
    that includes 0."""
    prefs = [f"- {'/'.join(map(str, d.key))}: **{'lamp' if d.mean > 0 else 'erk'}** "
             f"({d.mean:+.2f} pt, p = {_fmt(d.p, '.3g')}, n = {d.n})"
             for d in alloc_diffs if d.significant]
    few = [d for d in alloc_diffs if d.n < MIN_SEEDS_FOR_SIGNIFICANCE]
    enough = len(alloc_diffs) - len(few)
    if few:
        ns = "/".join(map(str, sorted({d.n for d in few})))
        which = "every LAMP - ERK group has" if not enough else \
            f"{len(few)} of {len(alloc_diffs)} LAMP - ERK groups have"
        prefs.append(f"- {'nothing flagged' if not enough else 'not considered'}: {which} "
                     f"{_seeds(ns)}, fewer than the {MIN_SEEDS_FOR_SIGNIFICANCE} needed for a "
                     f"significance flag; read the intervals above instead")
    if enough and not any(d.significant for d in alloc_diffs):
        prefs.append(f"- none significant: the {LEVEL:.0%} t-interval includes 0 in every "
                     f"group with >= {MIN_SEEDS_FOR_SIGNIFICANCE} seeds")
    return prefs or ["- no LAMP - ERK pairs in these rows"]


# Short allocation names for the best-allocation table (registry name otherwise).
ALLOC_SHORT = {"global_magnitude": "gm", "uniform_plus": "uniform+"}


def best_allocations(rows: list[dict]) -> dict[tuple, dict[float, dict]]:
    """The best allocation per (model, dataset, repair) and sparsity, among every allocation
    the rows hold there: {(model, dataset, repair): {sparsity: {"best", "runner_up" (None when
    one allocation), "margin" (best mean - runner-up mean, pt), "lo", "hi" (paired ``LEVEL``
    t-interval of best - runner-up over their common seeds; None below 2), "n" (common seeds),
    "ahead" (interval excludes 0 with >= ``AHEAD_MIN_SEEDS`` seeds), "allocations" (how many
    were compared)}}}. Means are over each allocation's own seeds, as in the accuracy tables.
    With more than two allocations this is the question the LAMP - ERK table asks of two: which
    allocation a repair prefers, and whether that changes along the sparsity axis."""
    per: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        key = (r["model"], r["dataset"], r["repair"], float(r["sparsity"]))
        per[key][r["allocation"]][int(r["seed"])] = float(r["top1"])
    out: dict[tuple, dict[float, dict]] = defaultdict(dict)
    for (model, dataset, repair, sp), by_alloc in sorted(per.items()):
        ranked = sorted(by_alloc, key=lambda a: (-np.mean(list(by_alloc[a].values())), a))
        best, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
        cell = {"best": best, "runner_up": second, "margin": None, "lo": None, "hi": None,
                "n": 0, "ahead": False, "allocations": len(ranked)}
        if second is not None:
            common = sorted(set(by_alloc[best]) & set(by_alloc[second]))
            d = [by_alloc[best][k] - by_alloc[second][k] for k in common]
            lo, hi, _ = paired_t_interval(d, LEVEL)
            cell.update(margin=float(np.mean(list(by_alloc[best].values()))
                                     - np.mean(list(by_alloc[second].values()))),
                        lo=lo, hi=hi, n=len(common),
                        ahead=bool(len(common) >= AHEAD_MIN_SEEDS and lo is not None and lo > 0))
        out[(model, dataset, repair)][sp] = cell
    return dict(out)


def _best_allocation_section(best: dict[tuple, dict[float, dict]], repairs: list[str]
                             ) -> list[str]:
    """``best_allocations`` as a table: a row per model/dataset/repair, a column per sparsity,
    cells "<best> +<margin over the runner-up>", bold where the best is ahead (interval
    excludes 0, >= ``AHEAD_MIN_SEEDS`` seeds) and "(k alloc)" where fewer allocations were
    compared than elsewhere in the table; then how often the flagged best changes along the
    sparsity axis."""
    if not best:
        return []
    most = max(c["allocations"] for cells in best.values() for c in cells.values())
    grid = sorted({s for cells in best.values() for s in cells})
    order = {r: i for i, r in enumerate(repairs)}
    table = []
    for (model, dataset, repair), cells in sorted(
            best.items(), key=lambda kv: (kv[0][:2], order.get(kv[0][2], len(order)), kv[0])):
        row: dict[str, object] = {"group": f"{model}/{dataset}/{repair}"}
        for s in grid:
            c = cells.get(s)
            if c is None:
                row[str(s)] = "-"
                continue
            lead = ALLOC_SHORT.get(c["best"], c["best"]) + \
                ("" if c["margin"] is None else f" {c['margin']:+.2f}")
            # bold, not "*": elsewhere in the report "*" is the significance flag (>= 5 seeds)
            row[str(s)] = (f"**{lead}**" if c["ahead"] else lead) + \
                (f" ({c['allocations']} alloc)" if c["allocations"] < most else "")
        ahead = [(s, c["best"]) for s, c in sorted(cells.items()) if c["ahead"]]
        row["changes of the flagged best"] = _changes([w for _, w in ahead])
        table.append(row)
    names = sorted({c["best"] for cells in best.values() for c in cells.values()})
    legend = ", ".join(f"{ALLOC_SHORT[n]} = {n}" for n in names if n in ALLOC_SHORT)
    return ["", f"## Best allocation per repair (mean top-1 over seeds; + = lead over the "
            f"runner-up, pt; bold = ahead: {LEVEL:.0%} paired t-interval of best - runner-up "
            f"excludes 0 with >= {AHEAD_MIN_SEEDS} seeds{'; ' + legend if legend else ''})", ""
            ] + _md_table(pd.DataFrame(table))


def _repair_order(study: Study, cells: pd.DataFrame) -> list[str]:
    """Repairs in the order the study file lists them (the reader's order), then any others."""
    listed = [r for _, cfg in study.runs for r in cfg.repairs]
    present = set(cells["repair"])
    return [r for r in dict.fromkeys(listed) if r in present] + \
        sorted(present - set(listed))


def _accuracy_tables(cells: pd.DataFrame, dense: dict, repairs: list[str]) -> list[str]:
    """One table per (model, data set): a row per (allocation, sparsity), a column per repair,
    cells mean ± std over seeds; n is the number of seeds behind the row's cells."""
    md = []
    for (model, dataset), sel in cells.groupby(["model", "dataset"], sort=True):
        text = sel.assign(cell=[f"{m:.2f} ± {s:.2f}" for m, s in zip(sel["mean"], sel["std"])])
        table = (text.pivot(index=["allocation", "sparsity"], columns="repair", values="cell")
                 .reindex(columns=repairs).astype(object).fillna("-").sort_index())
        table["n"] = sel.groupby(["allocation", "sparsity"])["n"].agg(
            lambda n: "/".join(map(str, sorted(set(n)))))
        md += [f"## Accuracy: {model} on {dataset} (top-1 %, mean ± std over seeds; dense "
               f"{dense[(model, dataset)]:.2f})", ""]
        md += _md_table(table.reset_index()) + [""]
    return md[:-1]


def _plots(study: Study, cells: pd.DataFrame, dense: dict, regimes: dict, out: Path,
           df: pd.DataFrame | None = None, store=None, skipped: list[str] | None = None
           ) -> list[str]:
    """Draw the accuracy plots and the per-layer plots; return the PNG names. Reasons for plots
    not drawn are appended to ``skipped``."""
    skipped = [] if skipped is None else skipped
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: install the `plot` extra for figures", flush=True)
        skipped.append("every plot: matplotlib is not installed (install the `plot` extra)")
        return []
    files = []
    from matplotlib.lines import Line2D

    for (model, dataset), sel in cells.groupby(["model", "dataset"], sort=True):
        fig, ax = plt.subplots(figsize=(9.0, 4.8))
        repairs = sorted(set(sel["repair"]))
        allocs = sorted(set(sel["allocation"]), key=_alloc_order)
        colors = {r: f"C{i}" for i, r in enumerate(repairs)}  # colour = repair
        styles = {a: _ALLOC_STYLE.get(a, ":") for a in allocs}  # line style = allocation
        for (alloc, rep), pts in sel.groupby(["allocation", "repair"], sort=True):
            pts = pts.sort_values("sparsity")
            ax.errorbar(pts["sparsity"], pts["mean"], yerr=pts["std"],
                        linestyle=styles[alloc], marker="o", ms=3, lw=1.2,
                        capsize=2, color=colors[rep])
        ax.axhline(dense[(model, dataset)], color="k", lw=0.8)
        ax.set_ylim(0, min(100, dense[(model, dataset)] + 5))
        shaded = []
        for i, alloc in enumerate(allocs):
            iv = regimes.get((model, dataset, alloc))
            if iv:
                ax.axvspan(iv[0] - 0.002, iv[1] + 0.002, color=f"C{i + len(repairs)}",
                           alpha=0.15)
                shaded.append(alloc)
        ax.set_xlabel("global sparsity (pruned fraction)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{model} on {dataset}: label-free repair vs sparsity")
        # Two small legends outside the axes (repair by colour, allocation by line style)
        # instead of one entry per line: 4 allocations x 6 repairs hid the curves.
        rep_leg = ax.legend([Line2D([], [], color=colors[r], marker="o", ms=3) for r in repairs]
                            + [Line2D([], [], color="k", lw=0.8)],
                            repairs + ["dense"], title="repair", fontsize=7, title_fontsize=7,
                            loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.add_artist(rep_leg)
        ax.legend([Line2D([], [], color="0.3", linestyle=styles[a]) for a in allocs]
                  + [plt.Rectangle((0, 0), 1, 1, color=f"C{allocs.index(a) + len(repairs)}",
                                   alpha=0.15) for a in shaded],
                  allocs + [f"transition ({a})" for a in shaded], title="allocation",
                  fontsize=7, title_fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0.0))
        fig.tight_layout()
        files += _save(fig, out, f"accuracy_{model}_{dataset}")
        plt.close(fig)
    if df is not None:
        files += _layer_plots(study, df, out, plt, store, skipped)
    return files


# ERK solid and LAMP dashed (the paper's pair), then the others; unknown allocations dotted.
_ALLOC_STYLE = {"erk": "-", "lamp": "--", "uniform": ":", "global_magnitude": "-.",
                "uniform_plus": (0, (5, 1, 1, 1)), "er": (0, (1, 3))}


def _alloc_order(alloc: str) -> tuple:
    return (list(_ALLOC_STYLE).index(alloc) if alloc in _ALLOC_STYLE else len(_ALLOC_STYLE),
            alloc)


def _save(fig, out: Path, stem: str) -> list[str]:
    import matplotlib

    fig.savefig(out / f"{stem}.png", dpi=130)
    # Without a fixed hash salt and date, matplotlib writes random element ids and the time
    # into every SVG, so a regenerated report would change every committed SVG.
    with matplotlib.rc_context({"svg.hashsalt": "sparse-repair"}):
        fig.savefig(out / f"{stem}.svg", metadata={"Date": None})
    return [f"{stem}.png"]


# The repair whose gains the damage plot shows: the first of these the study ran. All four
# record dense and pruned per-channel sd (bn_recal does not).
_DAMAGE_REPAIRS = ("asr", "clipped_asr", "channelwise", "layerwise")

# Said when a store has no per-layer data for a run: why, and what would give it (never a
# re-run from the report).
_NO_LAYER_DATA = ("the store holds none for these runs (runs written before the store kept "
                  "per-layer data have none; the report reads the store only and never re-runs "
                  "the pipeline: run the study into a new --db to get this plot)")


_NO_REPAIR_STATS = ("the store has this run's allocation but no per-BN repair statistics: "
                    "they are stored only when the rows of sparse_repair.run.run_single carry "
                    "each repair's RepairReport layers (key \"layers\"); the report never "
                    "re-runs the pipeline")


def _layer_plots(study: Study, df: pd.DataFrame, out: Path, plt, store, skipped: list[str]
                 ) -> list[str]:
    """Per-layer density of each allocation, and the per-channel damage (pruned / dense sd) with
    an activation repair's gains, for the study's first model at its finished sparsity nearest
    0.9 (the lowest seed's run of each allocation), from the store's per-layer tables."""
    _, cfg = study.runs[0]
    sel = df[(df["model"] == cfg.model) & (df["dataset"] == cfg.dataset)]
    sparsity, chosen = layer_plot_runs(study, set(df["run_id"]))
    if store is None or not chosen:
        skipped.append("per-layer plots: " + ("no result store was given" if store is None else
                                              f"no finished run of {cfg.model}/{cfg.dataset}"))
        return []
    runs = {a: chosen[a] for a in sorted(chosen, key=_alloc_order)}
    where = f"{cfg.model} at sparsity {sparsity}"
    files = []

    layers = store.allocation_layers({rid for rid, _ in runs.values()})
    allocs = {a: pd.DataFrame(layers[rid]) for a, (rid, _) in runs.items() if rid in layers}
    if not allocs:
        skipped.append(f"per-layer density plot ({where}): {_NO_LAYER_DATA}")
    else:
        names = next(iter(allocs.values()))["name"].tolist()
        fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(names)), 4))
        x = np.arange(len(names))
        width = 0.8 / len(allocs)
        for i, (a, t) in enumerate(allocs.items()):
            density = t.set_index("name")["density"].reindex(names)
            ax.bar(x + (i - (len(allocs) - 1) / 2) * width, density, width=width, label=a)
        ax.set_xticks(x, names, rotation=90, fontsize=6)
        ax.set_ylabel("density (kept fraction)")
        ax.set_xlabel("layer (forward order)")
        ax.set_title(f"{cfg.model}: per-layer density at global sparsity {sparsity}")
        ax.legend()
        fig.tight_layout()
        files += _save(fig, out, f"density_{cfg.model}_{sparsity}")
        plt.close(fig)

    wanted = [r for r in _DAMAGE_REPAIRS if r in set(sel["repair"])]
    if not wanted:
        skipped.append(f"per-channel damage plot ({where}): the study has none of the "
                       f"activation-statistic repairs {', '.join(_DAMAGE_REPAIRS)}")
        return files
    alloc = "erk" if "erk" in runs else next(iter(runs))
    rid, seed = runs[alloc]
    stored = store.repair_layers({rid})
    found = [(r, [ly for ly in stored.get((rid, r), []) if ly.get("sd_d") is not None])
             for r in wanted]
    found = [(r, ly) for r, ly in found if ly]
    if not found:
        # A run with a stored allocation was written by this version: its repair statistics are
        # missing because run_single's rows did not carry them, not because the store is old.
        why = _NO_REPAIR_STATS if rid in layers else _NO_LAYER_DATA
        skipped.append(f"per-channel damage plot ({where}, {alloc}, seed {seed}): per-BN "
                       f"statistics of {' / '.join(wanted)}: {why}")
        return files
    rep, bns = found[0]
    width = max(len(ly["sd_d"]) for ly in bns)
    ratio = np.full((len(bns), width), np.nan)
    gain = np.full((len(bns), width), np.nan)
    for i, ly in enumerate(bns):
        sd_d = np.maximum(np.asarray(ly["sd_d"], dtype=float), 1e-12)
        ratio[i, : len(sd_d)] = np.asarray(ly["sd_s"], dtype=float) / sd_d
        if ly.get("gain") is not None:  # per channel, or one per layer for a layer-wise gain
            gain[i, : len(sd_d)] = np.broadcast_to(np.asarray(ly["gain"], dtype=float),
                                                   sd_d.shape)
    fig, axes = plt.subplots(1, 2, figsize=(11, max(4, 0.2 * len(bns))))
    for ax, data, title, cmap in (
            (axes[0], np.log10(np.clip(ratio, 1e-3, None)), "log10(pruned sd / dense sd)", "RdBu"),
            (axes[1], np.log10(np.clip(gain, 1e-3, None)), f"log10({rep} channel gain)",
             "viridis")):
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_yticks(range(len(bns)), [ly["name"] for ly in bns], fontsize=6)
        ax.set_xlabel("channel")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{cfg.model}, {alloc} at sparsity {sparsity} (seed {seed}): per-channel "
                 f"damage and {rep} gain")
    fig.tight_layout()
    files += _save(fig, out, f"damage_{cfg.model}_{sparsity}")
    plt.close(fig)
    return files
