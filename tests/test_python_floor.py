"""The Python floor in pyproject.toml (``requires-python = ">=3.10"``) holds for every source file.

CI runs one interpreter (3.11), so nothing else would notice a 3.11-only construct. Two checks:
the grammar, with ``ast.parse(feature_version=(3, 10))`` (best effort: CPython refuses most, not
all, newer syntax under it) and, where a 3.10 interpreter is installed (pyenv on this image),
``py_compile`` under that interpreter, which is exact for syntax; and the standard-library names
added in 3.11 that this code base could reach for, which neither check sees.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("sparse_repair", "benchmarks", "tests")
                 for p in (ROOT / d).rglob("*.py")) + [ROOT / "conftest.py"]

# 3.11+ standard-library names (What's New in Python 3.11) and how this code base must use them.
NEW_IN_311 = {
    r"^\s*import tomllib": "guard it: try: import tomllib / except ModuleNotFoundError: import "
                           "tomli as tomllib (tomli is a dependency below 3.11)",
    r"\bStrEnum\b": "enum.StrEnum is 3.11+; subclass (str, Enum)",
    r"from typing import[^\n]*\bSelf\b": "typing.Self is 3.11+; use a TypeVar or a string",
    r"\bdatetime\.UTC\b": "datetime.UTC is 3.11+; use datetime.timezone.utc",
    r"\bExceptionGroup\b|\bexcept\s*\*": "exception groups are 3.11+",
    r"\basyncio\.TaskGroup\b": "asyncio.TaskGroup is 3.11+",
}


def test_requires_python_is_310():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^requires-python\s*=\s*">=3\.10"', text, re.M), \
        "the floor these tests check is 3.10; update them with pyproject.toml"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_parses_with_python_310_grammar(path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))


def test_no_unguarded_311_standard_library():
    found = []
    for path in SOURCES:
        if path == Path(__file__).resolve():
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            for pattern, fix in NEW_IN_311.items():
                if not re.search(pattern, line):
                    continue
                guarded = pattern.startswith(r"^\s*import tomllib") and i > 0 and \
                    lines[i - 1].strip() == "try:"
                if not guarded:
                    found.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()} ({fix})")
    assert not found, "\n".join(found)


def _python310() -> str | None:
    """A working 3.10 interpreter: pyenv's own binary first (its `python3.10` shim on PATH fails
    when 3.10 is not the selected version), then PATH; each is tried before it is trusted."""
    pyenv = Path.home() / ".pyenv" / "versions"
    candidates = [str(p) for p in sorted(pyenv.glob("3.10.*/bin/python3.10"))[::-1]]
    candidates += [exe for exe in [shutil.which("python3.10")] if exe]
    for exe in candidates:
        try:
            ok = subprocess.run([exe, "-c", "import sys; assert sys.version_info[:2] == (3, 10)"],
                                capture_output=True, timeout=30).returncode == 0
        except OSError:
            ok = False
        if ok:
            return exe
    return None


@pytest.mark.skipif(_python310() is None, reason="no Python 3.10 interpreter on this machine; "
                                                 "the grammar check above still runs")
def test_compiles_under_python_310_interpreter(tmp_path):
    script = ("import py_compile, sys\n"
              "for p in sys.argv[1:]:\n"
              "    py_compile.compile(p, cfile=None, doraise=True, optimize=-1)\n")
    # Compile into tmp_path (no __pycache__ written into the tree by another interpreter).
    env = {"PYTHONPYCACHEPREFIX": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([_python310(), "-c", script, *map(str, SOURCES)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sys.version_info >= (3, 10)
