"""Pretrained checkpoints: a registry of published files, verified loading, and our own
trainer's checkpoints with their JSON sidecars.

Every loader checks a file completely before it touches the model (format, truncation, a state
dict inside, keys, shapes, class count, finite values) and raises ``CheckpointError`` naming the
file, what is wrong and the fix; the model is unchanged when it raises. A loaded model carries
a ``WeightsRecord`` (what the weights were trained on, when known) that ``check_weights_fit``
compares with the data set a model is run on."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .assets import AssetMissingError, asset_root, download, require, verify_sha256
from .models import create_model, list_models

AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


@dataclass(frozen=True)
class Checkpoint:
    model: str
    dataset: str
    filename: str
    url: str
    sha256: str               # full digest where known, else torch.hub's 8-hex prefix
    published_top1: float     # percent, on the canonical data set, as published upstream
    num_classes: int = 10
    resolution: int = 32      # input side (px) the weights were trained at


# Hashes: full sha256 for the two files checked here (shared assets' SHA256SUMS); for the others
# the upstream file name's 8-hex sha256 prefix (torch.hub's convention), from the upstream README.
R20_SHA = "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"
R56_SHA = "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367"
PRETRAINED: dict[str, Checkpoint] = {
    "resnet20": Checkpoint("resnet20", "cifar10", "resnet20-12fca82f.th",
                           AKAMASTER + "resnet20-12fca82f.th",
                           R20_SHA, 91.73),
    "resnet32": Checkpoint("resnet32", "cifar10", "resnet32-d509ac18.th",
                           AKAMASTER + "resnet32-d509ac18.th", "d509ac18", 92.63),
    "resnet44": Checkpoint("resnet44", "cifar10", "resnet44-014dd654.th",
                           AKAMASTER + "resnet44-014dd654.th", "014dd654", 93.10),
    "resnet56": Checkpoint("resnet56", "cifar10", "resnet56-4bfd9763.th",
                           AKAMASTER + "resnet56-4bfd9763.th",
                           R56_SHA, 93.39),
    "resnet110": Checkpoint("resnet110", "cifar10", "resnet110-1d1ed7c2.th",
                            AKAMASTER + "resnet110-1d1ed7c2.th", "1d1ed7c2", 93.68),
}

# Data sets whose labels are another data set's labels (same classes, same order): weights
# trained on the value may be evaluated on the key. cifar10-jpeg is CIFAR-10 re-encoded, the
# distribution-shift check of the benchmarks; every other data set has its own label space.
SAME_LABELS_AS: dict[str, str] = {"cifar10-jpeg": "cifar10"}


class CheckpointError(ValueError):
    """A checkpoint file, or the weights in a model, cannot be used as asked. The message names
    the file (or tensor), what is wrong and the fix. A ValueError, so the CLI prints it and
    exits 2."""


@dataclass(frozen=True)
class WeightsRecord:
    """Where a model's weights came from, attached to the model by the loaders of this module
    (``weights_record``). ``dataset``, ``num_classes`` and ``resolution`` are None where the
    file does not say (a bare state dict without a sidecar)."""
    source: str                      # the file, or "published <model> weights (<file>)"
    model: str | None = None         # registered architecture name
    dataset: str | None = None       # data set the weights were trained on
    num_classes: int | None = None
    resolution: int | None = None    # input side (px) trained at


_RECORD_ATTR = "_sparse_repair_weights"  # a plain attribute: survives deepcopy and .to()


def weights_record(model: nn.Module) -> WeightsRecord | None:
    """The ``WeightsRecord`` a loader of this module attached to ``model``, or None."""
    return getattr(model, _RECORD_ATTR, None)


def forget_weights_record(model: nn.Module) -> nn.Module:
    """Drop the record of where ``model``'s weights came from (after training it further on
    another data set, say), so ``check_weights_fit`` checks only what the model itself shows.
    Returns the model."""
    if hasattr(model, _RECORD_ATTR):
        delattr(model, _RECORD_ATTR)
    return model


def _attach(model: nn.Module, record: WeightsRecord) -> nn.Module:
    object.__setattr__(model, _RECORD_ATTR, record)
    return model


# ----------------------------------------------------------------------------- reading a file

# torch.save's two formats: a zip archive (torch >= 1.6) and the legacy pickle stream, which
# starts with pickle protocol 2 and torch's magic number 0x1950a86a20f9469cfc6c as a long.
_ZIP_HEAD = b"PK\x03\x04"
_LEGACY_HEAD = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_RESAVE = ("save the weights again with torch.save(model.state_dict(), FILE), or copy or "
           "download the file again")


def _describe_foreign(head: bytes) -> str:
    """What a file that is not a torch checkpoint looks like, from its first bytes."""
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (run `git lfs pull` to fetch them)"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (Keras/TensorFlow weights?)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if len(head) >= 10 and head[8:10] == b'{"':
        return ("a safetensors file (load it with safetensors.torch.load_file and pass the "
                "dict to model.load_state_dict)")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"not a format torch.save writes (first bytes {head[:8].hex(' ')})"
    if text.lstrip().lower().startswith(("<!doctype html", "<html")):
        return "an HTML page (a failed download saved as the file?)"
    first = text.splitlines()[0][:60] if text.strip() else ""
    return f"a text file (first line {first!r})"


def _zip_damage(path: Path) -> str | None:
    """What is damaged in a complete zip archive, or None: the first member failing its CRC
    check. torch.load does not check CRCs, so flipped bytes inside a tensor would load as
    silently wrong weights; reading the file once more is cheap next to that."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"unreadable zip archive: {e}"
    return f"member {bad!r} fails its CRC check" if bad else None


