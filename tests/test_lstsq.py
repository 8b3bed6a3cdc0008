"""Specification of the least-squares rebuild core (sparse_repair.repair.lstsq, issue #17):
w_o[S_o] = (H[S_o,S_o] + lambda I)^-1 (C w_o)[S_o], H = X_s X_s^T, C = X_s X_d^T."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_repair.repair.lstsq import SINGULAR_RTOL, Gram, solve, unfold_inputs

F64 = torch.float64


def _pair(shape, seed=0, noise=0.3):
    """Dense inputs and 'pruned-model' inputs that differ by noise, float64."""
    g = torch.Generator().manual_seed(seed)
    x_d = torch.randn(*shape, generator=g, dtype=F64)
    return x_d + noise * torch.randn(*shape, generator=g, dtype=F64), x_d


def _mask(shape, keep=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) < keep


def _gram(layer, x_s, x_d, **kw):
    gram = Gram(layer, **kw)
    gram.add(x_s, x_d)
    return gram


def _rebuild(layer, mask, x_s, x_d, damping=0.0, **kw):
    gram = _gram(layer, x_s, x_d)
    return solve(layer.weight, mask, gram.H, gram.C, gram.D, damping=damping, bias=layer.bias,
                 **kw)


def _conv(c_in, c_out, k=3, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, k, **kw).double()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


# --- closed form --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_lstsq_per_row_on_kept_columns(bias):
    torch.manual_seed(0)
    layer = nn.Linear(12, 7, bias=bias).double()
    x_s, x_d = _pair((300, 12))
    mask = _mask(layer.weight.shape)
    w, b, info = _rebuild(layer, mask, x_s, x_d)
    design = torch.cat([x_s, torch.ones(300, 1, dtype=F64)], 1).numpy() if bias else x_s.numpy()
    target = layer(x_d).detach().numpy()
    for o in range(7):
        keep = np.concatenate([mask[o].numpy(), np.ones(int(bias), dtype=bool)])
        ref = np.linalg.lstsq(design[:, keep], target[:, o], rcond=None)[0]
        got = np.r_[w[o].detach().numpy(), [b[o].item()] if bias else []][keep]
        assert np.abs(got - ref).max() <= 1e-8 * np.abs(ref).max()
    assert info.kept == int(mask.sum()) and info.fallback == [] and info.lam == [0.0]


def test_damped_rule_is_ridge_on_the_kept_block_with_lambda_from_mean_diag_h():
    torch.manual_seed(0)
    layer = nn.Linear(10, 4, bias=False).double()
    x_s, x_d = _pair((80, 10))
    mask = _mask(layer.weight.shape)
    gram = _gram(layer, x_s, x_d)
    w, _, info = solve(layer.weight, mask, gram.H, gram.C, damping=0.05)
    h, c = gram.H[0], gram.C[0]
    lam = 0.05 * float(torch.diagonal(h).mean())
    assert info.lam == [pytest.approx(lam, rel=1e-15)]
    for o in range(4):
        s = mask[o].nonzero().squeeze(1)
        a = h[s][:, s] + lam * torch.eye(len(s), dtype=F64)
        ref = torch.linalg.solve(a, (c @ layer.weight[o].detach())[s])
        assert _rel(w[o, s].detach(), ref) <= 1e-12


def test_dense_prior_shrinks_towards_the_dense_weights():
    torch.manual_seed(0)
    layer = nn.Linear(10, 4, bias=False).double()
    x_s, x_d = _pair((80, 10))
    mask = _mask(layer.weight.shape)
    gram = _gram(layer, x_s, x_d)
    w, _, info = solve(layer.weight, mask, gram.H, gram.C, damping=0.05, prior="dense")
    lam, w_d = info.lam[0], layer.weight.detach()
    for o in range(4):
        s = mask[o].nonzero().squeeze(1)
        a = gram.H[0][s][:, s] + lam * torch.eye(len(s), dtype=F64)
        ref = torch.linalg.solve(a, (gram.C[0] @ w_d[o])[s] + lam * w_d[o, s])
        assert _rel(w[o, s].detach(), ref) <= 1e-12


@pytest.mark.parametrize("bias", [False, True])
def test_nothing_pruned_same_inputs_returns_the_dense_weights(bias):
    layer = _conv(4, 6, bias=bias, padding=1)
    x, _ = _pair((5, 4, 7, 7))
    full = torch.ones_like(layer.weight, dtype=torch.bool)
    w, b, info = _rebuild(layer, full, x, x)  # damping 0, prior zero: the plain normal equations
    assert _rel(w, layer.weight.detach()) <= 1e-8
    if bias:
        assert _rel(b, layer.bias.detach()) <= 1e-8
    assert info.rel_err_after <= 1e-6 and info.rel_err_before == 0.0
    # the dense prior returns them for any damping; the zero prior (ridge) shrinks them
    w, _, _ = _rebuild(layer, full, x, x, damping=0.1, prior="dense")
    assert _rel(w, layer.weight.detach()) <= 1e-8
    w, _, _ = _rebuild(layer, full, x, x, damping=0.1)
    assert w.norm() < layer.weight.norm()


def test_target_pruned_refits_to_the_dense_weights_output_on_pruned_inputs():
    torch.manual_seed(0)
    layer = nn.Linear(9, 3).double()
    x_s, x_d = _pair((100, 9))
    gram = _gram(layer, x_s, None, target="pruned")
    assert gram.C is gram.H and gram.D is gram.H
    mask = _mask(layer.weight.shape)
    w, b, _ = solve(layer.weight, mask, gram.H, gram.C, gram.D, damping=0.0, bias=layer.bias)
    target = layer(x_s).detach()  # W_d X_s
    design = torch.cat([x_s, torch.ones(100, 1, dtype=F64)], 1)
    for o in range(3):
        keep = torch.cat([mask[o], torch.tensor([True])])
        ref = torch.linalg.lstsq(design[:, keep], target[:, o]).solution
        assert _rel(torch.cat([w[o], b[o:o + 1]])[keep].detach(), ref) <= 1e-8


# --- the mask ---------------------------------------------------------------------------


def test_mask_is_kept_exactly():
    layer = _conv(8, 8, padding=1)
    x_s, x_d = _pair((4, 8, 6, 6))
    mask = _mask(layer.weight.shape, keep=0.3)
    mask[0] = False  # a channel with nothing kept: all zero
    w, _, info = _rebuild(layer, mask, x_s, x_d, damping=0.01)
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum()), dtype=F64))
    assert not torch.signbit(w[~mask]).any()  # +0.0, not -0.0
    assert (w[mask] != 0).all() and info.kept == int(mask.sum())
    # a block of only all-pruned channels, too
    w1, _, _ = _rebuild(layer, mask, x_s, x_d, damping=0.01, block_bytes=1)
    assert torch.equal(w1[~mask], w[~mask]) and torch.equal(w1[0], torch.zeros_like(w1[0]))


# --- Conv2d: unfold and solve -----------------------------------------------------------

CONVS = {
    "plain": dict(c_in=4, c_out=6, padding=1),
    "stride2": dict(c_in=4, c_out=6, stride=2, padding=1),
    "groups2": dict(c_in=4, c_out=6, padding=1, groups=2),
    "depthwise": dict(c_in=4, c_out=4, stride=2, padding=1, groups=4),
    "dilated_bias": dict(c_in=3, c_out=5, dilation=2, padding=2, bias=True),
    "same_even_kernel": dict(c_in=3, c_out=4, k=4, padding="same", bias=False),
}


def _make(cfg):
    cfg = dict(cfg)
    return _conv(cfg.pop("c_in"), cfg.pop("c_out"), k=cfg.pop("k", 3), bias=cfg.pop("bias", False),
                 **cfg)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name", list(CONVS))
def test_unfold_times_weight_equals_conv2d(name):
    layer = _make(CONVS[name])
    x, _ = _pair((3, layer.in_channels, 9, 8))
    cols = unfold_inputs(x, layer)
    g, o = layer.groups, layer.out_channels
    w = layer.weight.detach().reshape(g, o // g, -1)
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().reshape(g, o // g, 1)], 2)
    out = layer(x).detach()                                         # [N, O, Ho, Wo]
    ref = out.permute(1, 0, 2, 3).reshape(g, o // g, -1)            # positions sample-major
    assert cols.shape == (g, w.shape[2], ref.shape[2])
    assert (torch.bmm(w, cols) - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("name", [n for n in CONVS if CONVS[n].get("padding") != "same"])
def test_unfold_equals_torch_unfold_split_by_group(name):
    layer = _make(CONVS[name])
    x, _ = _pair((3, layer.in_channels, 9, 8))
    ref = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                   stride=layer.stride)                              # [N, C*kh*kw, L]
    g = layer.groups
    ref = ref.unflatten(1, (g, -1)).permute(1, 2, 0, 3).flatten(2)  # [G, Kg, N*L]
    assert torch.equal(unfold_inputs(x, layer, bias=False), ref)


@pytest.mark.parametrize("name", list(CONVS))
def test_unfold_of_chosen_positions_equals_those_columns(name):
    layer = _make(CONVS[name])
    x, _ = _pair((3, layer.in_channels, 9, 8))
    full = unfold_inputs(x, layer)
    # every position, shuffled (so every padded border tap is gathered), and a subset
    pos = torch.randperm(full.shape[2], generator=torch.Generator().manual_seed(0))
    assert torch.equal(unfold_inputs(x, layer, positions=pos), full[:, :, pos])
    assert torch.equal(unfold_inputs(x, layer, positions=pos[:17]), full[:, :, pos[:17]])


def test_unfold_linear_flattens_leading_dims():
    layer = nn.Linear(5, 2).double()
    x, _ = _pair((3, 4, 5))
    cols = unfold_inputs(x, layer)
    assert cols.shape == (1, 6, 12)
    assert torch.equal(cols[0, :5], x.reshape(12, 5).T) and (cols[0, 5] == 1).all()
    assert unfold_inputs(x, layer, bias=False).shape == (1, 5, 12)
    pos = torch.tensor([11, 0, 5])
    assert torch.equal(unfold_inputs(x, layer, positions=pos), cols[:, :, pos])


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_solve_equals_a_per_channel_reference_loop(name):
    layer = _make(CONVS[name])
    x_s, x_d = _pair((4, layer.in_channels, 8, 8))
    mask = _mask(layer.weight.shape, keep=0.6)
    w, b, info = _rebuild(layer, mask, x_s, x_d)
    cols = unfold_inputs(x_s, layer)
    target = layer(x_d).detach()
    g, o_g = layer.groups, layer.out_channels // layer.groups
    for o in range(layer.out_channels):
        keep = mask[o].flatten()
        got = w[o].flatten()
        if layer.bias is not None:
            keep, got = torch.cat([keep, torch.tensor([True])]), torch.cat([got, b[o:o + 1]])
        design = cols[o // o_g].T[:, keep]                           # [P, kept]
        ref = torch.linalg.lstsq(design, target[:, o].flatten()).solution
        assert _rel(got[keep].detach(), ref) <= 1e-8, o
    assert info.fallback == [] and len(info.lam) == g


# --- bias ------------------------------------------------------------------------------


def test_bias_is_refit_through_the_constant_row():
    """A shifted input, x_s = x_d + c, is exactly absorbed by the bias: b' = b - W c."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 3).double()
    _, x_d = _pair((50, 6))
    shift = torch.linspace(-1, 2, 6, dtype=F64)
    full = torch.ones_like(layer.weight, dtype=torch.bool)
    w, b, info = _rebuild(layer, full, x_d + shift, x_d)
    assert _rel(w, layer.weight.detach()) <= 1e-8
    assert _rel(b, (layer.bias - layer.weight @ shift).detach()) <= 1e-8
    assert info.rel_err_before > 0.1 and info.rel_err_after <= 1e-6
    nobias = nn.Linear(6, 3, bias=False).double()
    nobias.weight.data.copy_(layer.weight.data)
    _, _, info = _rebuild(nobias, full, x_d + shift, x_d)
    assert info.rel_err_after > 0.1  # without a bias the shift cannot be absorbed
    with pytest.raises(ValueError, match="bias"):  # H without the constant row
        solve(layer.weight, full, *(_gram(nobias, x_d, x_d).H,) * 2, bias=layer.bias)


