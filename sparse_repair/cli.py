"""Command line: ``sparse-repair {allocate,eval,train,run,select,study}``. Thin adapters over the
library; each subcommand's arguments are its visible config and are echoed with --json."""

from __future__ import annotations

import argparse
import json
import sys


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assets", default=None, help="asset root (else $SPARSE_REPAIR_ASSETS)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _apply_assets(args: argparse.Namespace) -> None:
    if getattr(args, "assets", None) is not None:  # --assets "" is refused, not skipped
        from .assets import set_asset_root

        set_asset_root(args.assets)


# ----------------------------------------------------------------------------- allocate

def cmd_allocate(args: argparse.Namespace) -> int:
    from .allocation import allocate
    from .models import create_model
    from .pruning import prune_, sparsity_report

    if args.weights is not None and not args.weights.strip():
        # an empty --weights (an unset shell variable) silently pruned a random model
        raise ValueError("--weights is empty; pass a checkpoint file, or drop --weights to "
                         "prune a randomly initialised model")
    try:
        model = create_model(args.model, args.num_classes)
    except RuntimeError as e:  # the head does not fit in memory: --num-classes 1000000000
        raise ValueError(f"cannot build {args.model} with --num-classes {args.num_classes} "
                         f"({str(e).splitlines()[0][:200]}); pass the number of classes of "
                         f"the model's head, e.g. 10 for CIFAR-10") from None
    if args.weights is not None:
        from .weights import load_checkpoint_into

        load_checkpoint_into(model, args.weights, arch=args.model)
    min_keep = args.min_keep
    alloc = allocate(model, args.method, args.sparsity, exclude=args.exclude, min_keep=min_keep)
    masks = prune_(model, alloc)
    report = sparsity_report(model, masks)
    if args.json:
        # Layer collapse is part of every allocation JSON: per layer ("collapsed": bool), in
        # "total" and at the top, so a script cannot miss a layer left with zero weights.
        print(json.dumps({"config": vars(args), "min_keep": min_keep,
                          "collapsed": alloc.collapsed, "layers": list(report),
                          "total": report.total}, indent=1, default=str))
    else:
        print(f"# {args.model}  method={args.method}  target sparsity={args.sparsity}")
        print(report)
    return 0


# ----------------------------------------------------------------------------- eval / run

def _eval_config(args: argparse.Namespace):
    """eval's settings as a checked RunConfig (the same checks as run: an empty --weights,
    --resolution 0), before any weights or data are read."""
    from .run import RunConfig

    if not (args.weights or args.pretrained):
        raise ValueError("no weights given: pass --pretrained or --weights FILE (a random model "
                         "has nothing to evaluate)")
    cfg = RunConfig(model=args.model, dataset=args.dataset, weights=args.weights,
                    pretrained=args.pretrained, resolution=args.resolution)
    cfg.check()
    return cfg


def _fetch(model: str, dataset: str, pretrained: bool, weights: str | None,
           splits: tuple[str, ...]) -> None:
    """--download: fetch the published weights (when they are the ones used) and the data set
    splits the command reads, each checksummed by its source (assets.download, torchvision),
    before anything else runs. A data set without an automatic download (ImageFolder ones)
    raises AssetMissingError naming where to place it, unless it is already there."""
    from .data import fetch_split
    from .weights import pretrained_path

    if pretrained and not weights:
        pretrained_path(model, allow_download=True)
    for split in splits:  # files only: decoding here would be at the default size, uncalled for
        fetch_split(dataset, split)


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import get_spec
    from .evaluate import evaluate
    from .run import input_resolution, load_dense

    cfg = _eval_config(args)
    if args.download:  # the evaluation split only
        _fetch(cfg.model, cfg.dataset, cfg.pretrained, cfg.weights,
               get_spec(cfg.dataset).splits[1:])
    model = load_dense(cfg)  # by the same rule as runs and studies
    resolution = input_resolution(cfg)
    result = evaluate(model, args.dataset, args.n_eval, batch_size=args.batch_size,
                      device=args.device, resolution=resolution, progress=not args.json)
    from .assets import asset_root

    result["config"] = {k: v for k, v in vars(args).items() if k != "func"}
    result["config"]["assets"] = str(asset_root())  # the root in effect, from flag or env
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        extra = f"  top-5 {result['top5']:.2f}%" if "top5" in result else ""
        which = f"full {result['split']} split" if result["subset"] == "full" else \
            f"stratified subset of the {result['split']} split"
        print(f"{args.model} on {args.dataset} ({which}, {result['n']} images): "
              f"top-1 {result['top1']:.2f}%"
              f"{extra}  [{result['images_per_s']:.0f} images/s]")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import RunConfig, run_config

    cfg = RunConfig.from_dict(_config_values(args, RunConfig))
    if args.download:  # calibration images come from the train split, top-1 from the test split
        from .data import get_spec

        _fetch(cfg.model, cfg.dataset, cfg.pretrained, cfg.weights, get_spec(cfg.dataset).splits)
    rows, dense_top1, _ = run_config(cfg, progress=not args.json)
    for r in rows:  # per-BN channel statistics: the study store keeps them, the CLI does not
        r.pop("layers")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"# {json.dumps(rows[0]['config'])}")
        print(f"# dense top-1 {dense_top1:.2f}% on the same {rows[0]['n_eval']} images")
        print(f"{'repair':<12} {'top1 %':>7} {'seconds':>8} {'passes D/P':>10}  path")
        for r in rows:
            print(f"{r['repair']:<12} {r['top1']:>7.2f} {r['seconds']:>8.2f} "
                  f"{r['passes_dense']:>4}/{r['passes_pruned']:<5}  {r['path']}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from .select import SelectConfig, select

    cfg = SelectConfig.from_dict(_config_values(args, SelectConfig))
    result = select(cfg, progress=not args.json)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.table())
    if result.choice is None:
        print("sparse-repair: error: every candidate failed (see each one's error)",
              file=sys.stderr)
        return 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig.from_dict(_config_values(args, TrainConfig))
    meta = train(cfg, progress=not args.json)
    if args.json:
        print(json.dumps(meta, indent=1))
    else:
        print(f"{meta['model']} on {meta['dataset']}: top-1 {meta['top1']:.2f}% on "
              f"{meta['n_eval']} test images after {meta['train_seconds']:.0f} s; wrote "
              f"{cfg.out} and {cfg.out}.json")
    return 0


