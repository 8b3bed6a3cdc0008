"""Study report: markdown and CSV tables, transition regimes, and plots (extra `plot`)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

from .spec import Study
from .stats import (
    MIN_SEEDS_FOR_SIGNIFICANCE,
    cells,
    describe_interval,
    paired_diffs,
    span,
    transition_points,
)

FAIL_FACTOR = 2.0          # failure threshold = FAIL_FACTOR x chance (percent top-1)
RECOVERY_MARGIN_PT = 5.0   # recovery: best activation repair >= bn_recal + this
LEVEL = 0.95               # coverage of the paired t-intervals (CSV keys ci95_lo / ci95_hi)

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
        return [f"**Significance is not flagged: {ns} seeds < {MIN_SEEDS_FOR_SIGNIFICANCE} "
                f"needed** ({why})", ""]
    return [f"**Significance is not flagged for {len(few)} of {len(diffs)} differences: "
            f"{ns} seeds < {MIN_SEEDS_FOR_SIGNIFICANCE} needed** ({why})", ""]


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _num_classes(dataset: str) -> int:
    from ..data import get_spec

    return get_spec(dataset).num_classes


def write_report(study: Study, rows: list[dict], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cell_rows = cells(rows)
    (out / "cells.csv").write_text(_csv(cell_rows))
    alloc_diffs = paired_diffs(rows, "allocation", "lamp", "erk",
                               ("model", "dataset", "sparsity", "repair"), LEVEL)
    repair_diffs = paired_diffs(rows, "repair", "asr", "bn_recal",
                                ("model", "dataset", "allocation", "sparsity"), LEVEL)
    # ci95_lo / ci95_hi / p_value are empty in the CSV (None) where one seed gives no interval.
    diff_rows = [{"group": "/".join(map(str, d.key)), "difference": d.label, "mean": d.mean,
                  "ci95_lo": d.lo, "ci95_hi": d.hi, "p_value": d.p, "n_seeds": d.n,
                  "significant": d.significant} for d in alloc_diffs + repair_diffs]
    (out / "differences.csv").write_text(_csv(diff_rows))

    dense = {(r["model"], r["dataset"]): r["dense_top1"] for r in rows}
    curves: dict[tuple, dict] = defaultdict(lambda: defaultdict(dict))
    for c in cell_rows:
        curves[(c["model"], c["dataset"], c["allocation"])][c["sparsity"]][c["repair"]] = c["mean"]
    regimes, hits = {}, {}
    for key, curve in sorted(curves.items()):
        k = _num_classes(key[1])
        hits[key] = transition_points(curve, k, FAIL_FACTOR * 100.0 / k, RECOVERY_MARGIN_PT)
        regimes[key] = span(hits[key])

    runs_done, runs_total = len({r["run_id"] for r in rows}), len(study.runs)
    md = [f"# Study `{study.name}`", "",
          f"{len(rows)} result rows from `{study.path}`; every cell also in `cells.csv`.", "",
          INTERVALS_NOTE, ""]
    md += _significance_note(alloc_diffs + repair_diffs)
    if runs_done < runs_total:
        # A report of a sweep in progress is useful, but must not pass for the finished one.
        md += [f"**Incomplete: {runs_done} of {runs_total} runs done.** Missing cells, cells "
               f"with n below the study's seed count and the transition regimes are provisional; "
               f"resume with `sparse-repair study run {study.path}`.", ""]
    md += _accuracy_tables(cell_rows, dense, _repair_order(study, cell_rows))
    md += ["", f"## Paired differences (mean over calibration seeds; {LEVEL:.0%} paired "
           f"t-interval; p = paired t-test; * = interval excludes 0 with >= "
           f"{MIN_SEEDS_FOR_SIGNIFICANCE} seeds)", "",
           f"| group | difference | mean | {LEVEL:.0%} t-interval | p | n |",
           "|---|---|---|---|---|---|"]
    md += [f"| {d['group']} | {d['difference']} | {d['mean']:+.2f} | "
           + ("n/a" if d["ci95_lo"] is None else
              f"[{d['ci95_lo']:+.2f}, {d['ci95_hi']:+.2f}]{' *' if d['significant'] else ''}")
           + f" | {_fmt(d['p_value'], '.3g')} | {d['n_seeds']} |" for d in diff_rows]
    md += ["", f"## Preferred allocation (only where LAMP - ERK is significant: {LEVEL:.0%} "
           f"t-interval excludes 0 with >= {MIN_SEEDS_FOR_SIGNIFICANCE} seeds)", ""]
    md += _preferred(alloc_diffs)
    md += ["", f"## Transition regime (bn_recal < {FAIL_FACTOR:g} x chance; best activation "
           f"repair >= {FAIL_FACTOR:g} x chance and >= bn_recal + {RECOVERY_MARGIN_PT:g} pt)", ""]
    for key in regimes:
        md.append(f"- {'/'.join(key)}: {describe_interval(list(curves[key]), hits[key])}")
    plots = _plots(study, cell_rows, dense, regimes, out)
    if plots:
        md += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return {"report": str(out / "report.md"), "plots": plots,
            "runs_done": runs_done, "runs_total": runs_total,
            "transition": {"/".join(k): v for k, v in regimes.items()}}


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
        prefs.append(f"- {'nothing flagged' if not enough else 'not considered'}: {which} {ns} "
                     f"seeds < {MIN_SEEDS_FOR_SIGNIFICANCE} needed for a significance flag; "
                     f"read the intervals above instead")
    if enough and not any(d.significant for d in alloc_diffs):
        prefs.append(f"- none significant: the {LEVEL:.0%} t-interval includes 0 in every "
                     f"group with >= {MIN_SEEDS_FOR_SIGNIFICANCE} seeds")
    return prefs or ["- no LAMP - ERK pairs in these rows"]


def _repair_order(study: Study, cell_rows) -> list[str]:
    """Repairs in the order the study file lists them (the reader's order), then any others."""
    listed = [r for _, cfg in study.runs for r in cfg.repairs]
    present = {c["repair"] for c in cell_rows}
    return [r for r in dict.fromkeys(listed) if r in present] + \
        sorted(present - set(listed))


def _accuracy_tables(cell_rows, dense, repairs: list[str]) -> list[str]:
    """One table per (model, data set): a row per (allocation, sparsity), a column per repair,
    cells mean ± std over seeds; n is the number of seeds behind the row's cells."""
    md = []
    groups = sorted({(c["model"], c["dataset"]) for c in cell_rows})
    for model, dataset in groups:
        sel = [c for c in cell_rows if c["model"] == model and c["dataset"] == dataset]
        md += [f"## Accuracy: {model} on {dataset} (top-1 %, mean ± std over seeds; dense "
               f"{dense[(model, dataset)]:.2f})", "",
               "| allocation | sparsity | " + " | ".join(repairs) + " | n |",
               "|---|---|" + "---|" * (len(repairs) + 1)]
        for alloc, sp in sorted({(c["allocation"], c["sparsity"]) for c in sel}):
            row = {c["repair"]: c for c in sel if c["allocation"] == alloc and c["sparsity"] == sp}
            vals = [f"{row[r]['mean']:.2f} ± {row[r]['std']:.2f}" if r in row else "-"
                    for r in repairs]
            ns = sorted({c["n"] for c in row.values()})
            md.append(f"| {alloc} | {sp} | " + " | ".join(vals) + " | "
                      + "/".join(map(str, ns)) + " |")
        md.append("")
    return md[:-1]


def _plots(study: Study, cell_rows, dense, regimes, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: install the `plot` extra for figures", flush=True)
        return []
    files = []
    from matplotlib.lines import Line2D

    for (model, dataset) in sorted({(c["model"], c["dataset"]) for c in cell_rows}):
        fig, ax = plt.subplots(figsize=(9.0, 4.8))
        sel = [c for c in cell_rows if c["model"] == model and c["dataset"] == dataset]
        repairs = sorted({c["repair"] for c in sel})
        allocs = sorted({c["allocation"] for c in sel}, key=_alloc_order)
        colors = {r: f"C{i}" for i, r in enumerate(repairs)}  # colour = repair
        styles = {a: _ALLOC_STYLE.get(a, ":") for a in allocs}  # line style = allocation
        for (alloc, rep) in sorted({(c["allocation"], c["repair"]) for c in sel}):
            pts = sorted((c["sparsity"], c["mean"], c["std"]) for c in sel
                         if c["allocation"] == alloc and c["repair"] == rep)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
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
    files += _density_plot(study, out, plt)
    return files


# ERK solid and LAMP dashed (the paper's pair), then the others; unknown allocations dotted.
_ALLOC_STYLE = {"erk": "-", "lamp": "--", "uniform": ":", "global_magnitude": "-.",
                "uniform_plus": (0, (5, 1, 1, 1)), "er": (0, (1, 3))}


def _alloc_order(alloc: str) -> tuple:
    return (list(_ALLOC_STYLE).index(alloc) if alloc in _ALLOC_STYLE else len(_ALLOC_STYLE),
            alloc)


def _save(fig, out: Path, stem: str) -> list[str]:
    fig.savefig(out / f"{stem}.png", dpi=130)
    fig.savefig(out / f"{stem}.svg")
    return [f"{stem}.png"]


def _density_plot(study: Study, out: Path, plt) -> list[str]:
    """Per-layer density of ERK vs LAMP for the first model at its sparsity nearest 0.9, and the
    per-channel damage and ASR gains of that pruned model (from the repair report)."""
    import copy

    import numpy as np
    import torch

    from ..allocation import allocate
    from ..data import calibration_set
    from ..repair import repair
    from ..run import load_dense

    _, cfg = study.runs[0]
    sparsity = min({c.sparsity for _, c in study.runs}, key=lambda s: abs(s - 0.9))
    dense = load_dense(cfg)
    allocs = {a: allocate(dense, a, sparsity) for a in ("erk", "lamp")}
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(allocs["erk"].names)), 4))
    x = np.arange(len(allocs["erk"].names))
    for off, (a, al) in zip((-0.2, 0.2), allocs.items()):
        ax.bar(x + off, al.keep / al.sizes, width=0.4, label=a)
    ax.set_xticks(x, allocs["erk"].names, rotation=90, fontsize=6)
    ax.set_ylabel("density (kept fraction)")
    ax.set_xlabel("layer (forward order)")
    ax.set_title(f"{cfg.model}: per-layer density at global sparsity {sparsity}")
    ax.legend()
    fig.tight_layout()
    files = _save(fig, out, f"density_{cfg.model}_{sparsity}")
    plt.close(fig)

    from ..pruning import prune_

    pruned = copy.deepcopy(dense)
    prune_(pruned, allocs["erk"])
    report = repair(pruned, "asr", calibration_set(cfg.dataset, min(cfg.calib, 512), 0),
                    dense=dense)
    layers = [ly for ly in report.layers if ly.get("sd_d") is not None]
    width = max(len(ly["gain"]) for ly in layers)
    ratio = np.full((len(layers), width), np.nan)
    gain = np.full((len(layers), width), np.nan)
    for i, ly in enumerate(layers):
        sd_d = ly["sd_d"].clamp(min=1e-12)
        ratio[i, : len(sd_d)] = (ly["sd_s"] / sd_d).numpy()
        gain[i, : len(sd_d)] = ly["gain"].numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, max(4, 0.2 * len(layers))))
    for ax, data, title, cmap in (
            (axes[0], np.log10(np.clip(ratio, 1e-3, None)), "log10(pruned sd / dense sd)", "RdBu"),
            (axes[1], np.log10(np.clip(gain, 1e-3, None)), "log10(ASR channel gain)", "viridis")):
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_yticks(range(len(layers)), [ly["name"] for ly in layers], fontsize=6)
        ax.set_xlabel("channel")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"{cfg.model}, erk at sparsity {sparsity}: per-channel damage and repair gain")
    fig.tight_layout()
    files += _save(fig, out, f"damage_{cfg.model}_{sparsity}")
    plt.close(fig)
    del torch
    return files
