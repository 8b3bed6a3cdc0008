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
            q.add_argument("--executor", default="local", choices=["local"])
        if name == "report":
            q.add_argument("--out", required=True)
        q.set_defaults(func=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    from . import runner

    return getattr(runner, f"cmd_{args.study_command}")(args)