# --- accumulation ----------------------------------------------------------------------


def test_sums_do_not_depend_on_chunking_without_max_positions():
    layer = _conv(4, 6, stride=2, padding=1, groups=2, bias=True)
    x_s, x_d = _pair((10, 4, 7, 7))
    one = _gram(layer, x_s, x_d)
    three = Gram(layer, batch_bytes=1)  # also slices every chunk into single samples
    for sl in (slice(0, 2), slice(2, 7), slice(7, 10)):
        three.add(x_s[sl], x_d[sl])
    assert one.n == three.n == 10 * 16 and three.samples == 10
    for a, b in ((one.H, three.H), (one.C, three.C), (one.D, three.D)):
        assert a.dtype == F64 and a.shape == (2, 19, 19)
        assert (a - b).abs().max() <= 1e-12 * a.abs().max()
    cols_s, cols_d = unfold_inputs(x_s, layer), unfold_inputs(x_d, layer)
    assert (one.C - cols_s @ cols_d.transpose(1, 2)).abs().max() <= 1e-12 * one.C.abs().max()


def test_max_positions_draws_a_seeded_proportional_subsample():
    layer = _conv(3, 4, padding=1)
    x_s, x_d = _pair((9, 3, 6, 6))                      # 9 * 36 = 324 positions
    def run(seed, chunks):
        gram = Gram(layer, max_positions=100, n_samples=9, seed=seed)
        for sl in chunks:
            gram.add(x_s[sl], x_d[sl])
        return gram
    whole = run(0, [slice(0, 9)])
    parts = run(0, [slice(0, 4), slice(4, 5), slice(5, 9)])
    assert whole.n == parts.n == 100                    # exactly max_positions in all
    assert torch.equal(whole.H, run(0, [slice(0, 9)]).H)  # deterministic
    assert not torch.equal(whole.H, run(1, [slice(0, 9)]).H)
    # the same positions for X_s and X_d: equal inputs give H == C == D exactly
    same = Gram(layer, max_positions=100, n_samples=9)
    same.add(x_s, x_s.clone())
    assert torch.equal(same.H, same.C) and torch.equal(same.H, same.D)
    # a budget above the total uses every position
    assert run_all(layer, x_s, x_d).n == 324
    with pytest.raises(ValueError, match="n_samples"):
        Gram(layer, max_positions=10)
    with pytest.raises(ValueError, match="n_samples"):
        Gram(layer, max_positions=10, n_samples=2).add(x_s, x_d)


