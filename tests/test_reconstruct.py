"""Specification of the layer-wise reconstruction repair (``reconstruct``, issue #17): every
Conv2d / Linear, in forward order with its mask fixed, is refit so that it reproduces the dense
layer's output from the input it receives in the pruned model,
w_o[S_o] = (H[S_o,S_o] + lambda I)^-1 (C w_o)[S_o], H = X_s X_s^T, C = X_s X_d^T."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import sparse_repair.repair.lstsq as lstsq
from sparse_repair.allocation import allocate
from sparse_repair.models import random_with_batch_statistics
from sparse_repair.pruning import prune_
from sparse_repair.repair import REPAIRS, list_repairs, repair
from sparse_repair.repair.reconstruct import capture_input, cond_estimate, plan_layers, solve_gflop

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


class Grouped(nn.Module):
    """No BatchNorm; a plain conv with bias, a grouped conv (stride 2), a depthwise conv
    (dilation 2, no bias), a pointwise conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False)
        self.pointwise = nn.Conv2d(8, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.pointwise(x))
        return self.head(x.mean((2, 3)))


class WithBN(nn.Module):
    """Two conv + BN blocks and a linear head."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def _images(n: int, seed: int = 2, side: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _half_pruned(model: nn.Module, seed: int = 1, keep: float = 0.5) -> nn.Module:
    """A copy with about half of every conv / linear weight zeroed at random."""
    pruned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) < keep).to(m.weight))
    return pruned


def _with_statistics(model: nn.Module, side: int = 8) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, side, side, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def grouped():
    torch.manual_seed(0)
    dense = Grouped().eval()
    return dense, _half_pruned(dense), _images(48)


RN_OPTIONS = {"max_positions": 1024, "chunk_size": 12}


@pytest.fixture(scope="module")
def resnet20():
    """Random ResNet-20 with real BN statistics, ERK 0.9; 32 calibration images (in chunks of
    12: 12, 12, 8) and 32 held-out ones; one-pass repair with positions capped at 1,024 per
    layer (to keep the tests fast), done once and shared: (dense, pruned, calib, held,
    repaired, report)."""
    dense = random_with_batch_statistics("resnet20")
    pruned = copy.deepcopy(dense)
    prune_(pruned, allocate(pruned, "erk", 0.9))
    calib = _images(32, seed=1, side=32)
    repaired = copy.deepcopy(pruned)
    report = repair(repaired, "reconstruct", calib, dense=dense, **RN_OPTIONS)
    return dense, pruned, calib, _images(32, seed=9, side=32), repaired, report


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _assert_params_close(a: nn.Module, b: nn.Module, rtol: float, what: str) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for k in pa:
        assert _rel(pa[k], pb[k]) <= rtol, f"{what}: {k} differs ({_rel(pa[k], pb[k]):.2e})"


def _mse(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - dense(x)) ** 2).mean())


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("options", [{"prior": "dense"}, {"prior": "zero", "damping": 0.0}],
                         ids=["dense_prior", "zero_prior_undamped"])
def test_nothing_pruned_leaves_weights_and_outputs_unchanged(grouped, options):
    """X_s = X_d at every layer and nothing is masked: the dense weights solve the problem
    exactly (the dense prior returns them for any damping; the zero prior only without damping,
    since ridge shrinks towards 0). Where H is singular (here: pointwise channels that ReLU
    zeroes on every calibration image, so the head sees constant-0 features) the weights on
    the null space are not determined by the data: the minimum-norm solution about the prior
    keeps the dense ones under the dense prior and sets them to 0 under the zero prior, which
    leaves every output unchanged."""
    dense, _, calib = grouped
    model = copy.deepcopy(dense)
    report = repair(model, "reconstruct", calib, dense=dense, max_positions=None, **options)
    for ly in report.layers:
        if options["prior"] == "dense" or ly["cond_h"] < 1e12:
            layer, ref = model.get_submodule(ly["name"]), dense.get_submodule(ly["name"])
            _assert_params_close(layer, ref, 1e-5, f"{options}: {ly['name']}")
    x = _images(16, seed=7)
    with torch.no_grad():
        assert _rel(model(x), dense(x)) <= 1e-5
    assert [ly["name"] for ly in report.layers] == list(_layers(dense))
    for ly in report.layers:
        # the error is sqrt of a difference of float64 sums (||W_d X_d||^2 is summed apart from
        # H and C), so exact agreement reads as rounding, ~1e-8 (SolveInfo's docstring)
        assert ly["rel_err_before"] <= 1e-7 and ly["rel_err_after"] <= 1e-5, ly


def test_each_layer_is_the_masked_least_squares_fit_on_its_own_inputs(grouped):
    """After the repair, every layer's input in P is the X_s it was fit on (later layers do not
    change it): refitting each layer directly from captured inputs with lstsq gives back its
    weights. Grouped (stride 2), depthwise (dilation 2) and pointwise convs and the head."""
    dense, pruned, calib = grouped
    model = copy.deepcopy(pruned)
    repair(model, "reconstruct", calib, dense=dense, damping=1e-3, max_positions=None)
    for name, layer in _layers(model).items():
        with torch.no_grad():
            x_s, x_d = capture_input(model, name, calib), capture_input(dense, name, calib)
        gram = lstsq.Gram(layer)
        gram.add(x_s, x_d)
        dense_layer = dense.get_submodule(name)
        mask = pruned.get_submodule(name).weight != 0
        w, b, _ = lstsq.solve(dense_layer.weight, mask, gram.H, gram.C, damping=1e-3,
                              bias=dense_layer.bias)
        assert _rel(layer.weight, w) <= 1e-5, name
        if b is not None:
            assert _rel(layer.bias, b) <= 1e-5, name


def test_the_mask_is_kept_exactly(resnet20):
    _, pruned, _, _, model, _ = resnet20
    changed = 0
    for name, layer in _layers(model).items():
        before = pruned.get_submodule(name).weight
        pruned_entries = before == 0
        assert (layer.weight[pruned_entries] == 0).all(), f"{name}: a pruned weight became nonzero"
        assert not torch.signbit(layer.weight[pruned_entries]).any(), f"{name}: -0.0 written"
        changed += int(not torch.equal(layer.weight, before))
    assert changed == len(_layers(model))


def test_a_zero_in_the_dense_weights_counts_as_pruned(grouped):
    """The mask is the pruned layer's zero pattern: a weight that was already 0 stays 0."""
    dense, pruned, calib = grouped
    d, p = copy.deepcopy(dense), copy.deepcopy(pruned)
    with torch.no_grad():
        d.pointwise.weight[0, :4] = 0.0
        p.pointwise.weight[0, :4] = 0.0
    repair(p, "reconstruct", calib, dense=d)
    assert (p.pointwise.weight[0, :4] == 0).all()


