"""Repair on the models and inputs users bring (issue #18): all or nothing, statistics that do not
depend on the chunking, half precision, BatchNorm variants, one graph per instance, no labels,
and mismatched or broken input models refused before any work, blaming the input at fault."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

import sparse_repair.repair.engine as engine
from sparse_repair.allocation import allocate
from sparse_repair.models import create_model, random_with_batch_statistics
from sparse_repair.pruning import prune_
from sparse_repair.repair import REPAIRS, PairedMethod, list_repairs, repair

# Every method that changes the model (the all-or-nothing and input checks are repair()'s, so
# they hold for each), and those that recalibrate BatchNorm statistics on the paired engine.
WRITING = [m for m in list_repairs() if m != "none"]
BN_METHODS = [m for m in list_repairs() if isinstance(REPAIRS[m], PairedMethod)]


# ----------------------------------------------------------------------------- helpers


class Small(nn.Module):
    """Three BNs, a residual sum (so ASR's scopes differ) and a linear head."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(x + self.bn3(self.conv3(y)))
        return self.head(x.mean((2, 3)))


def _with_statistics(model: nn.Module, seed: int = 0, side: int = 8) -> nn.Module:
    """Real BN running statistics: two train-mode passes on noise, then eval mode."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, 3, side, side, generator=g))
    return model.eval()


def _half_pruned(model: nn.Module, seed: int = 1) -> nn.Module:
    """A copy with half of every conv/linear weight zeroed at random (fixed seed)."""
    pruned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) > 0.5).to(m.weight))
    return pruned


def _images(n: int, seed: int = 2, side: int = 8, scale: float = 1.0, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g) * scale + offset


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    dense = _with_statistics(Small())
    return dense, _half_pruned(dense), _images(24)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equality here is bit identity, NaN payloads included."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _snapshot(model: nn.Module) -> dict:
    """Everything a repair may change; an uninitialised lazy tensor (no values) by identity."""
    tensors = model.state_dict(keep_vars=True)
    return {"state": {k: v if is_lazy(v) else v.detach().clone() for k, v in tensors.items()},
            "objects": {k: id(v) for k, v in tensors.items()},
            "modes": {n: m.training for n, m in model.named_modules()},
            "momenta": {n: m.momentum for n, m in model.named_modules()
                        if isinstance(m, _BatchNorm)},
            "grads": {n: p.requires_grad for n, p in model.named_parameters()}}


def _assert_unchanged(model: nn.Module, before: dict, what: str = "") -> None:
    now = model.state_dict(keep_vars=True)
    assert now.keys() == before["state"].keys(), f"{what}: tensors added or removed"
    for k, v in before["state"].items():
        if is_lazy(v):
            assert now[k] is v, f"{what}: lazy {k} was materialised"
            continue
        assert now[k].dtype == v.dtype and now[k].shape == v.shape, f"{what}: {k} changed kind"
        assert torch.equal(_bits(now[k]), _bits(v)), f"{what}: {k} is not bit-identical"
    assert {k: id(v) for k, v in now.items()} == before["objects"], \
        f"{what}: tensor objects were replaced (an optimiser holding them would be stale)"
    assert {n: m.training for n, m in model.named_modules()} == before["modes"], what
    assert {n: m.momentum for n, m in model.named_modules()
            if isinstance(m, _BatchNorm)} == before["momenta"], what
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["grads"], what


def _bn_state(model: nn.Module) -> dict:
    return {k: v.double() for k, v in model.state_dict().items()
            if v.is_floating_point() and k.rsplit(".", 1)[0] in engine.batchnorms(model)}


def _assert_close(a: dict, b: dict, rtol: float, atol: float, what: str) -> None:
    """|a - b| <= rtol * scale + atol per value, scale = |b|, and for a running mean |b| plus
    the channel's standard deviation: a mean near 0 has no relative accuracy of its own, its
    rounding is relative to the spread of the values it averages."""
    assert a.keys() == b.keys()
    for k in a:
        scale = b[k].abs()
        if k.endswith("running_mean"):
            scale = scale + b[k[:-len("mean")] + "var"].sqrt()
        diff = (a[k] - b[k]).abs() - rtol * scale
        assert (diff <= atol).all(), (
            f"{what}: {k} differs: {a[k].flatten()[:4].tolist()} vs {b[k].flatten()[:4].tolist()}")


# ----------------------------------------------------------------------------- 1. all or nothing


def test_empty_calibration_is_refused_and_nothing_changes(small):
    _, pruned, _ = small
    model = copy.deepcopy(pruned)
    before = _snapshot(model)
    for empty in (torch.empty(0, 3, 8, 8), iter([]), (b for b in [torch.empty(0, 3, 8, 8)])):
        with pytest.raises(ValueError, match="calibration set is empty"):
            repair(model, "bn_recal", empty)
        _assert_unchanged(model, before, "empty calibration")


def test_nan_calibration_images_are_named_by_index_and_nothing_changes(small):
    _, pruned, _ = small
    model = copy.deepcopy(pruned)
    before = _snapshot(model)
    x = torch.randn(6, 3, 8, 8)
    x[2, 0, 1, 1] = float("nan")
    x[4, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf \(2 of 6 images, first at index \[2, 4\]\)"
                                         r".*drop or re-load"):
        repair(model, "bn_recal", x)
    _assert_unchanged(model, before, "NaN calibration")


def test_mixed_dtype_or_numpy_calibration_batches_are_refused_and_nothing_changes(small):
    """torch.cat promotes a uint8 batch beside float ones silently (raw 0-255 pixels among
    normalized images); a numpy batch, or a bare numpy array, gets the conversion named."""
    import numpy as np

    _, pruned, _ = small
    model = copy.deepcopy(pruned)
    before = _snapshot(model)
    mixed = (b for b in [torch.randn(2, 3, 8, 8), torch.zeros(2, 3, 8, 8, dtype=torch.uint8)])
    with pytest.raises(TypeError, match=r"differ in dtype: batch 0 is torch.float32, batch 1 "
                                        r"is torch.uint8"):
        repair(model, "bn_recal", mixed)
    with pytest.raises(TypeError, match=r"got ndarray \(torch.from_numpy"):
        repair(model, "bn_recal", (b for b in [np.zeros((2, 3, 8, 8), np.float32)]))
    with pytest.raises(TypeError, match=r"calibration is a numpy ndarray; pass a tensor .*"
                                        r"torch.from_numpy\(images\)"):
        repair(model, "bn_recal", np.zeros((2, 3, 8, 8), np.float32))  # not "batches"
    with pytest.raises(ValueError, match="meta device"):
        repair(model, "bn_recal", torch.empty(2, 3, 8, 8, device="meta"))
    _assert_unchanged(model, before, "mixed calibration")


def _fail_at(monkeypatch, method: str, k: int, how: str) -> list:
    """Patch ``method``'s per-BN update: at the k-th BN, after the real update wrote (so the
    BN really is changed), raise (how="raise") or write a NaN (how="nan")."""
    klass = type(REPAIRS[method])
    real = klass.update
    calls = []

    def update(self, opts, site, m):
        record = real(self, opts, site, m)
        calls.append(site.name)
        if len(calls) == k + 1:
            if how == "raise":
                raise RuntimeError("injected failure")
            site.bn.running_var[0] = float("nan")
        return record

    monkeypatch.setattr(klass, "update", update)
    return calls


@pytest.mark.parametrize("path", ["onepass", "rerun"])
@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("method", BN_METHODS)
def test_failure_at_any_bn_restores_the_exact_state(small, monkeypatch, method, how, path):
    dense, pruned, calib = small
    model = copy.deepcopy(pruned).train()          # modes must come back too
    model.bn2.momentum = 0.3
    model.conv1.weight.requires_grad_(False)
    before = _snapshot(model)
    n_bns = len(engine.batchnorms(model))
    for k in range(n_bns):
        with monkeypatch.context() as mp:
            calls = _fail_at(mp, method, k, how)
            error = RuntimeError if how == "raise" else FloatingPointError
            with pytest.raises(error):
                repair(model, method, calib, dense=dense, chunk_size=10, path=path)
            # a NaN is caught by the next BN's write (its input is NaN) or by the final check
            assert len(calls) == k + 1 if how == "raise" else len(calls) >= k + 1, \
                f"{method}: the failure was not injected at BN {k}"
        _assert_unchanged(model, before, f"{method} failing at BN {k} ({how}, {path})")
    # and the same model still repairs normally afterwards
    repair(model, method, calib, dense=dense, chunk_size=10, path=path)
    assert not torch.equal(model.bn1.running_mean, before["state"]["bn1.running_mean"])


@pytest.mark.parametrize("method", WRITING)
def test_failure_anywhere_restores_every_method(small, monkeypatch, method):
    """Method-agnostic (any registered method, paired or its own pass): the k-th BatchNorm2d
    forward of the repair raises, after whatever the method wrote before it, for k a third,
    two thirds and all the way through a normal run's BN calls."""
    dense, pruned, calib = small
    real = nn.BatchNorm2d.forward
    calls = [0, None]                      # calls so far, the call that raises

    def forward(self, x):
        calls[0] += 1
        if calls[0] == calls[1]:
            raise RuntimeError("injected failure")
        return real(self, x)

    monkeypatch.setattr(nn.BatchNorm2d, "forward", forward)
    repair(copy.deepcopy(pruned), method, calib, dense=dense, chunk_size=10)
    total = calls[0]
    model = copy.deepcopy(pruned).train()
    before = _snapshot(model)
    for k in sorted({total // 3, 2 * total // 3, total}):
        calls[:] = [0, k]
        with pytest.raises(RuntimeError, match="injected"):
            repair(model, method, calib, dense=dense, chunk_size=10)
        _assert_unchanged(model, before, f"{method} failing at BN call {k} of {total}")


def test_interrupt_restores_too(small, monkeypatch):
    """KeyboardInterrupt is not an Exception; the model is restored all the same."""
    dense, pruned, calib = small
    model = copy.deepcopy(pruned)
    before = _snapshot(model)
    klass = type(REPAIRS["asr"])
    real = klass.update

    def update(self, opts, site, m):
        real(self, opts, site, m)
        raise KeyboardInterrupt

    monkeypatch.setattr(klass, "update", update)
    with pytest.raises(KeyboardInterrupt):
        repair(model, "asr", calib, dense=dense)
    _assert_unchanged(model, before, "interrupted")


def test_value_out_of_the_dtype_range_is_refused_before_writing(small):
    """float16 holds at most 65504: a variance beyond it raises and leaves the model as it was,
    rather than writing inf."""
    dense, _, _ = small
    model = copy.deepcopy(dense).half()
    before = _snapshot(model)
    big = _images(16, scale=3000.0).half()          # conv1's output variance ~1e6
    for method in ("bn_recal", "channelwise"):
        with pytest.raises(FloatingPointError, match="bn1.*float16"):
            repair(model, method, big)
        _assert_unchanged(model, before, method)


# ----------------------------------------------------------------------------- 2. chunking


def test_bn_recal_is_the_pooled_statistic_with_a_one_image_tail_chunk():
    """The issue's example: 257 images in chunks of 256 put a 1-image tail chunk next to a
    256-image one; a train-mode pass (momentum None) weighs both alike and the first BN's
    running_var came out 7% off. Right: the pooled unbiased variance of bn1's input."""
    dense = random_with_batch_statistics("resnet20")
    pruned = copy.deepcopy(dense)
    prune_(pruned, allocate(pruned, "erk", 0.9))
    calib = torch.randn(257, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        s = pruned.conv1(calib).double()
    model = copy.deepcopy(pruned)
    report = repair(model, "bn_recal", calib)
    assert report.path == "onepass" and report.options["chunk_size"] == 256
    want_var, want_mean = s.var((0, 2, 3), unbiased=True), s.mean((0, 2, 3))
    assert torch.allclose(model.bn1.running_var.double(), want_var, rtol=1e-6)
    assert torch.allclose(model.bn1.running_mean.double(), want_mean, rtol=1e-6, atol=1e-7)


def test_bn_recal_equals_a_train_mode_pass_over_one_batch(small):
    """With the whole set in one batch a train-mode pass is exact at the first BN; later BNs
    differ by the train-mode normalisation with the biased variance (factor n / (n - 1) in the
    scale, n = 24 * 64 values per channel here: 7e-4)."""
    _, pruned, calib = small
    ours, ref = copy.deepcopy(pruned), copy.deepcopy(pruned)
    repair(ours, "bn_recal", calib, chunk_size=5)
    torch.optim.swa_utils.update_bn([calib], ref)
    assert torch.allclose(ours.bn1.running_var, ref.bn1.running_var, rtol=1e-5)
    assert torch.allclose(ours.bn1.running_mean, ref.bn1.running_mean, rtol=1e-5, atol=1e-6)
    for name in ("bn2", "bn3"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert torch.allclose(a.running_var, b.running_var, rtol=3e-3), name
        assert torch.allclose(a.running_mean, b.running_mean, rtol=3e-3, atol=1e-3), name


_REFERENCE: dict = {}


def _chunk_reference(method: str, data: str):
    key = (method, data)
    if key not in _REFERENCE:
        dense, pruned, calib = _chunk_case(data)
        model = copy.deepcopy(pruned)
        repair(model, method, calib, dense=dense, chunk_size=len(calib))
        _REFERENCE[key] = _bn_state(model)
    return _REFERENCE[key]


_CASES: dict = {}


def _chunk_case(data: str):
    """'plain': noise images; 'stale': the BNs' running means and variances reset to 0 and 1
    while the images have mean 20 (a reference shift far from the data)."""
    if data not in _CASES:
        torch.manual_seed(0)
        dense = _with_statistics(Small())
        pruned = _half_pruned(dense)
        calib = _images(13, seed=5)
        if data == "stale":
            for bn in engine.batchnorms(pruned).values():
                bn.reset_running_stats()
            calib = calib + 20.0
        _CASES[data] = (dense, pruned, calib)
    return _CASES[data]


@settings(max_examples=40, deadline=None)
@given(chunk=st.integers(1, 13), method=st.sampled_from(BN_METHODS),
       path=st.sampled_from(["onepass", "rerun"]))
def test_statistics_do_not_depend_on_the_chunking(chunk, method, path):
    dense, pruned, calib = _chunk_case("plain")
    model = copy.deepcopy(pruned)
    repair(model, method, calib, dense=dense, chunk_size=chunk, path=path)
    _assert_close(_bn_state(model), _chunk_reference(method, "plain"), 1e-6, 1e-9,
                  f"{method}, chunk {chunk}, {path}")


@settings(max_examples=20, deadline=None)
@given(chunk=st.integers(1, 13), path=st.sampled_from(["onepass", "rerun"]))
def test_bn_recal_chunking_with_stale_running_means(chunk, path):
    """bn_recal sums each chunk about its own mean: a reset running mean (0) far from the data
    (mean ~20 at the input) costs no digits."""
    _, pruned, calib = _chunk_case("stale")
    model = copy.deepcopy(pruned)
    repair(model, "bn_recal", calib, chunk_size=chunk, path=path)
    _assert_close(_bn_state(model), _chunk_reference("bn_recal", "stale"), 1e-6, 1e-9,
                  f"stale, chunk {chunk}, {path}")


# ----------------------------------------------------------------------------- 3. half precision


def test_half_precision_conv_bn_repairs_finitely():
    """The issue's example: a .half() Conv2d(3, 4, 3) + BatchNorm2d(4) on 16 images of 32x32
    scaled by 4 wrote running_var = inf (the float16 sum of squares overflowed) and raised."""
    torch.manual_seed(0)
    dense32 = _with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), side=32)
    calib = _images(16, side=32, scale=4.0)
    for method in ("channelwise", "asr"):
        want = copy.deepcopy(dense32).half().float()       # same rounded weights, in fp32
        repair(want, method, calib, dense=copy.deepcopy(dense32).half().float())
        model = copy.deepcopy(dense32).half()
        repair(model, method, calib.half(), dense=copy.deepcopy(dense32).half())
        var = model[1].running_var
        assert var.dtype == torch.float16 and torch.isfinite(var).all(), method
        assert torch.allclose(var.float(), want[1].running_var, rtol=4e-3), method


# Tolerance for a float16/bfloat16 model against the float32 repair of the same weights rounded
# to the dtype (so only the computation in the dtype differs): every conv and BN output is
# rounded to the dtype's unit roundoff u (2^-11 float16, 2^-8 bfloat16), and a statistic, a mean
# over 24 x 64 such values, keeps about that relative error; through Small's three conv+BN
# layers it measured at most 1.2 u (relative to |value|, and for a mean to |mean| + sd). 8 u
# leaves room for other conv kernels; the moments themselves are summed in float32.
_UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", BN_METHODS)
def test_low_precision_models_repair_like_float32(small, method, dtype):
    dense, pruned, calib = small
    dense_r = copy.deepcopy(dense).to(dtype).float()          # weights rounded to the dtype
    want = copy.deepcopy(pruned).to(dtype).float()
    repair(want, method, calib, dense=dense_r)
    model = copy.deepcopy(pruned).to(dtype)
    report = repair(model, method, calib, dense=copy.deepcopy(dense).to(dtype))
    for k, v in model.state_dict().items():
        assert v.dtype == (dtype if v.is_floating_point() else v.dtype)
        if v.is_floating_point():
            assert torch.isfinite(v).all(), f"{method}/{dtype}: non-finite {k}"
    tol = 8 * _UNIT_ROUNDOFF[dtype]
    _assert_close(_bn_state(model), _bn_state(want), tol, tol, f"{method}/{dtype}")
    assert report.path == "onepass"


def test_images_are_cast_to_the_model_dtype(small):
    """float32 images into a float16 model: cast once, as the model would need them."""
    dense, pruned, calib = small
    a, b = copy.deepcopy(pruned).half(), copy.deepcopy(pruned).half()
    repair(a, "asr", calib, dense=copy.deepcopy(dense).half())
    repair(b, "asr", calib.half(), dense=copy.deepcopy(dense).half())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


# ----------------------------------------------------------------------------- 4. BN variants


class Variants(nn.Module):
    """One of each: a BatchNorm2d, an untracked one, one called twice, a never-called one, an
    affine=False one, and a BatchNorm1d on the pooled features."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.untracked = nn.BatchNorm2d(c, track_running_stats=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.twice = nn.BatchNorm2d(c)
        self.unused = nn.BatchNorm2d(c)
        self.plain = nn.BatchNorm2d(c, affine=False)
        self.fc = nn.Linear(c, 5)
        self.bn1d = nn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.untracked(x)
        x = self.twice(self.conv2(x))
        x = torch.relu(self.twice(x))
        x = self.plain(x)
        return self.bn1d(self.fc(x.mean((2, 3))))


@pytest.fixture(scope="module")
def variants():
    torch.manual_seed(0)
    dense = _with_statistics(Variants())
    return dense, _half_pruned(dense), _images(20)


@pytest.mark.parametrize("method", BN_METHODS)
def test_bn_variants_are_repaired_or_skipped_with_a_reason(variants, method):
    dense, pruned, calib = variants
    a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
    ra = repair(a, method, calib, dense=dense, chunk_size=7)
    rb = repair(b, method, calib, dense=dense, chunk_size=7, path="rerun")
    assert (ra.path, rb.path) == ("onepass", "rerun")
    assert [ly["name"] for ly in ra.layers] == ["bn1", "untracked", "twice", "plain", "bn1d",
                                                "unused"], "forward order, never-called last"
    assert set(ra.skipped) == {"untracked", "twice", "unused"}
    assert "track_running_stats=False" in ra.skipped["untracked"]
    assert "called 2 times" in ra.skipped["twice"]
    assert "not called" in ra.skipped["unused"]
    for name in ("twice", "unused"):
        for buf in ("running_mean", "running_var", "weight"):
            assert torch.equal(getattr(getattr(a, name), buf), getattr(getattr(pruned, name), buf))
    for name in ("bn1", "plain", "bn1d"):
        assert not torch.equal(getattr(a, name).running_var, getattr(pruned, name).running_var)
    if method in ("asr", "clipped_asr"):
        plain = next(ly for ly in ra.layers if ly["name"] == "plain")
        assert "affine=False" in plain["note"]
    _assert_close(_bn_state(a), _bn_state(b), 1e-5, 1e-7, f"{method}: paths differ")


class UntraceableVariants(Variants):
    """The same model with data-dependent control flow: torch.fx cannot trace it, so the re-run
    path runs, and its plan comes from the probe forward alone."""

    def forward(self, x):
        if x.sum() > float("inf"):
            return x
        return super().forward(x)


def test_bn_variants_on_a_model_that_does_not_trace(variants):
    dense, pruned, calib = variants
    u_dense, u_pruned = UntraceableVariants(), UntraceableVariants()
    u_dense.load_state_dict(dense.state_dict())
    u_pruned.load_state_dict(pruned.state_dict())
    u_dense.eval(), u_pruned.eval()
    a, b = copy.deepcopy(pruned), u_pruned
    repair(a, "asr", calib, dense=dense, chunk_size=7)
    report = repair(b, "asr", calib, dense=u_dense, chunk_size=7)
    assert report.path == "rerun" and set(report.skipped) == {"untracked", "twice", "unused"}
    _assert_close(_bn_state(b), _bn_state(a), 1e-5, 1e-7, "untraceable")


def test_batchnorm1d_bn_recal_is_the_pooled_statistic(variants):
    """bn1d's input pooled over the chunks, each run in eval mode through the repaired model.
    Per chunk, because the untracked BN upstream normalises each chunk by its own statistics:
    in a model with such a BN, what later BNs see depends on the chunking, as in its inference."""
    _, pruned, calib = variants
    model = copy.deepcopy(pruned)
    repair(model, "bn_recal", calib, chunk_size=3)
    feats = []
    model.fc.register_forward_hook(lambda m, i, o: feats.append(o.double()))
    with torch.no_grad():
        for x in torch.split(calib, 3):
            model(x)
    f = torch.cat(feats)
    assert torch.allclose(model.bn1d.running_mean.double(), f.mean(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(model.bn1d.running_var.double(), f.var(0, unbiased=True), rtol=1e-5)


def test_sync_batchnorm_repairs_like_batchnorm(small):
    """SyncBatchNorm in eval mode is F.batch_norm with its running statistics, on CPU too; the
    repair never puts a BN in training mode, so no process group is needed."""
    dense, pruned, calib = small
    sync_dense = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(dense))
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(pruned))
    assert isinstance(sync.bn1, nn.SyncBatchNorm)
    for method in BN_METHODS:
        a, b = copy.deepcopy(sync), copy.deepcopy(pruned)
        repair(a, method, calib, dense=sync_dense)
        repair(b, method, calib, dense=dense)
        _assert_close(_bn_state(a), _bn_state(b), 1e-6, 1e-8, method)


def test_batchnorm3d_is_repaired():
    class Video(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm3d(4)

        def forward(self, x):            # images [N, 3, H, W] as a 1-channel volume
            return self.bn(self.conv(x.unsqueeze(1)))

    torch.manual_seed(0)
    model = Video().eval()
    calib = _images(6)
    report = repair(model, "bn_recal", calib, chunk_size=4)
    with torch.no_grad():
        s = model.conv(calib.unsqueeze(1)).double()
    assert report.layers[0]["name"] == "bn"
    assert torch.allclose(model.bn.running_var.double(), s.var((0, 2, 3, 4)), rtol=1e-5)


def test_uninitialised_lazy_batchnorm_is_refused_before_any_change():
    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LazyBatchNorm2d())

    model = make()
    before = _snapshot(model)
    for method in WRITING:
        with pytest.raises(ValueError, match=r"'2' \(LazyBatchNorm2d\) is uninitialised"):
            repair(model, method, _images(4), dense=make())
        _assert_unchanged(model, before, method)
    assert isinstance(model[2], nn.LazyBatchNorm2d)


def test_initialised_lazy_batchnorm_is_an_ordinary_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    model(_images(4))
    model.eval()
    repair(model, "bn_recal", _images(4))
    assert model[1].running_var.shape == (4,)


def test_only_untracked_batchnorms_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="no BatchNorm of the model can be repaired"):
        repair(model, "channelwise", _images(4))
    _assert_unchanged(model, before, "untracked only")


def test_bn_recal_needs_two_values_per_channel():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.BatchNorm1d(4)).eval()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="at least 2"):
        repair(model, "bn_recal", _images(1))
    _assert_unchanged(model, before, "one value per channel")
    repair(model, "bn_recal", _images(2))


# ----------------------------------------------------------------------------- 5. graphs


class Flagged(nn.Module):
    """A Python attribute changes the control flow of forward, which torch.fx bakes in."""

    def __init__(self, flag: bool) -> None:
        super().__init__()
        self.flag = flag
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        if self.flag:
            x = torch.relu(x) * 3.0 + 1.0
        return self.bn2(self.conv2(x))


def _flagged(flag: bool) -> nn.Module:
    torch.manual_seed(0)
    return Flagged(flag).eval()


def _direct_bn2_mean(model: Flagged, calib) -> torch.Tensor:
    """bn2's running_mean after channelwise, computed by hand: bn1 first, then bn2's input."""
    with torch.no_grad():
        s1 = model.conv1(calib).double()
        m1, v1 = s1.mean((0, 2, 3)), s1.var((0, 2, 3), unbiased=False)
        b = model.bn1
        x = ((s1 - m1.view(1, -1, 1, 1)) / torch.sqrt(v1.view(1, -1, 1, 1) + b.eps)
             * b.weight.double().view(1, -1, 1, 1) + b.bias.double().view(1, -1, 1, 1))
        if model.flag:
            x = torch.relu(x) * 3.0 + 1.0
        return model.conv2.double()(x).mean((0, 2, 3))


def test_a_graph_is_never_reused_for_another_instance():
    calib = _images(16)
    first = _flagged(True)
    repair(copy.deepcopy(first), "channelwise", calib)       # caches Flagged(flag=True)'s graph
    model = _flagged(False)
    want = _direct_bn2_mean(copy.deepcopy(model), calib)
    onepass, rerun = copy.deepcopy(model), copy.deepcopy(model)
    assert repair(onepass, "channelwise", calib).path == "onepass"
    repair(rerun, "channelwise", calib, path="rerun")
    assert torch.allclose(onepass.bn2.running_mean.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(rerun.bn2.running_mean.double(), want, rtol=1e-5, atol=1e-6)


def test_changing_an_attribute_of_one_instance_retraces():
    calib = _images(16)
    model = _flagged(True)
    repair(copy.deepcopy(model), "channelwise", calib)
    model.flag = False                                        # same instance, other forward
    want = _direct_bn2_mean(copy.deepcopy(model), calib)
    repair(model, "channelwise", calib)
    assert torch.allclose(model.bn2.running_mean.double(), want, rtol=1e-5, atol=1e-6)


def test_copies_share_a_trace_and_unkeyable_models_trace_every_time(monkeypatch):
    traces = []
    real = torch.fx.symbolic_trace
    monkeypatch.setattr(torch.fx, "symbolic_trace", lambda m: traces.append(m) or real(m))
    model = _flagged(True)
    model.extra_depth = 7                    # a plain attribute: a key no other test cached
    for _ in range(3):
        repair(copy.deepcopy(model), "channelwise", _images(4))
    assert len(traces) == 1, "deep copies of one model must share its cached trace"
    model.scale = torch.ones(1)              # a plain tensor attribute: no key, trace each time
    for _ in range(2):
        repair(copy.deepcopy(model), "channelwise", _images(4))
    assert len(traces) == 3


def test_dense_with_another_forward_is_refused():
    pruned, dense = _flagged(False), _flagged(True)
    before = _snapshot(pruned)
    with pytest.raises(ValueError, match="dense does not match pruned.*different graphs"):
        repair(pruned, "asr", _images(8), dense=dense)
    _assert_unchanged(pruned, before, "dense with another forward")


# ----------------------------------------------------------------------------- 8. labels


class _Poison:
    def __getattribute__(self, name):
        raise AssertionError("repair code touched a label")


@pytest.mark.parametrize("batch", ["list_labels", "list_targets", "tuple", "list_in_iter",
                                   "dict_in_iter", "dict"])
def test_any_list_or_tuple_batch_is_refused_before_anything_is_read(small, batch):
    dense, pruned, calib = small
    x = calib[:8]
    given = {"list_labels": [x, _Poison()], "list_targets": [x, torch.randn_like(x)],
             "tuple": (x, _Poison()), "list_in_iter": iter([[x, _Poison()]]),
             "dict_in_iter": iter([{"image": x}]), "dict": {"image": x}}[batch]
    model = copy.deepcopy(pruned)
    before = _snapshot(model)
    with pytest.raises(TypeError, match="label-free|image tensor"):
        repair(model, "asr", given, dense=dense)
    _assert_unchanged(model, before, batch)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "8"])
def test_bad_chunk_size_is_refused(small, chunk_size):
    dense, pruned, calib = small
    _refused(copy.deepcopy(pruned), "asr", calib, "chunk_size", dense=dense,
             chunk_size=chunk_size)


def test_a_generator_of_tensors_equals_one_tensor(small):
    dense, pruned, calib = small
    a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
    repair(a, "asr", (calib[i:i + 5] for i in range(0, len(calib), 5)), dense=dense)
    repair(b, "asr", calib, dense=dense)
    _assert_close(_bn_state(a), _bn_state(b), 1e-6, 1e-9, "generator")


# ----------------------------------------------------------------------------- 12. mismatches


@pytest.fixture(scope="module")
def resnet20_pair():
    dense = random_with_batch_statistics("resnet20")
    pruned = copy.deepcopy(dense)
    prune_(pruned, allocate(pruned, "erk", 0.9))
    return dense, pruned, _images(8, side=32)


def _refused(model, method, calib, match, **kw):
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        repair(model, method, calib, **kw)
    _assert_unchanged(model, before, match)


def test_another_architecture_as_dense_is_refused(resnet20_pair):
    _, pruned, calib = resnet20_pair
    _refused(pruned, "asr", calib, r"dense does not match pruned.*only in dense",
             dense=create_model("resnet56"))


def test_the_pruned_model_as_dense_is_refused(resnet20_pair):
    _, pruned, calib = resnet20_pair
    _refused(pruned, "asr", calib, "dense is the pruned model itself", dense=pruned)


def test_a_dense_sharing_the_pruned_parameters_is_refused(resnet20_pair):
    _, pruned, calib = resnet20_pair
    _refused(pruned, "asr", calib, "dense shares tensor", dense=copy.copy(pruned))
    wrapped = nn.Sequential()
    wrapped.add_module("m", pruned)
    for name, mod in pruned.named_children():   # same modules under the same names
        setattr(wrapped, name, mod)
    del wrapped.m
    _refused(pruned, "channelwise", calib, "dense shares tensor", dense=wrapped)


def test_dense_of_other_width_or_dtype_is_refused(resnet20_pair):
    dense, pruned, calib = resnet20_pair
    other = copy.deepcopy(dense)
    other.conv1 = nn.Conv2d(3, 16, 5, padding=2, bias=False)
    _refused(pruned, "asr", calib, r"'conv1.weight' is \[16, 3, 5, 5\]", dense=other)
    _refused(pruned, "asr", calib, "float64", dense=copy.deepcopy(dense).double())


@pytest.mark.parametrize("role", ["pruned", "dense"])
@pytest.mark.parametrize("what", ["running_var", "running_mean", "weight"])
def test_non_finite_input_models_are_blamed_on_the_input(resnet20_pair, role, what):
    dense, pruned, calib = resnet20_pair
    d, p = copy.deepcopy(dense), copy.deepcopy(pruned)
    broken = p if role == "pruned" else d
    with torch.no_grad():
        getattr(broken.layer2[1].bn1, what)[3] = float("nan")
    for method in WRITING:
        _refused(p, method, calib,
                 rf"the {role} model is broken: BatchNorm 'layer2.1.bn1' has a non-finite {what}",
                 dense=d)


def test_non_finite_weight_and_negative_variance_are_refused(resnet20_pair):
    dense, pruned, calib = resnet20_pair
    p = copy.deepcopy(pruned)
    with torch.no_grad():
        p.layer1[0].conv2.weight[0, 0, 0, 0] = float("inf")
    _refused(p, "bn_recal", calib, r"'layer1.0.conv2.weight' is non-finite")
    p = copy.deepcopy(pruned)
    with torch.no_grad():
        p.bn1.running_var[2] = -1.0
    _refused(p, "asr", calib, "BatchNorm 'bn1' has a negative running_var", dense=dense)


@pytest.mark.parametrize("method", sorted(REPAIRS))
def test_wrong_channel_count_names_the_first_layer(resnet20_pair, method):
    """Every method, BN-based or not (reconstruct once gave a raw conv error), refuses images
    with the wrong channel count by name before changing anything."""
    dense, pruned, _ = resnet20_pair
    gray = torch.randn(4, 1, 32, 32)
    _refused(pruned, method, gray, r"1 channel but the pruned model's first layer 'conv1' "
             r"\(Conv2d\) expects 3", dense=dense)


def test_torch_prune_reparametrisation_matches_its_dense(small):
    """torch.nn.utils.prune keeps weight_orig and weight_mask: it is the same model."""
    dense, _, calib = small
    pruned = copy.deepcopy(dense)
    for m in (pruned.conv1, pruned.conv2, pruned.conv3):
        torch_prune.l1_unstructured(m, "weight", amount=0.5)
    report = repair(pruned, "asr", calib, dense=dense)
    assert report.path == "onepass" and not report.skipped
