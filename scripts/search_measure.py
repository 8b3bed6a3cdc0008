"""Does the repair-aware allocation beat the best fixed allocation? (issue #19, docs/search.md)

For each (model, sparsity, repair): the fixed allocations (default ERK, LAMP, uniform, global
magnitude) are pruned, repaired on the same calibration images and evaluated; the search
(``sparse_repair.select.search.search_allocation``; its criterion, agreement by default
since 2026-11-30, KL before) runs on the same calibration
images and chooses by its label-free score on disjoint scoring images; then the chosen
allocation is evaluated. Labels are used only here, for the table, never by the search.

With ``--anchors auto`` (default, the library default) the search itself evaluates every
candidate fixed allocation first and searches the family between the two best by the
criterion; the fixed allocations' top-1 is taken from those evaluations (``observe``), not
recomputed. With a pair (``--anchors erk,lamp``, the original family) the pair's pipelines are
the family's endpoints and the other fixed allocations are pruned, repaired and evaluated here.

    python scripts/search_measure.py --models resnet20 --sparsities 0.9,0.95 \\
        --repairs bn_recal --out results/search_auto_r20_bn.jsonl

One JSON line per regime is appended to --out as soon as it finishes (a long run keeps what it
measured); the table is printed at the end, and ``--table FILE.jsonl`` prints it from a file.

``--confirm FILE.jsonl [--n-confirm N]`` re-evaluates, for each record, the best fixed
allocation and the search's choice (rebuilt from the record: same calibration images, same
counts) on N test images (default the whole split), paired: both top-1, the difference, the
images only one of them gets right, and the paired standard error of the difference.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
import warnings

import numpy as np
import torch

from sparse_repair.allocation import LayerCollapseWarning, allocate
from sparse_repair.data import (
    calibration_set,
    get_spec,
    load_split,
    normalize,
    scoring_set,
    stratified_indices,
)
from sparse_repair.evaluate import evaluate, label_free_scores, predict_logits
from sparse_repair.pruning import prune_
from sparse_repair.repair import repair
from sparse_repair.select.search import DEFAULT_CRITERION, interpolate, search_allocation
from sparse_repair.weights import load_pretrained


def fixed_choice(rows: dict[str, dict], criterion: str) -> str:
    """The fixed allocation ``criterion`` ranks first among ``rows`` ({method: {"kl",
    "agreement", ...}}), as the search ranks its candidates: ties go to the other criterion,
    then to the earlier method."""
    order = {m: i for i, m in enumerate(rows)}
    if criterion == "kl":
        return min(rows, key=lambda m: (rows[m]["kl"], -rows[m]["agreement"], order[m]))
    return min(rows, key=lambda m: (-rows[m]["agreement"], rows[m]["kl"], order[m]))


def measure(model_name: str, sparsity: float, repair_name: str, *, dataset: str, seed: int,
            calib: int, scoring: int, n_eval: int, fixed: list[str], criterion: str,
            grid: int = 5, refine: int = 2, anchors: str | tuple[str, str] = "auto",
            candidates: list[str] | None = None, layer_sweeps: int = 0,
            move_factor: float = 2.0) -> dict:
    """One regime: returns the JSON record (fixed rows, search choice, every point's scores and
    true top-1 on ``n_eval`` stratified test images)."""
    dense = load_pretrained(model_name)
    images = calibration_set(dataset, calib, seed)
    score_images = scoring_set(dataset, scoring, seed, calib=calib)
    dense_logits = predict_logits(dense, score_images)
    top1 = {}  # t -> true top-1 of a family point (labels: reporting only)
    fixed_top1 = {}  # candidate name -> true top-1 (anchors="auto")

    def observe(point, model):
        if point.method.startswith("move("):
            return  # layer-move proposals: only the accepted ones are evaluated, below
        acc = evaluate(model, dataset, n_eval)["top1"]
        if point.t is None:
            fixed_top1[point.method] = acc
        else:
            top1[point.t] = acc
        print(f"  {point.method:<32} kl {point.kl:.4f} agree {point.agreement:5.1f} top-1 "
              f"{acc:5.2f} ({point.seconds:.0f}s)", file=sys.stderr, flush=True)

    auto = anchors == "auto"
    result = search_allocation(dense, sparsity, images, score_images, repair=repair_name,
                               criterion=criterion, keep_model=False, observe=observe,
                               grid=grid, refine=refine, anchors=anchors,
                               candidates=(candidates if auto else None),
                               layer_sweeps=layer_sweeps, move_factor=move_factor,
                               progress=True)  # the layer-move proposals print nothing else
    moves = []  # accepted layer moves, each rebuilt (prune + repair are deterministic)
    for q in result.moves:
        model = copy.deepcopy(dense)
        prune_(model, dataclasses.replace(result.allocation, keep=np.array(q.keep)))
        repair(model, repair_name, images, dense=dense)
        moves.append({**q.to_dict(), "top1": evaluate(model, dataset, n_eval)["top1"]})
        print(f"  {q.method:<32} kl {q.kl:.4f} agree {q.agreement:5.1f} top-1 "
              f"{moves[-1]['top1']:5.2f}", file=sys.stderr, flush=True)
    # Reused points (same counts as an earlier evaluation) share its model, hence its accuracy.
    evaluated = [(q.keep, fixed_top1[q.method]) for q in result.fixed if not q.reused]
    evaluated += [(q.keep, top1[q.t]) for q in result.points if q.t in top1]
    for q in result.fixed:
        fixed_top1.setdefault(q.method, next(acc for k, acc in evaluated if k == q.keep))
    for p in result.points:
        top1.setdefault(p.t, next(acc for k, acc in evaluated if k == p.keep))
    rows = {}
    by_method = {q.method: q for q in result.fixed}
    for method in fixed:
        if method in by_method:
            q = by_method[method]
            rows[method] = {"top1": fixed_top1[method], "kl": q.kl, "agreement": q.agreement,
                            "seconds": q.seconds, "collapsed": q.collapsed}
            continue
        if not auto and method in result.anchors:
            t = 0.0 if method == result.anchors[0] else 1.0
            p = next(q for q in result.points if q.t == t)
            rows[method] = {"top1": top1[t], "kl": p.kl, "agreement": p.agreement,
                            "seconds": p.seconds}
            continue
        tic = time.perf_counter()
        model = copy.deepcopy(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LayerCollapseWarning)
            alloc = allocate(model, method, sparsity)
        prune_(model, alloc)
        repair(model, repair_name, images, dense=dense)
        s = label_free_scores(predict_logits(model, score_images), dense_logits)
        rows[method] = {"top1": evaluate(model, dataset, n_eval)["top1"], **s,
                        "seconds": time.perf_counter() - tic, "collapsed": alloc.collapsed}
        print(f"  {method:<32} kl {s['kl']:.4f} agree {s['agreement']:5.1f} top-1 "
              f"{rows[method]['top1']:5.2f}", file=sys.stderr, flush=True)
    best_fixed = max(rows, key=lambda m: rows[m]["top1"])
    by_crit = fixed_choice(rows, criterion)
    oracle_t = max(top1, key=lambda t: (top1[t], -t))
    search_top1 = moves[-1]["top1"] if moves else top1[result.t]
    return {"model": model_name, "dataset": dataset, "sparsity": sparsity,
            "repair": repair_name, "seed": seed, "calib": calib, "scoring": scoring,
            "n_eval": n_eval, "criterion": criterion, "grid": grid, "refine": refine,
            "anchors_mode": "auto" if auto else "pair", "anchors": list(result.anchors),
            "candidates": [q.method for q in result.fixed],
            "fixed": rows,
            "best_fixed": best_fixed, "best_fixed_top1": rows[best_fixed]["top1"],
            "fixed_by_criterion": by_crit, "fixed_by_criterion_top1": rows[by_crit]["top1"],
            "search_t": result.t, "search_method": result.allocation.method,
            "search_keep": result.allocation.keep.tolist(), "layer_sweeps": layer_sweeps,
            "move_factor": move_factor,
            "family_top1": top1[result.t], "search_top1": search_top1,
            "gain_over_best_fixed": search_top1 - rows[best_fixed]["top1"],
            "moves": moves, "proposals": len(result.proposals),
            "family_oracle_t": oracle_t, "family_oracle_top1": top1[oracle_t],
            "points": [{**p.to_dict(), "top1": top1[p.t]} for p in result.points],
            "evaluations": result.evaluations, "search_seconds": result.seconds}


def _correct(model, dataset: str, n: int | None) -> torch.Tensor:
    """bool [n]: per test image (``evaluate``'s stratified subset, or the whole split for
    None), whether the model's top-1 is the label (labels: reporting only)."""
    spec = get_spec(dataset)
    images, labels = load_split(dataset, spec.splits[1])
    idx = torch.from_numpy(stratified_indices(labels, n))
    x = normalize(images[idx], dataset)
    return predict_logits(model.eval(), x).argmax(1) == labels[idx]


