"""Root pytest options shared by tests/ and benchmarks/.

--gpu                  run tests marked ``gpu``; stops at once when no CUDA device is present,
                       so a GPU lane can never pass silently on a CPU
--full                 evaluate accuracy regimes on the full test split
--nightly              the heavy lane (every regime and case; ~1 h on 2 cores)
--update-baselines     rewrite stored baselines from this run (refused when CI=true)
--assets DIR           asset root (else $SPARSE_REPAIR_ASSETS, else ~/.cache/sparse_repair)
"""

from __future__ import annotations

import os

import pytest

try:
    from hypothesis import HealthCheck, settings

    # ci: bounded for 2-core CI; nightly: many more examples for the scheduled job.
    settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", max_examples=100, deadline=None)
    settings.register_profile("nightly", max_examples=2000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")
except ImportError:  # hypothesis is only in the test extra
    pass


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu", action="store_true", help="run tests that need a CUDA device")
    parser.addoption("--full", action="store_true", help="evaluate on the full test split")
    parser.addoption("--nightly", action="store_true",
                     help="the heavy lane: every regime, every sparsity for large models in the "
                          "allocation check, ResNet-18 in the CPU speed check")
    parser.addoption("--update-baselines", action="store_true",
                     help="rewrite baselines/ from this run's measurements (not allowed in CI)")
    parser.addoption("--assets", default=None, help="asset root (data and weights)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--assets") is not None:  # --assets "" is refused, not skipped
        from sparse_repair.assets import set_asset_root

        try:
            set_asset_root(config.getoption("--assets"))
        except ValueError as e:
            raise pytest.UsageError(f"--assets: {e}") from None
    from sparse_repair.runtime import tune_allocator

    tune_allocator()  # a test session is an entry point: same allocator as the CLI
    if config.getoption("--update-baselines") and os.environ.get("CI", "").lower() == "true":
        raise pytest.UsageError("--update-baselines is refused when CI=true: baselines are "
                                "recorded by a person on purpose, never by CI")
    if config.getoption("--gpu"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--gpu was given but torch.cuda.is_available() is False: "
                                    "run the GPU lane on a machine with a CUDA device (and a "
                                    "CUDA build of torch), or drop --gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--gpu"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run with --gpu on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
