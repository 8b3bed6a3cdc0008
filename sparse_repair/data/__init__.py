"""Data sets as decoded uint8 tensors, calibration sets (images only) and stratified subsets.

Registry: ``str -> DatasetSpec``. Every split is decoded once into a uint8 tensor [N, C, H, W]
and cached as .npy under <asset root>/cache (keyed by data set, split and resolution), because
decoding tens of thousands of small JPEGs on 2 cores costs far more than the forward passes.
Normalization is applied per batch by ``normalize``.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..assets import UNPACK_HINT, AssetMissingError, asset_root, cache_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_resolution: int                  # side length in pixels fed to the model
    splits: tuple[str, str]                  # (train split, evaluation split)
    source: Callable[..., Source] = field(repr=False)


@dataclass
class Source:
    """A split before decoding: either arrays in memory or a list of image files."""
    labels: np.ndarray                       # int64 [N]
    files: list[Path] | None = None
    array: np.ndarray | None = None          # uint8 [N, H, W, C] when already decoded

    def __len__(self) -> int:
        return len(self.labels)


# ----------------------------------------------------------------------------- sources

def _image_folder(folder: Path, classes: list[str] | None = None) -> Source:
    if not folder.is_dir():
        raise AssetMissingError(f"image folder not found: looked for {folder}; {UNPACK_HINT}")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    if classes is not None:
        wanted = set(classes)
        class_dirs = [d for d in class_dirs if d.name in wanted]
        missing = wanted - {d.name for d in class_dirs}
        if missing:
            raise AssetMissingError(f"{folder} lacks {len(missing)} of the required class "
                                    f"folders, e.g. {sorted(missing)[:3]}")
    if not class_dirs:
        raise AssetMissingError(f"{folder} has no class sub-folders (ImageFolder layout needed)")
    files, labels = [], []
    exts = {".jpg", ".jpeg", ".png", ".bmp"}
    for label, d in enumerate(class_dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in exts:
                files.append(f)
                labels.append(label)
    return Source(np.asarray(labels, dtype=np.int64), files=files)


# Missing-batch warnings already given in this process (one per data set and folder).
_WARNED: set[tuple[str, str]] = set()


def _present_batches(root: Path, folder: str, files: list[str], split: str) -> list[str]:
    """The batch files of ``files`` that exist. A train split may be partial (the shared
    offline copy holds data_batch_1..3 of CIFAR-10, for size): use what is there and warn
    once per process naming what is missing; never pretend to hold the whole split."""
    present = [n for n in files if (root / folder / n).exists()]
    if not present:
        raise AssetMissingError(f"CIFAR {split} files not found: looked for {files} in "
                                f"{root / folder}; {UNPACK_HINT}")
    missing = [n for n in files if n not in present]
    if missing and (str(root), folder) not in _WARNED:
        _WARNED.add((str(root), folder))
        warnings.warn(f"{folder} under {root}: {', '.join(missing)} not found; the {split} "
                      f"split uses the {len(present)} of {len(files)} batch files present "
                      f"({', '.join(present)}). Calibration draws and result records carry "
                      "the train-image count, so they are never confused with draws from the "
                      "full split.", UserWarning, stacklevel=3)
    return present


def _cifar_pickle(root: Path, folder: str, files: list[str], label_key: str) -> Source:
    data, labels = [], []
    for name in files:
        path = root / folder / name
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    array = np.concatenate(data).transpose(0, 2, 3, 1)
    return Source(np.asarray(labels, dtype=np.int64), array=np.ascontiguousarray(array))


def _torchvision_cifar(cls_name: str, folder: str, train_files, test_files, label_key):
    def source(split: str, root: Path, download: bool = False) -> Source:
        if download:
            import torchvision

            getattr(torchvision.datasets, cls_name)(str(root), train=split == "train",
                                                    download=True)
        files = _present_batches(root, folder, train_files if split == "train" else test_files,
                                 split)
        return _cifar_pickle(root, folder, files, label_key)
    return source


def _folder_source(sub: str, classes_file: str | None = None):
    def source(split: str, root: Path, download: bool = False) -> Source:
        if download:
            raise AssetMissingError(f"{sub} has no automatic download; place it under "
                                    f"{root / sub} in ImageFolder layout")
        classes = None
        if classes_file:
            text = resources.files("sparse_repair.data").joinpath(classes_file).read_text()
            classes = text.split()
        return _image_folder(root / sub / split, classes)
    return source


def _digits_source(split: str, root: Path, download: bool = False) -> Source:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, inside its wheel), with a
    fixed stratified 80/20 split, as 3-channel uint8 so every model applies unchanged."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):  # every 5th image of each class is a test image: fixed, stratified
        idx = np.flatnonzero(labels == c)
        test[idx[::5]] = True
    keep = test if split == "test" else ~test
    array = np.repeat(images[keep][..., None], 3, axis=3)
    return Source(labels[keep], array=np.ascontiguousarray(array))


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", 10, IMAGENET_MEAN, IMAGENET_STD, 32, ("train", "test"),
                           _torchvision_cifar("CIFAR10", "cifar-10-batches-py",
                                              [f"data_batch_{i}" for i in range(1, 6)],
                                              ["test_batch"], "labels")),
    "cifar100": DatasetSpec("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            32, ("train", "test"),
                            _torchvision_cifar("CIFAR100", "cifar-100-python", ["train"],
                                               ["test"], "fine_labels")),
    # The pretrained akamaster weights were trained with ImageNet statistics (assets README).
    "cifar10-jpeg": DatasetSpec("cifar10-jpeg", 10, IMAGENET_MEAN, IMAGENET_STD, 32,
                                ("train", "test"), _folder_source("cifar10-jpeg")),
    "imagenette": DatasetSpec("imagenette", 10, IMAGENET_MEAN, IMAGENET_STD, 160,
                              ("train", "val"), _folder_source("imagenette")),
    "imagenet100": DatasetSpec("imagenet100", 100, IMAGENET_MEAN, IMAGENET_STD, 224,
                               ("train", "val"),
                               _folder_source("imagenet100", "imagenet100_wnids.txt")),
    "digits": DatasetSpec("digits", 10, (0.5,) * 3, (0.5,) * 3, 8, ("train", "test"),
                          _digits_source),
}


def list_datasets() -> list[str]:
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------- decoding

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


def load_split(name: str, split: str, resolution: int | None = None, *,
               download: bool = False, cache: bool = True, progress: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 3, H, W], labels int64 [N]) for a whole split, decoded once."""
    spec = get_spec(name)
    resolution = resolution or spec.default_resolution
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


