"""Studies: resumable sweeps of model x data set x allocation x sparsity x repair x seed, with
a SQLite result store, statistics and reports (docs/study.md).

    from sparse_repair import study
    study.run("studies/tiny.toml")                  # -> RunSummary
    study.status("studies/tiny.toml")               # -> dict
    study.report("studies/tiny.toml", "report/")    # -> dict
    study.export("studies/tiny.toml", "tiny.runs.jsonl.gz")   # a committable snapshot
    study.import_("studies/tiny.toml", "tiny.runs.jsonl.gz")  # into the store, to resume

Modules: ``api`` (these functions), ``spec`` (study files and run ids), ``driver`` (the sweep
loop, sole writer of the store), ``executors`` (local, Ray, Slurm), ``store`` (SQLite),
``stats`` (intervals, transition rule), ``report_writer`` (tables and plots), ``cli``
(`sparse-repair study`).
"""

from .api import RunSummary, export, import_, load, report, run, status

__all__ = ["RunSummary", "export", "import_", "load", "report", "run", "status"]
