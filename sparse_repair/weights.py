"""Pretrained checkpoints: a registry of published files, verified loading, and our own
trainer's checkpoints with their JSON sidecars."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .assets import AssetMissingError, asset_root, download, require, verify_sha256
from .models import create_model

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


def _strip_prefix(state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from an upstream-format file ({'state_dict': ...}), our trainer's format
    ({'model': ...}) or a bare state dict; loaded with weights_only=True."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    return _strip_prefix(obj)


def load_checkpoint_into(model: nn.Module, path: str | Path) -> nn.Module:
    path = Path(path)
    if not path.exists():
        raise AssetMissingError(f"checkpoint not found: {path}")
    model.load_state_dict(read_state_dict(path), strict=True)
    return model


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
    """The published model in eval mode, from <asset root>/weights/ (downloaded if allowed)."""
    path = pretrained_path(name, allow_download)
    if verify:
        verify_sha256(path, PRETRAINED[name].sha256)
    model = create_model(PRETRAINED[name].model, PRETRAINED[name].num_classes)
    return load_checkpoint_into(model, path).eval()


def load_trained(path: str | Path) -> tuple[nn.Module, dict]:
    """A checkpoint written by ``sparse-repair train`` and its JSON sidecar (path + '.json')."""
    path = Path(path)
    sidecar = path.with_suffix(path.suffix + ".json")
    require(path, "trained checkpoint")
    require(sidecar, "checkpoint sidecar (written by sparse-repair train)")
    meta = json.loads(sidecar.read_text())
    model = create_model(meta["model"], meta["num_classes"])
    return load_checkpoint_into(model, path).eval(), meta
