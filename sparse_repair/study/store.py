"""SQLite result store. One row per (run id, repair); a run's rows are written in one
transaction, so killing the process loses at most the run in flight.

Tables:

    results        one row per (run_id, repair): accuracy, timings, resolved config, and the
                   label-free scores against the dense model (agreement in percent, kl in
                   nats; NULL when the run had scoring = 0)
    runs           one row per run: status (done/failed), attempts, last error, wall time
    allocation_layers  one row per (run_id, idx): the run's per-layer allocation in forward
                   order: layer name, weight shape (JSON list), numel, keep_count, density
    repair_layers  one row per (run_id, repair, idx): a repair's per-BatchNorm statistics
                   (``RepairReport.to_dict(with_layers=True)["layers"]``) as JSON
                   ``{field: list of per-channel floats | float | null}``

The two per-layer tables were added so that ``study report`` draws its per-layer plots from the
store instead of re-running the pipeline. Stores written before have no rows there (opening
one adds the empty tables); their reports skip those plots and say why.

Snapshots (``Store.export`` / ``Store.import_``): a store lives under the ignored ``results/``,
so a study that spans machines or sessions carries its finished runs in a snapshot file that can
be committed: gzip-compressed JSON Lines, one line per done run holding every table's rows of
that run. Floats are written as Python's shortest round-trip repr, so an imported store holds
the same numbers bit for bit and reports exactly as the original. Why it exists: the fifth
session's evidence store (209 of 240 runs, about 13 worker-hours) was lost with its checkout.
"""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    run_id TEXT NOT NULL, repair TEXT NOT NULL,
    model TEXT, dataset TEXT, allocation TEXT, sparsity REAL, seed INTEGER,
    top1 REAL, n_eval INTEGER, seconds REAL, passes_dense INTEGER, passes_pruned INTEGER,
    path TEXT, sparsity_achieved REAL, dense_top1 REAL,
    config TEXT, env TEXT, created REAL, agreement REAL, kl REAL,
    PRIMARY KEY (run_id, repair));
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, status TEXT NOT NULL, attempts INTEGER DEFAULT 0,
    error TEXT, config TEXT, updated REAL, wall_s REAL);
CREATE TABLE IF NOT EXISTS allocation_layers (
    run_id TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL, shape TEXT NOT NULL,
    numel INTEGER NOT NULL, keep_count INTEGER NOT NULL, density REAL NOT NULL,
    PRIMARY KEY (run_id, idx));
CREATE TABLE IF NOT EXISTS repair_layers (
    run_id TEXT NOT NULL, repair TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL,
    stats TEXT NOT NULL,
    PRIMARY KEY (run_id, repair, idx));
