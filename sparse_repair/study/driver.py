"""The sweep driver: submits a study's pending runs to an executor and writes each outcome to
the result store as it arrives. It is the only writer of the store (workers only compute), so
a run is committed whole or not at all. The public entry points are in ``api``; where runs
execute is the ``executors`` module's business."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..progress import Progress
from .executors import ExecutorConfig, Outcome, TaskFn, execute, run_task
from .spec import Study, stored_config
from .store import Store


def db_path(study: Study, override: str | os.PathLike | None) -> Path:
    """The store of ``study``: ``override`` when given, else ``results/<study name>.sqlite``
    relative to the working directory. ValueError for an empty ``override`` (it used to mean
    the default store)."""
    if override is not None and not str(override).strip():
        raise ValueError("empty --db path: name the store file, or leave --db out for "
                         f"results/{study.name}.sqlite")
    return Path(override) if override is not None else Path("results") / f"{study.name}.sqlite"


@dataclass
class RunSummary:
    """What one call of ``run`` did. ``failed`` lists the run ids that failed every attempt in
    this call (recorded in the store with their traceback; ``status`` shows them)."""
    study: str
    db: str
    executor: str
    runs_total: int                     # runs the study file expands to
    done_before: int                    # already done in the store: not submitted again
    ran: int = 0                        # runs finished (done) in this call
    failed: list[str] = field(default_factory=list)

    @property
    def pending(self) -> int:
        """Runs neither done before nor finished now (the failed ones)."""
        return self.runs_total - self.done_before - self.ran

    @property
    def exit_code(self) -> int:
        """The command line's exit status: 0 when every run is done, 1 when some failed."""
        return 1 if self.failed else 0


def sweep(study: Study, store: Store, ec: ExecutorConfig, assets: str | os.PathLike | None,
          fn: TaskFn | None = None, progress: bool = False,
          after_run: Callable[[], None] | None = None) -> RunSummary:
    """Run the runs of ``study`` not yet done in ``store`` on executor ``ec`` and write each
    outcome (one transaction per run). ``progress`` prints a header, a line per run on stdout
    (failures on stderr) and a progress bar with ETA on stderr. ``after_run`` is called after
    each finished run is written (the snapshot export); an error it raises is printed as a
    warning and the sweep goes on, since the run is safe in the store. Raises
    ``ExecutorLost`` when the executor itself goes away (finished runs are saved; the rest
    stay pending)."""
    done = store.done()
    pending = [(rid, cfg) for rid, cfg in study.runs if rid not in done]
    summary = RunSummary(study.name, str(store.path), ec.name, len(study.runs),
                         len(study.runs) - len(pending))
    if progress:
        print(f"study {study.name}: {len(study.runs)} runs, {summary.done_before} done, "
              f"{len(pending)} to run on executor {ec.name} -> {store.path}", flush=True)
        from .executors import USED_BY

        # only what this executor acts on (the slurm settings mean nothing to a local run)
        shown = {k: v for k, v in asdict(ec).items() if ec.name in USED_BY.get(k, (ec.name,))}
        print(f"executor config: {json.dumps(shown)}", flush=True)
    bar = Progress(len(pending), f"study {study.name}", enabled=progress, unit="run")
    for out in execute(pending, ec, assets=assets, fn=fn or run_task):
        _write(out, store, progress)
        if out.ok:
            summary.ran += 1
            if after_run is not None:
                try:
                    after_run()
                except (OSError, ValueError) as e:
                    print(f"\nwarning: snapshot not written after run {out.rid}: {e}",
                          file=sys.stderr, flush=True)
        else:
            summary.failed.append(out.rid)
        bar.update(1)
    bar.close()
    return summary


def _write(out: Outcome, store: Store, progress: bool) -> None:
    cfg = out.cfg
    tag = f"[{out.rid}] {cfg.model}/{cfg.dataset} {cfg.allocation} S={cfg.sparsity} " \
          f"seed {cfg.seed}"
    if out.ok:
        rows = [{**r, "config": stored_config(r["config"])} for r in out.rows]
        store.write_run(out.rid, rows, out.dense_top1, attempts=out.attempts,
                        wall_s=out.wall_s, allocation=out.allocation,
                        repair_layers=out.repair_layers)
        if progress:
            summary = " ".join(f"{r['repair']}={r['top1']:.1f}" for r in out.rows)
            wall = "?" if out.wall_s is None else f"{out.wall_s:.1f}"
            print(f"\n{tag}: {summary} (worker {wall}s, attempt {out.attempts})", flush=True)
    else:
        store.write_failure(out.rid, stored_config(asdict(cfg)), out.error,
                            attempts=out.attempts)
        if progress:
            print(f"\n{tag}: FAILED after {out.attempts} attempts; see `sparse-repair study "
                  f"status`", file=sys.stderr, flush=True)
