"""Command line: ``sparse-repair {allocate,eval,train,run,study}``. Thin adapters over the
library; each subcommand's arguments are its visible config and are echoed with --json."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assets", default=None, help="asset root (else $SPARSE_REPAIR_ASSETS)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _apply_assets(args: argparse.Namespace) -> None:
    if getattr(args, "assets", None):
        from .assets import ENV_VAR

        os.environ[ENV_VAR] = args.assets


# ----------------------------------------------------------------------------- allocate

def cmd_allocate(args: argparse.Namespace) -> int:
    from .allocation import allocate
    from .models import create_model
    from .pruning import prune_, sparsity_report

    model = create_model(args.model, args.num_classes)
    if args.weights:
        from .weights import load_checkpoint_into

        load_checkpoint_into(model, args.weights)
    alloc = allocate(model, args.method, args.sparsity, exclude=args.exclude)
    masks = prune_(model, alloc)
    report = sparsity_report(model, masks)
    if args.json:
        print(json.dumps({"config": vars(args), "layers": list(report), "total": report.total},
                         indent=1, default=str))
    else:
        print(f"# {args.model}  method={args.method}  target sparsity={args.sparsity}")
        print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-repair", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("allocate", help="allocate + prune a model, print per-layer sparsity")
    p.add_argument("--model", required=True)
    p.add_argument("--method", default="erk")
    p.add_argument("--sparsity", type=float, required=True, help="pruned fraction in [0, 1)")
    p.add_argument("--exclude", action="append", default=[], help="layer name kept dense")
    p.add_argument("--weights", default=None, help="checkpoint to prune instead of random init")
    p.add_argument("--num-classes", type=int, default=10)
    _add_common(p)
    p.set_defaults(func=cmd_allocate)

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return parser


_EXTRA_COMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _apply_assets(args)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sparse-repair: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