def _n_eval(text: str) -> int | None:
    """--n-eval: an image count >= 1, or 'full' / 'all' (the Python API's None) for the whole
    split; anything else (0 and negative counts included, refused here rather than after the
    model and the data are loaded) is argparse's usage error naming the flag."""
    if text in ("all", "full"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise argparse.ArgumentTypeError(
            f"expected an image count >= 1, or 'full' for the whole split, got {text!r}")
    return n


def _int_or_none(text: str) -> int | None:
    """An ``int | None`` field: an integer, or 'none' for the Python API's None (the field's
    help says what None means, e.g. the data set's default resolution), so the default can
    also be written out."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


class _ListFlag(argparse.Action):
    """A list setting: comma-separated, and repeatable (``--exclude a --exclude b,c`` is
    [a, b, c]); the first use replaces the default list, later uses add to it. argparse's own
    "extend" would add to the default (every repair plus the named ones), and a plain flag
    kept only the last of repeated uses, silently."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        # argparse puts the default object itself in the namespace; every use stores a new list
        current = [] if current is self.default or current is None else current
        setattr(namespace, self.dest, list(current) + list(values))


def _json_object(text: str) -> dict:
    """--repair-options: a JSON object; bad JSON is argparse's usage error naming the flag and
    the JSON parser's complaint, with an example of the expected form."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({e.msg} at character {e.pos}) in {text!r}; expected an object "
            f"such as '{{\"asr\": {{\"shrinkage\": 0.5}}}}'") from None


# How a config field's annotation (a string: `from __future__ import annotations`) is
# read from the command line; bool fields are --flag/--no-flag.
_PARSERS = {"str": str, "float": float, "int": int, "str | None": str,
            "dict[str, dict]": _json_object}


def _models() -> list[str]:
    from .models import list_models

    return list_models()


def _datasets() -> list[str]:
    from .data import list_datasets

    return list_datasets()


def _allocators() -> list[str]:
    from .allocation import list_allocators

    return list_allocators()


# Fields whose value is a registry name: their help lists the names.
_REGISTRY_FIELDS = {"model": _models, "dataset": _datasets, "allocation": _allocators}
# Flag names kept from before the CLI was derived from RunConfig (README commands use them).
_ALIASES = {"repairs": ["--repair"]}


def add_config_arguments(p: argparse.ArgumentParser, cls, names: list[str] | None = None,
                         **defaults) -> None:
    """One `--flag` per field of the dataclass ``cls`` (or of ``names``), with the field's own
    default and help text, so the CLI restates no default. ``defaults`` overrides a default
    for this subcommand only (eval's full split)."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING
                               else f.default_factory())
        shown = (",".join(map(str, default)) or "none") if isinstance(default, (list, tuple)) \
            else default
        # a list default as the flag takes it (comma-separated); no second "default" where
        # the field's help already names it in words
        text = f.metadata.get("help", "")
        if "default:" not in text:
            text = f"{text} (default: {shown})"
        else:
            text = f"{text} ({shown})"
        if f.name in _REGISTRY_FIELDS:  # name the choices where the user reads the help
            text = f"{text}; one of: {', '.join(_REGISTRY_FIELDS[f.name]())}"
        flags = [flag] + _ALIASES.get(f.name, [])
        if f.type == "bool":
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default,
                           help=text)
        elif f.name == "n_eval":
            # the field's help speaks of the Python API's None; on the command line it is 'full'
            text = text.replace("None = ", "'full' = ").replace("(default: None)",
                                                                 "(default: full)")
            p.add_argument(*flags, type=_n_eval, default=default, metavar="N|full", help=text)
        elif f.type == "int | None":
            # likewise: the API's None is written 'none' on the command line
            text = text.replace("None = ", "'none' = ").replace("(default: None)",
                                                                 "(default: none)")
            p.add_argument(*flags, dest=f.name, type=_int_or_none, default=default,
                           metavar="N|none", help=text)
        elif f.type == "list[str]":
            p.add_argument(*flags, dest=f.name, type=_csv, action=_ListFlag, default=default,
                           metavar="A,B,...", help=f"{text}; comma-separated, repeatable")
        else:
            p.add_argument(*flags, dest=f.name, type=_PARSERS[f.type], default=default,
                           help=text)


