"""`sparse-repair study {run,status,report}`."""

from __future__ import annotations

import argparse


def add_study_parser(sub) -> None:
    p = sub.add_parser("study", help="resumable sweeps with statistics and plots")
    ssub = p.add_subparsers(dest="study_command", required=True)
    for name, helptext in (("run", "run (or resume) a study"), ("status", "progress of a study"),
                           ("report", "tables, regimes and plots")):
        q = ssub.add_parser(name, help=helptext)
        q.add_argument("study", help="study TOML file")
        q.add_argument("--db", default=None, help="SQLite file (default results/<study>.sqlite)")
        q.add_argument("--assets", default=None)
        if name == "run":
            _add_executor_options(q)
        if name == "report":
            q.add_argument("--out", required=True)
        q.set_defaults(func=_dispatch)


def _add_executor_options(q) -> None:
    from .executors import EXECUTORS, ExecutorConfig

    d = ExecutorConfig()
    q.add_argument("--executor", default=d.name, choices=EXECUTORS,
                   help="local: in-process; ray: Ray tasks; slurm: submitit job arrays")
    q.add_argument("--retries", type=int, default=d.retries,
                   help="extra attempts for a run that raises or whose worker dies")
    q.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task)
    q.add_argument("--gpus-per-task", type=int, default=None,
                   help="default: 1 when the study's device is CUDA, else 0")
    q.add_argument("--ray-address", default=None,
                   help="join an existing Ray cluster ('auto' or ray://HOST:10001); "
                        "default: start a local one")
    q.add_argument("--slurm-cluster", default=None,
                   help="submitit cluster: default auto (Slurm when sbatch exists); 'local'")
    q.add_argument("--slurm-partition", default=None)
    q.add_argument("--slurm-time-min", type=int, default=d.slurm_time_min,
                   help="wall-clock limit per array task, minutes")
    q.add_argument("--slurm-parallelism", type=int, default=d.slurm_parallelism,
                   help="array tasks running at once")
    q.add_argument("--slurm-folder", default=d.slurm_folder,
                   help="submitit logs and pickles; must be on the shared filesystem")


def _dispatch(args: argparse.Namespace) -> int:
    from . import runner

    return getattr(runner, f"cmd_{args.study_command}")(args)
