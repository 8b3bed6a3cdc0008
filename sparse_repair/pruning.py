"""Unstructured magnitude pruning inside each layer, to the counts of an Allocation.

Masks are applied by zeroing weights in place: no hooks, no parametrizations, so a pruned model
deep-copies, saves and traces with torch.fx like any other model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .allocation import Allocation, topk_mask


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def magnitude_mask(weight: torch.Tensor, keep_count: int) -> torch.Tensor:
    """Keep the ``keep_count`` largest |w|; ties broken by lower flat index (allocation's rule)."""
    return topk_mask(weight.detach().abs().flatten().float(), int(keep_count)).view_as(weight)


@torch.no_grad()
def prune_(model: nn.Module, allocation: Allocation) -> dict[str, torch.Tensor]:
    """Zero all but each layer's ``keep`` largest-magnitude weights, in place; return masks."""
    layers = _layers(model)
    missing = [n for n in allocation.names if n not in layers]
    if missing:
        raise ValueError(f"allocation names layers {missing} that the model does not have; "
                         "allocate on this model (or a copy of it)")
    masks = {}
    for name, keep, shape in zip(allocation.names, allocation.keep, allocation.shapes):
        weight = layers[name].weight
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(f"layer {name!r} has shape {tuple(weight.shape)} but the allocation "
                             f"was made for {tuple(shape)}")
        mask = magnitude_mask(weight, int(keep))
        weight.mul_(mask)
        masks[name] = mask.cpu()
    return masks


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    layers = _layers(model)
    for name, mask in masks.items():
        if name not in layers:
            raise ValueError(f"mask for unknown layer {name!r}")
        layers[name].weight.mul_(mask.to(layers[name].weight.device))


def save_masks(masks: dict[str, torch.Tensor], path: str | Path) -> None:
    torch.save({k: v.to(torch.bool).cpu() for k, v in masks.items()}, path)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


class SparsityReport(list):
    """Per-layer rows (dicts) plus a ``total`` row; ``str()`` renders the table."""

    def __init__(self, rows: list[dict], total: dict) -> None:
        super().__init__(rows)
        self.total = total

    def __str__(self) -> str:
        width = max([len(r["name"]) for r in self] + [6])
        lines = [f"{'layer':<{width}}  {'shape':<18} {'weights':>10} {'kept':>10} {'sparsity':>9}"]
        for r in list(self) + [self.total]:
            shape = "x".join(map(str, r["shape"])) if r["shape"] else ""
            lines.append(f"{r['name']:<{width}}  {shape:<18} {r['weights']:>10} {r['kept']:>10} "
                         f"{r['sparsity']:>9.4f}")
        return "\n".join(lines)


def sparsity_report(model: nn.Module, masks: dict[str, torch.Tensor] | None = None
                    ) -> SparsityReport:
    """Achieved per-layer sparsity, counted from the masks if given, else from nonzero weights."""
    rows = []
    for name, m in _layers(model).items():
        weights = m.weight.numel()
        kept = int(masks[name].sum()) if masks is not None and name in masks else \
            int(torch.count_nonzero(m.weight))
        rows.append({"name": name, "shape": list(m.weight.shape), "weights": weights,
                     "kept": kept, "sparsity": 1.0 - kept / weights})
    weights = sum(r["weights"] for r in rows)
    kept = sum(r["kept"] for r in rows)
    total = {"name": "TOTAL", "shape": [], "weights": weights, "kept": kept,
             "sparsity": 1.0 - kept / weights if weights else 0.0}
    return SparsityReport(rows, total)
