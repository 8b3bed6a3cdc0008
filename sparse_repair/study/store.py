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
    error TEXT, config TEXT, updated REAL);
"""


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def done(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT run_id FROM runs WHERE status='done'")}

    def failed(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT run_id, error FROM runs WHERE status='failed'"))

    def write_run(self, rid: str, rows: list[dict], dense_top1: float) -> None:
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
                     json.dumps({**c, "options": r.get("options")}), json.dumps(env), now))
            self.db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,COALESCE((SELECT attempts "
                            "FROM runs WHERE run_id=?),0)+1,NULL,?,?)",
                            (rid, "done", rid, json.dumps(rows[0]["config"]), now))

    def write_failure(self, rid: str, config: dict, error: str) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,COALESCE((SELECT attempts "
                            "FROM runs WHERE run_id=?),0)+1,?,?,?)",
                            (rid, "failed", rid, error, json.dumps(config), time.time()))

    def rows(self) -> list[dict]:
        cur = self.db.execute("SELECT * FROM results ORDER BY model, dataset, allocation, "
                              "sparsity, seed, repair")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
