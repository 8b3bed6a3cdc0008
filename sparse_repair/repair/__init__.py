"""Label-free repair of a pruned model from unlabeled images (no labels, no gradients).

``repair(pruned, method, calibration, dense=None, **options) -> RepairReport`` works in place on
``pruned``. This package never imports the data layer: it sees image tensors only, so labels
cannot reach it. Definitions (docs/repair.md): BatchNorm layers of P are processed in forward
order; at BN b with dense running statistics (m, v) and affine (gamma, beta), channel c of b's
input has dense/pruned means mu_d, mu_s, variances var_d, var_s and correlation rho.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .engine import (
    FrontierTooLarge,
    branch_end_bns,
    run_onepass,
    run_rerun,
    traces,
)
from .stats import SHRINKAGE, Moments, dead_channels


@dataclass
class RepairReport:
    method: str
    options: dict
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
    """Images only: a float tensor [N, C, H, W] or an iterable of such tensors. A tuple or list
    batch (what a labeled DataLoader yields) is refused before anything in it is touched."""
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


def _bns(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


# ----------------------------------------------------------------------------- methods

def _bn_recal(pruned, dense, chunks, opts) -> tuple[str, int, int, list[dict]]:
    """Reset running stats, momentum None (cumulative average), only BN modules in training
    mode, one pass over the calibration chunks (REFLOW's BN-only baseline)."""
    bns = _bns(pruned)
    old_var = {n: (bn.running_var.clone(), bn.eps) for n, bn in bns.items()}
    momenta = {n: bn.momentum for n, bn in bns.items()}
    for bn in bns.values():
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        with torch.no_grad():
            for x in chunks:
                pruned(x)
    finally:
        for n, bn in bns.items():
            bn.momentum = momenta[n]
    layers = [{"name": n, "gain": torch.sqrt((old_var[n][0].double() + old_var[n][1]) /
                                             (bn.running_var.double() + bn.eps))}
              for n, bn in bns.items()]
    return "bn_train_pass", 0, 1, layers


def _paired(kind: str) -> Callable:
    def method(pruned, dense, chunks, opts):
        shrink = opts.get("shrinkage", DEFAULT_SHRINKAGE)
        if kind in ("asr", "clipped_asr") and shrink not in SHRINKAGE:
            raise ValueError(f"unknown shrinkage {shrink!r}; choose one of {', '.join(SHRINKAGE)}")
        needs_dense = kind != "channelwise"
        if needs_dense and dense is None:
            raise ValueError(f"{kind} compares the pruned model with the dense one: pass "
                             "dense=<the unpruned model>")
        g_min, g_max = opts.get("g_min", DEFAULT_CLIP[0]), opts.get("g_max", DEFAULT_CLIP[1])
        scope = opts.get("scope", DEFAULT_SCOPE)
        if scope not in ("all", "branch_end", "inner"):
            raise ValueError(f"unknown scope {scope!r}; choose all, branch_end or inner")
        ends = branch_end_bns(pruned) if scope != "all" else set()
        layers: list[dict] = []

        @torch.no_grad()
        def on_bn(name: str, bn: _BatchNorm, m: Moments) -> None:
            v = bn.running_var.double()
            eps = bn.eps
            dead = dead_channels(m, v)
            var_s = m.var_s
            if kind == "layerwise":
                g = torch.sqrt(m.var_d.sum() / var_s.sum().clamp(min=1e-300))
                new_var = v / (g * g)
                kappa = torch.ones_like(v)
            else:
                new_var = var_s
                damp = kind != "channelwise" and (
                    scope == "all" or (scope == "branch_end") == (name in ends))
                kappa = SHRINKAGE[shrink](m, v, eps).clamp(0.0, 1.0) if damp else \
                    torch.ones_like(v)
            kappa = torch.where(dead, torch.zeros_like(kappa), kappa)
            gain = kappa * torch.sqrt((v + eps) / (new_var + eps))
            if kind == "clipped_asr":
                gain = torch.where(dead, gain, gain.clamp(g_min, g_max))
                kappa = gain * torch.sqrt((new_var + eps) / (v + eps))
            bn.running_mean.copy_(m.mean_s.to(bn.running_mean))
            bn.running_var.copy_(new_var.to(bn.running_var))
            if bn.affine and kind in ("asr", "clipped_asr"):
                bn.weight.mul_(kappa.to(bn.weight))
            layers.append({"name": name,
                           "mu_d": m.mean_d, "sd_d": m.var_d.sqrt() if m.s2_d is not None else None,
                           "mu_s": m.mean_s, "sd_s": var_s.sqrt(),
                           "rho": m.rho if m.s_ds is not None else None,
                           "kappa": kappa, "gain": gain})

        path = opts.get("path", "auto")
        memory_limit = _memory_limit_bytes(opts.get("memory_limit_gb"), chunks[0].device)
        ref = dense if needs_dense else None
        requested = path
        if path not in ("auto", "onepass", "rerun"):
            raise ValueError(f"unknown path {path!r}; choose auto, onepass or rerun")
        if path == "auto":
            path = "onepass" if traces(pruned) else "rerun"
        if path == "onepass":
            # Snapshot BN state so that a frontier over the memory limit can fall back to the
            # rerun path from a clean model (the limit is checked while the graph executes).
            saved = {n: copy.deepcopy(b.state_dict()) for n, b in _bns(pruned).items()}
            try:
                run_onepass(pruned, ref, chunks, on_bn, memory_limit)
                passes = 1
            except FrontierTooLarge:
                if requested == "onepass":
                    raise
                for n, b in _bns(pruned).items():
                    b.load_state_dict(saved[n])
                layers.clear()
                path = "rerun"
        if path == "rerun":
            passes = run_rerun(pruned, ref, chunks, on_bn)
        return path, passes if needs_dense else 0, passes, layers
    return method


def _memory_limit_bytes(limit_gb: float | None, device: torch.device) -> float:
    """The one-pass frontier limit: the option if given, else half the free memory of the
    CUDA device, else 8 GiB on CPU (a third of the 24 GiB machines this project runs on)."""
    if limit_gb is not None:
        return float(limit_gb) * 2**30
    if device.type == "cuda":
        return 0.5 * torch.cuda.mem_get_info(device)[0]
    return 8.0 * 2**30


def _none(pruned, dense, chunks, opts):
    return "none", 0, 0, []


# Registry: method -> (function, needs BatchNorm). Defaults chosen by the ablations in
# docs/RESULTS.md sections 2-3 (python scripts/repair_ablation.py shrinkage / clip).
REPAIRS: dict[str, tuple[Callable, bool]] = {
    "none": (_none, False),
    "bn_recal": (_bn_recal, True),
    "layerwise": (_paired("layerwise"), True),
    "channelwise": (_paired("channelwise"), True),
    "asr": (_paired("asr"), True),
    "clipped_asr": (_paired("clipped_asr"), True),
}
DEFAULT_SHRINKAGE = "relative"
DEFAULT_SCOPE = "all"      # which BNs asr damps: all, branch_end (feeds a residual sum), inner
DEFAULT_CLIP = (0.0, 4.0)  # (g_min, g_max) on the channel gain relative to the pruned model


def list_repairs() -> list[str]:
    return list(REPAIRS)


def repair(pruned: nn.Module, method: str, calibration, *, dense: nn.Module | None = None,
           chunk_size: int = 256, **options) -> RepairReport:
    """Repair ``pruned`` in place from unlabeled ``calibration`` images; returns a report.

    Options: shrinkage (asr, clipped_asr), g_min/g_max (clipped_asr), path ("auto", "onepass",
    "rerun"), memory_limit_gb (one-pass frontier limit before falling back to rerun).
    """
    if method not in REPAIRS:
        raise ValueError(f"unknown repair method {method!r}; choose one of {', '.join(REPAIRS)}")
    fn, needs_bn = REPAIRS[method]
    if needs_bn and not _bns(pruned):
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
            path, pd, pp, layers = fn(pruned, dense, chunks, options)
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
    for b in _bns(pruned).values():
        if not (torch.isfinite(b.running_mean).all() and torch.isfinite(b.running_var).all()):
            raise FloatingPointError(f"{method} produced non-finite BN statistics")
    opts = {"chunk_size": chunk_size, **options}
    if method in ("asr", "clipped_asr"):
        opts.setdefault("shrinkage", DEFAULT_SHRINKAGE)
        opts.setdefault("scope", DEFAULT_SCOPE)
    if method == "clipped_asr":
        opts.setdefault("g_min", DEFAULT_CLIP[0])
        opts.setdefault("g_max", DEFAULT_CLIP[1])
    return RepairReport(method, opts, path, pd, pp, seconds, layers)