def confirm(rec: dict, n: int | None) -> dict:
    """Paired re-evaluation of one record's best fixed allocation and search choice."""
    dense = load_pretrained(rec["model"])
    images = calibration_set(rec["dataset"], rec["calib"], rec["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayerCollapseWarning)
        best = allocate(dense, rec["best_fixed"], rec["sparsity"])
        a, b = (allocate(dense, m, rec["sparsity"]) for m in rec.get("anchors", ["erk", "lamp"]))
    chosen = interpolate(a, b, rec["search_t"])
    stored = next(p["keep"] for p in rec["points"] if p["t"] == rec["search_t"])
    if chosen.keep.tolist() != stored:
        raise ValueError("the rebuilt search allocation differs from the record's counts")
    if rec.get("moves"):  # layer moves from the family point: the record's final counts
        chosen = dataclasses.replace(chosen, method=rec["search_method"],
                                     keep=np.array(rec["search_keep"], dtype=np.int64))
        if chosen.keep_total != best.keep_total:
            raise ValueError("the record's searched counts do not sum to the budget")
    right = {}
    for name, alloc in (("fixed", best), ("search", chosen)):
        model = copy.deepcopy(dense)
        prune_(model, alloc)
        repair(model, rec["repair"], images, dense=dense)
        right[name] = _correct(model, rec["dataset"], n)
    f, s = right["fixed"], right["search"]
    m = len(f)
    only_s, only_f = int((s & ~f).sum()), int((f & ~s).sum())
    diff = 100.0 * (only_s - only_f) / m
    se = 100.0 * ((only_s + only_f) - (only_s - only_f) ** 2 / m) ** 0.5 / m
    return {"model": rec["model"], "sparsity": rec["sparsity"], "repair": rec["repair"],
            "n": m, "best_fixed": rec["best_fixed"], "fixed_top1": 100.0 * float(f.float().mean()),
            "search": chosen.method, "search_top1": 100.0 * float(s.float().mean()),
            "diff": diff, "paired_se": se, "only_search_right": only_s,
            "only_fixed_right": only_f}


def table(records: list[dict]) -> str:
    fixed = list(records[0]["fixed"]) if records else []
    # the records' own criterion (kl before 2026-11-30's agreement runs, hence the old header)
    crits = sorted({r.get("criterion", "kl") for r in records}) or ["kl"]
    head = ["model", "sparsity", "repair", *fixed, "best fixed",
            f"fixed by {'/'.join(crits).replace('kl', 'KL')}", "anchors",
            "search t", "family choice", "layer moves",
            "search", "search - best fixed", "family oracle (t)", "evals", "search s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        cells = [r["model"], f"{r['sparsity']:g}", r["repair"],
                 *[f"{r['fixed'][m]['top1']:.2f}" for m in fixed],
                 f"{r['best_fixed_top1']:.2f} ({r['best_fixed']})",
                 f"{r['fixed_by_criterion_top1']:.2f} ({r['fixed_by_criterion']})",
                 ("auto: " if r.get("anchors_mode") == "auto" else "")
                 + "-".join(r.get("anchors", ["erk", "lamp"])),
                 f"{r['search_t']:g}", f"{r.get('family_top1', r['search_top1']):.2f}",
                 f"{len(r.get('moves', []))} of {r.get('proposals', 0)}",
                 f"{r['search_top1']:.2f}",
                 f"{r['gain_over_best_fixed']:+.2f}",
                 f"{r['family_oracle_top1']:.2f} ({r['family_oracle_t']:g})",
                 str(r["evaluations"]), f"{r['search_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--sparsities", default="0.9,0.95")
    ap.add_argument("--repairs", default="bn_recal")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--scoring", type=int, default=1000)
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--fixed", default="erk,lamp,uniform,global_magnitude")
    ap.add_argument("--criterion", default=DEFAULT_CRITERION,
                    help=f"kl or agreement (default: the library's, {DEFAULT_CRITERION})")
    ap.add_argument("--anchors", default="auto",
                    help="'auto' (default) or a pair such as erk,lamp (the original family)")
    ap.add_argument("--candidates", default="erk,lamp,uniform,global_magnitude",
                    help="the allocators --anchors auto evaluates first")
    ap.add_argument("--grid", type=int, default=5)
    ap.add_argument("--refine", type=int, default=2)
    ap.add_argument("--layer-sweeps", type=int, default=0,
                    help="sweeps of greedy layer moves after the family (search_allocation; "
                         "default 0: off)")
    ap.add_argument("--move-factor", type=float, default=2.0,
                    help="the first sweep's density factor of a layer move (default 2)")
    ap.add_argument("--out", help="append one JSON line per regime to this file")
    ap.add_argument("--table", help="print the table of a JSON-lines file and exit")
    ap.add_argument("--confirm", help="paired re-evaluation of a JSON-lines file's records")
    ap.add_argument("--n-confirm", type=int, default=None,
                    help="test images for --confirm (default: the whole split)")
    args = ap.parse_args(argv)
    if args.confirm:
        with open(args.confirm) as f:
            records = [json.loads(line) for line in f if line.strip()]
        print("| model | sparsity | repair | n | best fixed | search | search - fixed | paired SE "
              "| only search right | only fixed right |\n|" + "---|" * 10)
        for rec in records:
            c = confirm(rec, args.n_confirm)
            print(f"| {c['model']} | {c['sparsity']:g} | {c['repair']} | {c['n']} | "
                  f"{c['fixed_top1']:.2f} ({c['best_fixed']}) | {c['search_top1']:.2f} "
                  f"({c['search']}) | {c['diff']:+.2f} | {c['paired_se']:.2f} | "
                  f"{c['only_search_right']} | {c['only_fixed_right']} |", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(c) + "\n")
        return 0
    if args.table:
        with open(args.table) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return 0
    records = []
    for model in args.models.split(","):
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            for rep in args.repairs.split(","):
                print(f"{model} {sparsity} {rep}", file=sys.stderr, flush=True)
                rec = measure(model, sparsity, rep, dataset=args.dataset, seed=args.seed,
                              calib=args.calib, scoring=args.scoring, n_eval=args.n_eval,
                              fixed=args.fixed.split(","), criterion=args.criterion,
                              grid=args.grid, refine=args.refine,
                              layer_sweeps=args.layer_sweeps, move_factor=args.move_factor,
                              anchors=("auto" if args.anchors == "auto"
                                       else tuple(args.anchors.split(","))),
                              candidates=args.candidates.split(","))
                records.append(rec)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
