"""SQLite result store. One row per (run id, repair); a run's rows are written in one
transaction, so killing the process loses at most the run in flight."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL, repair TEXT NOT NULL,
    model TEXT, dataset TEXT, allocation TEXT, sparsity REAL, seed INTEGER,
    top1 REAL, n_eval INTEGER, seconds REAL, passes_dense INTEGER, passes_pruned INTEGER,
    path TEXT, sparsity_achieved REAL, dense_top1 REAL,
    config TEXT, env TEXT, created REAL,
    PRIMARY KEY (run_id, repair));
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, status TEXT NOT NULL, attempts INTEGER DEFAULT 0,
    error TEXT, config TEXT, updated REAL, wall_s REAL);
"""


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(runs)")}
        if "wall_s" not in cols:  # databases written before worker wall times were recorded
            self.db.execute("ALTER TABLE runs ADD COLUMN wall_s REAL")

    def done(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT run_id FROM runs WHERE status='done'")}

    def failed(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT run_id, error FROM runs WHERE status='failed'"))

    def write_run(self, rid: str, rows: list[dict], dense_top1: float, attempts: int = 1,
                  wall_s: float | None = None) -> None:
        now = time.time()
        with self.db:  # one transaction per run
            for r in rows:
                c = r["config"]
                env = {k: r[k] for k in ("torch", "device_name", "python") if k in r}
                self.db.execute(
                    "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rid, r["repair"], c["model"], c["dataset"], c["allocation"], c["sparsity"],
                     c["seed"], r["top1"], r["n_eval"], r["seconds"], r["passes_dense"],
                     r["passes_pruned"], r["path"], r["sparsity_achieved"], dense_top1,
                     json.dumps({**c, "options": r.get("options"),
                                 "train_images": r.get("train_images")}), json.dumps(env), now))
            self._set_run(rid, "done", attempts, None, rows[0]["config"], now, wall_s)

    def write_failure(self, rid: str, config: dict, error: str, attempts: int = 1) -> None:
        with self.db:
            self._set_run(rid, "failed", attempts, error, config, time.time())

    def _set_run(self, rid, status, attempts, error, config, now, wall_s=None) -> None:
        # attempts accumulate over invocations: a run that failed yesterday and succeeded
        # today after one retry shows all its attempts.
        self.db.execute("INSERT OR REPLACE INTO runs (run_id, status, attempts, error, config, "
                        "updated, wall_s) VALUES (?,?,COALESCE((SELECT attempts FROM runs "
                        "WHERE run_id=?),0)+?,?,?,?,?)",
                        (rid, status, rid, attempts, error, json.dumps(config), now, wall_s))

    def wall_times(self, run_ids: set[str] | None = None) -> dict[str, list[float]]:
        """Worker wall seconds of each finished run (recorded since the executors), keyed
        ``model/dataset``: one architecture costs very different time per data set (the CPU
        study's ResNet-20 ran a median 54.9 s per CIFAR run and 210.5 s per 64-px Imagenette
        run, docs/RESULTS.md section 8); only the runs in ``run_ids`` when given."""
        out: dict[str, list[float]] = {}
        for rid, config, wall in self.db.execute(
                "SELECT run_id, config, wall_s FROM runs WHERE status='done' AND wall_s IS NOT "
                "NULL"):
            if run_ids is None or rid in run_ids:
                c = json.loads(config)
                out.setdefault(f"{c['model']}/{c['dataset']}", []).append(wall)
        return out

    def attempts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT run_id, attempts FROM runs"))

    def rows(self, run_ids: set[str] | None = None) -> list[dict]:
        """Result rows, only those of ``run_ids`` when given: a store may also hold runs of an
        earlier version of the study file, or runs copied from another study whose ids match
        (a run id is the hash of its resolved config, so equal ids are equal runs)."""
        cur = self.db.execute("SELECT * FROM results ORDER BY model, dataset, allocation, "
                              "sparsity, seed, repair")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
        return [r for r in rows if run_ids is None or r["run_id"] in run_ids]
