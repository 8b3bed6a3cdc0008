"""One run: load a dense model, prune it once, repair a copy per method on the same
calibration images, evaluate each. Used by ``sparse-repair run``, the study runner and the
benchmark suite, so all three measure the same thing."""

from __future__ import annotations

import copy
import platform
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from .allocation import allocate
from .config import _opt, check_device, check_seed, config_from_dict
from .data import calibration_set, get_spec, scoring_set, train_split_size
from .evaluate import evaluate, label_free_scores, predict_logits
from .pruning import prune_, sparsity_report
from .repair import list_repairs, repair
from .runtime import user_stacklevel


@dataclass
class RunConfig:
    """One run: the single source of the defaults of `sparse-repair run`, study files and the
    benchmark regimes (each derives its settings from these fields; none restates them).

    Build it from user input with ``RunConfig.from_dict`` (TOML, JSON, CLI), which refuses
    unknown keys and names the valid ones, as nanoGPT's configurator does."""
    model: str = _opt("resnet20", "architecture (sparse_repair.models registry)")
    dataset: str = _opt("cifar10", "data set (sparse_repair.data registry); calibration from "
                                    "its train split, evaluation on its test split")
    allocation: str = _opt("erk", "allocator (sparse_repair.allocation registry)")
    sparsity: float = _opt(0.9, "pruned fraction of all prunable weights, in [0, 1)")
    repairs: list[str] = _opt(lambda: list_repairs(),
                              "repairs to run, each on its own copy of the pruned model: "
                              "registered method names, or labels defined in repair_options")
    calib: int = _opt(1024, "calibration images (unlabeled, seeded draw from the train split)")
    seed: int = _opt(0, "draws the calibration images; masks do not depend on it")
    scoring: int = _opt(0, "unlabeled scoring images (the tail of the calibration seed's "
                           "train-split permutation, disjoint from the calibration images): each "
                           "row then records the repaired model's label-free agreement and KL "
                           "with the dense model (sparse_repair.select); 0 = off")
    n_eval: int | None = _opt(2000, "stratified evaluation subset size; None = full split")
    device: str = _opt("cpu", "torch device")
    weights: str | None = _opt(None, "checkpoint file; else the published weights")
    pretrained: bool = _opt(True, "use the published weights when no checkpoint is given")
    shrinkage: str | None = _opt(None, "ASR shrinkage rule for asr and clipped_asr (shorthand "
                                       "for repair_options); None = the method's default")
    exclude: list[str] = _opt(list, "layer names kept dense")
    resolution: int | None = _opt(None, "input side (px); None = the checkpoint sidecar's, "
                                        "else the data set's default")
    repair_options: dict[str, dict] = _opt(dict, "options per repair: {name: {option: value}}; "
                                                 "a name that is not a registered method is a "
                                                 "labelled variant and needs a 'method' key")

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """A RunConfig from a plain dict (TOML table, JSON). Raises ValueError naming any
        unknown key and the valid ones, before anything runs."""
        return config_from_dict(cls, d, "run")

    def check(self) -> None:
        """Refuse a value that would fail (or be silently reinterpreted) only after the dense
        model is loaded, so a study file or a command line is rejected before any work: the
        sparsity (``allocation.check_sparsity``), image counts, seed, n_eval, resolution, the
        device (parsed by torch), list settings given as a string, the model, data set and
        allocation names (their registries), pretrained (a bool: the string "false" is true),
        weights (a path string or None), shrinkage (an asr shrinkage rule, and only with asr or
        clipped_asr among the repairs), an empty or repeated repair list, and the repairs with
        their options (``repair_calls``; every option name and value is resolved by the
        method, as ``repair`` would). Raises ValueError / TypeError naming the setting and the
        fix."""
        from .allocation import check_sparsity, list_allocators
        from .data import get_spec
        from .models import list_models
        from .repair import REPAIRS

        for name, valid in (("model", list_models()), ("allocation", list_allocators())):
            v = getattr(self, name)
            if not isinstance(v, str) or v not in valid:
                raise ValueError(f"unknown {name} {v!r}; choose one of {', '.join(valid)}")
        if not isinstance(self.dataset, str):
            raise ValueError(f"dataset must be a data set name, got {self.dataset!r}")
        get_spec(self.dataset)  # names the registered data sets
        if not isinstance(self.pretrained, bool):
            raise TypeError(f"pretrained must be true or false, got {self.pretrained!r}")
        if self.weights is not None and not isinstance(self.weights, str):
            raise TypeError(f"weights must be a checkpoint path (a string) or None, got "
                            f"{self.weights!r}")
        if self.weights is not None and not self.weights.strip():
            # an empty path used to fall through to the published weights
            raise ValueError(f"weights is an empty path ({self.weights!r}); name a checkpoint "
                             f"file, or leave it out (None) for the published weights")
        check_sparsity(self.sparsity)

        def integer(name, lo, none_ok=False):
            v = getattr(self, name)
            if v is None and none_ok:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}"
                                 f"{' or None' if none_ok else ''}, got "
                                 f"{type(v).__name__} {v!r:.60}")

        integer("calib", 1)
        integer("scoring", 0)   # 0 = no label-free scores
        integer("seed", 0)
        check_seed(self.seed)
        integer("n_eval", 1, none_ok=True)
        integer("resolution", 1, none_ok=True)
        for name in ("repairs", "exclude"):
            v = getattr(self, name)
            if isinstance(v, str) or not isinstance(v, (list, tuple)):
                raise TypeError(f"{name} must be a list of names, got {v!r}; e.g. [{v!r}]")
            if not all(isinstance(x, str) for x in v):
                raise TypeError(f"{name} must be a list of names (strings), got {v!r}")
        if not self.repairs:
            raise ValueError("repairs is empty: name at least one repair (e.g. ['none'] for "
                             "pruning only)")
        dup = sorted({r for r in self.repairs if list(self.repairs).count(r) > 1})
        if dup:
            raise ValueError(f"repairs lists {dup} more than once; name each repair once (a "
                             "variant of one method gets its own label in repair_options)")
        check_device(self.device)
        calls = self.repair_calls()  # validates repairs and repair_options
        if self.shrinkage is not None:
            REPAIRS["asr"].resolve(shrinkage=self.shrinkage)  # a known rule, named if not
            clash = sorted(label for label, _, opts in calls
                           if opts.get("shrinkage", self.shrinkage) != self.shrinkage)
            if clash:  # repair_options won silently before (repair_calls' setdefault)
                raise ValueError(f"shrinkage={self.shrinkage!r} and repair_options give "
                                 f"{clash} another shrinkage; set it in one place")
            if not any(method in ("asr", "clipped_asr") for _, method, _ in calls):
                raise ValueError(f"shrinkage={self.shrinkage!r} applies to asr and clipped_asr "
                                 f"only, and repairs {list(self.repairs)} has neither; add one "
                                 "or drop shrinkage")
        for _, method, opts in calls:  # an unknown option or bad value, before any work
            REPAIRS[method].resolve(**opts)

    def repair_calls(self) -> list[tuple[str, str, dict]]:
        """(label, method, options) for every entry of ``repairs``. Raises ValueError for a
        repair that is neither a registered method nor a labelled variant, and TypeError for
        an option the method does not take (the repair registry checks option names)."""
        from .repair import REPAIRS

        if not isinstance(self.repair_options, dict) or not all(
                isinstance(k, str) and isinstance(v, dict)
                for k, v in self.repair_options.items()):
            raise ValueError(f"repair_options must be a JSON object {{repair: {{option: value}}}}"
                             f", got {self.repair_options!r}")
        extra = sorted(set(self.repair_options) - set(self.repairs))
        if extra:
            raise ValueError(f"repair_options names {extra}, which are not in repairs "
                             f"{self.repairs}; add them to repairs or remove the options")
        calls = []
        for label in self.repairs:
            opts = dict(self.repair_options.get(label, {}))
            method = opts.pop("method", label)
            if method not in REPAIRS:
                # "repairs names ..." so the CLI reads "--repairs names ...", the flag both
                # `run` and `select` take (cli._as_flag)
                raise ValueError(f"repairs names {label!r}, which is not a registered method ("
                                 f"{', '.join(REPAIRS)}); a labelled variant needs "
                                 f"repair_options[{label!r}] = {{'method': <one of those>, ...}}")
            if self.shrinkage and method in ("asr", "clipped_asr"):
                opts.setdefault("shrinkage", self.shrinkage)
            calls.append((label, method, opts))
        return calls