def test_output_agreement_with_the_dense_model_improves(resnet20):
    """On held-out images the logits of the repaired model are far closer to the dense ones
    than those of the pruned model (ResNet-20, random init with real BN statistics, ERK 0.9)."""
    dense, pruned, _, held, model, report = resnet20
    assert _mse(model, dense, held) < 0.25 * _mse(pruned, dense, held)
    assert report.path == "onepass" and (report.passes_dense, report.passes_pruned) == (1, 1)
    assert [ly["name"] for ly in report.layers] == list(_layers(pruned))
    for ly in report.layers:
        # conv1 is not pruned by ERK (before = 0): only the damping moves it
        assert ly["rel_err_after"] <= ly["rel_err_before"] or ly["name"] == "conv1", ly
        # every conv has at least 32 images x 8 x 8 output positions > 1,024; the head 32
        assert ly["positions"] == (1024 if ly["kind"] == "Conv2d" else 32)
        assert ly["fallback"] == 0 and ly["cond_h"] >= 1.0
        assert ly["kept"] == int((pruned.get_submodule(ly["name"]).weight != 0).sum())


def test_onepass_equals_rerun(resnet20):
    """Both paths feed the same chunks in the same order to a Gram seeded per layer, so they
    draw the same positions (a subsample here) and agree to float rounding."""
    dense, pruned, calib, _, onepass, ra = resnet20
    rerun = copy.deepcopy(pruned)
    rb = repair(rerun, "reconstruct", calib, dense=dense, path="rerun", **RN_OPTIONS)
    assert rb.path == "rerun" and (rb.passes_dense, rb.passes_pruned) == (20, 20)
    _assert_params_close(onepass, rerun, 1e-5, "onepass vs rerun")
    for la, lb in zip(ra.layers, rb.layers):
        assert la["name"] == lb["name"] and la["positions"] == lb["positions"]


