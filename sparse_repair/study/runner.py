"""`sparse-repair study run|status|report`: the local executor, progress, and reports."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from ..progress import Progress
from .spec import Study, load_study
from .store import Store


def db_path(study: Study, override: str | None) -> Path:
    return Path(override) if override else Path("results") / f"{study.name}.sqlite"


def execute_run(cfg, dense_cache: dict) -> tuple[list[dict], float]:
    """One run (prune once, every repair on its own copy); returns rows and dense top-1."""
    from ..evaluate import evaluate
    from ..run import load_dense, run_single

    key = (cfg.model, cfg.dataset, cfg.weights, cfg.n_eval, cfg.device)
    if key not in dense_cache:
        dense = load_dense(cfg).to(cfg.device)
        dense_cache[key] = (dense, evaluate(dense, cfg.dataset, cfg.n_eval,
                                            device=cfg.device)["top1"])
    dense, dense_top1 = dense_cache[key]
    return run_single(cfg, dense=dense), dense_top1


def cmd_run(args: argparse.Namespace) -> int:
    if getattr(args, "assets", None):
        os.environ["SPARSE_REPAIR_ASSETS"] = args.assets
    study = load_study(args.study)
    store = Store(db_path(study, args.db))
    done = store.done()
    pending = [(rid, cfg) for rid, cfg in study.runs if rid not in done]
    print(f"study {study.name}: {len(study.runs)} runs, {len(study.runs) - len(pending)} done, "
          f"{len(pending)} to run -> {store.path}", flush=True)
    bar = Progress(len(pending), f"study {study.name}", unit="run")
    dense_cache: dict = {}
    failures = 0
    for rid, cfg in pending:
        start = time.perf_counter()
        try:
            rows, dense_top1 = execute_run(cfg, dense_cache)
        except Exception:
            failures += 1
            store.write_failure(rid, cfg.__dict__, traceback.format_exc())
            print(f"\n[{rid}] FAILED {cfg.model} {cfg.allocation} {cfg.sparsity} seed "
                  f"{cfg.seed}; see `sparse-repair study status`", file=sys.stderr, flush=True)
            bar.update(1)
            continue
        store.write_run(rid, rows, dense_top1)
        summary = " ".join(f"{r['repair']}={r['top1']:.1f}" for r in rows)
        print(f"\n[{rid}] {cfg.model}/{cfg.dataset} {cfg.allocation} S={cfg.sparsity} seed "
              f"{cfg.seed}: {summary} ({time.perf_counter() - start:.1f}s)", flush=True)
        bar.update(1)
    return 1 if failures else 0


def cmd_status(args: argparse.Namespace) -> int:
    study = load_study(args.study)
    store = Store(db_path(study, args.db))
    done, failed = store.done(), store.failed()
    ids = [rid for rid, _ in study.runs]
    print(f"study {study.name}: {sum(r in done for r in ids)}/{len(ids)} runs done, "
          f"{sum(r in failed for r in ids)} failed, "
          f"{sum(r not in done and r not in failed for r in ids)} pending ({store.path})")
    for rid, err in failed.items():
        print(f"--- failed run {rid}:\n{err.strip().splitlines()[-1]}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    if getattr(args, "assets", None):
        os.environ["SPARSE_REPAIR_ASSETS"] = args.assets
    study = load_study(args.study)
    store = Store(db_path(study, args.db))
    out = write_report(study, store.rows(), Path(args.out))
    print(json.dumps(out, indent=1))
    return 0
