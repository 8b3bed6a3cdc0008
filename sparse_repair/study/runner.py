"""`sparse-repair study run|status|report`: the driver (the only writer of the result store),
progress, status and reports. Where runs execute is the executors module's business."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from ..progress import Progress
from .executors import ExecutorConfig, ExecutorLost, execute, run_task
from .spec import Study, load_study
from .store import Store


def db_path(study: Study, override: str | None) -> Path:
    return Path(override) if override else Path("results") / f"{study.name}.sqlite"


def executor_config(args: argparse.Namespace) -> ExecutorConfig:
    fields = ExecutorConfig.__dataclass_fields__
    opts = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return ExecutorConfig(name=getattr(args, "executor", "local"), **opts)


def cmd_run(args: argparse.Namespace, fn=None) -> int:
    if getattr(args, "assets", None):
        os.environ["SPARSE_REPAIR_ASSETS"] = args.assets
    study = load_study(args.study)
    ec = executor_config(args)
    store = Store(db_path(study, args.db))
    done = store.done()
    pending = [(rid, cfg) for rid, cfg in study.runs if rid not in done]
    print(f"study {study.name}: {len(study.runs)} runs, {len(study.runs) - len(pending)} done, "
          f"{len(pending)} to run on executor {ec.name} -> {store.path}", flush=True)
    print(f"executor config: {json.dumps(asdict(ec))}", flush=True)
    bar = Progress(len(pending), f"study {study.name}", unit="run")
    try:
        failures = _drive(execute(pending, ec, fn=fn or run_task), store, bar)
    except ExecutorLost as e:
        print(f"\nstopped: {e}", file=sys.stderr, flush=True)
        return 2
    return 1 if failures else 0


def _drive(outcomes, store: Store, bar: Progress) -> int:
    """Write each outcome as it arrives (one transaction per run); returns the failure count."""
    failures = 0
    for out in outcomes:
        cfg = out.cfg
        tag = f"[{out.rid}] {cfg.model}/{cfg.dataset} {cfg.allocation} S={cfg.sparsity} " \
              f"seed {cfg.seed}"
        if out.ok:
            store.write_run(out.rid, out.rows, out.dense_top1, attempts=out.attempts,
                            wall_s=out.wall_s)
            summary = " ".join(f"{r['repair']}={r['top1']:.1f}" for r in out.rows)
            print(f"\n{tag}: {summary} (worker {out.wall_s:.1f}s, attempt {out.attempts})",
                  flush=True)
        else:
            failures += 1
            store.write_failure(out.rid, asdict(cfg), out.error, attempts=out.attempts)
            print(f"\n{tag}: FAILED after {out.attempts} attempts; see `sparse-repair study "
                  f"status`", file=sys.stderr, flush=True)
        bar.update(1)
    return failures


def cmd_status(args: argparse.Namespace) -> int:
    study = load_study(args.study)
    store = Store(db_path(study, args.db))
    done, failed = store.done(), store.failed()
    ids = [rid for rid, _ in study.runs]
    print(f"study {study.name}: {sum(r in done for r in ids)}/{len(ids)} runs done, "
          f"{sum(r in failed for r in ids)} failed, "
          f"{sum(r not in done and r not in failed for r in ids)} pending ({store.path})")
    for model_data, walls in sorted(store.wall_times(set(ids)).items()):
        walls = sorted(walls)
        print(f"{model_data}: worker wall time per run median {walls[len(walls) // 2]:.1f}s "
              f"(min {walls[0]:.1f}s, max {walls[-1]:.1f}s, {len(walls)} runs; "
              f"total {sum(walls) / 3600:.2f} worker-hours)")
    attempts = store.attempts()
    configs = dict(study.runs)
    for rid, err in failed.items():
        cfg = configs.get(rid)
        what = f"{cfg.model}/{cfg.dataset} {cfg.allocation} S={cfg.sparsity} seed {cfg.seed}" \
            if cfg else "(not in this study file)"
        print(f"--- failed run {rid} {what}, {attempts.get(rid, 0)} attempts; last error:\n"
              f"{_last_error(err)}")
    return 0


def _last_error(tb: str, lines: int = 6) -> str:
    """The tail of a traceback (the frames nearest the error and the message)."""
    return "\n".join(tb.strip().splitlines()[-lines:])


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    if getattr(args, "assets", None):
        os.environ["SPARSE_REPAIR_ASSETS"] = args.assets
    study = load_study(args.study)
    store = Store(db_path(study, args.db))
    out = write_report(study, store.rows({rid for rid, _ in study.runs}), Path(args.out))
    print(json.dumps(out, indent=1))
    return 0
