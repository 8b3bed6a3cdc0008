"""The study API: run, status and report of a study, as plain Python calls.

    from sparse_repair import study
    summary = study.run("studies/tiny.toml", db="results/tiny.sqlite")   # RunSummary
    study.status("studies/tiny.toml", db="results/tiny.sqlite")          # dict
    study.report("studies/tiny.toml", "report/", db="results/tiny.sqlite")  # dict
    study.export("studies/tiny.toml", "studies/tiny.runs.jsonl.gz")         # runs written
    study.import_("studies/tiny.toml", "studies/tiny.runs.jsonl.gz")        # dict of counts

``sparse-repair study run|status|report|export|import`` (``study/cli.py``) is a thin layer over
these.
A study is a TOML file (``spec.py``) or a loaded ``Study``; its store defaults to
``results/<study name>.sqlite`` under the working directory.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from .driver import RunSummary, db_path, sweep
from .executors import ExecutorConfig, TaskFn
from .spec import Study, load_study
from .store import Store

__all__ = ["RunSummary", "export", "import_", "load", "report", "run", "status"]

StudyLike = str | os.PathLike | Study


def check_weights(study: Study) -> None:
    """Load every distinct (model, data set, checkpoint) of ``study`` once, in this process,
    before any run is submitted: a corrupt, truncated or foreign checkpoint, or one that holds
    another architecture than its ``model``, is one clear error naming the study file, instead
    of a failure recorded for each of its runs after every retry. Published weights
    (``pretrained``, no ``weights``) and checkpoints not present on this machine (they may be
    on the workers; their runs fail and are recorded) are not checked here. Raises ValueError
    (the loaders' CheckpointError, with the study and model prepended)."""
    from ..run import load_dense

    seen = set()
    for _, cfg in study.runs:
        key = (cfg.model, cfg.dataset, cfg.weights)
        # A checkpoint absent here may exist where the runs execute (a cluster's workers): its
        # runs fail and are recorded as such, and the sweep goes on. One present here is read.
        if not cfg.weights or key in seen or not os.path.exists(cfg.weights):
            continue
        seen.add(key)
        try:
            load_dense(cfg)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{study.path}: model {cfg.model} with weights {cfg.weights}: {e}"
                             ) from e


def load(study: StudyLike) -> Study:
    """A ``Study`` from a TOML path (or the ``Study`` itself). Raises FileNotFoundError for a
    missing file and ValueError for a study without models or grid values."""
    return study if isinstance(study, Study) else load_study(study)


def run(study: StudyLike, *, db: str | os.PathLike | None = None,
        executor: str | ExecutorConfig = "local", assets: str | os.PathLike | None = None,
        progress: bool = False, fn: TaskFn | None = None,
        snapshot: str | os.PathLike | None = None, **executor_options) -> RunSummary:
    """Run (or resume) a study: every run not yet ``done`` in the store is submitted to
    ``executor`` and written to the store as it finishes, one transaction per run.

    ``executor``: "local" (in this process), "ray" or "slurm", with ``executor_options`` the
    fields of ``ExecutorConfig`` (retries, cpus_per_task, gpus_per_task, ray_address,
    slurm_cluster, slurm_partition, slurm_time_min, slurm_parallelism, slurm_folder, poll_s);
    or an ``ExecutorConfig``. ``assets``: the asset root handed to the workers (default
    ``$SPARSE_REPAIR_ASSETS``, else ~/.cache/sparse_repair); it must be visible to every
    worker, and the local executor makes it this process's asset root. ``progress`` prints a
    line per run and a progress bar; ``fn`` replaces the worker's task (tests inject faults).
    ``snapshot``: a snapshot file (``export``) rewritten after every finished run, so the runs
    outlive the store once the file is committed; it is written once before any run is
    submitted, so a target ``export`` refuses (it holds runs the store lacks: import it first)
    stops the study before any work.

    Returns a ``RunSummary`` (runs done before, finished now, failed; ``exit_code``). A run that
    fails ``1 + retries`` times is recorded as failed and the sweep goes on. Raises
    FileNotFoundError / ValueError for a bad study file, ValueError for an unknown executor,
    negative retries or a ``db`` that is not an SQLite store (``Store``), TypeError for an
    unknown executor option or executor options given together with an ``ExecutorConfig``,
    ModuleNotFoundError when the executor's extra (ray, submitit) is not installed, and
    ``executors.ExecutorLost`` when the executor itself goes away mid-sweep (finished runs are
    saved; calling again resumes). Unless ``fn`` is given, every checkpoint the study names is
    checked first (``check_weights``): a bad one raises ValueError before the store is opened,
    instead of failing every run 1 + retries times."""
    st = load(study)
    ec = _executor_config(executor, executor_options)
    if fn is None:
        check_weights(st)
    from .executors import preflight

    preflight(st.runs, ec, assets)  # before the store exists: a refused run leaves no file
    store = Store(db_path(st, db))
    try:
        after = None
        if snapshot is not None:
            def after() -> None:
                _export(st, store, snapshot, overwrite=False, layer_stats="plotted")

            after()  # refused targets stop here, before any run
        return sweep(st, store, ec, assets, fn=fn, progress=progress, after_run=after)
    finally:
        store.close()


