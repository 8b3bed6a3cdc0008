"""Dense training recipe: SGD + Nesterov 0.9, weight decay 5e-4, batch 128, one-cycle LR,
random crop + flip (CIFAR-like) or random-resized-crop + flip (Imagenette), label smoothing off,
AMP and channels_last on CUDA. Writes a checkpoint and a JSON sidecar."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import _opt, check_device, check_seed, config_from_dict
from .data import DATASETS, get_spec, load_split, normalize
from .evaluate import evaluate
from .models import create_model, list_models
from .progress import progress_bar


@dataclass
class TrainConfig:
    """One dense training run: the single source of the defaults of `sparse-repair train` (its
    flags, defaults and help are derived from these fields; the CLI restates none).

    Build it from user input with ``TrainConfig.from_dict`` (JSON, CLI), which refuses unknown
    keys naming the valid ones and runs ``check`` before any data is read."""
    model: str = _opt("resnet20", "architecture (sparse_repair.models registry)")
    dataset: str = _opt("cifar10", "data set (sparse_repair.data registry); trains on its train "
                                   "split, reports top-1 on its evaluation split")
    epochs: int = _opt(30, "passes over the train split")
    batch_size: int = _opt(128, "images per SGD step")
    lr: float = _opt(0.1, "one-cycle peak learning rate, reached after the first quarter "
                               "of the steps")
    momentum: float = _opt(0.9, "Nesterov momentum, in (0, 1)")
    weight_decay: float = _opt(5e-4, "L2 weight decay on conv/linear weights (not BN or "
                                     "biases), >= 0")
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing, in [0, 1); 0 = off")
    resolution: int | None = _opt(None, "input side (px); None = the data set's default")
    seed: int = _opt(0, "seeds the initialisation, the batch order and the augmentation")
    device: str = _opt("cpu", "torch device (AMP and channels_last on CUDA)")
    out: str = _opt("results/checkpoints/model.pt", "checkpoint path; its JSON sidecar is "
                                                     "path + '.json'")
    threads: int | None = _opt(None, "torch CPU threads; None = torch's default")
    overwrite: bool = _opt(False, "replace an existing checkpoint at out")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """A TrainConfig from a plain dict. Raises ValueError naming any unknown key and the
        valid ones, or any bad value (``check``), before any data is read."""
        return config_from_dict(cls, d, "train")

    def check(self) -> None:
        """``check_config(self)``: raises ValueError / TypeError naming the setting."""
        check_config(self)


# ImageNet-style folder data sets (photos of objects at varying scale) train with
# random-resized-crop; imagenet100 got the CIFAR pad-crop before, though its docs promised it.
RESIZED_CROP = ("imagenette", "imagenet100")


def _augment(x: torch.Tensor, dataset: str, g: torch.Generator) -> torch.Tensor:
    """uint8 [n, C, h, w] -> augmented uint8 [n, C, h, w] on x's device. Every random number
    comes from the CPU generator ``g`` (seeded once per training run), so the seed fixes them.

    ``RESIZED_CROP`` data sets (imagenette, imagenet100): random-resized-crop, a square of
    side sqrt(scale) * h with scale uniform in [0.35, 1] at a uniform position, resized back
    to h x w (bilinear), one image at a time: a Python loop, left as it is because it costs
    30-90 ms per 128-image batch at 64 px on one loaded core, 1-3% of a training step (3.3 s:
    2,412 s / 740 steps in the committed resnet20-imagenette64 sidecar). Other data sets
    (CIFAR-like, digits): ``_pad_crop`` with pad max(1, h // 8), per image and vectorised.
    Then each image is flipped left-right with probability 1/2, one coin per image."""
    n, _, h, w = x.shape
    if dataset in RESIZED_CROP:  # random-resized-crop (scale 0.35-1) back to h x w
        scale = torch.empty(n).uniform_(0.35, 1.0, generator=g)
        side = (scale.sqrt() * h).long().clamp(8, h)
        out = torch.empty_like(x)
        for i in range(n):
            s = int(side[i])
            top = int(torch.randint(0, h - s + 1, (1,), generator=g))
            left = int(torch.randint(0, w - s + 1, (1,), generator=g))
            crop = x[i:i + 1, :, top:top + s, left:left + s].float()  # noqa: E203
            out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
        x = out
    else:  # pad 4 (1/8 of the side) and random crop
        x = _pad_crop(x, max(1, h // 8), g)
    flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def _pad_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """torchvision's ``RandomCrop((h, w), padding=pad)`` (zero fill) applied to each image of
    a batch independently: uint8 [n, C, h, w] -> uint8 [n, C, h, w] on x's device.

    Image i becomes the window ``padded[i, :, dy_i:dy_i + h, dx_i:dx_i + w]`` of its copy
    zero-padded by ``pad`` on every side, with dy_i, dx_i drawn uniformly from {0, ..., 2 pad}
    by ``g`` (as RandomCrop draws its top-left corner), all 2n offsets in one call.
    Vectorised: ``unfold`` views every h x w window of the padded batch without copying, and
    one advanced index picks window (dy_i, dx_i) of image i; no loop over images (0.9 ms per
    128-image 32-px batch on one core, where per-pixel index grids took 3.6 ms)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g).to(x.device)
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)      # [n, C, 2 pad + 1, 2 pad + 1, h, w]
    # The advanced indices (dims 0, 2, 3) are split by a slice, so their broadcast dim n
    # comes first: the result is [n, C, h, w].
    return windows[torch.arange(n, device=x.device), :, dy, dx]