def run_all(layer, x_s, x_d):
    gram = Gram(layer, max_positions=10_000, n_samples=9)
    gram.add(x_s, x_d)
    return gram


def test_add_refuses_bad_inputs():
    layer = _conv(3, 4, padding=1)
    x_s, x_d = _pair((2, 3, 5, 5))
    with pytest.raises(ValueError, match="x_d"):
        Gram(layer).add(x_s)
    with pytest.raises(ValueError, match="differ"):
        Gram(layer).add(x_s, x_d[:1])
    gram = _gram(layer, x_s, x_d)
    h, n = gram.H.clone(), gram.n
    bad = x_d.clone()
    bad[1, 2, 3, 4] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        gram.add(x_s, bad)
    assert torch.equal(gram.H, h) and gram.n == n  # a refused chunk adds nothing
    with pytest.raises(ValueError, match="padding_mode"):
        unfold_inputs(x_s, _conv(3, 4, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError):
        Gram(nn.Conv1d(3, 4, 3))


# --- dtypes, conditioning, error report, blocks -----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer_accumulates_in_float64_and_keeps_its_dtype(dtype):
    layer = _conv(4, 6, padding=1, bias=True)
    x_s, x_d = _pair((4, 4, 6, 6))
    mask = _mask(layer.weight.shape)
    w64, b64, _ = _rebuild(layer, mask, x_s.float().to(dtype).double(),
                           x_d.float().to(dtype).double(), damping=0.01)
    layer = layer.to(dtype)
    gram = _gram(layer, x_s.to(dtype), x_d.to(dtype))
    assert gram.H.dtype == gram.C.dtype == gram.D.dtype == F64
    w, b, info = solve(layer.weight, mask, gram.H, gram.C, gram.D, damping=0.01,
                       bias=layer.bias)
    assert w.dtype == b.dtype == dtype
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum()), dtype=dtype))
    # what the float64 solve gives for the same (half-rounded) inputs, rounded once
    # (the layer's own weights were rounded to half, too: compare at half precision)
    assert _rel(w.double(), w64) <= 2e-2 and _rel(b.double(), b64) <= 2e-2
    assert info.rel_err_after < info.rel_err_before


