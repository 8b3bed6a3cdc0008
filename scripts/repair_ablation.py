"""Shrinkage ablation and clip sensitivity for ASR (tables for docs/repair.md).

    python scripts/repair_ablation.py shrinkage --models resnet20,resnet56 --sparsities 0.9,0.95
    python scripts/repair_ablation.py clip --models resnet20 --sparsities 0.9

Each regime is pruned once; every variant repairs its own copy from the same 1,024 calibration
images (seed 0) and is evaluated on the fixed stratified 2,000-image subset of cifar10-jpeg.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time

from sparse_repair.allocation import allocate
from sparse_repair.data import calibration_set
from sparse_repair.evaluate import evaluate
from sparse_repair.pruning import prune_
from sparse_repair.repair import repair
from sparse_repair.weights import load_pretrained

SHRINK_VARIANTS = [("bn_recal", {}), ("channelwise", {})] + [
    ("asr", {"shrinkage": s, "scope": sc})
    for s in ("correlation", "relative", "relative_soft", "pooled")
    for sc in ("all", "branch_end", "inner")]
G_MIN = [0.0, 0.25, 0.5]
G_MAX = [1.5, 2.0, 4.0, 8.0, float("inf")]


def variants(kind: str):
    if kind == "shrinkage":
        return SHRINK_VARIANTS
    return [("bn_recal", {}), ("asr", {})] + [
        ("clipped_asr", {"g_min": lo, "g_max": hi}) for lo, hi in itertools.product(G_MIN, G_MAX)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["shrinkage", "clip"])
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--allocations", default="erk,lamp")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args()
    calib = calibration_set("cifar10-jpeg", args.calib, 0)
    rows = []
    for model_name in args.models.split(","):
        dense = load_pretrained(model_name)
        for alloc, sp in itertools.product(args.allocations.split(","),
                                           [float(s) for s in args.sparsities.split(",")]):
            pruned = copy.deepcopy(dense)
            prune_(pruned, allocate(pruned, alloc, sp))
            for method, opts in variants(args.kind):
                model = copy.deepcopy(pruned)
                t = time.perf_counter()
                repair(model, method, calib, dense=dense, **opts)
                top1 = evaluate(model, "cifar10-jpeg", args.n_eval)["top1"]
                label = method + "".join(f" {k}={v}" for k, v in opts.items())
                rows.append({"model": model_name, "allocation": alloc, "sparsity": sp,
                             "variant": label, "top1": top1,
                             "seconds": time.perf_counter() - t})
                print(f"{model_name} {alloc} {sp} {label:<48} {top1:6.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    regimes = sorted({(r["model"], r["allocation"], r["sparsity"]) for r in rows})
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    print("\n| variant | " + " | ".join(f"{m} {a} {s}" for m, a, s in regimes) + " |")
    print("|---|" + "---|" * len(regimes))
    for label in labels:
        cells = [next(r["top1"] for r in rows if r["variant"] == label and
                      (r["model"], r["allocation"], r["sparsity"]) == g) for g in regimes]
        print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