def _corrupt(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is corrupt ({detail}): the bytes were damaged "
                           f"in storage or transfer; {_RESAVE}")


def _load_file(path: Path) -> object:
    """torch.load(path, weights_only=True), with every way it fails turned into one
    CheckpointError naming the file and the fix."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written or "
                              f"the copy failed; {_RESAVE}")
    with open(path, "rb") as f:
        head = f.read(64)
    is_zip, is_legacy = head.startswith(_ZIP_HEAD), head.startswith(_LEGACY_HEAD)
    if not (is_zip or is_legacy):
        raise CheckpointError(
            f"{path} is not a torch checkpoint: it is {_describe_foreign(head)}; expected a file "
            "written by torch.save (a zip archive, or torch's legacy pickle format). Pass the "
            ".pt/.pth/.th file written by torch.save(model.state_dict(), FILE)")
    truncated = CheckpointError(
        f"checkpoint {path} is truncated ({size} bytes; the end of the "
        f"{'zip archive' if is_zip else 'legacy torch pickle'} is missing): an interrupted "
        f"download or copy; {_RESAVE}")
    if is_zip and not zipfile.is_zipfile(path):  # no end-of-central-directory record
        raise truncated
    damage = _zip_damage(path) if is_zip else None
    if damage:
        raise _corrupt(path, damage)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL" in msg:
            glob = next((w.strip(" :`,.") for w in msg.split() if w.count(".") >= 2 and
                         not w.startswith("http")), "a Python object")
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects ({glob}), not only tensors, so "
                "it cannot be loaded safely (weights_only=True). A whole model saved with "
                "torch.save(model, FILE)? Load it where its code is, and save "
                "model.state_dict() instead") from None
        raise _corrupt(path, "its pickled index cannot be read") from None
    except (EOFError, struct.error):
        raise truncated from None
    except RuntimeError as e:
        msg = str(e)
        if "unexpected EOF" in msg or "central directory" in msg:
            raise truncated from None
        raise _corrupt(path, msg.splitlines()[0][:120]) from None


def _strip_prefix(state: dict) -> dict:
    # "module." from DataParallel/DDP, "_orig_mod." from torch.compile
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict {name: tensor} in a checkpoint file: upstream format ({'state_dict':
    ...}), our trainer's format ({'model': ...}) or a bare state dict; loaded with
    weights_only=True on the CPU; "module." and "_orig_mod." prefixes stripped.

    Raises AssetMissingError (a FileNotFoundError) when the file does not exist, and
    CheckpointError when it is empty, not a torch checkpoint, truncated, corrupt, holds pickled
    Python objects, or holds no state dict (each message names the file and the fix)."""
    path = Path(path)
    if not path.is_file():
        raise AssetMissingError(f"checkpoint not found: {path}" +
                                (" (a directory)" if path.is_dir() else ""))
    obj = _load_file(path)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state "
                              "dict {name: tensor}; save model.state_dict()")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} is a dict with {len(bad)} entries that are not tensors (e.g. "
            f"{', '.join(map(repr, bad[:5]))}) and no state dict under 'state_dict' or 'model'; "
            "pass a file holding model.state_dict() (or one of those two keys)")
    return _strip_prefix(obj)