def test_rank_deficient_inputs_fall_back_to_the_minimum_norm_solution():
    torch.manual_seed(0)
    layer = nn.Linear(8, 5, bias=False).double()
    x_s, x_d = _pair((60, 8))
    x_s[:, 3] = x_s[:, 2]                               # two identical inputs: H is singular
    x_s[:, 7] = 0.0                                     # and a dead one
    mask = torch.ones(5, 8, dtype=torch.bool)
    mask[0, [2, 7]] = False                             # channel 0: one twin, not the dead one
    w, _, info = _rebuild(layer, mask, x_s, x_d)
    assert torch.isfinite(w).all()
    assert info.fallback == [1, 2, 3, 4] and math.isinf(info.cond_h)
    target = layer(x_d).detach()
    for o in range(5):
        keep = mask[o].numpy()
        ref = np.linalg.lstsq(x_s.numpy()[:, keep], target[:, o].numpy(), rcond=None)[0]
        assert np.abs(w[o].detach().numpy()[keep] - ref).max() <= 1e-6 * np.abs(ref).max()
    assert info.rel_err_after <= info.rel_err_before
    # the same data with damping: every channel factorises
    _, _, damped = _rebuild(layer, mask, x_s, x_d, damping=0.01)
    assert damped.fallback == []


def test_dead_layer_input_gives_zero_not_nan():
    layer = nn.Linear(4, 3, bias=False).double()
    zeros = torch.zeros(10, 4, dtype=F64)
    w, _, info = _rebuild(layer, torch.ones(3, 4, dtype=torch.bool), zeros, zeros)
    assert torch.equal(w, torch.zeros_like(w)) and info.fallback == [0, 1, 2]
    assert info.rel_err_before == info.rel_err_after == 0.0