# ----------------------------------------------------------------------------- subsets

def stratified_indices(labels: torch.Tensor | np.ndarray, n: int | None, seed: int = 0
                       ) -> np.ndarray:
    """A fixed class-stratified subset of size n (all indices when n is None or >= len).

    Each class contributes floor(n / K) images (the first classes one more for the remainder),
    picked by a seeded permutation within the class; returned in ascending index order. Never
    "the first n files": ImageFolder order is sorted by class.
    """
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    base, extra = divmod(n, len(classes))
    chosen = []
    for k, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        take = base + (1 if k < extra else 0)
        if take > len(idx):
            raise ValueError(f"class {c} has only {len(idx)} images, {take} requested")
        chosen.append(rng.permutation(idx)[:take])
    return np.sort(np.concatenate(chosen))


_TRAIN_SIZE: dict[tuple[str, str], int] = {}


def train_split_size(dataset: str) -> int:
    """Number of images (int) in the data set's train split under the asset root: the pool
    every calibration draw comes from. On the shared offline copy of CIFAR-10 this is 30,000
    (data_batch_1..3), on a full torchvision download 50,000; it is part of every calibration
    cache key and of every result record, so the two are never confused.

    Raises AssetMissingError when the train split is not under the asset root."""
    spec = get_spec(dataset)
    key = (dataset, str(asset_root()))
    if key not in _TRAIN_SIZE:
        _TRAIN_SIZE[key] = len(spec.source(spec.splits[0], asset_root()))
    return _TRAIN_SIZE[key]


def calibration_set(dataset: str, n: int = 1024, seed: int = 0, *,
                    resolution: int | None = None) -> torch.Tensor:
    """n training images drawn without replacement by a seeded generator, normalized,
    as a float32 tensor [n, 3, H, W]. No labels leave this function.

    The draw is ``torch.randperm(train_split_size(dataset), generator=seed)[:n]``, so it
    depends on the size of the train split present (see ``train_split_size``).
    Raises ValueError for n outside [1, train split size], AssetMissingError when neither the
    train split nor a cached draw is under the asset root."""
    spec = get_spec(dataset)
    resolution = resolution or spec.default_resolution
    root = asset_root()
    try:
        pool: int | None = train_split_size(dataset)
    except AssetMissingError as e:  # a machine holding only <root>/cache may still have it
        pool, missing = None, e
    if pool is not None and (n <= 0 or n > pool):
        raise ValueError(f"calibration size must be in [1, {pool}] (the {dataset} train split "
                         f"under {root} holds {pool} images), got {n}")
    # The decoded draw is cached (uint8, 3 MB for 1,024 CIFAR images) because a study decodes
    # the same images for every run, and so that a machine holding only <root>/cache (a GPU
    # runner given the test-split cache and these files) reproduces the draw exactly. The key
    # holds the train-split size: a draw from 30,000 images differs from one from 50,000.
    stem = f"{dataset}-calib-{resolution}-n{n}-seed{seed}-of"
    npy = None
    if dataset != "digits":
        if pool is not None:
            npy = cache_dir(root) / f"{stem}{pool}.npy"
        else:
            found = sorted(cache_dir(root).glob(f"{stem}*.npy"))
            if len(found) != 1:
                raise missing
            npy = found[0]
    if npy is not None and npy.exists():
        arr = np.load(npy)
    else:
        if pool is None:
            raise missing
        source = spec.source(spec.splits[0], root)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(source), generator=g)[:n].numpy()
        native = spec.default_resolution if dataset.startswith("cifar") else None
        arr = _decode_many(source, idx, resolution, native)
        if npy is not None:
            tmp = npy.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, arr)
            tmp.replace(npy)
    images = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
    return normalize(images, dataset)
