"""Pruning: counts in the model equal the allocation, masks are plain zeros that survive every
normal model operation, and selection is deterministic. Weights that are not plain Parameters
(torch.nn.utils.prune masks, parametrizations, hook-based weight_norm, lazy) are refused before
anything changes; tied weights are one layer; collapsed layers are reported (issue #18)."""

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from sparse_repair.allocation import (
    LayerCollapseWarning,
    LayerSpec,
    allocate,
    list_allocators,
    prune_count,
)
from sparse_repair.models import create_model
from sparse_repair.pruning import (
    apply_masks_,
    load_masks,
    prune_,
    save_masks,
    sparsity_report,
)


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


# ----------------------------------------------------------------------------- helpers

def _bits(model: nn.Module) -> dict[str, bytes]:
    """Every state_dict entry as raw bytes: equal means bit-identical (NaN and -0.0 included)."""
    return {k: v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


def _refused(model: nn.Module, call, match: str) -> None:
    """``call()`` raises ValueError matching ``match`` and leaves the model bit-identical."""
    before = _bits(model)
    with pytest.raises(ValueError, match=match):
        call()
    assert _bits(model) == before, "the model changed before the error was raised"


def _nonzero_after_forward(layer: nn.Module, n_in: int) -> int:
    with torch.no_grad():
        layer(torch.randn(2, n_in))
    return int(torch.count_nonzero(layer.weight))


# ----------------------------------------------------------------------------- not plain weights

def test_torch_prune_mask_is_refused_then_works_once_removed():
    # Regression: prune_ to 0.9 after l1_unstructured(0.2) was undone by the next forward (the
    # pre-hook recomputes weight = weight_orig * weight_mask): 80 nonzero weights, right: 10.
    torch.manual_seed(0)
    layer = nn.Linear(10, 10)
    torch_prune.l1_unstructured(layer, "weight", 0.2)
    _refused(layer, lambda: allocate(layer, "global_magnitude", 0.9),
             r"torch\.nn\.utils\.prune\.remove\(")
    alloc = allocate([LayerSpec("", (10, 10), layer.weight.detach())], "global_magnitude", 0.9)
    _refused(layer, lambda: prune_(layer, alloc), r"torch\.nn\.utils\.prune\.remove\(")
    _refused(layer, lambda: apply_masks_(layer, {"": torch.zeros(10, 10, dtype=torch.bool)}),
             "weight_orig")
    torch_prune.remove(layer, "weight")  # what the message says to do
    prune_(layer, allocate(layer, "global_magnitude", 0.9))
    assert _nonzero_after_forward(layer, 10) == 10


@pytest.mark.parametrize("wrap", ["parametrizations.weight_norm", "parametrize.register",
                                  "parametrizations.spectral_norm"])
def test_parametrized_weight_is_refused_then_works_once_removed(wrap):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    if wrap == "parametrize.register":
        class Scale(nn.Module):
            def forward(self, w):
                return 2 * w
        parametrize.register_parametrization(model[2], "weight", Scale())
    else:
        getattr(nn.utils.parametrizations, wrap.split(".")[1])(model[2])
    _refused(model, lambda: allocate(model, "erk", 0.9),
             r"layer '2'.*parametrize\.remove_parametrizations\(")
    alloc = allocate([LayerSpec("0", (10, 10), None), LayerSpec("2", (10, 10), None)], "erk",
                     0.9)
    _refused(model, lambda: prune_(model, alloc), "remove_parametrizations")
    # An excluded parametrized layer is only read (its size counts in N) and stays untouched.
    # (eval: in training mode spectral_norm's weight moves at every access by design.)
    model.eval()
    dense = model[2].weight.detach().clone()
    a = allocate(model, "erk", 0.45, exclude=["2"])
    prune_(model, a)
    assert torch.equal(model[2].weight.detach(), dense) and a.keep_of("2") == 100
    parametrize.remove_parametrizations(model[2], "weight")
    model.load_state_dict(model.state_dict())
    prune_(model, allocate(model, "erk", 0.9))
    with torch.no_grad():
        model(torch.randn(2, 10))
    assert sum(int(torch.count_nonzero(model[i].weight)) for i in (0, 2)) == 20


@pytest.mark.parametrize(("wrap", "fix"), [("weight_norm", "remove_weight_norm"),
                                           ("spectral_norm", "remove_spectral_norm")])
def test_hook_based_norms_are_refused(wrap, fix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated in torch
        layer = getattr(nn.utils, wrap)(nn.Linear(10, 10))
    _refused(layer, lambda: allocate(layer, "uniform", 0.9), fix)
    getattr(nn.utils, fix)(layer)
    prune_(layer, allocate(layer, "uniform", 0.9))
    assert _nonzero_after_forward(layer, 10) == 10


def test_lazy_layer_is_refused_until_materialized():
    model = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(ValueError, match="forward pass"):
        allocate(model, "erk", 0.5)
    with torch.no_grad():
        model(torch.randn(1, 6))
    assert allocate(model, "erk", 0.5).total == 24


# ----------------------------------------------------------------------------- tied weights

def _tied(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "same_module":
        lin = nn.Linear(8, 8)
        return nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(8, 4))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model[2].weight = (model[0].weight if kind == "parameter"
                       else nn.Parameter(model[0].weight.data))  # same memory, new Parameter
    return model


@pytest.mark.parametrize("kind", ["parameter", "same_module", "memory"])
def test_tied_weight_counts_once(kind):
    # Regression: the shared weight was counted twice (N = 160, not 96) and pruned twice.
    model = _tied(kind)
    a = allocate(model, "global_magnitude", 0.5)
    assert a.names == ["0", "4"] and a.aliases == {"0": ("2",)}
    assert a.total == 96 and a.prune_total == 48
    prune_(model, a)
    kept = int(torch.count_nonzero(model[0].weight)) + int(torch.count_nonzero(model[4].weight))
    assert kept == 48 and torch.equal(model[0].weight, model[2].weight)
    report = sparsity_report(model)
    assert [r["name"] for r in report] == ["0", "4"] and report[0]["aliases"] == ["2"]
    assert report.total["weights"] == 96 and report.total["kept"] == 48


@pytest.mark.parametrize("kind", ["parameter", "same_module", "memory"])
def test_half_excluded_tie_is_refused(kind):
    # Regression: excluding "2" alone left "0" free, so "2" was pruned through its tie.
    model = _tied(kind)
    _refused(model, lambda: allocate(model, "lamp", 0.5, exclude=["2"]),
             r"share one weight \(tied\).*Exclude all of them or none")
    a = allocate(model, "lamp", 0.3, exclude=["0", "2"])
    dense = model[0].weight.detach().clone()
    prune_(model, a)
    assert torch.equal(model[2].weight, dense) and a.prune_total == prune_count(0.3, 96)


def test_allocation_counting_a_tie_twice_is_refused():
    model = _tied("parameter")
    specs = [LayerSpec(n, tuple(m.weight.shape), m.weight.detach())
             for n, m in model.named_children() if isinstance(m, nn.Linear)]
    alloc = allocate(specs, "erk", 0.5)  # from specs that do not know the tie
    _refused(model, lambda: prune_(model, alloc), "tied.*counted and pruned twice")


def test_overlapping_weights_in_different_layouts_are_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].weight = nn.Parameter(model[0].weight.data.t())  # same memory, transposed
    with pytest.raises(ValueError, match="overlap in memory"):
        allocate(model, "erk", 0.5)


# ----------------------------------------------------------------------------- bad input

def test_bad_allocation_changes_nothing():
    # Regression: a wrong shape in a later layer was found after earlier layers were pruned.
    model = create_model("resnet20")
    alloc = allocate(model, "erk", 0.9)
    alloc.shapes[-1] = (1, 1)
    _refused(model, lambda: prune_(model, alloc), "was made for")
    alloc = allocate(model, "erk", 0.9)
    alloc.keep[-1] = alloc.sizes[-1] + 1
    _refused(model, lambda: prune_(model, alloc), "outside")
    masks = prune_(copy.deepcopy(model), allocate(model, "erk", 0.9))
    masks["nope"] = masks["conv1"]
    _refused(model, lambda: apply_masks_(model, masks), "does not have")
    _refused(model, lambda: allocate(model, "global_magnitude", 0.99, min_keep=10**6),
             "min_keep")


# ----------------------------------------------------------------------------- layer collapse

def test_collapsed_layers_in_the_report():
    torch.manual_seed(0)
    model = create_model("resnet20")
    with pytest.warns(LayerCollapseWarning, match="layer3.1.conv2, layer3.2.conv2"):
        alloc = allocate(model, "global_magnitude", 0.995)
    masks = prune_(model, alloc)
    for report in (sparsity_report(model), sparsity_report(model, masks)):
        assert report.collapsed == alloc.collapsed == ["layer3.1.conv2", "layer3.2.conv2"]
        assert report.total["collapsed"] == alloc.collapsed
        assert [r["name"] for r in report if r["collapsed"]] == alloc.collapsed
        assert "COLLAPSED" in str(report) and "collapsed (0 kept weights" in str(report)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerCollapseWarning)
        fixed = allocate(create_model("resnet20"), "global_magnitude", 0.995, min_keep=1)
    assert fixed.collapsed == [] and fixed.prune_total == prune_count(0.995, fixed.total)


def test_cli_allocate_json_reports_collapse(capsys):
    from sparse_repair.cli import main

    torch.manual_seed(0)
    with pytest.warns(LayerCollapseWarning):
        assert main(["allocate", "--model", "resnet8", "--method", "global_magnitude",
                     "--sparsity", "0.99", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["collapsed"] == ["layer3.0.conv2"] == out["total"]["collapsed"]
    assert [r["name"] for r in out["layers"] if r["collapsed"]] == out["collapsed"]
    assert out["min_keep"] == 0