@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_error_after_is_at_most_before_and_matches_the_direct_residual(damping):
    layer = _conv(6, 8, stride=2, padding=1, bias=True, seed=3)
    x_s, x_d = _pair((6, 6, 8, 8), seed=4, noise=0.5)
    mask = _mask(layer.weight.shape, keep=0.4, seed=5)
    w, b, info = _rebuild(layer, mask, x_s, x_d, damping=damping)
    assert info.rel_err_after < info.rel_err_before    # guaranteed only at damping 0
    ref = layer(x_d).detach()
    after = F.conv2d(x_s, w, b, stride=2, padding=1)
    before = F.conv2d(x_s, layer.weight.detach() * mask, layer.bias.detach(), stride=2,
                      padding=1)
    assert info.rel_err_after == pytest.approx(float((ref - after).norm() / ref.norm()),
                                               rel=1e-6)
    assert info.rel_err_before == pytest.approx(float((ref - before).norm() / ref.norm()),
                                                rel=1e-6)
    assert info.cond_h >= 1.0 and math.isfinite(info.cond_h)


def test_block_solving_equals_one_block():
    layer = _conv(6, 10, padding=1, bias=True, seed=7)
    x_s, x_d = _pair((3, 6, 6, 6))
    mask = _mask(layer.weight.shape, keep=0.5)
    mask[2] = True                                      # different kept counts per channel
    gram = _gram(layer, x_s, x_d)
    args = (layer.weight, mask, gram.H, gram.C, gram.D)
    w1, b1, one = solve(*args, damping=0.01, bias=layer.bias)
    wn, bn, many = solve(*args, damping=0.01, bias=layer.bias, block_bytes=1)
    assert one.blocks == 1 and many.blocks == 10
    assert _rel(wn, w1) <= 1e-12 and _rel(bn, b1) <= 1e-12


def test_solve_refuses_bad_arguments():
    layer = nn.Linear(4, 3, bias=False).double()
    x, _ = _pair((10, 4))
    gram = _gram(layer, x, x)
    full = torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask"):
        solve(layer.weight, full[:2], gram.H, gram.C)
    with pytest.raises(ValueError, match="damping"):
        solve(layer.weight, full, gram.H, gram.C, damping=-1.0)
    with pytest.raises(ValueError, match="prior"):
        solve(layer.weight, full, gram.H, gram.C, prior="ridge")
    with pytest.raises(ValueError, match="non-finite"):
        solve(layer.weight, full, gram.H * math.nan, gram.C)


def test_singular_threshold_is_far_above_float64_rounding():
    assert 1e3 * torch.finfo(F64).eps < SINGULAR_RTOL < 1e-6


@pytest.mark.gpu
def test_cuda_matches_cpu_and_is_deterministic():
    layer = _conv(8, 12, stride=2, padding=1, groups=2, bias=True)
    x_s, x_d = _pair((16, 8, 16, 16))
    mask = _mask(layer.weight.shape)
    w_cpu, b_cpu, _ = _rebuild(layer, mask, x_s, x_d, damping=0.01)
    cuda = layer.cuda()
    runs = [_rebuild(cuda, mask.cuda(), x_s.cuda(), x_d.cuda(), damping=0.01) for _ in range(2)]
    assert runs[0][0].device.type == "cuda"
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert _rel(runs[0][0].cpu(), w_cpu) <= 1e-10 and _rel(runs[0][1].cpu(), b_cpu) <= 1e-10