def _executor_config(executor: str | ExecutorConfig, options: dict) -> ExecutorConfig:
    if isinstance(executor, ExecutorConfig):
        if options:
            raise TypeError(f"executor options {sorted(options)} given with an ExecutorConfig; "
                            f"set them on the ExecutorConfig instead")
        return executor
    valid = {f.name for f in fields(ExecutorConfig)} - {"name"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"unknown executor option(s) {unknown}; valid: {sorted(valid)}")
    return ExecutorConfig(name=executor, **options)


def _existing_store(st: Study, db: str | os.PathLike | None) -> Path:
    """The store of ``st``, which must exist: status, report and export read a store, and
    opening a mistyped path would create an empty one and answer "0 runs done"."""
    path = db_path(st, db)
    if not path.is_file() or path.stat().st_size == 0:
        raise FileNotFoundError(f"no result store {path}" + (" (an empty file)" if
                                path.is_file() else "") + ": run the study first (sparse-"
                                "repair study run), or pass its store with --db (db=)")
    return path


def status(study: StudyLike, db: str | os.PathLike | None = None) -> dict:
    """Progress of a study in its store, counting only the runs the study expands to.

    Returns {"study": name, "db": path, "runs_total", "done", "failed", "pending": int,
    "wall_s": {"model/dataset": {"runs": int, "median", "min", "max", "total": seconds}}
    (worker wall time of this study's done runs; median is the upper middle value for an even
    count), "failures": [{"run_id", "run": "model/dataset allocation S=.. seed .." or None for
    a run not in this study file, "attempts": int, "error": traceback}] (every failed run in the
    store)}. Raises FileNotFoundError / ValueError for a bad study file, FileNotFoundError
    for a missing store, and ValueError for a ``db`` that is not an SQLite store."""
    st = load(study)
    store = Store(_existing_store(st, db))
    try:
        done, failed, attempts = store.done(), store.failed(), store.attempts()
        ids = [rid for rid, _ in st.runs]
        walls = {}
        for model_data, w in sorted(store.wall_times(set(ids)).items()):
            w = sorted(w)
            walls[model_data] = {"runs": len(w), "median": w[len(w) // 2], "min": w[0],
                                 "max": w[-1], "total": sum(w)}
        configs = dict(st.runs)
        failures = []
        for rid, err in failed.items():
            cfg = configs.get(rid)
            failures.append({
                "run_id": rid, "attempts": attempts.get(rid, 0), "error": err,
                "run": f"{cfg.model}/{cfg.dataset} {cfg.allocation} S={cfg.sparsity} seed "
                       f"{cfg.seed}" if cfg else None})
        return {"study": st.name, "db": str(store.path), "runs_total": len(ids),
                "done": sum(r in done for r in ids), "failed": sum(r in failed for r in ids),
                "pending": sum(r not in done and r not in failed for r in ids),
                "wall_s": walls, "failures": failures}
    finally:
        store.close()


def report(study: StudyLike, out: str | os.PathLike, db: str | os.PathLike | None = None
           ) -> dict:
    """Write the study's report to the folder ``out`` from its store alone (nothing is
    loaded, pruned or repaired): ``report.md``, ``cells.csv``, ``differences.csv`` and, with
    matplotlib, PNG + SVG plots; a study still running is reported as far as it got.

    Returns {"report": path of report.md, "plots": [png names], "skipped": [why a plot was
    not drawn, e.g. a store written before per-layer data was kept], "runs_done",
    "runs_total": int, "transition": {"model/dataset/allocation": (lo, hi) or None},
    "transition_by_repair": {"model/dataset/allocation": {repair: [sparsities where that
    recovering repair alone recovers while bn_recal fails; [] = nowhere on the grid]} (no key
    for a repair not run there; None for a curve without bn_recal)}, "fails_from":
    {"model/dataset/allocation": {repair: first grid sparsity below 2 x chance, as text}},
    "best_allocation": {"model/dataset/repair": {sparsity: report_writer.best_allocations'
    cell (best, runner_up, margin, lo, hi, n, ahead, allocations)}},
    "selection": {criterion: select.evidence.summarize(rows, criterion)} or None (no
    label-free scores), "allocation_choice": select.evidence.allocation_choice(rows, plan)
    (the allocation chosen with the repair fixed; {} when no repair offers two allocations in
    a complete selection) or None (no label-free scores)}.
    Raises FileNotFoundError / ValueError for a bad study file, FileNotFoundError for a
    missing store, ValueError for a ``db`` that is not an SQLite store, and ImportError
    (naming the `plot` extra) when pandas is not installed."""
    from .report_writer import write_report  # pandas and matplotlib: only needed here

    st = load(study)
    store = Store(_existing_store(st, db))
    try:
        ids = {rid for rid, _ in st.runs}
        return write_report(st, store.rows(ids), Path(out), store=store)
    finally:
        store.close()


def export(study: StudyLike, out: str | os.PathLike, db: str | os.PathLike | None = None,
           overwrite: bool = False, layer_stats: str = "plotted") -> dict:
    """Write the study's done runs (only the runs its file expands to) from its store to the
    snapshot file ``out`` (``Store.export``: gzip JSON Lines), a file that can be committed so
    that finished runs outlive the machine or session the store is on; ``import_`` loads it
    into a store and ``run`` then resumes from there.

    ``layer_stats``: "plotted" (default) keeps the per-channel repair statistics only of the
    runs the report's per-layer plots use (``spec.layer_plot_runs``), which keeps a run's
    record near 2 kB instead of 60 kB (ResNet-20; more for deeper models); "all" keeps every
    run's. Results, scores, timings and per-layer allocations are always written whole.

    Returns {"snapshot": path, "runs": runs written, "runs_total": runs of the study}. Raises
    FileNotFoundError / ValueError for a bad study file, FileNotFoundError when the store does
    not exist (nothing to export; the path is named), and ValueError, before writing anything
    (``Store.export``), for a ``layer_stats`` other than "plotted" or "all", a ``db`` that is
    not an SQLite store, an ``out`` that is the store itself, a directory or a file that is not
    a snapshot (even with ``overwrite``), an unwritable ``out``, and, unless ``overwrite``, a
    damaged snapshot at ``out`` or one holding runs that this export would drop (import it
    first)."""
    if layer_stats not in ("plotted", "all"):
        raise ValueError(f"layer_stats={layer_stats!r}; use 'plotted' or 'all'")
    st = load(study)
    store = Store(_existing_store(st, db))
    try:
        n = _export(st, store, out, overwrite, layer_stats)
    finally:
        store.close()
    return {"snapshot": str(out), "runs": n, "runs_total": len(st.runs)}


def _export(st: Study, store: Store, out: str | os.PathLike, overwrite: bool,
            layer_stats: str) -> int:
    from .spec import layer_plot_runs

    keep = None
    if layer_stats == "plotted":
        keep = [rid for rid, _ in layer_plot_runs(st, store.done())[1].values()]
    return store.export(out, [rid for rid, _ in st.runs], study=st.name, overwrite=overwrite,
                        layer_stats=keep)


def import_(study: StudyLike, snapshot: str | os.PathLike, db: str | os.PathLike | None = None
            ) -> dict:
    """Load the runs of ``snapshot`` (written by ``export``) that belong to the study into its
    store (created if needed), so that ``run`` resumes after them and ``report`` includes them.
    Runs already done in the store are kept; runs of other studies are skipped and counted.

    Returns {"db": store path, "imported", "already_done", "not_in_study": runs, "done",
    "runs_total": the store's done runs of this study after the import, and the study's
    size}. Raises FileNotFoundError / ValueError for a bad study file or snapshot, and
    ValueError when no run of the snapshot belongs to the study (a moved or changed
    checkpoint changes every run id) or ``db`` is not an SQLite store, all before anything is
    written."""
    from .store import read_snapshot

    st = load(study)
    header, records = read_snapshot(snapshot)  # refused before a store is created
    ids = [rid for rid, _ in st.runs]
    if records and not set(records) & set(ids):
        raise ValueError(
            f"none of the {len(records)} runs of {snapshot} (study {header.get('study')!r}) "
            f"belongs to {st.path}: a run id hashes the run's resolved configuration, "
            f"including its checkpoint's contents, so another study file, a changed one, or a "
            f"checkpoint missing or different here matches nothing. Check the study file and "
            f"its weights paths; nothing was imported")
    store = Store(db_path(st, db))
    try:
        counts = store.import_(snapshot, ids, records=records)
        done = store.done()
        return {"db": str(store.path), **counts, "done": sum(r in done for r in ids),
                "runs_total": len(ids)}
    finally:
        store.close()