# ----------------------------------------------------------------------------- checking values

def _classifier(model: nn.Module) -> str | None:
    """Name of the model's output layer: its last module with parameters, when that is a
    Linear (every registered model; None for a model that ends otherwise)."""
    last = None
    for name, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            last = (name, m)
    return last[0] if last is not None and isinstance(last[1], nn.Linear) else None


def check_finite(tensors, source: str) -> None:
    """Refuse NaN/Inf weights or statistics before any work.

    ``tensors``: an nn.Module (its parameters and buffers) or a state dict {name: tensor}.
    ``source`` names where they came from in the message (a file, "the model"). Raises
    CheckpointError naming the first non-finite floating tensor in order, with its count of bad
    values. Integer tensors (num_batches_tracked) are not checked."""
    items = (list(tensors.named_parameters()) + list(tensors.named_buffers())
             if isinstance(tensors, nn.Module) else list(tensors.items()))
    for name, t in items:
        if (t.is_floating_point() or t.is_complex()) and t.device.type != "meta":
            bad = ~torch.isfinite(t)
            if bad.any():
                others = [n for n, u in items if (u.is_floating_point() or u.is_complex())
                          and u.device.type != "meta" and not torch.isfinite(u).all()]
                more = f" (and {len(others) - 1} more tensors)" if len(others) > 1 else ""
                raise CheckpointError(
                    f"{source}: tensor {name!r} holds {int(bad.sum())} NaN/Inf values of "
                    f"{t.numel()}{more}; the weights are broken (a diverged training run?): use "
                    "an earlier or a re-trained checkpoint")


_NBT = "num_batches_tracked"


@lru_cache(maxsize=1)
def _signatures() -> dict[str, tuple[dict[str, tuple], str | None]]:
    """Registered model -> ({state-dict key: shape} at 10 classes, classifier name); built on
    the meta device (no memory, ~2 s for all)."""
    out = {}
    with torch.device("meta"):
        for name in list_models():
            m = create_model(name, 10)
            out[name] = ({k: tuple(v.shape) for k, v in m.state_dict().items()}, _classifier(m))
    return out


def guess_architecture(state: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(registered model name, class count) whose state dict has exactly the keys and shapes of
    ``state`` (any class count), else None."""
    state = {k: v for k, v in state.items() if not k.endswith(_NBT)}
    for name, (shapes, clf) in _signatures().items():
        shapes = {k: v for k, v in shapes.items() if not k.endswith(_NBT)}
        if set(shapes) != set(state):
            continue
        out = {f"{clf}.weight", f"{clf}.bias"} if clf else set()
        k = state[f"{clf}.weight"].shape[0] if clf and f"{clf}.weight" in state else 10
        if all(tuple(state[key].shape) == (shape if key not in out else (k, *shape[1:]))
               for key, shape in shapes.items()):
            return name, int(k)
    return None


def _examples(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                     arch: str | None = None) -> None:
    """Refuse a state dict that ``model.load_state_dict(state, strict=True)`` would not load
    whole: missing and unexpected keys (counts, a few of each, and the registered architecture
    the checkpoint matches, if any), a wrong class count, other shape mismatches (each tensor,
    checkpoint vs model), and NaN/Inf values (``check_finite``). ``source`` names the file and
    ``arch`` the model (its registry name, else its class name) in the messages. Raises
    CheckpointError; reads only."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # BatchNorm fills a missing num_batches_tracked itself (state dicts without torch's
    # version metadata, as read here: the published CIFAR ResNets have none), so it is optional.
    missing = {k for k in set(want) - set(state) if not k.endswith(_NBT)}
    unexpected = set(state) - set(want)
    wrong = {k: (tuple(state[k].shape), want[k]) for k in want
             if k in state and tuple(state[k].shape) != want[k]}
    if arch is None and (missing or unexpected or wrong):
        # Only on the way to an error: name the model as the registry does (resnet20, not
        # CifarResNet), when its keys and shapes are those of a registered architecture.
        guessed = guess_architecture(model.state_dict())
        arch = guessed[0] if guessed else type(model).__name__
    if missing or unexpected:
        guess = guess_architecture(state)
        hint = (f" These are {guess[0]} weights ({guess[1]} classes): pass --model {guess[0]} "
                f"(create_model({guess[0]!r}, {guess[1]})), or a checkpoint of {arch}."
                if guess else f" Pass a checkpoint saved from {arch}, or the --model these "
                              "weights were saved from.")
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(want)} tensors are missing from "
                         f"the checkpoint (e.g. {_examples(missing)})")
        if unexpected:
            parts.append(f"the checkpoint has {len(unexpected)} tensors the model does not "
                         f"(e.g. {_examples(unexpected)})")
        raise CheckpointError(f"checkpoint {source} does not fit {arch} ({len(state)} tensors "
                              f"in the file, {len(want)} in the model): {'; '.join(parts)}."
                              f"{hint}")
    clf = _classifier(model)
    out_keys = {f"{clf}.weight", f"{clf}.bias"} if clf else set()
    if wrong and set(wrong) <= out_keys:
        got, exp = wrong.get(f"{clf}.weight", wrong.get(f"{clf}.bias"))
        raise CheckpointError(
            f"checkpoint {source} has {got[0]} output classes ({clf} {list(got)}) but {arch} "
            f"was built for {exp[0]}: use weights trained on a {exp[0]}-class data set, or "
            f"build the model for {got[0]} classes (run, eval: the --dataset these weights "
            f"were trained on; allocate: --num-classes {got[0]})")
    if wrong:
        lines = "; ".join(f"{k}: checkpoint {list(g)}, model {list(w)}"
                          for k, (g, w) in list(wrong.items())[:5])
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise CheckpointError(
            f"checkpoint {source} does not fit {arch}: {len(wrong)} tensors have other shapes: "
            f"{lines}{more}. Pass a checkpoint of this architecture (same width and depth), or "
            "the --model these weights were saved from")
    check_finite(state, f"checkpoint {source}")