def load_dense(cfg: RunConfig) -> torch.nn.Module:
    from .models import create_model
    from .weights import load_checkpoint_into, load_pretrained, load_trained

    if cfg.weights:
        import os

        if os.path.exists(cfg.weights + ".json"):
            model, meta = load_trained(cfg.weights)
            # The sidecar names the architecture; building it silently in place of the one
            # asked for would report another model's numbers under cfg.model's name.
            if meta["model"] != cfg.model:
                raise ValueError(f"checkpoint {cfg.weights} holds a {meta['model']} (its sidecar "
                                 f"{cfg.weights}.json says so) but the model asked for is "
                                 f"{cfg.model}; pass --model {meta['model']} (model = "
                                 f"\"{meta['model']}\" in a study file)")
            return model
        model = create_model(cfg.model, get_spec(cfg.dataset).num_classes)
        return load_checkpoint_into(model, cfg.weights).eval()
    if not cfg.pretrained:
        raise ValueError("no weights: set weights=FILE or pretrained=True")
    return load_pretrained(cfg.model)


def check_dense(cfg: RunConfig, dense: torch.nn.Module) -> None:
    """Refuse a caller's ``dense`` model that is not the one ``cfg`` names, before anything
    runs: its parameter and buffer names and shapes must be those of ``cfg.model`` built for
    ``cfg.dataset`` (built on the meta device: no memory, no weights), and its floating tensors
    float32, the dtype of the images the pipeline feeds it. Another architecture used to run
    silently and report its numbers under ``cfg.model``'s name; another dtype failed inside
    torch with a message naming no setting. Raises ValueError naming the first difference."""
    from .models import create_model

    with torch.device("meta"):
        ref = create_model(cfg.model, get_spec(cfg.dataset).num_classes)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        k = diff[0]
        raise ValueError(f"the dense model passed is not a {cfg.model} for {cfg.dataset}: "
                         f"{k!r} is {got.get(k, 'missing')} in it and {want.get(k, 'absent')} "
                         f"in a {cfg.model}; pass a {cfg.model}, or set model to the dense "
                         f"model's architecture")
    dtypes = sorted({str(t.dtype) for t in dense.state_dict().values()
                     if t.is_floating_point() and t.dtype != torch.float32})
    if dtypes:
        raise ValueError(f"the dense model passed holds {', '.join(dtypes)} tensors; the "
                         f"pipeline feeds float32 images: pass dense.float()")