"""

# Named in INSERTs, so stores whose older columns were extended by ALTER TABLE (which appends)
# are written correctly whatever their physical column order.
_RESULT_COLUMNS = ("run_id", "repair", "model", "dataset", "allocation", "sparsity", "seed",
                   "top1", "n_eval", "seconds", "passes_dense", "passes_pruned", "path",
                   "sparsity_achieved", "dense_top1", "config", "env", "created", "agreement",
                   "kl")

# Per-channel statistics are kept to 6 significant digits: float32 precision is ~7, the plots
# need ~3, and full float64 reprs would make a 432-run ResNet-20 store ~3x larger.
_DIGITS = 6

# The first line of a snapshot; a file without it is not one (or a newer, unknown version).
SNAPSHOT_FORMAT = "sparse-repair study snapshot"
SNAPSHOT_VERSION = 1


class Store:
    """The result store of one study (or several: rows are keyed by run id).

    Opening creates the file and its tables if needed; the file appears with every table in
    place (built in a temporary file and linked into place), so a reader polling for it, such as
    the kill-and-resume test, never sees a store without tables. Opening an older store adds the
    tables and columns it lacks, empty."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                _create_atomically(self.path)
            self.db = sqlite3.connect(self.path, timeout=60)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)  # older stores: adds the per-layer tables
        except (OSError, sqlite3.DatabaseError) as e:
            # a directory, a file under a file, a gzip snapshot passed as --db, no permission
            raise ValueError(f"cannot open {self.path} as a study result store (SQLite): {e}; "
                             f"pass a store file, or a new path, with --db") from e
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(runs)")}
        if "wall_s" not in cols:  # databases written before worker wall times were recorded
            self.db.execute("ALTER TABLE runs ADD COLUMN wall_s REAL")
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(results)")}
        for col in ("agreement", "kl"):  # stores written before label-free scores were kept
            if col not in cols:
                self.db.execute(f"ALTER TABLE results ADD COLUMN {col} REAL")

    def close(self) -> None:
        self.db.close()

    def done(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT run_id FROM runs WHERE status='done'")}

    def failed(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT run_id, error FROM runs WHERE status='failed'"))

    def write_run(self, rid: str, rows: list[dict], dense_top1: float, attempts: int = 1,
                  wall_s: float | None = None, allocation: list[dict] | None = None,
                  repair_layers: dict[str, list[dict]] | None = None) -> None:
        """Write one finished run in one transaction: its result ``rows`` (one per repair, as
        ``run_single`` returns them), and when given its per-layer ``allocation`` (dicts with
        name, shape, numel, keep_count, density, in forward order) and ``repair_layers``
        ({repair label: per-BN dicts of ``RepairReport.to_dict(with_layers=True)``, values
        plain floats, lists of floats or None}). Rewriting a run replaces all of it."""
        now = time.time()
        with self.db:  # one transaction per run
            for r in rows:
                c = r["config"]
                env = {k: r[k] for k in ("torch", "device_name", "python") if k in r}
                self.db.execute(
                    f"INSERT OR REPLACE INTO results ({', '.join(_RESULT_COLUMNS)}) VALUES "
                    f"({', '.join('?' * len(_RESULT_COLUMNS))})",
                    (rid, r["repair"], c["model"], c["dataset"], c["allocation"], c["sparsity"],
                     c["seed"], r["top1"], r["n_eval"], r["seconds"], r["passes_dense"],
                     r["passes_pruned"], r["path"], r["sparsity_achieved"], dense_top1,
                     json.dumps({**c, "options": r.get("options"),
                                 "train_images": r.get("train_images")}), json.dumps(env), now,
                     r.get("agreement"), r.get("kl")))
            if allocation is not None:
                self.db.execute("DELETE FROM allocation_layers WHERE run_id=?", (rid,))
                self.db.executemany(
                    "INSERT INTO allocation_layers VALUES (?,?,?,?,?,?,?)",
                    [(rid, i, ly["name"], json.dumps([int(d) for d in ly["shape"]]),
                      int(ly["numel"]), int(ly["keep_count"]), float(ly["density"]))
                     for i, ly in enumerate(allocation)])
            if repair_layers is not None:
                self.db.execute("DELETE FROM repair_layers WHERE run_id=?", (rid,))
                self.db.executemany(
                    "INSERT INTO repair_layers VALUES (?,?,?,?,?)",
                    [(rid, rep, i, ly["name"],
                      json.dumps({k: _compact(v) for k, v in ly.items() if k != "name"}))
                     for rep, layers in repair_layers.items() for i, ly in enumerate(layers)])
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

    def allocation_layers(self, run_ids: Iterable[str]) -> dict[str, list[dict]]:
        """{run id: [{name, shape (list of int), numel, keep_count, density}, ...] in forward
        order} for the given runs that have a stored allocation (runs written before the store
        kept it have none and are absent)."""
        out: dict[str, list[dict]] = {}
        for rid, name, shape, numel, keep, density in self._select(
                "SELECT run_id, name, shape, numel, keep_count, density FROM allocation_layers",
                run_ids, "run_id, idx"):
            out.setdefault(rid, []).append({"name": name, "shape": json.loads(shape),
                                            "numel": numel, "keep_count": keep,
                                            "density": density})
        return out

    def repair_layers(self, run_ids: Iterable[str], repair: str | None = None
                      ) -> dict[tuple[str, str], list[dict]]:
        """{(run id, repair): [{"name": BN layer, field: value, ...}, ...] in forward order}:
        each repair's per-BatchNorm statistics (mu_d, sd_d, mu_s, sd_s, rho as per-channel
        lists of float, kappa and gain per channel or per layer as the method reports them;
        None where the method has no such statistic), only ``repair`` when given. Runs or
        repairs without stored statistics are absent."""
        out: dict[tuple[str, str], list[dict]] = {}
        extra, params = ("", ()) if repair is None else (" AND repair=?", (repair,))
        for rid, rep, name, stats in self._select(
                "SELECT run_id, repair, name, stats FROM repair_layers", run_ids,
                "run_id, repair, idx", extra, params):
            out.setdefault((rid, rep), []).append({"name": name, **json.loads(stats)})
        return out

    def export(self, path: str | os.PathLike, run_ids: Iterable[str], study: str = "",
               overwrite: bool = False, layer_stats: Iterable[str] | None = None) -> int:
        """Write the done runs among ``run_ids`` (in that order) to the snapshot file ``path``
        (gzip JSON Lines: a header, then one line per run with its ``runs`` row and all its
        ``results``, ``allocation_layers`` and ``repair_layers`` rows). The file is built under
        a temporary name and renamed into place, so a reader never sees half of it, and its
        bytes depend only on the store's contents (gzip mtime 0, sorted keys).

        ``layer_stats``: the runs whose per-channel repair statistics (``repair_layers``) are
        written; None = every run. They are ~97% of a run's record (measured on the evidence
        study's ResNet-20 runs: 57.6 of 59.3 kB compressed), so a committed snapshot of a
        240-run study keeps them only for the runs a report plots (``spec.layer_plot_runs``).
        Runs whose statistics the snapshot at ``path`` already holds keep them too, so a
        snapshot only ever grows.

        Returns the number of runs written. Raises ValueError before writing anything when
        ``path`` is this store, a directory, or an existing file that is not a snapshot (even
        with ``overwrite``: only snapshots are replaced); and, unless ``overwrite``, when the
        snapshot at ``path`` is damaged or holds runs or per-channel statistics that this
        store lacks (writing it would lose them: import it first)."""
        path = Path(path)
        done = self.done()
        ids = [r for r in dict.fromkeys(run_ids) if r in done]
        keep = None if layer_stats is None else set(layer_stats)
        old = _existing_snapshot(path, self.path, overwrite)
        if old is not None:
            with_stats = {rid for rid, rec in old.items() if rec["repair_layers"]}
            if keep is not None:
                keep |= with_stats
            have = {r[0] for r in self.db.execute("SELECT DISTINCT run_id FROM repair_layers")}
            lost = sorted(set(old) - set(ids))
            lost_stats = sorted(with_stats - have - set(lost))
            if (lost or lost_stats) and not overwrite:
                what = (f"{len(lost)} done run(s) (e.g. {lost[0]})" if lost else
                        f"per-channel repair statistics of {len(lost_stats)} run(s) (e.g. "
                        f"{lost_stats[0]})")
                raise ValueError(f"{path} holds {what} that this store lacks; writing it would "
                                 f"lose them. Import it first (sparse-repair study import "
                                 f"<study file> {path}), or pass --overwrite (overwrite=True)")
        lines = [json.dumps({"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION,
                             "study": study, "runs": len(ids)}, sort_keys=True)]
        lines += [json.dumps(self._run_record(rid, keep is None or rid in keep), sort_keys=True)
                  for rid in ids]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # a short temporary name beside the target: a target name near the file system's
            # limit must still be writable
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".snap", suffix=".tmp")
        except OSError as e:
            raise ValueError(f"cannot write the snapshot {path}: {e.strerror or e}; choose "
                             f"another --out path") from e
        try:
            with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                           filename="") as f:
                f.write(("\n".join(lines) + "\n").encode())
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a committed file private
            os.replace(tmp, path)
        except OSError as e:
            raise ValueError(f"cannot write the snapshot {path}: {e.strerror or e}; choose "
                             f"another --out path") from e
        finally:
            Path(tmp).unlink(missing_ok=True)
        return len(ids)

    def _run_record(self, rid: str, layer_stats: bool = True) -> dict:
        def table(name: str, order: str) -> list[dict]:
            cur = self.db.execute(f"SELECT * FROM {name} WHERE run_id=? ORDER BY {order}", (rid,))
            cols = [d[0] for d in cur.description]
            return [{k: v for k, v in zip(cols, row) if k != "run_id"} for row in cur]

        return {"run_id": rid, "runs": table("runs", "run_id")[0],
                "results": table("results", "repair"),
                "allocation_layers": table("allocation_layers", "idx"),
                "repair_layers": table("repair_layers", "repair, idx") if layer_stats else []}

    def import_(self, path: str | os.PathLike, run_ids: Iterable[str] | None = None,
                records: dict[str, dict] | None = None) -> dict[str, int]:
        """Add the runs of the snapshot file ``path`` (written by ``export``) to this store,
        only those in ``run_ids`` when given, in one transaction. A run already done here is
        kept as it is (equal run ids are equal computations), except that per-channel
        statistics it lacks are taken from the snapshot; a run recorded here as failed is
        replaced by the snapshot's finished one, its attempts added up.

        Returns {"imported", "already_done", "not_in_study": number of runs}. Raises
        FileNotFoundError for a missing file and ValueError (naming the file and line) for a
        file that is not a complete, consistent snapshot (``read_snapshot``), both before
        anything is written."""
        if records is None:  # a caller that has read (and so checked) the file passes them
            _, records = read_snapshot(path)
        wanted = None if run_ids is None else set(run_ids)
        done = self.done()
        attempts = self.attempts()
        have = {r[0] for r in self.db.execute("SELECT DISTINCT run_id FROM repair_layers")}
        counts = {"imported": 0, "already_done": 0, "not_in_study": 0}
        with self.db:
            for rid, rec in records.items():
                if wanted is not None and rid not in wanted:
                    counts["not_in_study"] += 1
                elif rid in done:
                    counts["already_done"] += 1
                    if rid not in have and rec["repair_layers"]:
                        _insert(self.db, rid, {"repair_layers": rec["repair_layers"]})
                else:
                    runs = {**rec["runs"], "attempts": (rec["runs"].get("attempts") or 0)
                            + attempts.get(rid, 0)}
                    _insert(self.db, rid, {**rec, "runs": runs}, replace=True)
                    counts["imported"] += 1
        return counts

    def _select(self, sql: str, run_ids: Iterable[str], order: str, extra: str = "",
                params: tuple = ()) -> list[tuple]:
        ids = sorted(set(run_ids))
        rows: list[tuple] = []
        for i in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[i:i + 500]
            rows += self.db.execute(
                f"{sql} WHERE run_id IN ({','.join('?' * len(chunk))}){extra} ORDER BY {order}",
                (*chunk, *params)).fetchall()
        return rows


