"""pytest options are never ignored silently: the --gpu lane cannot pass on a CPU, and an
option the session would not act on stops it with a usage error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")
def test_gpu_flag_without_cuda_stops_with_message():
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pytest", "--gpu", "-q", "-p", "no:cacheprovider",
                        f"{Path(__file__).resolve()}::test_gpu_marker_runs_only_with_flag"],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode != 0, "--gpu on a CPU machine must fail the run"
    assert "cuda" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


@pytest.mark.gpu
def test_gpu_marker_runs_only_with_flag():
    assert torch.cuda.is_available(), "gpu-marked tests run only under --gpu with CUDA"


def _pytest(*args: str, ci: bool = False) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--collect-only", *args], capture_output=True, text=True, cwd=root,
                          env=env)


@pytest.mark.parametrize("args, message", [
    # was read only by the accuracy test's fixture: with another file selected, ignored
    (["benchmarks/test_gate_logic.py", "--update-repairs", "asr"],
     "--update-repairs only selects what --update-baselines records"),
    # an empty list rewrote the baselines file with nothing recorded
    (["benchmarks/test_gate_logic.py", "--update-baselines", "--update-repairs", ","],
     "names no repair"),
    (["benchmarks/test_gate_logic.py", "--update-baselines", "--update-repairs", "asr,asrr"],
     "names ['asrr']"),
    # an empty root fell through to $SPARSE_REPAIR_ASSETS
    (["tests/test_conftest_options.py", "--assets", ""], "--assets: empty asset root"),
])
def test_an_option_the_session_would_not_act_on_is_a_usage_error(args, message):
    r = _pytest(*args)
    assert r.returncode == 4, r.stdout + r.stderr  # pytest's usage-error status
    assert message in r.stdout + r.stderr, r.stdout + r.stderr


def test_download_is_a_benchmark_option_not_silently_accepted_by_tests():
    """`pytest tests --download` accepted the flag and did nothing; it belongs to benchmarks."""
    r = _pytest("tests/test_conftest_options.py", "--download")
    assert r.returncode == 4 and "unrecognized arguments: --download" in r.stderr, r.stderr