def input_resolution(cfg: RunConfig) -> int | None:
    """The side length the dense model expects: explicit, else what it was trained at (the
    sidecar of a checkpoint from ``sparse-repair train``), else None (the data set default).
    A model trained at 64 px and evaluated at the 160-px default would be silently wrong."""
    import os

    from .weights import read_sidecar

    if cfg.resolution is not None:
        return cfg.resolution
    if cfg.weights and os.path.exists(cfg.weights + ".json"):
        return read_sidecar(cfg.weights).get("resolution")  # checked: clear error if malformed
    return None


def environment(device: str) -> dict:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        f"cpu {platform.machine()} x{torch.get_num_threads()} threads"
    return {"torch": torch.__version__, "device_name": name, "python": platform.python_version()}


class RunResult(NamedTuple):
    """What ``run_config`` returns: one row per repair (``run_single``), the dense model's top-1
    (percent) on the same evaluation images, and the run's per-layer allocation
    (``allocation_table``)."""
    rows: list[dict]
    dense_top1: float
    allocation: list[dict]


def allocation_table(alloc) -> list[dict]:
    """A run's per-layer allocation in forward order: [{"name": str, "shape": list[int],
    "numel": int, "keep_count": int, "density": keep_count / numel}, ...]."""
    return [{"name": n, "shape": [int(d) for d in sh], "numel": int(size), "keep_count": int(k),
             "density": float(k) / float(size)}
            for n, sh, size, k in zip(alloc.names, alloc.shapes, alloc.sizes, alloc.keep)]


def run_single(cfg: RunConfig, dense: torch.nn.Module | None = None, progress: bool = False
               ) -> list[dict]:
    """Prune ``dense`` once by ``cfg``, repair a copy per entry of ``cfg.repairs`` on the same
    calibration images, evaluate each: one row (dict) per repair, with the repair's per-BN
    statistics under "layers" (``RepairReport.to_dict(with_layers=True)``). A ``dense`` given
    must be ``cfg.model`` in float32 (``check_dense``: ValueError otherwise)."""
    if dense is not None:  # a caller's model; run_config's come from load_dense
        cfg.check()
        check_dense(cfg, dense)
    return _run(cfg, dense, progress)[0]