def check_weights_fit(model: nn.Module, dataset: str, num_classes: int, resolution: int
                      ) -> None:
    """Refuse to run ``model`` on ``dataset`` (``num_classes`` classes, images of side
    ``resolution`` px) when they cannot fit, before any image is read:

    - a NaN/Inf parameter or buffer (``check_finite``, naming the first);
    - an output layer (a final Linear) whose class count is not ``num_classes``;
    - weights whose ``WeightsRecord`` says they were trained on another label space (another
      data set that is not listed in ``SAME_LABELS_AS`` with it) or at another resolution.

    Raises CheckpointError naming the weights, the data set and the fix; reads only. (The
    caller passes the data set's facts: this module does not import ``data``.)"""
    record = weights_record(model)
    source = f"the weights from {record.source}" if record else "the model"
    check_finite(model, source)
    clf = _classifier(model)
    if clf is not None:
        k = model.get_submodule(clf).out_features
        if k != num_classes:
            raise CheckpointError(
                f"{source}: the output layer {clf!r} has {k} classes but {dataset} has "
                f"{num_classes}: use weights trained on {dataset} (sparse-repair train "
                f"--dataset {dataset}), or a {k}-class data set")
    if record is None:
        return
    if record.dataset is not None:
        def labels(d: str) -> str:
            return SAME_LABELS_AS.get(d, d)

        if labels(record.dataset) != labels(dataset):
            raise CheckpointError(
                f"{source} were trained on {record.dataset}, whose classes are not those of "
                f"{dataset}: their predictions would be scored against another data set's "
                f"labels. Use weights trained on {dataset} (sparse-repair train --model "
                f"{record.model or '<model>'} --dataset {dataset} --out FILE, then --weights "
                f"FILE), or --dataset {record.dataset}")
    side = resolution
    if record.resolution is not None and side != record.resolution:
        raise CheckpointError(
            f"{source} were trained at {record.resolution} px but would run on {dataset} at "
            f"{side} px: pass --resolution {record.resolution} (resolution="
            f"{record.resolution}), or weights trained at {side} px")


# ----------------------------------------------------------------------------- loaders

def load_checkpoint_into(model: nn.Module, path: str | Path, *, arch: str | None = None,
                         record: WeightsRecord | None = None) -> nn.Module:
    """Load the state dict in ``path`` into ``model`` (strict) and return ``model``.

    The file is checked completely first (``read_state_dict``, ``check_state_dict``): on any
    error ``model`` is unchanged. ``arch`` names the architecture in messages (else the model's
    class name). The model then carries ``record`` (default: the file, nothing else known) as
    its ``weights_record``.

    Raises AssetMissingError (missing file) or CheckpointError (empty, not a torch
    checkpoint, truncated, corrupt, not a state dict, missing/unexpected keys, wrong class
    count, other shape mismatches, NaN/Inf values)."""
    path = Path(path)
    state = read_state_dict(path)
    check_state_dict(model, state, str(path), arch)
    model.load_state_dict(state, strict=True)
    return _attach(model, record or WeightsRecord(source=str(path), model=arch))


