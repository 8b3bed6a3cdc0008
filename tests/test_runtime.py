"""Process-level allocator tuning: applied by entry points, never by a library import, and
switchable off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import sparse_repair, sparse_repair.repair, sparse_repair.runtime as r; "
         "print(r._DONE, r.tune_allocator())")


def _probe(**env) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_importing_the_library_does_not_tune_and_entry_points_can():
    assert _probe(SPARSE_REPAIR_MALLOC="") == "False True", (
        "importing sparse_repair must leave the allocator alone; tune_allocator() applies it")


def test_opt_out_is_respected():
    assert _probe(SPARSE_REPAIR_MALLOC="default") == "False False", (
        "SPARSE_REPAIR_MALLOC=default must keep glibc's default thresholds")