def _config_values(args: argparse.Namespace, cls) -> dict:
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if hasattr(args, f.name)}


def _model_data_args(p: argparse.ArgumentParser, n_eval: int | None = 2000) -> None:
    from .run import RunConfig

    add_config_arguments(p, RunConfig, ["model", "dataset", "weights", "pretrained", "device",
                                        "n_eval", "resolution"], n_eval=n_eval)
    p.add_argument("--download", action="store_true", help="allow downloads (needs internet)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-repair",
                                     description=__doc__.replace("``", ""))  # no RST markup
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("allocate", help="allocate + prune a model, print per-layer sparsity")
    import dataclasses

    from .allocation import list_allocators
    from .run import RunConfig

    method = next(f.default for f in dataclasses.fields(RunConfig) if f.name == "allocation")
    p.add_argument("--model", required=True, help="architecture (sparse_repair.models registry)")
    # --allocation as in run (and study files): the same setting under its RunConfig name
    p.add_argument("--method", "--allocation", default=method, choices=list_allocators(),
                   help=f"allocator (sparse_repair.allocation registry) (default: {method})")
    p.add_argument("--sparsity", type=float, required=True, help="pruned fraction in [0, 1)")
    p.add_argument("--exclude", type=_csv, action=_ListFlag, default=[], metavar="A,B,...",
                   help="layer names kept dense; comma-separated, repeatable (default: none)")
    p.add_argument("--min-keep", type=int, default=0, metavar="K",
                   help="keep at least K weights in every layer that is not excluded (K=1 "
                        "prevents layer collapse: a layer left with zero weights); the total "
                        "pruned count stays exactly round(sparsity * N) (default: 0)")
    p.add_argument("--weights", default=None, help="checkpoint to prune instead of random init")
    p.add_argument("--num-classes", type=int, default=10,
                   help="number of classes of the model's head (default: 10)")
    _add_common(p)
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("eval", help="top-1 accuracy of a model on a data set")
    # The whole evaluation split by default, as timm's validate and torchvision's references
    # report; a silent 2,000-image subset read as the model's accuracy (80.30 vs 81.03).
    _model_data_args(p, n_eval=None)
    p.add_argument("--batch-size", type=int, default=128,
                   help="images per forward pass (default: 128)")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("run", help="prune once, repair a copy per method, evaluate each")
    from .run import RunConfig

    add_config_arguments(p, RunConfig)
    p.add_argument("--download", action="store_true", help="allow downloads (needs internet)")
    _add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("select", help="choose an allocation and a repair without labels "
                                      "(docs/select.md)")
    from .select import SelectConfig

    add_config_arguments(p, SelectConfig)
    _add_common(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("train", help="dense training recipe; writes checkpoint + JSON sidecar")
    from .train import TrainConfig

    add_config_arguments(p, TrainConfig)
    _add_common(p)
    p.set_defaults(func=cmd_train)

    from .study.cli import add_study_parser

    add_study_parser(sub)
    return parser


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and its subcommands, recursively."""
    out: set[str] = set()
    for a in parser._actions:
        out.update(a.option_strings)
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out |= _flags(sub)
    return out


def _as_flag(message: str, flags: set[str]) -> str:
    """A config check's message names the Python setting ("batch_size must be an int >= 1");
    on the command line, name the flag the user typed ("--batch-size must be ...")."""
    import re

    m = re.match(r"([a-z][a-z0-9_]*) ", message)
    flag = m and "--" + m.group(1).replace("_", "-")
    if flag and flag in flags:
        return flag + message[m.end(1):]
    return message


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .runtime import tune_allocator

    tune_allocator()
    try:
        _apply_assets(args)  # an empty --assets is one clear error too
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"sparse-repair: error: {_as_flag(str(e), _flags(parser))}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional dependency (the message names the extra)
        print(f"sparse-repair: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
