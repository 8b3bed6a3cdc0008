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


def test_warnings_point_past_the_package_but_never_at_typed_code():
    """user_stacklevel walks past the package's own frames; code typed at a prompt or passed
    with -c ("<stdin>", "<string>") is the user's even when the working directory lies inside
    the package, where resolving the name as a path would have counted it as ours."""
    from pathlib import Path

    import sparse_repair.runtime as r

    inside = Path(r.__file__).parent / "data"
    assert r._in_package(str(inside / "datasets.py"))
    assert not r._in_package(__file__)
    cwd = os.getcwd()
    try:
        os.chdir(inside)
        assert not r._in_package("<stdin>") and not r._in_package("<string>")
    finally:
        os.chdir(cwd)
