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

import dataclasses
import hashlib
import json
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomllib is 3.11+; tomli is the same parser
    import tomli as tomllib

from ..assets import sha256_of
from ..run import RunConfig


@dataclass
class Study:
    name: str
    path: Path
    runs: list[tuple[str, RunConfig]]        # (run id, config): seed-major, then model
    raw: dict


def layer_plot_runs(study: Study, done: set[str]
                    ) -> tuple[float | None, dict[str, tuple[str, int]]]:
    """The runs the report's per-layer plots draw from, among the ``done`` run ids: the study's
    first model and data set, at its finished sparsity nearest 0.9 (the lower one on a tie),
    the lowest seed of each allocation. Returns (sparsity, {allocation: (run id, seed)}), or
    (None, {}) when that model has no finished run. ``study export`` keeps the per-channel
    repair statistics of exactly these runs, so a report from an imported snapshot draws the
    same plots."""
    _, first = study.runs[0]
    runs = [(rid, c) for rid, c in study.runs if rid in done
            and (c.model, c.dataset) == (first.model, first.dataset)]
    if not runs:
        return None, {}
    # rounded: |0.95 - 0.9| < |0.85 - 0.9| in binary floating point, a tie in decimal
    sparsity = min({c.sparsity for _, c in runs}, key=lambda s: (round(abs(s - 0.9), 9), s))
    chosen: dict[str, tuple[str, int]] = {}
    for rid, c in sorted(runs, key=lambda t: (t[1].seed, t[0])):
        if c.sparsity == sparsity:
            chosen.setdefault(c.allocation, (rid, c.seed))
    return sparsity, chosen


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
    if not d.get("scoring"):  # likewise
        d.pop("scoring", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


_WEIGHT_IDS: dict[tuple[str, int, int], str] = {}


def _weights_identity(path: str) -> str:
    """File name and content hash of a checkpoint, so run ids are the same on every machine
    and filesystem (a laptop, a Ray node, a Slurm job) for the same weights. A path that is no
    file here is its own identity (the checkpoint may exist only on the workers). The hash is
    cached per (path, mtime, size) and never for a missing file: a checkpoint written or
    replaced later in the same process gets its own identity, not a stale one."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return path
    if not stat.S_ISREG(st.st_mode):  # from the one stat: no second look at the file
        return path
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _WEIGHT_IDS:
        _WEIGHT_IDS[key] = f"{p.name}:{sha256_of(p)[:16]}"
    return _WEIGHT_IDS[key]


def stored_config(config: dict) -> dict:
    """``config`` (a run's settings, as a dict) as a store keeps it: ``weights`` named by the
    checkpoint's identity (file name and content hash, as the run id hashes it), not by this
    machine's path. A study file's relative weights path is resolved against the study's
    directory for the workers; writing that absolute path into the store, and so into a
    committed snapshot, would leak the machine's layout ("no absolute machine paths")."""
    if not config.get("weights"):
        return config
    ident = _weights_identity(config["weights"])
    if ident == config["weights"]:  # no file here (a failed run, or one only on the workers)
        ident = f"{Path(ident).name}:not found here"
    return {**config, "weights": ident}


def _resolve_weights(w: str | None, base: Path) -> str | None:
    if w is None:
        return None
    if isinstance(w, str) and not w.strip():  # "" meant the published weights, silently
        raise ValueError("weights is an empty path; name a checkpoint file, or leave weights "
                         "out for the published weights")
    if not isinstance(w, str):
        return w  # RunConfig.check names the type
    p = Path(w)
    if p.is_absolute() or p.exists():
        return str(p)
    return str((base / p).resolve()) if (base / p).exists() else str(p)


# The grid axes a study sweeps (lists); every other key is a RunConfig setting, its default
# RunConfig's own (the one source of run defaults), overridable per [[models]] table.
SWEEP_KEYS = {"seeds": "seed", "allocations": "allocation", "sparsities": "sparsity"}
STUDY_KEYS = ("name", "models")


def _valid_keys() -> list[str]:
    swept = set(SWEEP_KEYS.values())
    return [*STUDY_KEYS, *SWEEP_KEYS,
            *(f.name for f in dataclasses.fields(RunConfig) if f.name not in swept)]


def _check_axes(path: Path, model, axes: dict) -> None:
    """Each grid axis is a list of values of its type, each value once: seeds ints, sparsities
    numbers (never converted from a string or truncated, e.g. seed 0.5 or sparsity "0.9"),
    allocations names. A repeated value would run one configuration twice under one id.
    Raises ValueError naming the axis and the model."""
    kinds = {"seeds": ("ints", lambda v: isinstance(v, int) and not isinstance(v, bool)),
             "sparsities": ("numbers", lambda v: isinstance(v, int | float)
                            and not isinstance(v, bool)),
             "allocations": ("names", lambda v: isinstance(v, str))}
    for key, values in axes.items():
        noun, ok = kinds[key]
        if not isinstance(values, list) or not all(ok(v) for v in values):
            hint = "" if isinstance(values, list) else f"; e.g. {key} = [{values!r}]"
            raise ValueError(f"{path}: model {model}: {key} must be a list of {noun}, got "
                             f"{key} = {values!r}{hint}")
        dup = sorted({v for v in values if values.count(v) > 1}, key=str)
        if dup:
            raise ValueError(f"{path}: model {model}: {key} lists {dup} more than once; name "
                             "each value once")


def load_study(path: str | Path) -> Study:
    """Expand a study file into runs. Raises FileNotFoundError for a missing file and
    ValueError for a study without models or grid axes, or with a key that is neither a
    study key, a grid axis nor a RunConfig setting (the message names the valid keys)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"study file not found: {path}")
    raw = tomllib.loads(path.read_text())
    if not raw.get("models"):
        raise ValueError(f"{path}: a study needs at least one [[models]] table")
    if not isinstance(raw["models"], list) or not all(isinstance(m, dict)
                                                      for m in raw["models"]):
        raise ValueError(f"{path}: models must be [[models]] tables (one per model, each with "
                         f"model = \"...\"), got models = {raw['models']!r}")
    valid = _valid_keys()
    for where, table in [("top level", raw)] + [(f"[[models]] {m.get('model')}", m)
                                                for m in raw["models"]]:
        misplaced = sorted(set(table) & set(STUDY_KEYS)) if table is not raw else []
        if misplaced:  # they were accepted there and dropped
            raise ValueError(f"{path}: {', '.join(map(repr, misplaced))} at {where} is a "
                             f"study-level key; put it at the top of the file")
        unknown = sorted(set(table) - set(valid) - ({"models"} if table is raw else set()))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))} at "
                             f"{where}; valid keys: {', '.join(valid)}")
    name = raw.get("name", path.stem)
    keyed = []  # ((seed rank, model index), run id, config)
    for index, m in enumerate(raw["models"]):
        merged = {k: v for k, v in raw.items() if k not in STUDY_KEYS}
        merged.update({k: v for k, v in m.items() if k not in STUDY_KEYS})
        missing = [k for k in (*SWEEP_KEYS, "repairs") if not merged.get(k)]
        if missing or "model" not in merged:
            raise ValueError(f"{path}: model {m.get('model')} has no {missing or ['model']}")
        axes = {k: merged.pop(k) for k in SWEEP_KEYS}
        _check_axes(path, m.get("model"), axes)
        if merged.get("n_eval") in ("full", "all"):
            merged["n_eval"] = None
        merged["weights"] = _resolve_weights(merged.get("weights"), path.parent)
        merged.setdefault("pretrained", not merged["weights"])
        # Seeds outermost, across models: a study stopped part-way (they run for hours and
        # resume across sessions) holds whole grids of every model for its first seeds, which a
        # partial report can use, rather than every seed of its first model or cells only.
        for rank, seed in enumerate(axes["seeds"]):
            for alloc in axes["allocations"]:
                for sp in axes["sparsities"]:
                    cfg = RunConfig.from_dict({**merged, "allocation": alloc,
                                               "sparsity": float(sp), "seed": seed})
                    keyed.append(((rank, index), run_id(cfg), cfg))
    keyed.sort(key=lambda t: t[0])  # stable: grid order inside one (seed, model)
    runs = [(rid, cfg) for _, rid, cfg in keyed]
    return Study(name, path, runs, raw)
