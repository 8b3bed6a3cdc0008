"""Repair speed: the one-pass engine costs at most 1.5x one dense plus one pruned eval-mode
forward pass over the same calibration images (asr), and the layer-wise reconstruction at most
3x (issue #17's goal, ResNet-20 and ResNet-56), measured side by side in the same test. On a CPU
kind where a goal is not met, the bound is the measured ratio x 1.2, recorded and accepted in
baselines/cpu_speed_bounds.json (AMX-class Xeons: asr 2.6x).
GPU lane (--gpu): the same on CUDA, agreement with the CPU path, and absolute budgets per card."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import GPU_BUDGET_FILE, GPU_UPDATES, load_json
from sparse_repair.allocation import allocate
from sparse_repair.evaluate import forward_seconds
from sparse_repair.models import random_with_batch_statistics
from sparse_repair.pruning import prune_
from sparse_repair.repair import repair

RATIO_BOUND = 1.5          # asr / (dense forward + pruned forward): the goal; the GPU bound
# The CPU gate reads its bounds per CPU kind from this file: the goals by default, a measured
# bound (x 1.2) for a kind where a goal is not met, with who accepted it and why.
CPU_BOUND_FILE = Path(__file__).resolve().parents[1] / "baselines" / "cpu_speed_bounds.json"
# reconstruct time / (dense forward + pruned forward): issue #17's cost goal on CPU. It does a
# one-pass walk of each model like asr, plus per layer an unfold of 4,096 sampled positions
# into float64 patch columns, three K x K Gram products and a batched Cholesky solve.
RECONSTRUCT_BOUND = 3.0
RECONSTRUCT_MODELS = {"resnet20", "resnet56"}   # the issue's; ResNet-18 (K = 4,608 > 4,096
                                                # default positions) is not gated
# Both are gated in the default lane. ResNet-56 was briefly --nightly only after it read 3.14x
# at a load average of ~20 (2 cores shared by ~10 processes): oversubscribed OpenMP threads slow
# reconstruct's many small float64 ops far more than the large convs of the reference forwards,
# so that ratio measured the load, not the method. On the quiet machine it read 1.83x, and 1.44x
# once the Gram products were batched per layer and the subsample gathered without padding
# (`python scripts/reconstruct_cost.py`, old and new code side by side, 2026-11-29).
CALIB = 1024               # calibration images
CHUNK = 256                # images per chunk, for the repair and the reference forwards
BUDGET_HEADROOM = 1.2      # recorded GPU budgets = measured * 1.2


def _pair(name: str, device: str, seed: int = 0):
    """A dense model with real BN statistics (two train-mode passes on noise) and its ERK-90%
    copy; random weights suffice for timing and for CPU/GPU agreement."""
    dense = random_with_batch_statistics(name, seed).to(device)
    pruned = copy.deepcopy(dense)
    prune_(pruned, allocate(pruned, "erk", 0.9))
    g = torch.Generator().manual_seed(seed)
    calib = torch.randn(CALIB, 3, 32, 32, generator=g).to(device)
    return dense, pruned, calib


def _time_methods(name: str, device: str, methods, rounds: int,
                  gated: tuple[str, ...] = ("asr",)) -> dict:
    """Best-of-``rounds`` seconds for the reference forwards and the gated methods, measured
    interleaved: each round times the two forwards and then each gated repair back to back, so
    the minima come from the same stretches of machine time. Measured in sequence (all
    reference rounds first, best of 2), a slow spell on the shared 2-core CI runner fell on the
    repair alone and CI read ResNet-56 at 1.51x and then 1.56x (docs/RESULTS.md section 4).
    The other methods are timed once on CPU (one ResNet-56 round of bn_recal + clipped_asr costs
    about 15 s of the suite, docs/RESULTS.md section 4), ``rounds`` times on CUDA."""
    dense, pruned, calib = _pair(name, device)
    forward_seconds(dense, calib[:CHUNK], CHUNK)  # warm-up (allocator, cuDNN autotune)
    for method in gated:
        repair(copy.deepcopy(pruned), method, calib[:CHUNK], dense=dense)

    def timed(method: str) -> tuple[float, object]:
        report = repair(copy.deepcopy(pruned), method, calib, dense=dense, chunk_size=CHUNK)
        return report.seconds, report

    ref, best, reports = float("inf"), {m: float("inf") for m in methods}, {}
    for r in range(rounds):
        ref = min(ref, forward_seconds(dense, calib, CHUNK) + forward_seconds(pruned, calib, CHUNK))
        for method in methods:
            if method in gated or device != "cpu" or r == 0:
                seconds, reports[method] = timed(method)
                best[method] = min(best[method], seconds)
    out = {"reference_s": ref, "rounds": rounds}
    for method in methods:
        report = reports[method]
        out[method] = {"seconds": best[method], "ratio": best[method] / ref,
                       "passes_dense": report.passes_dense, "passes_pruned": report.passes_pruned,
                       "path": report.path}
        if report.method == "reconstruct":   # channels solved by pseudo-inverse cost more
            out[method]["fallback"] = sum(lay.get("fallback", 0) for lay in report.layers)
    return out


CPU_MODELS = ["resnet20", "resnet56", "resnet18"]


def pytest_generate_tests(metafunc):
    if "cpu_model" in metafunc.fixturenames:
        # CIFAR ResNet-18 needs ~4 min on 2 cores for this test; it runs with --nightly.
        full = metafunc.config.getoption("--nightly")
        metafunc.parametrize("cpu_model", [m for m in CPU_MODELS if full or m != "resnet18"])


def cpu_kind() -> str:
    """torch's CPU capability (AVX2, AVX512, ...), '+AMX' where the CPU has AMX tiles: the
    kinds whose conv speed differs enough to move the ratios (baselines/cpu_speed_bounds.json)."""
    kind = torch.backends.cpu.get_cpu_capability()
    try:
        with open("/proc/cpuinfo") as f:
            if " amx_tile" in f.read():
                kind += "+AMX"
    except OSError:  # not Linux
        pass
    return kind


def cpu_bounds(kind: str) -> dict[str, float]:
    data = load_json(CPU_BOUND_FILE)
    return {**data["default"], **{k: v for k, v in data["kinds"].get(kind, {}).items()
                                  if k in data["default"]}}


def test_cpu_bound_file_keeps_the_goals_and_says_why_a_kind_misses_them():
    data = load_json(CPU_BOUND_FILE)
    assert data["default"] == {"asr": RATIO_BOUND, "reconstruct": RECONSTRUCT_BOUND}
    for kind, entry in data["kinds"].items():
        assert entry["accepted"] and entry["command"] and entry["measured"], kind
        for method, bound in data["default"].items():
            assert entry.get(method, bound) >= bound, f"{kind}: a bound below the goal"


def test_cpu_repair_within_ratio(benchmark, cpu_model):
    gated = ("asr", "reconstruct") if cpu_model in RECONSTRUCT_MODELS else ("asr",)
    kind = cpu_kind()
    bounds = cpu_bounds(kind)
    methods = ["bn_recal", "asr", "clipped_asr", *gated[1:]]
    results = {}
    benchmark.pedantic(lambda: results.update(_time_methods(
        cpu_model, "cpu", methods, rounds=3, gated=gated)), rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    failures = []
    benchmark.extra_info["cpu_kind"] = kind
    for method in gated:
        bound = bounds[method]
        got = results[method]
        assert got["path"] == "onepass" and got["passes_pruned"] == 1 and \
            got["passes_dense"] == 1, f"{cpu_model}/{method}: {got}"
        if got["ratio"] > bound:
            failures.append(
                f"{cpu_model}: {method} took {got['seconds']:.2f}s = {got['ratio']:.2f}x one "
                f"dense + one pruned forward ({results['reference_s']:.2f}s); bound {bound}x "
                f"on CPU kind {kind} (baselines/cpu_speed_bounds.json)")
    assert not failures, "\n".join(failures)


GPU_MODELS = ["resnet18", "resnet50", "densenet121"]
_GPU_TIMES: dict[str, dict] = {}


def _gpu_times(name: str) -> dict:
    if name not in _GPU_TIMES:
        _GPU_TIMES[name] = _time_methods(name, "cuda", ["bn_recal", "asr", "clipped_asr"],
                                         rounds=3)
    return _GPU_TIMES[name]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["asr", "clipped_asr"])
@pytest.mark.parametrize("name", GPU_MODELS)
def test_gpu_matches_cpu(name, method):
    """The CUDA path computes what the CPU path computes. Compared in float64: in float32 the
    two devices' conv accumulation orders differ by ~1e-7 relative, and after ~50 pruned layers
    the kappa of weakly correlated channels differed by up to 5e-4 relative on an H200 (first
    GPU run, 2026-11-27), which is hardware rounding, not the engine."""
    pairs = []
    for device in ("cuda", "cpu"):
        dense, pruned, calib = _pair(name, device)
        dense, pruned, calib = dense.double(), pruned.double(), calib.double()
        repair(pruned, method, calib, dense=dense)
        pairs.append(pruned.state_dict())
    for (k, vg), vc in zip(pairs[0].items(), pairs[1].values()):
        if ("bn" in k or "norm" in k) and vg.is_floating_point():
            diff = (vg.cpu() - vc).abs() - 1e-4 * vc.abs()
            worst = int(diff.flatten().argmax())
            assert (diff <= 1e-8).all(), (
                f"{name}/{method}: {k} differs between CUDA and CPU at [{worst}]: "
                f"{vg.flatten()[worst].item():.8g} vs {vc.flatten()[worst].item():.8g}")


# DenseNet-121 measured 2.46x on an H200 (docs/RESULTS.md section 4): every BN's input is the
# growing concatenation of all earlier features, and the statistics were summed afresh for each.
# The engine now reuses the moments of channels an earlier BN summed (CPU: 1.55x -> 1.38x,
# scripts/bench_repair_share.py); not yet measured on a GPU, so the mark stays, non-strict, until
# the GPU lane reports XPASS.
RATIO_XFAIL = {"densenet121"}


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_MODELS)
def test_gpu_repair_within_ratio(benchmark, name, request):
    if name in RATIO_XFAIL:
        request.applymarker(pytest.mark.xfail(reason="statistics over DenseNet's concatenated "
                                              "inputs cost more than its 1x1 convs", strict=False))
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {}
    benchmark.pedantic(lambda: results.update(_gpu_times(name)), rounds=1, iterations=1)
    benchmark.extra_info.update(results)
    assert results["asr"]["ratio"] <= RATIO_BOUND, \
        f"{name} on CUDA: asr is {results['asr']['ratio']:.2f}x the two forward passes"


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_MODELS)
def test_gpu_within_budget(name, update_baselines):
    results = _gpu_times(name)
    card = torch.cuda.get_device_name()
    if update_baselines:
        GPU_UPDATES.setdefault(card, {})[name] = {
            m: round(results[m]["seconds"] * BUDGET_HEADROOM, 4)
            for m in ("bn_recal", "asr", "clipped_asr")}
        return
    budgets = load_json(GPU_BUDGET_FILE).get(card, {}).get(name)
    if budgets is None:
        pytest.fail(f"no GPU budget for {name} on {card!r}; record it on this card with:\n"
                    "  pytest benchmarks/test_repair_speed.py --gpu --update-baselines")
    for method, budget in budgets.items():
        got = results[method]["seconds"]
        assert got <= budget, f"{name}/{method} on {card}: {got:.3f}s over budget {budget:.3f}s"
