"""The README's Python example runs as written (needs CIFAR-10 and the published weights under
the asset root, as the README says; skipped without them)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_ASSETS = os.environ.get("SPARSE_REPAIR_ASSETS")


@pytest.mark.skipif(not (_ASSETS and (Path(_ASSETS) / "cifar-10-batches-py").exists()
                         and (Path(_ASSETS) / "weights").exists()),
                    reason="needs cifar-10-batches-py and weights under SPARSE_REPAIR_ASSETS")
def test_readme_python_example_runs_as_written(capsys):
    text = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "TOTAL" in out and "onepass" in out