def pretrained_path(name: str, allow_download: bool = False) -> Path:
    if name not in PRETRAINED:
        raise ValueError(f"no published checkpoint for {name!r}; available: "
                         f"{', '.join(PRETRAINED)} (or pass --weights FILE)")
    ckpt = PRETRAINED[name]
    path = asset_root() / "weights" / ckpt.filename
    if not path.exists() and allow_download:
        download(ckpt.url, path, ckpt.sha256)
    require(path, f"pretrained weights for {name}")
    return path


def load_pretrained(name: str, allow_download: bool = False, verify: bool = True) -> nn.Module:
    """The published model in eval mode, from <asset root>/weights/ (downloaded if allowed);
    its ``weights_record`` says data set (cifar10), classes and resolution (32 px).

    Raises ValueError for an unknown name or a checksum mismatch, AssetMissingError for a
    missing file, CheckpointError as ``load_checkpoint_into`` (checked before any change);
    with ``allow_download``, network errors from torch.hub propagate unchanged
    (``assets.download``)."""
    path = pretrained_path(name, allow_download)
    if verify:
        verify_sha256(path, PRETRAINED[name].sha256)
    ckpt = PRETRAINED[name]
    model = create_model(ckpt.model, ckpt.num_classes)
    record = WeightsRecord(f"{path} (published {name})", ckpt.model, ckpt.dataset,
                           ckpt.num_classes, ckpt.resolution)
    return load_checkpoint_into(model, path, arch=ckpt.model, record=record).eval()


def read_sidecar(path: str | Path) -> dict:
    """The JSON sidecar (path + '.json') that ``sparse-repair train`` writes next to a
    checkpoint: a dict with at least "model" (str) and "num_classes" (int), usually "dataset"
    and "resolution". Raises AssetMissingError when absent, CheckpointError when it is not
    JSON, not an object, or lacks those keys."""
    path = Path(path)
    sidecar = path.with_suffix(path.suffix + ".json")
    require(sidecar, "checkpoint sidecar (written by sparse-repair train)")
    fix = (f"re-create it (sparse-repair train writes it), or delete it to load {path.name} "
           "as a plain state dict with --model")
    try:
        meta = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint sidecar {sidecar} is not valid JSON ({e}): "
                              f"{fix}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint sidecar {sidecar} holds a {type(meta).__name__}, "
                              f"not a JSON object: {fix}")
    lacking = [k for k in ("model", "num_classes") if k not in meta]
    if lacking:
        raise CheckpointError(f"checkpoint sidecar {sidecar} lacks {', '.join(lacking)}: {fix}")
    if meta["model"] not in list_models():
        raise CheckpointError(f"checkpoint sidecar {sidecar} names model {meta['model']!r}, "
                              f"which is not registered (choose one of "
                              f"{', '.join(list_models())}): {fix}")
    k = meta["num_classes"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CheckpointError(f"checkpoint sidecar {sidecar} has num_classes={k!r}, not a "
                              f"positive int: {fix}")
    r = meta.get("resolution")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        # 0 would read as "the data set's default" downstream: a silent substitution.
        raise CheckpointError(f"checkpoint sidecar {sidecar} has resolution={r!r}, not null or "
                              f"a positive int (pixels): {fix}")
    return meta


def load_trained(path: str | Path) -> tuple[nn.Module, dict]:
    """A checkpoint written by ``sparse-repair train`` and its JSON sidecar (path + '.json'):
    (model in eval mode, sidecar dict). The model's ``weights_record`` holds the sidecar's
    model, data set, class count and resolution.

    Raises AssetMissingError (file or sidecar missing) and CheckpointError (``read_sidecar``,
    ``load_checkpoint_into``); nothing is built until the sidecar is checked."""
    path = Path(path)
    require(path, "trained checkpoint")
    meta = read_sidecar(path)
    model = create_model(meta["model"], meta["num_classes"])
    record = WeightsRecord(str(path), meta["model"], meta.get("dataset"), meta["num_classes"],
                           meta.get("resolution"))
    return load_checkpoint_into(model, path, arch=meta["model"], record=record).eval(), meta
