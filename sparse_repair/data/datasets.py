"""The data set registry: ``DATASETS`` maps a name to a ``DatasetSpec`` (classes,
normalization, default resolution, train and evaluation split names) whose ``source`` finds a
split's files under the asset root and returns them undecoded as a ``Source``.

Sources read the formats the data sets ship in: torchvision's CIFAR pickle batches, ImageFolder
trees of JPEGs, and scikit-learn's bundled digits. ``train_split_size`` counts the train images
present, which may be a partial split (see ``_present_batches``).
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..assets import UNPACK_HINT, AssetMissingError, asset_root
from ..runtime import user_stacklevel

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
    upstream: str | None = None              # where a missing split is downloaded from (None:
                                             # no download; place the files under the root)


@dataclass
class Source:
    """A split before decoding: either arrays in memory or a list of image files."""
    labels: np.ndarray                       # int64 [N]
    files: list[Path] | None = None
    array: np.ndarray | None = None          # uint8 [N, H, W, C] when already decoded

    def __len__(self) -> int:
        return len(self.labels)


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
    present = set(labels)
    empty = [d.name for label, d in enumerate(class_dirs) if label not in present]
    if empty:  # an empty split, or a class silently missing from accuracy and calibration
        raise AssetMissingError(f"{folder}: {len(empty)} class folder(s) hold no image "
                                f"({', '.join(sorted(exts))}), e.g. {empty[:3]}; {UNPACK_HINT}")
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
                      "full split.", UserWarning, stacklevel=user_stacklevel())
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
        # --download with the folder already in place is not an error (eval/run fetch first)
        if download and not (root / sub / split).is_dir():
            raise AssetMissingError(f"{sub} has no automatic download; place it under "
                                    f"{root / sub} in ImageFolder layout")
        classes = None
        if classes_file:
            text = resources.files("sparse_repair.data").joinpath(classes_file).read_text()
            classes = text.split()
        return _image_folder(root / sub / split, classes)
    return source


DIGITS_INSTALL = ('pip install scikit-learn (or pip install "sparse-repair[digits]"; the test '
                  "extra includes it too)")


def _digits_source(split: str, root: Path, download: bool = False) -> Source:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, inside its wheel), with a
    fixed stratified 80/20 split, as 3-channel uint8 so every model applies unchanged.

    Raises ModuleNotFoundError (name "sklearn") saying what to install when scikit-learn is
    missing: it is in the ``digits`` and ``test`` extras, not in the base install."""
    try:  # first, so a base install fails here with the fix rather than deeper in
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ModuleNotFoundError(f"the digits data set is read from scikit-learn, which is not "
                                  f"installed: {DIGITS_INSTALL}", name="sklearn") from e

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
                                              ["test_batch"], "labels"),
                           upstream="torchvision.datasets.CIFAR10 (md5-checked)"),
    "cifar100": DatasetSpec("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            32, ("train", "test"),
                            _torchvision_cifar("CIFAR100", "cifar-100-python", ["train"],
                                               ["test"], "fine_labels"),
                            upstream="torchvision.datasets.CIFAR100 (md5-checked)"),
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