def _run(cfg: RunConfig, dense: torch.nn.Module | None, progress: bool):
    # a RunConfig built directly (benchmarks, eval, the study worker) skips from_dict's check:
    # e.g. shrinkage without asr would be dropped, repairs=[] would return no rows
    cfg.check()
    check_device(cfg.device, available=True)
    dense = (dense if dense is not None else load_dense(cfg)).to(cfg.device).eval()
    pruned = copy.deepcopy(dense)
    alloc = allocate(pruned, cfg.allocation, cfg.sparsity, exclude=cfg.exclude)
    prune_(pruned, alloc)
    achieved = sparsity_report(pruned).total["sparsity"]
    resolution = input_resolution(cfg)
    images = calibration_set(cfg.dataset, cfg.calib, cfg.seed, resolution=resolution)
    # The pool the draw came from (30,000 on the shared CIFAR-10 copy, 50,000 on a full
    # download): a draw from one is a different calibration set than from the other.
    try:
        train_images = train_split_size(cfg.dataset)
    except FileNotFoundError:  # a cached draw on a machine without the train split
        train_images = None
    scoring = dense_scoring_logits = None
    if cfg.scoring:
        scoring = scoring_set(cfg.dataset, cfg.scoring, cfg.seed, calib=cfg.calib,
                              resolution=resolution).to(cfg.device)
        dense_scoring_logits = predict_logits(dense, scoring)
    rows = []
    for label, method, opts in cfg.repair_calls():
        model = copy.deepcopy(pruned)
        report = repair(model, method, images.to(cfg.device), dense=dense, **opts)
        acc = evaluate(model, cfg.dataset, cfg.n_eval, device=cfg.device,
                       resolution=resolution)
        scores = {"agreement": None, "kl": None}
        if scoring is not None:
            logits = predict_logits(model, scoring)
            if torch.isfinite(logits).all():
                scores = label_free_scores(logits, dense_scoring_logits)
            else:
                # A repaired model whose forward pass is not finite keeps its row (top-1 and
                # all) without label-free scores, instead of failing the run and losing the
                # other repairs' rows; select.evidence leaves such a selection out as
                # incomplete. The dense logits are still checked by label_free_scores.
                warnings.warn(f"{label}: the repaired model's logits on the scoring images are "
                              f"not finite; its row is stored without agreement and KL",
                              RuntimeWarning, stacklevel=user_stacklevel())
        rows.append({"repair": label, "method": method, "top1": acc["top1"], "n_eval": acc["n"],
                     **scores, "collapsed": alloc.collapsed,
                     "seconds": report.seconds, "passes_dense": report.passes_dense,
                     "passes_pruned": report.passes_pruned, "path": report.path,
                     "options": report.options, "sparsity_achieved": achieved,
                     "train_images": train_images,
                     "layers": report.to_dict(with_layers=True)["layers"],
                     "config": asdict(cfg), **environment(cfg.device)})
        if progress:
            print(f"  {label:<12} top-1 {acc['top1']:.2f}%  ({report.seconds:.2f}s)", flush=True)
    return rows, alloc


def run_config(cfg: RunConfig, dense_cache: dict | None = None, progress: bool = False
               ) -> RunResult:
    """One configuration, as the CLI, the study workers, the benchmark gate and the scripts run
    it (``RunResult``: rows, dense top-1, per-layer allocation).

    ``dense_cache`` (any dict, kept by the caller) holds each dense model and its accuracy, so
    a sweep loads and evaluates one checkpoint once per process."""
    check_device(cfg.device, available=True)
    resolution = input_resolution(cfg)
    key = (cfg.model, cfg.dataset, cfg.weights, cfg.pretrained, cfg.n_eval, cfg.device,
           resolution)
    cache = {} if dense_cache is None else dense_cache
    if key not in cache:
        dense = load_dense(cfg).to(cfg.device)
        cache[key] = (dense, evaluate(dense, cfg.dataset, cfg.n_eval, device=cfg.device,
                                      resolution=resolution)["top1"])
    dense, dense_top1 = cache[key]
    rows, alloc = _run(cfg, dense, progress)
    return RunResult(rows, dense_top1, allocation_table(alloc))
