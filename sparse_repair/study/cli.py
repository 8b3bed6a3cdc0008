"""`sparse-repair study {run,status,report,export,import}`: argparse in, printed text and exit
status out. Everything else is the study API (``api.py``), which these handlers call."""

from __future__ import annotations

import argparse
import json
import sys


def add_study_parser(sub) -> None:
    p = sub.add_parser("study", help="resumable sweeps with statistics and plots")
    ssub = p.add_subparsers(dest="study_command", required=True)
    for name, helptext in (("run", "run (or resume) a study"), ("status", "progress of a study"),
                           ("report", "tables, regimes and plots"),
                           ("export", "write the finished runs to a snapshot file to commit"),
                           ("import", "load a snapshot's runs into the store, to resume")):
        q = ssub.add_parser(name, help=helptext)
        q.add_argument("study", help="study TOML file")
        if name == "import":
            q.add_argument("snapshot", help="snapshot file written by `study export`")
        q.add_argument("--db", default=None, help="SQLite file (default results/<study>.sqlite)")
        q.add_argument("--assets", default=None,
                       help="asset root (else $SPARSE_REPAIR_ASSETS, else ~/.cache/sparse_repair)")
        if name == "run":
            _add_executor_options(q)
            q.add_argument("--snapshot", default=None, metavar="FILE",
                           help="rewrite this snapshot file (`study export`) after every "
                                "finished run; commit it so the runs outlive the store "
                                "(default: none)")
        if name == "report":
            q.add_argument("--out", required=True, help="folder for report.md, CSVs and plots")
        if name == "export":
            q.add_argument("--out", required=True,
                           help="snapshot file (gzip JSON Lines), e.g. studies/NAME.runs.jsonl.gz")
            q.add_argument("--overwrite", action="store_true",
                           help="replace a snapshot that holds runs the store lacks "
                                "(default: refuse; import it first)")
            q.add_argument("--layer-stats", choices=("plotted", "all"), default="plotted",
                           help="whose per-channel repair statistics to keep: the runs the "
                                "report plots (default; ~2 kB per other run) or all (~60 kB "
                                "per ResNet-20 run)")
        q.set_defaults(func=HANDLERS[name])


def _add_executor_options(q) -> None:
    from .executors import EXECUTORS, ExecutorConfig

    d = ExecutorConfig()
    q.add_argument("--executor", default=d.name, choices=EXECUTORS,
                   help=f"local: in-process; ray: Ray tasks; slurm: submitit job arrays "
                        f"(default: {d.name})")
    q.add_argument("--retries", type=int, default=d.retries,
                   help=f"extra attempts for a run that raises or whose worker dies "
                        f"(default: {d.retries})")
    q.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task,
                   help=f"CPU slots reserved per run with ray or slurm "
                        f"(default: {d.cpus_per_task})")
    q.add_argument("--gpus-per-task", type=int, default=None,
                   help="default: 1 when the study's device is CUDA, else 0")
    q.add_argument("--ray-address", default=None,
                   help="join an existing Ray cluster ('auto' or ray://HOST:10001); "
                        "default: start a local one")
    q.add_argument("--slurm-cluster", default=None,
                   help="submitit cluster: default auto (Slurm when sbatch exists); 'local'")
    q.add_argument("--slurm-partition", default=None,
                   help="Slurm partition (default: the cluster's default)")
    q.add_argument("--slurm-time-min", type=int, default=d.slurm_time_min,
                   help=f"wall-clock limit per array task, minutes (default: "
                        f"{d.slurm_time_min})")
    q.add_argument("--slurm-parallelism", type=int, default=d.slurm_parallelism,
                   help=f"array tasks running at once (default: {d.slurm_parallelism})")
    # argparse %-formats help texts: the folder's %j (submitit's job id) is written %%j
    q.add_argument("--slurm-folder", default=d.slurm_folder,
                   help=f"submitit logs and pickles; must be on the shared filesystem "
                        f"(default: {d.slurm_folder.replace('%', '%%')})")


def cmd_run(args: argparse.Namespace) -> int:
    """0: every run done; 1: some run failed every attempt; 2: the executor went away."""
    from dataclasses import fields

    from . import api
    from .executors import ExecutorConfig, ExecutorLost

    names = {f.name for f in fields(ExecutorConfig)} - {"name"}
    options = {k: v for k, v in vars(args).items() if k in names and v is not None}
    try:
        summary = api.run(args.study, db=args.db, executor=args.executor, assets=args.assets,
                          progress=True, snapshot=args.snapshot, **options)
    except ExecutorLost as e:
        print(f"\nstopped: {e}", file=sys.stderr, flush=True)
        return 2
    return summary.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from . import api

    print(format_status(api.status(args.study, db=args.db)))
    return 0


def format_status(st: dict) -> str:
    """``api.status``'s dict as the text `study status` prints."""
    lines = [f"study {st['study']}: {st['done']}/{st['runs_total']} runs done, "
             f"{st['failed']} failed, {st['pending']} pending ({st['db']})"]
    for model_data, w in st["wall_s"].items():
        lines.append(f"{model_data}: worker wall time per run median {w['median']:.1f}s "
                     f"(min {w['min']:.1f}s, max {w['max']:.1f}s, {w['runs']} runs; "
                     f"total {w['total'] / 3600:.2f} worker-hours)")
    for f in st["failures"]:
        lines.append(f"--- failed run {f['run_id']} {f['run'] or '(not in this study file)'}, "
                     f"{f['attempts']} attempts; last error:\n{_last_error(f['error'])}")
    return "\n".join(lines)


def _last_error(tb: str, lines: int = 6) -> str:
    """The tail of a traceback (the frames nearest the error and the message)."""
    return "\n".join(tb.strip().splitlines()[-lines:])


def cmd_report(args: argparse.Namespace) -> int:
    from . import api

    print(json.dumps(api.report(args.study, args.out, db=args.db), indent=1))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import api

    out = api.export(args.study, args.out, db=args.db, overwrite=args.overwrite,
                     layer_stats=args.layer_stats)
    print(f"{out['runs']} of {out['runs_total']} runs -> {out['snapshot']}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from . import api

    out = api.import_(args.study, args.snapshot, db=args.db)
    print(f"imported {out['imported']} runs ({out['already_done']} already done, "
          f"{out['not_in_study']} not in this study) -> {out['db']}: {out['done']} of "
          f"{out['runs_total']} runs done")
    return 0


HANDLERS = {"run": cmd_run, "status": cmd_status, "report": cmd_report, "export": cmd_export,
            "import": cmd_import}
