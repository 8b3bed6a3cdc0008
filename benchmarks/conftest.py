"""Benchmark-suite plumbing: measured regimes are cached per session, compared with
baselines/, printed as one table at the end, and written back only with --update-baselines
(with --update-repairs NAMES: only those repairs' numbers, added to the existing entries)."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import pytest
import torch

from sparse_repair.gate import format_table

ROOT = Path(__file__).resolve().parents[1]
ACCURACY_FILE = ROOT / "baselines" / "repair_accuracy.json"
GPU_BUDGET_FILE = ROOT / "baselines" / "gpu_budgets.json"

VERDICTS: list = []          # gate.Verdict rows for the closing table
UPDATES: dict = {}           # regime id -> new baseline entry (written only on request)
PARTIAL: list = []           # non-empty when UPDATES holds --update-repairs entries only
GPU_UPDATES: dict = {}


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                       else f"cpu {platform.machine()}"),
            "date": datetime.date.today().isoformat()}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-repairs", default=None, metavar="NAMES",
        help="with --update-baselines: measure and record only these repairs (comma-separated) "
             "into each selected regime's existing baseline; every other recorded number, the "
             "dense top-1 and the file's 'recorded' header stay as they are")
    parser.addoption(
        "--download", action="store_true",
        help="before the session, fetch what the asset regimes read and has an upstream: "
             "canonical CIFAR-10 (torchvision, md5-checked) and the published weights "
             "(sha256-checked); needs internet")


def pytest_configure(config: pytest.Config) -> None:
    # Checked here, not in the fixture: a session that never uses the fixture (another file
    # selected) ignored --update-repairs silently.
    _repairs_to_update(config)
    if config.getoption("--download"):
        fetch_regime_assets()


def _repairs_to_update(config: pytest.Config) -> list[str] | None:
    """The repairs --update-repairs names (None: record whole regimes). Refused without
    --update-baselines, so that the flag alone never looks like it recorded something, and
    when it names no repair (a file rewritten with nothing recorded) or an unknown one."""
    names = config.getoption("--update-repairs", default=None)
    if names is None:
        return None
    if not config.getoption("--update-baselines"):
        raise pytest.UsageError("--update-repairs only selects what --update-baselines records")
    from regimes import REPAIRS

    out = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in out if n not in REPAIRS]
    if not out or unknown:
        raise pytest.UsageError(f"--update-repairs {names!r} names {unknown or 'no repair'}; "
                                f"name one or more of {', '.join(REPAIRS)}")
    return out


def fetch_regime_assets() -> None:
    """--download: the data and published weights of every asset regime that have an
    upstream. cifar10-jpeg and our Imagenette checkpoint have none; their regimes still skip
    unless they are under the asset root (../shared/assets/unpack.sh)."""
    from regimes import ALL

    from sparse_repair.data import fetch_split, get_spec
    from sparse_repair.weights import PRETRAINED, pretrained_path

    regimes = [r for r in ALL if r.needs_assets]
    for model in sorted({r.model for r in regimes if r.weights is None and r.model in PRETRAINED}):
        pretrained_path(model, allow_download=True)
    for dataset in sorted({r.dataset for r in regimes if get_spec(r.dataset).upstream}):
        for split in get_spec(dataset).splits:
            fetch_split(dataset, split)


@pytest.fixture(scope="session")
def update_baselines(request) -> bool:
    return bool(request.config.getoption("--update-baselines"))


@pytest.fixture(scope="session")
def update_repairs(request) -> list[str] | None:
    """The repairs --update-repairs names (None: record whole regimes; checked at configure)."""
    return _repairs_to_update(request.config)


@pytest.fixture(scope="session")
def full_eval(request) -> bool:
    return bool(request.config.getoption("--full"))


def assets_present(*parts: str) -> bool:
    """Whether ``parts`` exists under the asset root in effect (--assets, else
    $SPARSE_REPAIR_ASSETS, else ~/.cache/sparse_repair, where --download puts files)."""
    from sparse_repair.assets import asset_root

    return asset_root().joinpath(*parts).exists()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if VERDICTS:
        terminalreporter.write_sep("=", "repair accuracy against baselines")
        terminalreporter.write_line(format_table(VERDICTS))


def pytest_sessionfinish(session, exitstatus):
    if not session.config.getoption("--update-baselines"):
        return
    if UPDATES:
        data = load_json(ACCURACY_FILE) or {"default_tolerance_pt": 0.5, "regimes": {}}
        data["regimes"].update(UPDATES)
        if not PARTIAL:   # a partial update keeps the header of the numbers it did not touch
            data["recorded"] = environment() | {
                "command": "pytest benchmarks/test_repair_accuracy.py --update-baselines"}
        data["regimes"] = dict(sorted(data["regimes"].items()))
        ACCURACY_FILE.write_text(json.dumps(data, indent=1) + "\n")
    if GPU_UPDATES:
        data = load_json(GPU_BUDGET_FILE)
        data.update(GPU_UPDATES)
        GPU_BUDGET_FILE.write_text(json.dumps(data, indent=1) + "\n")
