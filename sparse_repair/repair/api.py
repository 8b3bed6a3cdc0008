"""``repair()``: input checks, option resolution, mode bookkeeping and the report around one
registered method (``methods.REPAIRS``). Nothing here knows what a method does."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .engine import batchnorms
from .methods import REPAIRS


@dataclass
class RepairReport:
    method: str
    options: dict                  # chunk_size and the method's full options (defaults included)
    path: str                      # "onepass", "rerun", "bn_train_pass" or "none"
    passes_dense: int
    passes_pruned: int
    seconds: float
    layers: list[dict] = field(default_factory=list)  # per BN: mu/sd dense+pruned, rho, kappa, gain

    def to_dict(self, with_layers: bool = False) -> dict:
        out = {"method": self.method, "options": self.options, "path": self.path,
               "passes_dense": self.passes_dense, "passes_pruned": self.passes_pruned,
               "seconds": self.seconds}
        if with_layers:
            out["layers"] = [{k: (v.tolist() if isinstance(v, torch.Tensor) else v)
                              for k, v in layer.items()} for layer in self.layers]
        return out


# ----------------------------------------------------------------------------- input checks

def as_image_tensor(calibration) -> torch.Tensor:
    """Images only: a float tensor [N, C, H, W] or an iterable of such tensors, returned as one
    [N, C, H, W] tensor. A tuple or list batch (what a labeled DataLoader yields) is refused with
    TypeError before anything in it is touched; non-float images raise TypeError; an empty set,
    a shape other than 4-D, or NaN/Inf raise ValueError."""
    if isinstance(calibration, (tuple, list)) and not all(
            isinstance(b, torch.Tensor) for b in calibration):
        raise TypeError(_LABELED)
    if isinstance(calibration, torch.Tensor):
        batches = [calibration]
    elif isinstance(calibration, Iterable):
        batches = []
        for batch in calibration:
            if isinstance(batch, (tuple, list, dict)):
                raise TypeError(_LABELED)
            if not isinstance(batch, torch.Tensor):
                raise TypeError(f"calibration batches must be image tensors, got {type(batch)}")
            batches.append(batch)
    else:
        raise TypeError(f"calibration must be an image tensor or an iterable of image tensors, "
                        f"got {type(calibration)}")
    if not batches:
        raise ValueError("calibration set is empty")
    x = torch.cat(batches) if len(batches) > 1 else batches[0]
    if x.dim() != 4:
        raise ValueError(f"calibration images must be [N, C, H, W], got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"calibration images have dtype {x.dtype}; pass normalized float images "
                        "(sparse_repair.data.calibration_set returns them)")
    if not torch.isfinite(x).all():
        raise ValueError("calibration images contain NaN or Inf")
    return x


_LABELED = ("calibration batches are tuples/lists, as a labeled DataLoader yields (images, "
            "labels); repair is label-free and takes images only: pass a tensor of images, "
            "e.g. sparse_repair.data.calibration_set(...) or (x for x, _ in loader)")


# ----------------------------------------------------------------------------- repair

def repair(pruned: nn.Module, method: str, calibration, *, dense: nn.Module | None = None,
           chunk_size: int = 256, **options) -> RepairReport:
    """Repair ``pruned`` in place from unlabeled ``calibration`` images; returns a report.

    ``calibration``: see ``as_image_tensor``; it is moved to ``pruned``'s device and split into
    chunks of ``chunk_size`` images. ``options`` are the fields of the method's options dataclass
    (``REPAIRS[method].Options``; e.g. asr: shrinkage, scope, path, memory_limit_gb); the
    report's ``options`` is chunk_size plus that dataclass in full, defaults included.

    Raises, before the model is touched: ValueError for an unknown method, TypeError for an
    option the method does not have (naming the valid ones), ValueError for a bad option value,
    for dense=None where the method needs the dense model, or for a model without BatchNorm
    where the method needs one; the input errors of ``as_image_tensor``. After the repair,
    FloatingPointError if a parameter or BN statistic is non-finite. Modes (training flags) of
    ``pruned`` and ``dense`` are restored even when the method raises.
    """
    if method not in REPAIRS:
        raise ValueError(f"unknown repair method {method!r}; choose one of {', '.join(REPAIRS)}")
    impl = REPAIRS[method]
    opts = impl.resolve(**options)
    if impl.needs_dense and dense is None:
        raise ValueError(f"{method} compares the pruned model with the dense one: pass "
                         "dense=<the unpruned model>")
    if impl.needs_bn and not batchnorms(pruned):
        raise ValueError(f"{method} repairs BatchNorm statistics but the model has no BatchNorm "
                         "layer; use a model with BatchNorm or method 'none'")
    x = as_image_tensor(calibration)
    device = next(pruned.parameters()).device
    chunks = list(torch.split(x.to(device), chunk_size))
    modes = {n: m.training for n, m in pruned.named_modules()}
    dense_modes = {n: m.training for n, m in dense.named_modules()} if dense is not None else {}
    pruned.eval()
    if dense is not None:
        dense.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            result = impl.run(opts, pruned, dense, chunks)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for n, m in pruned.named_modules():
            m.training = modes[n]
        if dense is not None:
            for n, m in dense.named_modules():
                m.training = dense_modes[n]
    seconds = time.perf_counter() - start
    for p in pruned.parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"{method} produced non-finite parameters; please report")
    for b in batchnorms(pruned).values():
        if not (torch.isfinite(b.running_mean).all() and torch.isfinite(b.running_var).all()):
            raise FloatingPointError(f"{method} produced non-finite BN statistics")
    return RepairReport(method, {"chunk_size": chunk_size, **dataclasses.asdict(opts)},
                        result.path, result.passes_dense, result.passes_pruned, seconds,
                        result.layers)
