"""Pruning: counts in the model equal the allocation, masks are plain zeros that survive every
normal model operation, and selection is deterministic."""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.fx

from sparse_repair.allocation import allocate, list_allocators, prune_count
from sparse_repair.models import create_model
from sparse_repair.pruning import load_masks, prune_, save_masks, sparsity_report


def _resnet20():
    """The shared pretrained ResNet-20 when the asset root holds it, else random weights."""
    model = create_model("resnet20")
    root = os.environ.get("SPARSE_REPAIR_ASSETS")
    if root and (Path(root) / "weights").exists():
        from sparse_repair.weights import load_pretrained

        model = load_pretrained("resnet20")
    return model


@pytest.mark.parametrize("method", list_allocators())
@pytest.mark.parametrize("sparsity", [0.9, 0.955])
def test_achieved_counts_equal_allocation(method, sparsity):
    model = _resnet20()
    alloc = allocate(model, method, sparsity)
    prune_(model, alloc)
    report = sparsity_report(model)
    for row, keep in zip(report, alloc.keep):
        assert row["kept"] == keep, f"{method}: layer {row['name']} kept {row['kept']} != {keep}"
    pruned = report.total["weights"] - report.total["kept"]
    assert pruned == prune_count(sparsity, alloc.total), "global pruned count is not round(S*N)"


def test_excluded_layer_dense_in_model():
    model = create_model("resnet20")
    prune_(model, allocate(model, "lamp", 0.9, exclude=["conv1", "linear"]))
    assert torch.count_nonzero(model.conv1.weight) == model.conv1.weight.numel()
    assert torch.count_nonzero(model.linear.weight) == model.linear.weight.numel()


def test_pruned_model_round_trips(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    masks = prune_(model, allocate(model, "erk", 0.9))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        assert torch.equal(copy.deepcopy(model)(x), y), "deepcopy changed the output"
        clone = create_model("resnet20").eval()
        clone.load_state_dict(model.state_dict())
        assert torch.equal(clone(x), y), "state_dict round trip changed the output"
        assert torch.allclose(torch.fx.symbolic_trace(model)(x), y, atol=1e-6)
    assert not model._forward_hooks and not model._forward_pre_hooks
    save_masks(masks, tmp_path / "m.pt")
    loaded = load_masks(tmp_path / "m.pt")
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)


def test_masks_deterministic_with_ties():
    model = create_model("resnet20")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 4) / 4)  # coarse weights: many exact ties in |w|
    a = prune_(copy.deepcopy(model), allocate(model, "global_magnitude", 0.9))
    b = prune_(copy.deepcopy(model), allocate(model, "global_magnitude", 0.9))
    assert all(torch.equal(a[k], b[k]) for k in a), "masks differ between identical calls"


def test_report_text_has_total_line():
    model = create_model("resnet20")
    prune_(model, allocate(model, "erk", 0.9))
    text = str(sparsity_report(model))
    assert "TOTAL" in text and "0.9000" in text