def test_onepass_equals_rerun_on_grouped_and_depthwise_convs(grouped):
    dense, pruned, calib = grouped
    a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
    repair(a, "reconstruct", calib, dense=dense, max_positions=500, chunk_size=7)
    repair(b, "reconstruct", calib, dense=dense, max_positions=500, chunk_size=7, path="rerun")
    _assert_params_close(a, b, 1e-5, "grouped")


def test_memory_limit_falls_back_to_rerun_from_the_untouched_weights(grouped):
    dense, pruned, calib = grouped
    a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
    ra = repair(a, "reconstruct", calib, dense=dense, memory_limit_gb=1e-6)
    repair(b, "reconstruct", calib, dense=dense, path="rerun")
    assert ra.path == "rerun"
    _assert_params_close(a, b, 0.0, "fallback")


def test_target_pruned_never_runs_the_dense_model(grouped):
    dense, pruned, calib = grouped
    calls = []
    handle = dense.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        for path in ("onepass", "rerun"):
            model = copy.deepcopy(pruned)
            report = repair(model, "reconstruct", calib, dense=dense, target="pruned", path=path)
            assert report.passes_dense == 0
    finally:
        handle.remove()
    assert not calls


# ----------------------------------------------------------------------------- models


def test_a_model_without_batchnorm_is_repaired(grouped):
    dense, pruned, calib = grouped
    model = copy.deepcopy(pruned)
    report = repair(model, "reconstruct", calib, dense=dense)
    held = _images(32, seed=11)
    assert _mse(model, dense, held) < 0.5 * _mse(pruned, dense, held)
    assert not report.skipped
    with pytest.raises(ValueError, match="then='bn_recal' needs a BatchNorm"):
        repair(copy.deepcopy(pruned), "reconstruct", calib, dense=dense, then="bn_recal")


def test_a_model_without_prunable_layers_is_refused():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).eval()
    with pytest.raises(ValueError, match=r"refits nn.Conv2d and nn.Linear.*has none"):
        repair(model, "reconstruct", _images(4), dense=copy.deepcopy(model))