def read_snapshot(path: str | os.PathLike) -> tuple[dict, dict[str, dict]]:
    """The header and the run records ({run id: record}) of a snapshot file written by
    ``Store.export``. Every record is checked by inserting it into an empty in-memory store
    (the schema's NOT NULL and key constraints, integer range, text encoding) and for the
    types of the columns the report reads, so a file that passes imports without error.
    Raises FileNotFoundError for a missing file and ValueError naming the file (and line) for
    anything else that is not a complete snapshot of a known version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot file {path}")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        what = ("damaged or cut short" if _gzip_magic(path) else "not a study snapshot "
                "(gzip JSON Lines written by `sparse-repair study export`)")
        raise ValueError(f"{path} is {what}: {e}") from e
    records: dict[str, dict] = {}
    header: dict = {}
    keys = {"run_id", "runs", "results", "allocation_layers", "repair_layers"}
    mem = sqlite3.connect(":memory:")
    mem.executescript(SCHEMA)
    try:
        for n, line in enumerate(lines, 1):
            try:
                obj = json.loads(line, parse_constant=_no_constant)
            except (json.JSONDecodeError, ValueError) as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e}); the snapshot is damaged: "
                                 f"export it again") from e
            if n == 1:
                header = _check_header(path, obj)
                continue
            _check_record(path, n, obj, keys)
            if obj["run_id"] in records:
                raise ValueError(f"{path}, line {n}: run {obj['run_id']} appears twice; the "
                                 f"snapshot is damaged: export it again")
            try:
                _insert(mem, obj["run_id"], obj)
            except (sqlite3.Error, OverflowError, UnicodeEncodeError) as e:
                raise ValueError(f"{path}, line {n}: run {obj['run_id']} does not fit the "
                                 f"store ({e}); the snapshot is damaged: export it again"
                                 ) from e
            records[obj["run_id"]] = obj
    finally:
        mem.close()
    if not header:
        raise ValueError(f"{path} is empty: not a study snapshot")
    if header["runs"] != len(records):
        raise ValueError(f"{path}: the header announces {header['runs']} runs but the file "
                         f"holds {len(records)}; it was cut short: export it again")
    return header, records


def _no_constant(name: str):
    raise ValueError(f"{name} is not a finite number")  # json.loads accepts NaN and Infinity


def _gzip_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _check_header(path: Path, obj) -> dict:
    if not isinstance(obj, dict) or obj.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path} is not a study snapshot: its first line lacks "
                         f'"format": "{SNAPSHOT_FORMAT}"')
    if obj.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"{path}: snapshot version {obj.get('version')!r}; this "
                         f"sparse-repair reads version {SNAPSHOT_VERSION}")
    runs = obj.get("runs")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 0:
        raise ValueError(f"{path}: the header's run count {runs!r} is not an int >= 0; the "
                         f"snapshot is damaged: export it again")
    return obj


# Columns the report and the selection evidence compute with: a snapshot is refused when they
# hold another type (a hand-edited "top1": "abc" would otherwise fail in pandas, far away).
_TYPES = {"results": {"repair": str, "model": str, "dataset": str, "allocation": str,
                      "sparsity": (int, float), "seed": int, "top1": (int, float)},
          "allocation_layers": {"name": str, "numel": int, "keep_count": int,
                                "density": (int, float)}}


def _check_record(path: Path, n: int, obj, keys: set[str]) -> None:
    if not (isinstance(obj, dict) and set(obj) == keys and isinstance(obj["run_id"], str)
            and isinstance(obj["runs"], dict) and obj["runs"].get("status") == "done"
            and all(isinstance(obj[t], list) and all(isinstance(r, dict) for r in obj[t])
                    for t in ("results", "allocation_layers", "repair_layers"))
            and obj["results"]):
        raise ValueError(f"{path}, line {n}: not a finished run's record (want the keys "
                         f"{sorted(keys)}, status done, at least one result row)")
    for name in ("runs", "results", "allocation_layers", "repair_layers"):
        rows = [obj["runs"]] if name == "runs" else obj[name]
        if not all(v is None or isinstance(v, (str, int, float)) for r in rows
                   for v in r.values()):
            raise ValueError(f"{path}, line {n}: a {name} value is not a number, text or "
                             f"null; the snapshot is damaged: export it again")
        for col, typ in _TYPES.get(name, {}).items():
            bad = [r.get(col) for r in rows
                   if isinstance(r.get(col), bool) or not isinstance(r.get(col), typ)]
            if bad:
                raise ValueError(f"{path}, line {n}: {name}.{col} is {bad[0]!r}; the snapshot "
                                 f"is damaged: export it again")


def _insert(db: sqlite3.Connection, rid: str, rec: dict, replace: bool = False) -> None:
    """Write the rows of one snapshot record (any subset of its tables) for run ``rid``;
    ``replace`` deletes the run's rows in those tables first. Column names are checked
    against the table, so a file cannot name anything else."""
    for name in ("runs", "results", "allocation_layers", "repair_layers"):
        if name not in rec:
            continue
        rows = [rec[name]] if name == "runs" else rec[name]
        columns = {r[1] for r in db.execute(f"PRAGMA table_info({name})")} - {"run_id"}
        if replace:
            db.execute(f"DELETE FROM {name} WHERE run_id=?", (rid,))
        for row in rows:
            unknown = set(row) - columns
            if unknown:
                raise sqlite3.OperationalError(f"{name} has no column(s) {sorted(unknown)}")
            cols = ["run_id", *row]
            db.execute(f"INSERT INTO {name} ({', '.join(cols)}) VALUES "
                       f"({', '.join('?' * len(cols))})", (rid, *row.values()))


def _existing_snapshot(path: Path, store: Path, overwrite: bool) -> dict[str, dict] | None:
    """The records of the snapshot an export to ``path`` would replace (None: nothing there,
    or a damaged snapshot that ``overwrite`` may replace). Raises ValueError for a target that
    must never be replaced: the store itself, a directory, a file that is not a snapshot."""
    if path.exists() and store.exists() and os.path.samefile(path, store):
        raise ValueError(f"--out {path} is the result store itself; give the snapshot its own "
                         f"file, e.g. studies/<study>.runs.jsonl.gz")
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; give a file path, e.g. "
                         f"{path / 'study.runs.jsonl.gz'}")
    if not path.exists():
        return None
    try:
        return read_snapshot(path)[1]
    except ValueError as e:
        damaged = _gzip_magic(path) and _first_line_is_header(path)
        if damaged and overwrite:
            return None
        raise ValueError(
            f"--out {path} exists and " + (f"is a damaged snapshot ({e}); pass --overwrite to "
                                           f"replace it" if damaged else
                                           "is not a study snapshot; refusing to replace it "
                                           "(even with --overwrite): choose another --out "
                                           "path")) from e


def _first_line_is_header(path: Path) -> bool:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.loads(f.readline()).get("format") == SNAPSHOT_FORMAT
    except Exception:  # noqa: BLE001 - any failure means "not a snapshot's header"
        return False


def _create_atomically(path: Path) -> None:
    """Create the store file with every table already in it: built under a temporary name and
    hard-linked into place, which fails (and leaves the other store alone) if another process
    created ``path`` meanwhile. A reader that sees the file therefore always sees the tables;
    before, a reader polling for the file could open it between its creation and the schema
    (``no such table: runs``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        con.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file header
        con.executescript(SCHEMA)
        con.commit()
    finally:
        con.close()  # the last connection checkpoints the WAL into the file and removes it
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process created the store first: use that one
    except OSError:  # a filesystem without hard links: rename unless someone was faster
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _compact(v):
    """A per-layer statistic for JSON: floats to _DIGITS significant digits, lists element
    by element, None and ints as they are."""
    if isinstance(v, float):
        return float(f"{v:.{_DIGITS}g}")
    if isinstance(v, (list, tuple)):
        return [_compact(x) for x in v]
    return v
