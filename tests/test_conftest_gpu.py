"""The --gpu lane can never pass silently on a CPU."""

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