class Odd(nn.Module):
    """A layer called twice, one never called, two modules sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.twice = nn.Conv2d(4, 4, 3, padding=1)
        self.unused = nn.Conv2d(4, 4, 1)
        self.tied_a = nn.Linear(4, 4)
        self.tied_b = nn.Linear(4, 4)
        self.tied_b.weight = self.tied_a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.twice(torch.relu(self.twice(torch.relu(self.conv(x))))))
        x = x.mean((2, 3))
        return self.head(torch.relu(self.tied_b(torch.relu(self.tied_a(x)))))


def test_layers_that_cannot_be_refit_are_skipped_with_the_reason():
    torch.manual_seed(0)
    dense = Odd().eval()
    pruned = _half_pruned(dense)
    calib = _images(24)
    for path in ("onepass", "rerun"):
        model = copy.deepcopy(pruned)
        report = repair(model, "reconstruct", calib, dense=dense, path=path)
        assert [ly["name"] for ly in report.layers] == ["conv", "twice", "tied_a", "tied_b",
                                                        "head", "unused"]
        assert set(report.skipped) == {"twice", "tied_a", "tied_b", "unused"}
        assert "called 2 times" in report.skipped["twice"]
        assert "not called" in report.skipped["unused"]
        assert "shared with 'tied_b'" in report.skipped["tied_a"]
        for name in report.skipped:
            assert torch.equal(model.get_submodule(name).weight,
                               pruned.get_submodule(name).weight), name
        assert not torch.equal(model.head.weight, pruned.head.weight)


def test_a_layer_over_the_solve_budget_is_left_as_pruned_with_the_estimate(grouped):
    """max_solve_gflop bounds the float64 work of one layer's solve (sum of k^3/3 over its
    output channels): a layer above it keeps its pruned weights, its record gives the estimate
    and the option to raise, a UserWarning names it, and every other layer is refit as without
    the budget. (VGG-11's 25,088-input classifier would need ~1.8e6 GFLOP: days of CPU.)"""
    dense, pruned, calib = grouped
    costs = {n: solve_gflop(m)[0] for n, m in pruned.named_modules()
             if isinstance(m, nn.Conv2d | nn.Linear)}
    big = max(costs, key=costs.get)
    limit = (costs[big] + max(c for n, c in costs.items() if n != big)) / 2
    free, capped = copy.deepcopy(pruned), copy.deepcopy(pruned)
    ref = repair(free, "reconstruct", calib, dense=dense, max_solve_gflop=None)
    with pytest.warns(UserWarning, match=f"exceeds max_solve_gflop.*{big}") as w:
        report = repair(capped, "reconstruct", calib, dense=dense, max_solve_gflop=limit)
    assert [x.filename for x in w] == [__file__], "the warning names the caller's line"
    assert set(report.skipped) == {big}
    assert "pass a larger max_solve_gflop" in report.skipped[big]
    assert f"{costs[big]:,.0f} GFLOP" in report.skipped[big]
    assert torch.equal(capped.get_submodule(big).weight, pruned.get_submodule(big).weight)
    assert len(ref.skipped) == 0 and not torch.equal(
        free.get_submodule(big).weight, pruned.get_submodule(big).weight)


def test_a_torch_prune_mask_is_refit_through_weight_orig(grouped):
    dense, _, calib = grouped
    plain, masked = copy.deepcopy(dense), copy.deepcopy(dense)
    for name in ("conv", "grouped", "depthwise"):
        torch.nn.utils.prune.l1_unstructured(masked.get_submodule(name), "weight", amount=0.5)
        with torch.no_grad():
            plain.get_submodule(name).weight.copy_(masked.get_submodule(name).weight)
    repair(plain, "reconstruct", calib, dense=dense)
    report = repair(masked, "reconstruct", calib, dense=dense)
    assert not report.skipped
    for name in ("conv", "grouped", "depthwise"):
        layer = masked.get_submodule(name)
        assert _rel(layer.weight_orig * layer.weight_mask, plain.get_submodule(name).weight) \
            <= 1e-6, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_keep_their_dtype(dtype):
    """Inputs are summed in float64 and the refit weights cast back. Compared with the float32
    repair of the same (rounded) weights at the tolerance of a few roundings of the dtype."""
    torch.manual_seed(0)
    dense = _with_statistics(WithBN())
    pruned = _half_pruned(dense)
    calib = _images(32)
    try:
        with torch.no_grad():
            copy.deepcopy(dense).to(dtype)(calib[:2].to(dtype))
    except RuntimeError as err:  # CPU builds without float16 conv kernels
        pytest.skip(f"this torch has no CPU {dtype} kernels: {err}")
    want = copy.deepcopy(pruned).to(dtype).float()
    repair(want, "reconstruct", calib, dense=copy.deepcopy(dense).to(dtype).float())
    model = copy.deepcopy(pruned).to(dtype)
    repair(model, "reconstruct", calib, dense=copy.deepcopy(dense).to(dtype))
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == dtype and torch.isfinite(v).all(), k
    for name, layer in _layers(model).items():
        assert (layer.weight[pruned.get_submodule(name).weight == 0] == 0).all(), name
        # float16 / bfloat16 activations differ from float32 by a few roundings per layer
        tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
        assert _rel(layer.weight, want.get_submodule(name).weight) <= tol, name


# ----------------------------------------------------------------------------- options, report


def test_then_bn_recal_is_reconstruct_followed_by_bn_recal():
    torch.manual_seed(0)
    dense = _with_statistics(WithBN())
    pruned = _half_pruned(dense)
    calib = _images(32)
    both = copy.deepcopy(pruned)
    report = repair(both, "reconstruct", calib, dense=dense, then="bn_recal")
    steps = copy.deepcopy(pruned)
    repair(steps, "reconstruct", calib, dense=dense)
    repair(steps, "bn_recal", calib)
    for k, v in both.state_dict().items():
        assert torch.equal(v, steps.state_dict()[k]), k
    assert [ly["name"] for ly in report.layers] == ["conv1", "conv2", "head", "bn1", "bn2"]
    assert report.passes_pruned == 2 and report.passes_dense == 1


def test_options_defaults_and_bad_values():
    impl = REPAIRS["reconstruct"]
    assert impl.family == "reconstruction" and list_repairs(family="reconstruction") == [
        "reconstruct"]
    assert impl.needs_dense and not impl.needs_bn
    defaults = {f.name: f.default for f in dataclasses.fields(impl.Options)}
    assert defaults == {"path": "auto", "memory_limit_gb": None, "damping": 0.001,
                        "max_positions": 4096, "target": "dense", "prior": "zero",
                        "then": "none", "seed": 0, "max_solve_gflop": 4000.0}
    for option, value in (("damping", -1.0), ("damping", "big"), ("max_positions", 0),
                          ("max_solve_gflop", 0), ("max_solve_gflop", "big"),
                          ("max_solve_gflop", float("inf")),
                          ("max_positions", 1.5), ("target", "both"), ("prior", "one"),
                          ("then", "asr"), ("seed", "zero"), ("seed", -1), ("seed", 2**70),
                          ("path", "fast")):
        with pytest.raises(ValueError, match=option.split("_")[0]):
            impl.resolve(**{option: value})


def test_unknown_option_raises_type_error_naming_the_valid_ones(grouped):
    dense, pruned, calib = grouped
    with pytest.raises(TypeError, match="reconstruct has no option 'dampign'") as err:
        repair(copy.deepcopy(pruned), "reconstruct", calib, dense=dense, dampign=0.1)
    for name in ("damping", "max_positions", "target", "prior", "then", "seed", "path"):
        assert name in str(err.value)


def test_labels_are_refused(grouped):
    dense, pruned, calib = grouped
    model = copy.deepcopy(pruned)
    with pytest.raises(TypeError, match="label-free"):
        repair(model, "reconstruct", (calib, torch.zeros(len(calib))), dense=dense)
    with pytest.raises(TypeError, match="label-free"):
        repair(model, "reconstruct", iter([(calib, torch.zeros(len(calib)))]), dense=dense)
    with pytest.raises(ValueError, match="dense="):
        repair(model, "reconstruct", calib)
    _assert_params_close(model, pruned, 0.0, "refused")


def test_deterministic(resnet20, grouped):
    dense, pruned, calib, _, first, _ = resnet20
    again = copy.deepcopy(pruned)
    repair(again, "reconstruct", calib, dense=dense, **RN_OPTIONS)
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # the seed draws the positions
    dense, pruned, calib = grouped
    a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
    repair(a, "reconstruct", calib, dense=dense, max_positions=300)
    repair(b, "reconstruct", calib, dense=dense, max_positions=300, seed=1)
    assert not torch.equal(a.grouped.weight, b.grouped.weight)


def test_a_failure_restores_the_model_and_leaves_no_hook(grouped, monkeypatch):
    dense, pruned, calib = grouped
    real = lstsq.Gram.add
    seen = []

    def add(self, x_s, x_d=None):
        seen.append(1)
        if len(seen) == 9:
            raise RuntimeError("injected")
        return real(self, x_s, x_d)

    monkeypatch.setattr(lstsq.Gram, "add", add)
    for path in ("onepass", "rerun"):
        seen.clear()
        model = copy.deepcopy(pruned)
        with pytest.raises(RuntimeError, match="injected"):
            repair(model, "reconstruct", calib, dense=dense, chunk_size=8, path=path)
        _assert_params_close(model, pruned, 0.0, path)
        for m in (*model.modules(), *dense.modules()):
            assert not m._forward_pre_hooks and not m._forward_hooks, path


def test_plan_and_condition_estimate(grouped):
    dense, _, calib = grouped
    plan = plan_layers(dense, calib[:2])
    assert plan.order == ("conv", "grouped", "depthwise", "pointwise", "head")
    with torch.no_grad():
        x = capture_input(dense, "pointwise", calib).double()
    gram = lstsq.Gram(dense.pointwise, target="pruned")
    gram.add(x)
    ev = torch.linalg.eigvalsh(gram.H)
    exact = float((ev[:, -1] / ev[:, 0]).max())
    assert 0.8 * exact <= cond_estimate(gram.H) <= exact * (1 + 1e-9)
    assert cond_estimate(torch.zeros(2, 3, 3, dtype=F64)) == float("inf")
