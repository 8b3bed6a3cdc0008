"""Shrinkage ablation and clip sensitivity for ASR (tables for docs/repair.md).

    python scripts/repair_ablation.py shrinkage --models resnet20,resnet56 --sparsities 0.9,0.95
    python scripts/repair_ablation.py clip --models resnet20 --sparsities 0.9
    python scripts/repair_ablation.py clip --models resnet56 --sparsities 0.97 --seeds 0,1,2 \
        --g-min 0,0.5 --g-max 2,3,4,6,8,inf
    python scripts/repair_ablation.py shrinkage --n-eval full --seeds 0,1,2 --device cuda \
        --jsonl rows.jsonl

Each regime is pruned once; for each calibration seed every variant repairs its own copy from
the same 1,024 calibration images and is evaluated on the fixed stratified subset of
`--dataset` (default cifar10; 2,000 images by default, `--n-eval full` for all 10,000). The
tables in docs/RESULTS.md sections 2-3 were measured with `--dataset cifar10-jpeg`. Rows are
appended to `--jsonl` as they finish, so an interrupted run keeps what it measured; the printed
table is the mean over seeds (± std when there are several).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

from sparse_repair.run import RunConfig, run_config

SHRINK_VARIANTS = [("bn_recal", {}), ("channelwise", {})] + [
    ("asr", {"shrinkage": s, "scope": sc})
    for s in ("correlation", "relative", "relative_soft", "pooled")
    for sc in ("all", "branch_end", "inner")]
G_MIN = "0,0.25,0.5"          # default clip grid: lower bounds of the channel gain
G_MAX = "1.5,2,4,8,inf"       # upper bounds ("inf" = no upper clip)


def floats(csv: str) -> list[float]:
    return [float(x) for x in csv.split(",")]


def variants(kind: str, g_min: list[float], g_max: list[float]):
    if kind == "shrinkage":
        return SHRINK_VARIANTS
    return [("bn_recal", {}), ("asr", {})] + [
        ("clipped_asr", {"g_min": lo, "g_max": hi}) for lo, hi in itertools.product(g_min, g_max)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["shrinkage", "clip"])
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--dataset", default=RunConfig.dataset)
    ap.add_argument("--allocations", default="erk,lamp")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--calib", type=int, default=1024, help="calibration images per seed")
    ap.add_argument("--seeds", default="0", help="calibration seeds, comma separated")
    ap.add_argument("--n-eval", default="2000", help="test images (stratified) or 'full'")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=None, help="JSON file for all rows at the end")
    ap.add_argument("--jsonl", default=None, help="append each row here as it finishes")
    ap.add_argument("--heatmap", default=None, help="clip: PNG path for the (g_min, g_max) map")
    ap.add_argument("--g-min", default=G_MIN, help="clip: lower bounds, comma separated")
    ap.add_argument("--g-max", default=G_MAX, help="clip: upper bounds, comma separated")
    args = ap.parse_args()
    g_min, g_max = floats(args.g_min), floats(args.g_max)
    n_eval = None if args.n_eval == "full" else int(args.n_eval)
    seeds = [int(s) for s in args.seeds.split(",")]
    # Every variant is a labelled repair of one run (sparse_repair.run.RunConfig.repair_options):
    # the run prunes once and repairs a copy per variant on the same calibration images.
    labelled = {method + "".join(f" {k}={v}" for k, v in opts.items()): (method, opts)
                for method, opts in variants(args.kind, g_min, g_max)}
    options = {label: {"method": m, **o} for label, (m, o) in labelled.items() if label != m}
    dense_cache: dict = {}
    rows = []
    for model_name, alloc, sp, seed in itertools.product(
            args.models.split(","), args.allocations.split(","),
            [float(s) for s in args.sparsities.split(",")], seeds):
        cfg = RunConfig(model=model_name, dataset=args.dataset, allocation=alloc, sparsity=sp,
                        repairs=list(labelled), repair_options=options, calib=args.calib,
                        seed=seed, n_eval=n_eval, device=args.device)
        for r in run_config(cfg, dense_cache)[0]:
            row = {"model": model_name, "dataset": args.dataset, "allocation": alloc,
                   "sparsity": sp, "seed": seed, "variant": r["repair"], "top1": r["top1"],
                   "n_eval": args.n_eval, "device": args.device, "seconds": r["seconds"]}
            rows.append(row)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
            print(f"{model_name} {alloc} {sp} seed {seed} {r['repair']:<48} {r['top1']:6.2f}",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    regimes = sorted({(r["model"], r["allocation"], r["sparsity"]) for r in rows})
    print(table(rows, regimes))
    if args.kind == "clip" and args.heatmap:
        heatmap(rows, regimes, args.heatmap, g_min, g_max)


def top1s(rows: list[dict], regime, label: str) -> list[float]:
    """Top-1 of one variant in one regime, one value per calibration seed."""
    return [r["top1"] for r in rows
            if r["variant"] == label and (r["model"], r["allocation"], r["sparsity"]) == regime]


def table(rows: list[dict], regimes) -> str:
    """Markdown: a row per variant, a column per regime, mean (± std over seeds) top-1."""
    def cell(vals: list[float]) -> str:
        if len(vals) < 2:
            return f"{vals[0]:.1f}"
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"

    labels = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| variant | " + " | ".join(f"{m} {a} {s}" for m, a, s in regimes) + " |",
             "|---|" + "---|" * len(regimes)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cell(top1s(rows, g, label))
                                                    for g in regimes) + " |")
    return "\n".join(lines)


def heatmap(rows: list[dict], regimes, path: str, g_min: list[float],
            g_max: list[float]) -> None:
    """One panel per regime: top-1 of clipped_asr over (g_min, g_max), with asr's and
    bn_recal's accuracy in the title for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(regimes), figsize=(5.2 * len(regimes), 3.8), squeeze=False)
    for ax, g in zip(axes[0], regimes):
        grid = np.zeros((len(g_min), len(g_max)))
        for i, lo in enumerate(g_min):
            for j, hi in enumerate(g_max):
                label = f"clipped_asr g_min={lo} g_max={hi}"
                grid[i, j] = statistics.mean(top1s(rows, g, label))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i in range(len(g_min)):
            for j in range(len(g_max)):
                bright = grid[i, j] > (grid.min() + grid.max()) / 2   # readable on viridis
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center",
                        color="k" if bright else "w", fontsize=8)
        ax.set_xticks(range(len(g_max)), [str(h) for h in g_max])
        ax.set_yticks(range(len(g_min)), [str(lo) for lo in g_min])
        ax.set_xlabel("g_max (upper clip of the channel gain)")
        ax.set_ylabel("g_min (lower clip)")
        asr = statistics.mean(top1s(rows, g, "asr"))
        bn = statistics.mean(top1s(rows, g, "bn_recal"))
        ax.set_title(f"{g[0]} {g[1]} S={g[2]}: top-1 %\n(asr {asr:.1f}, bn_recal {bn:.1f})",
                     fontsize=9)
        fig.colorbar(im, ax=ax, label="top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
