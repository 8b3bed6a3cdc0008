"""Unstructured magnitude pruning inside each layer, to the counts of an Allocation.

Masks are applied by zeroing weights in place: no hooks, no parametrizations, so a pruned model
deep-copies, saves and traces with torch.fx like any other model. For the same reason a weight
that is recomputed from something else (torch.nn.utils.prune masks, parametrizations, the
hook-based weight_norm) is refused, before anything is changed, with how to prepare it
(``allocation.weight_problem``). A weight shared by several modules is one layer, named by its
first module (``allocation.prunable_modules``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .allocation import Allocation, prunable_modules, read_weight, topk_mask, weight_problem


def _resolve(model: nn.Module, names, what: str, hint: str
             ) -> dict[str, tuple[str, nn.Module]]:
    """Each of ``names`` -> (layer name, module holding the weight). Raises ValueError for an
    unknown name or for two names of one tied weight (it would be pruned twice)."""
    owner = {}
    for name, module, aliases in prunable_modules(model):
        for n in (name, *aliases):
            owner[n] = (name, module)
    missing = [n for n in names if n not in owner]
    if missing:
        raise ValueError(f"{what} names layers {missing} that the model does not have; {hint}")
    seen: dict[str, str] = {}
    for n in names:
        layer = owner[n][0]
        if layer in seen:
            raise ValueError(f"{what} has both {seen[layer]!r} and {n!r}, but in this model they "
                             "share one weight (tied), which would be counted and pruned twice; "
                             f"name each tied weight once ({hint}: a tied weight is one layer, "
                             "named by its first module)")
        seen[layer] = n
    return {n: owner[n] for n in names}


def magnitude_mask(weight: torch.Tensor, keep_count: int) -> torch.Tensor:
    """Bool mask (shape of ``weight``) keeping the ``keep_count`` largest |w|; ties broken by
    lower flat index (allocation's rule)."""
    return topk_mask(weight.detach().abs().flatten().float(), int(keep_count)).view_as(weight)


@torch.no_grad()
def prune_(model: nn.Module, allocation: Allocation) -> dict[str, torch.Tensor]:
    """Zero all but each layer's ``keep`` largest-magnitude weights, in place.

    Returns {layer name: bool mask on CPU, shape of the weight} for every layer of the
    allocation (excluded layers: all True, their weights are not touched).
    Raises TypeError for a model that is not a Module or an allocation that is not an
    Allocation. Raises ValueError, before any weight changes, for: a layer name the model
    lacks; two allocation names of one tied weight; a shape or keep count that does not fit
    the layer; a non-excluded weight that is not a plain Parameter (``weight_problem`` says how
    to prepare it, e.g. ``torch.nn.utils.prune.remove(module, "weight")``); a lazy weight or
    weights overlapping in memory, even in excluded layers (``prunable_modules``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune_ takes a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(allocation, Allocation):
        raise TypeError(f"allocation must be an Allocation (from allocate(model, method, "
                        f"sparsity)), got {type(allocation).__name__}")
    targets = _resolve(model, allocation.names, "allocation",
                       "allocate on this model (or a copy of it)")
    excluded = set(allocation.excluded)
    for name, keep, shape in zip(allocation.names, allocation.keep, allocation.shapes):
        layer, module = targets[name]
        if name not in excluded:  # checked before reading: a computed weight runs code
            problem = weight_problem(module, layer)
            if problem:
                raise ValueError(problem)
        weight = read_weight(module)
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(f"layer {name!r} has shape {tuple(weight.shape)} but the allocation "
                             f"was made for {tuple(shape)}")
        if not 0 <= int(keep) <= weight.numel():
            raise ValueError(f"layer {name!r}: keep count {int(keep)} outside [0, "
                             f"{weight.numel()}]")
    masks = {}
    for name, keep, shape in zip(allocation.names, allocation.keep, allocation.shapes):
        if name in excluded:
            masks[name] = torch.ones(tuple(shape), dtype=torch.bool)
            continue
        weight = targets[name][1].weight
        mask = magnitude_mask(weight, int(keep))
        weight.mul_(mask)
        masks[name] = mask.cpu()
    return masks


@torch.no_grad()
def _mask_targets(model: nn.Module, masks) -> dict:
    """``_resolve`` of a mask set's layer names; TypeError when ``masks`` is not a dict."""
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict {{layer name: mask tensor}} (what prune_ "
                        f"returns), got {type(masks).__name__}")
    return _resolve(model, list(masks), "mask set", "masks come from prune_ on this model "
                    "(or a copy of it)")


def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Multiply each named layer's weight by its mask (same shape; bool or 0/1), in place.

    Raises, before any weight changes: TypeError when ``masks`` is not a dict or a mask is
    not a torch tensor; ValueError for an unknown layer, a shape mismatch, a mask with a value
    other than 0 and 1 (0.5 would scale the weights, NaN poison them), two masks for one tied
    weight, or a weight that is not a plain Parameter (``weight_problem``).
    """
    targets = _mask_targets(model, masks)
    for name, mask in masks.items():
        layer, module = targets[name]
        problem = weight_problem(module, layer)
        if problem:
            raise ValueError(problem)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask for {name!r} is a {type(mask).__name__}; pass a torch "
                            "tensor (bool, or 0/1), e.g. torch.as_tensor(mask, dtype=torch.bool)")
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight "
                             f"{tuple(module.weight.shape)}")
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask for {name!r} holds values other than 0 and 1 (dtype "
                             f"{mask.dtype}); a mask keeps or zeroes weights, it does not scale "
                             "them: pass a bool mask")
    for name, mask in masks.items():
        weight = targets[name][1].weight
        weight.mul_(mask.to(weight.device))


def save_masks(masks: dict[str, torch.Tensor], path: str | Path) -> None:
    """Save {layer name: mask} as bool CPU tensors (``torch.save``)."""
    torch.save({k: v.to(torch.bool).cpu() for k, v in masks.items()}, path)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Load masks written by ``save_masks`` (bool CPU tensors; weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class SparsityReport(list):
    """Per-layer rows (dicts: name, shape, weights, kept, sparsity, collapsed: bool, aliases)
    plus a ``total`` row whose ``collapsed`` lists the collapsed layers; ``str()`` renders the
    table."""

    def __init__(self, rows: list[dict], total: dict) -> None:
        super().__init__(rows)
        self.total = total

    @property
    def collapsed(self) -> list[str]:
        """Layers with zero kept weights (layer collapse), in layer order."""
        return list(self.total["collapsed"])

    def __str__(self) -> str:
        width = max([len(r["name"]) for r in self] + [6])
        lines = [f"{'layer':<{width}}  {'shape':<18} {'weights':>10} {'kept':>10} {'sparsity':>9}"]
        for r in list(self) + [self.total]:
            shape = "x".join(map(str, r["shape"])) if r["shape"] else ""
            flag = "  COLLAPSED" if r is not self.total and r["collapsed"] else ""
            lines.append(f"{r['name']:<{width}}  {shape:<18} {r['weights']:>10} {r['kept']:>10} "
                         f"{r['sparsity']:>9.4f}{flag}")
        if self.collapsed:
            lines.append(f"collapsed (0 kept weights, output is the bias alone): "
                         f"{', '.join(self.collapsed)}")
        return "\n".join(lines)


def sparsity_report(model: nn.Module, masks: dict[str, torch.Tensor] | None = None
                    ) -> SparsityReport:
    """Achieved per-layer sparsity, counted from the masks if given (by layer name or alias),
    else from the nonzero weights; a layer missing from ``masks`` is counted from its nonzero
    weights. A tied weight is one row, under its first module's name. ``sparsity`` (per row
    and in ``total``) is the pruned fraction 1 - kept / weights in [0, 1], not a percent.

    A layer is ``collapsed`` when it keeps zero of its weights; ``total["collapsed"]`` lists
    them (layer collapse: Lee et al., ICLR 2021; Tanaka et al., NeurIPS 2020).
    Raises TypeError when ``masks`` is not a dict. Raises ValueError for a mask naming a layer
    the model lacks or of another shape than its weight (it would be counted silently for the
    wrong layer or not at all), or two masks naming one tied weight.
    """
    if masks is not None:
        targets = _mask_targets(model, masks)
        for name, mask in masks.items():
            shape = tuple(read_weight(targets[name][1]).shape)
            if tuple(getattr(mask, "shape", ())) != shape:
                raise ValueError(f"mask for {name!r} has shape "
                                 f"{tuple(getattr(mask, 'shape', ()))}, the weight {shape}")
    rows = []
    for name, m, aliases in prunable_modules(model):
        weight = read_weight(m)
        weights = weight.numel()
        mask = None if masks is None else next(
            (masks[n] for n in (name, *aliases) if n in masks), None)
        kept = int(torch.count_nonzero(mask if mask is not None else weight))
        rows.append({"name": name, "shape": list(weight.shape), "weights": weights,
                     "kept": kept, "sparsity": 1.0 - kept / weights if weights else 0.0,
                     "collapsed": kept == 0 and weights > 0, "aliases": list(aliases)})
    weights = sum(r["weights"] for r in rows)
    kept = sum(r["kept"] for r in rows)
    total = {"name": "TOTAL", "shape": [], "weights": weights, "kept": kept,
             "sparsity": 1.0 - kept / weights if weights else 0.0,
             "collapsed": [r["name"] for r in rows if r["collapsed"]]}
    return SparsityReport(rows, total)
