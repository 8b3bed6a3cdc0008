"""Study files (TOML) and their expansion into runs with stable ids.

    name = "cpu"                 # study name; results go to results/<name>.sqlite
    calib = 1024                 # calibration images per run
    n_eval = 2000                # stratified evaluation subset, or "full"
    device = "cpu"
    seeds = [0, 1, 2]            # each seed draws other calibration images (masks are fixed)
    allocations = ["erk", "lamp"]
    sparsities = [0.8, 0.9]
    repairs = ["none", "bn_recal", "asr"]

    [[models]]                   # any top-level key may be overridden per model
    model = "resnet20"
    dataset = "cifar10"
    pretrained = true            # or weights = "path/to/checkpoint.pt"

Relative weight paths are resolved against the working directory, then the study file's folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is 3.11+; tomli is the same parser
    import tomli as tomllib

from ..assets import sha256_of
from ..run import RunConfig

SHARED_KEYS = ("calib", "n_eval", "device", "seeds", "allocations", "sparsities", "repairs",
               "shrinkage")


@dataclass
class Study:
    name: str
    path: Path
    runs: list[tuple[str, RunConfig]]        # (run id, config) in grid order
    raw: dict


def run_id(cfg: RunConfig) -> str:
    """Hash of the resolved configuration without the repair list: one run = one pruned model
    (model, data set, allocation, sparsity, seed, ...); its repairs are rows of that run."""
    d = asdict(cfg)
    d.pop("repairs")
    if d["weights"]:  # the checkpoint's content, not where this machine keeps it
        d["weights"] = _weights_identity(d["weights"])
    if d.get("resolution") is None:  # added later: ids of studies written before stay valid
        d.pop("resolution", None)
    if not d.get("repair_options"):  # likewise
        d.pop("repair_options", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


_WEIGHT_IDS: dict[str, str] = {}


def _weights_identity(path: str) -> str:
    """File name and content hash of a checkpoint, so run ids are the same on every machine
    and filesystem (a laptop, a Ray node, a Slurm job) for the same weights."""
    if path not in _WEIGHT_IDS:
        p = Path(path)
        _WEIGHT_IDS[path] = f"{p.name}:{sha256_of(p)[:16]}" if p.is_file() else path
    return _WEIGHT_IDS[path]


def _resolve_weights(w: str | None, base: Path) -> str | None:
    if not w:
        return None
    p = Path(w)
    if p.is_absolute() or p.exists():
        return str(p)
    return str((base / p).resolve()) if (base / p).exists() else str(p)


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"study file not found: {path}")
    raw = tomllib.loads(path.read_text())
    if not raw.get("models"):
        raise ValueError(f"{path}: a study needs at least one [[models]] table")
    name = raw.get("name", path.stem)
    runs = []
    for m in raw["models"]:
        opt = {k: m.get(k, raw.get(k)) for k in SHARED_KEYS}
        missing = [k for k in ("seeds", "allocations", "sparsities", "repairs") if not opt[k]]
        if missing:
            raise ValueError(f"{path}: model {m.get('model')} has no {missing}")
        n_eval = opt["n_eval"] if opt["n_eval"] is not None else 2000
        for alloc in opt["allocations"]:
            for sp in opt["sparsities"]:
                for seed in opt["seeds"]:
                    cfg = RunConfig(
                        model=m["model"], dataset=m.get("dataset", RunConfig.dataset),
                        allocation=alloc, sparsity=float(sp), repairs=list(opt["repairs"]),
                        calib=int(opt["calib"] or 1024), seed=int(seed),
                        n_eval=None if n_eval in ("full", "all") else int(n_eval),
                        device=opt["device"] or "cpu",
                        weights=_resolve_weights(m.get("weights"), path.parent),
                        pretrained=bool(m.get("pretrained", not m.get("weights"))),
                        shrinkage=opt["shrinkage"], exclude=list(m.get("exclude", [])),
                        resolution=m.get("resolution"))
                    runs.append((run_id(cfg), cfg))
    return Study(name, path, runs, raw)