def check_config(cfg: TrainConfig) -> None:
    """Refuse a setting that would fail inside torch (a zero division, OneCycleLR's
    "total_steps", a seed past torch's range), train silently wrong (NaN lr), or fail or
    destroy work only when the checkpoint is written (an ``out`` or its sidecar that already
    exists, unless ``overwrite``; an empty or non-string ``out``; one under a file or in a
    directory not writable), before any data is read. Raises ValueError / TypeError naming
    the setting. What depends on the machine (the device, the CPU count) is
    ``check_machine``'s, run by ``train``."""
    def number(v):
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    def integer(name, lo, none_ok=False):
        v = getattr(cfg, name)
        if not (v is None and none_ok) and (isinstance(v, bool) or not isinstance(v, int)
                                            or v < lo):
            raise ValueError(f"{name} must be an int >= {lo}{' or None' if none_ok else ''}, "
                             f"got {v!r}")

    if not isinstance(cfg.model, str) or cfg.model not in list_models():
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(list_models())}")
    if not isinstance(cfg.dataset, str) or cfg.dataset not in DATASETS:
        raise ValueError(f"unknown data set {cfg.dataset!r}; choose one of "
                         f"{', '.join(DATASETS)}")
    check_device(cfg.device)
    integer("epochs", 1)
    integer("batch_size", 1)
    integer("seed", 0)
    check_seed(cfg.seed)
    integer("resolution", 1, none_ok=True)
    integer("threads", 1, none_ok=True)
    if not (number(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be a finite number > 0 (the one-cycle peak), got {cfg.lr!r}")
    if not (number(cfg.momentum) and 0 < cfg.momentum < 1):
        raise ValueError(f"momentum must be a number in (0, 1) (Nesterov needs one), got "
                         f"{cfg.momentum!r}")
    if not (number(cfg.label_smoothing) and 0 <= cfg.label_smoothing < 1):
        raise ValueError(f"label_smoothing must be a number in [0, 1), got "
                         f"{cfg.label_smoothing!r}")
    if not (number(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {cfg.weight_decay!r}")
    if not isinstance(cfg.overwrite, bool):
        raise TypeError(f"overwrite must be true or false, got {cfg.overwrite!r}")
    _check_out(cfg.out, cfg.overwrite)


def _check_out(path, overwrite: bool) -> None:
    """Refuse an ``out`` whose checkpoint or JSON sidecar could not be written after training
    (a directory in the way, a parent that is a file, a directory not writable), or that would
    replace an existing checkpoint or sidecar unless ``overwrite``. ValueError naming the fix."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"out must be a checkpoint path (a non-empty string), got {path!r}")
    if "\0" in path:
        raise ValueError(f"out {path!r} contains a NUL character, which no file name can hold; "
                         f"remove it")
    out = Path(path)
    sidecar = out.with_suffix(out.suffix + ".json")
    if out.is_dir():
        raise ValueError(f"out {path!r} is a directory; give a checkpoint file path such as "
                         f"{str(out / 'model.pt')!r}")
    if sidecar.is_dir():
        raise ValueError(f"out {path!r}: its JSON sidecar path {str(sidecar)!r} is a directory; "
                         f"choose another --out")
    for p, what in ((out, "out"), (sidecar, f"out {path!r}: its JSON sidecar")):
        if not p.exists():
            continue
        shown = path if p is out else str(sidecar)
        if not overwrite:
            raise ValueError(f"{what} {shown!r} already exists and training would replace it; "
                             f"pass --overwrite (overwrite=True) to replace it, or choose "
                             f"another --out")
        if not os.access(p, os.W_OK):
            raise ValueError(f"{what} {shown!r} exists and is not writable; choose another "
                             f"--out, or make it writable")
    parent = out.absolute().parent  # the nearest existing ancestor must be a writable dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"out {path!r} cannot be created: {str(parent)!r} is a file, not a "
                         f"directory; choose an --out inside a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"out {path!r} cannot be written: directory {str(parent)!r} is not "
                         f"writable; choose an --out in a writable directory")


def check_machine(cfg: TrainConfig) -> None:
    """What ``check_config`` leaves to the machine that trains (a config loads on any machine):
    the device exists here (CUDA available, the index below the device count) and ``threads``
    is at most this machine's CPU count (torch crashed with SIGSEGV at threads=10**6).
    ValueError naming the fix."""
    check_device(cfg.device, available=True)
    cpus = os.cpu_count() or 1
    if cfg.threads is not None and cfg.threads > cpus:
        raise ValueError(f"threads={cfg.threads} is more than this machine's {cpus} CPUs; "
                         f"pass --threads {cpus} or fewer, or leave it unset (torch's default)")


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    check_config(cfg)
    check_machine(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    spec = get_spec(cfg.dataset)
    images, labels = load_split(cfg.dataset, spec.splits[0], cfg.resolution)
    device = torch.device(cfg.device)
    model = create_model(cfg.model, spec.num_classes).to(device)
    cuda = device.type == "cuda"
    if cuda:  # keep the uint8 split on the GPU: augmentation then runs there too
        model = model.to(memory_format=torch.channels_last)
        images, labels = images.to(device), labels.to(device)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs *
                                                steps_per_epoch, pct_start=0.25)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    bar = progress_bar(cfg.epochs * steps_per_epoch, f"train {cfg.model}", progress, "step")
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(labels), generator=g).to(images.device)
        for idx in torch.split(perm, cfg.batch_size):
            x = normalize(_augment(images[idx], cfg.dataset, g), cfg.dataset).to(device)
            y = labels[idx].to(device)
            if cuda:
                x = x.to(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=cuda):
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            bar.set_postfix_str(f"epoch {epoch + 1} loss {loss.item():.3f}", refresh=False)
            bar.update(1)
    wall = time.perf_counter() - start
    model = model.to(memory_format=torch.contiguous_format)
    acc = evaluate(model, cfg.dataset, None, device=device, resolution=cfg.resolution)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}}, out)
    meta = {"model": cfg.model, "dataset": cfg.dataset, "num_classes": spec.num_classes,
            "resolution": cfg.resolution or spec.default_resolution, "config": asdict(cfg),
            "command": " ".join(["sparse-repair"] + sys.argv[1:]) if sys.argv else "",
            "top1": acc["top1"], "n_eval": acc["n"], "train_seconds": round(wall, 1),
            "torch": torch.__version__, "device": _device_name(device),
            "python": platform.python_version()}
    out.with_suffix(out.suffix + ".json").write_text(json.dumps(meta, indent=1))
    return meta


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
