"""Whole splits as decoded uint8 tensors, and per-batch normalization.

Every split is decoded once into a uint8 tensor [N, C, H, W] and cached as .npy under
<asset root>/cache (keyed by data set, split and resolution), because decoding tens of
thousands of small JPEGs on 2 cores costs far more than the forward passes. Normalization is
applied per batch by ``normalize``.
"""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import torch

from ..assets import asset_root, cache_dir
from .datasets import Source, get_spec, train_split_size


def _decode(path: Path, resolution: int, native: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")  # Imagenette holds 69 grayscale images
        if native is None or im.size != (resolution, resolution):
            # Evaluation transform: resize the short side to resolution/0.875, center crop.
            short = int(round(resolution / 0.875)) if native is None else resolution
            w, h = im.size
            scale = short / min(w, h)
            im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))),
                           Image.BILINEAR)
            w, h = im.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
        return np.asarray(im, dtype=np.uint8)


def _decode_many(source: Source, indices: np.ndarray, resolution: int, native: int | None,
                 progress: bool = False) -> np.ndarray:
    if source.array is not None:
        arr = source.array[indices]
        if arr.shape[1] != resolution:
            t = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
            t = torch.nn.functional.interpolate(t, size=resolution, mode="bilinear",
                                                antialias=True, align_corners=False)
            arr = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return arr
    from ..progress import progress_bar

    out = np.empty((len(indices), resolution, resolution, 3), dtype=np.uint8)
    bar = progress_bar(len(indices), "decode", enabled=progress and len(indices) > 2000, unit="img")
    for j, i in enumerate(indices):
        out[j] = _decode(source.files[i], resolution, native)
        bar.update()
    return out


_MEMO: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def input_side(name: str, resolution: int | None) -> int:
    """The image side in px: ``resolution``, or the data set's default when None. ValueError
    for anything but None or an int >= 1 (``resolution or default`` turned 0 into the
    default silently)."""
    if resolution is None:
        return get_spec(name).default_resolution
    try:  # any integer type (numpy's too), not a bool or a float
        side = operator.index(resolution) if not isinstance(resolution, bool) else None
    except TypeError:
        side = None
    if side is None or side < 1:
        raise ValueError(f"resolution must be an integer >= 1 (px) or None (the {name} "
                         f"default, {get_spec(name).default_resolution}), got {resolution!r}")
    return int(side)


def fetch_split(name: str, split: str) -> None:
    """Make sure a split's files are under the asset root, downloading them where the data set
    has an upstream (torchvision's CIFAR, md5-checked); nothing is decoded or cached. Raises
    ValueError for an unknown data set or split and AssetMissingError for files that are
    missing and have no download (ImageFolder sets: the message says where to place them)."""
    check_split(name, split)
    get_spec(name).source(split, asset_root(), True)


def check_split(name: str, split: str) -> None:
    """ValueError unless ``split`` is one of the data set's ``splits`` (an unknown name was
    read as another split: digits "val" returned the train images)."""
    splits = list(get_spec(name).splits)
    if split not in splits:
        raise ValueError(f"{name} has the splits {splits} (train, evaluation); got "
                         f"split={split!r}")


def load_split(name: str, split: str, resolution: int | None = None, *,
               download: bool = False, cache: bool = True, progress: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 3, H, W], labels int64 [N]) for a whole split, decoded once (and
    cached under the asset root unless ``cache=False``). ``split``: one of the data set's
    ``splits`` (train split, evaluation split); ``resolution``: H = W in px (None: the data
    set's ``default_resolution``); ``download`` lets torchvision fetch a missing CIFAR split.

    Raises ValueError for an unknown data set or split (an unknown split was read as another
    one: digits "val" returned the train images), AssetMissingError when the files are not
    under the asset root, ModuleNotFoundError for digits without scikit-learn."""
    spec = get_spec(name)
    check_split(name, split)
    resolution = input_side(name, resolution)
    key = (name, split, resolution, str(asset_root()))
    if key in _MEMO:
        return _MEMO[key]
    root = asset_root()
    # A train split may be partial (train_split_size): its size is part of the cache key.
    size = f"-of{train_split_size(name)}" if split == spec.splits[0] else ""
    npy = cache_dir(root) / f"{name}-{split}-{resolution}{size}.npy" \
        if cache and name != "digits" else None
    source = None
    if npy is not None and npy.exists() and npy.with_suffix(".labels.npy").exists():
        arr = np.load(npy, mmap_mode=None)
        labels = np.load(npy.with_suffix(".labels.npy"))
    else:
        source = spec.source(split, root, download)
        native = spec.default_resolution if name.startswith("cifar") else None
        arr = _decode_many(source, np.arange(len(source)), resolution, native, progress)
        labels = source.labels
        if npy is not None:
            tmp = npy.with_suffix(".tmp.npy")
            np.save(tmp, arr)
            np.save(npy.with_suffix(".labels.npy"), labels)
            tmp.replace(npy)
    images = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
    result = (images, torch.from_numpy(np.asarray(labels, dtype=np.int64)))
    _MEMO[key] = result
    return result


def normalize(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 normalized with the data set's mean and std."""
    spec = get_spec(dataset)
    mean = torch.tensor(spec.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std
