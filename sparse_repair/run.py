"""One run: load a dense model, prune it once, repair a copy per method on the same
calibration images, evaluate each. Used by ``sparse-repair run``, the study runner and the
benchmark suite, so all three measure the same thing."""

from __future__ import annotations

import copy
import platform
from dataclasses import asdict, dataclass, field

import torch

from .allocation import allocate
from .data import calibration_set, get_spec, train_split_size
from .evaluate import evaluate
from .pruning import prune_, sparsity_report
from .repair import repair


@dataclass
class RunConfig:
    model: str = "resnet20"
    dataset: str = "cifar10"
    allocation: str = "erk"
    sparsity: float = 0.9                 # pruned fraction of all prunable weights
    repairs: list[str] = field(default_factory=lambda: ["none", "bn_recal", "asr"])
    calib: int = 1024                     # calibration images (unlabeled, from the train split)
    seed: int = 0                         # draws the calibration images; masks are deterministic
    n_eval: int | None = 2000             # stratified evaluation subset; None = full split
    device: str = "cpu"
    weights: str | None = None            # checkpoint file; else published weights
    pretrained: bool = True
    shrinkage: str | None = None          # ASR shrinkage rule; None = library default
    exclude: list[str] = field(default_factory=list)
    resolution: int | None = None         # input side (px); None = checkpoint sidecar's, else
                                          # the data set's default


def load_dense(cfg: RunConfig) -> torch.nn.Module:
    from .models import create_model
    from .weights import load_checkpoint_into, load_pretrained, load_trained

    if cfg.weights:
        import os

        if os.path.exists(cfg.weights + ".json"):
            return load_trained(cfg.weights)[0]
        model = create_model(cfg.model, get_spec(cfg.dataset).num_classes)
        return load_checkpoint_into(model, cfg.weights).eval()
    if not cfg.pretrained:
        raise ValueError("no weights: set weights=FILE or pretrained=True")
    return load_pretrained(cfg.model)


def input_resolution(cfg: RunConfig) -> int | None:
    """The side length the dense model expects: explicit, else what it was trained at (the
    sidecar of a checkpoint from ``sparse-repair train``), else None (the data set default).
    A model trained at 64 px and evaluated at the 160-px default would be silently wrong."""
    import json
    import os

    if cfg.resolution is not None:
        return cfg.resolution
    if cfg.weights and os.path.exists(cfg.weights + ".json"):
        with open(cfg.weights + ".json") as f:
            return json.load(f).get("resolution")
    return None


def environment(device: str) -> dict:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        f"cpu {platform.machine()} x{torch.get_num_threads()} threads"
    return {"torch": torch.__version__, "device_name": name, "python": platform.python_version()}


def run_single(cfg: RunConfig, dense: torch.nn.Module | None = None, progress: bool = False
               ) -> list[dict]:
    dense = (dense or load_dense(cfg)).to(cfg.device).eval()
    pruned = copy.deepcopy(dense)
    prune_(pruned, allocate(pruned, cfg.allocation, cfg.sparsity, exclude=cfg.exclude))
    achieved = sparsity_report(pruned).total["sparsity"]
    res = input_resolution(cfg)
    calib = calibration_set(cfg.dataset, cfg.calib, cfg.seed, resolution=res)
    # The pool the draw came from (30,000 on the shared CIFAR-10 copy, 50,000 on a full
    # download): a draw from one is a different calibration set than from the other.
    try:
        train_images = train_split_size(cfg.dataset)
    except FileNotFoundError:  # a cached draw on a machine without the train split
        train_images = None
    rows = []
    for method in cfg.repairs:
        model = copy.deepcopy(pruned)
        opts = {"shrinkage": cfg.shrinkage} if cfg.shrinkage and "asr" in method else {}
        report = repair(model, method, calib.to(cfg.device), dense=dense, **opts)
        acc = evaluate(model, cfg.dataset, cfg.n_eval, device=cfg.device, resolution=res)
        rows.append({"repair": method, "top1": acc["top1"], "n_eval": acc["n"],
                     "seconds": report.seconds, "passes_dense": report.passes_dense,
                     "passes_pruned": report.passes_pruned, "path": report.path,
                     "options": report.options, "sparsity_achieved": achieved,
                     "train_images": train_images,
                     "config": asdict(cfg), **environment(cfg.device)})
        if progress:
            print(f"  {method:<12} top-1 {acc['top1']:.2f}%  ({report.seconds:.2f}s)", flush=True)
    return rows
