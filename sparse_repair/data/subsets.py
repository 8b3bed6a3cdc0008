"""Which images: fixed class-stratified evaluation subsets and seeded, label-free calibration
draws from the train split."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..assets import AssetMissingError, asset_root, cache_dir
from .datasets import get_spec, train_split_size
from .splits import _decode_many, input_side, normalize


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


def calibration_set(dataset: str, n: int = 1024, seed: int = 0, *,
                    resolution: int | None = None) -> torch.Tensor:
    """n training images drawn without replacement by a seeded generator, as a float32 tensor
    [n, 3, H, W] normalized as (pixel / 255 - mean) / std with the data set's per-channel mean
    and std (``normalize``); H = W = ``resolution`` in px (default: the data set's
    ``default_resolution``). No labels leave this function.

    The draw is ``torch.randperm(train_split_size(dataset), generator=seed)[:n]``, so it
    depends on the size of the train split present (see ``train_split_size``).
    Raises TypeError for an n or seed that is not an int; ValueError for an unknown data set or
    n outside [1, train split size]; ModuleNotFoundError for digits without scikit-learn;
    AssetMissingError when neither the train split nor a cached draw is under the asset
    root."""
    return _train_draw(dataset, n, seed, resolution, "calib")


def scoring_set(dataset: str, n: int = 1000, seed: int = 0, *, calib: int = 1024,
                resolution: int | None = None) -> torch.Tensor:
    """n unlabeled training images for label-free scoring (``sparse_repair.select``),
    disjoint from ``calibration_set(dataset, calib, seed)``: float32 [n, 3, H, W], normalized
    and sized as there. No labels leave this function, and the test split is never touched.

    The draw is the *tail* of the same seeded permutation whose head is the calibration set,
    ``torch.randperm(train_split_size(dataset), generator=seed)[-n:]``, so the two are disjoint
    by construction whenever calib + n <= the train split size (checked). Scoring on the
    calibration images themselves would reward a repair for fitting them (reconstruct solves a
    least-squares problem on exactly those inputs).
    Raises ValueError for a calib that is negative or not an int, n < 1 or calib + n above the
    train split size; TypeError, ValueError (unknown data set), ModuleNotFoundError and
    AssetMissingError as ``calibration_set``."""
    if isinstance(calib, bool) or not isinstance(calib, int) or calib < 0:
        raise ValueError(f"calib must be the calibration size (an int >= 0), got {calib!r}")
    try:
        pool = train_split_size(dataset)
    except AssetMissingError:
        pool = None  # a cached draw may still exist; _train_draw decides
    if pool is not None and isinstance(n, int) and n >= 1 and calib + n > pool:
        raise ValueError(f"{calib} calibration + {n} scoring images exceed the {pool} images of "
                         f"the {dataset} train split, so the two sets would overlap; use fewer "
                         f"scoring images (at most {max(pool - calib, 0)})")
    return _train_draw(dataset, n, seed, resolution, "score")


def _train_draw(dataset: str, n: int, seed: int, resolution: int | None, part: str
                ) -> torch.Tensor:
    """The head ("calib") or tail ("score") n of the seeded permutation of the train split."""
    what = "calibration" if part == "calib" else "scoring"
    for name, value in ((f"{what} size n", n), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}); "
                            f"pass for example {name.split()[-1]}=1024")
    spec = get_spec(dataset)
    resolution = input_side(dataset, resolution)
    root = asset_root()
    try:
        pool: int | None = train_split_size(dataset)
    except AssetMissingError as e:  # a machine holding only <root>/cache may still have it
        pool, missing = None, e
    if pool is not None and (n <= 0 or n > pool):
        raise ValueError(f"{what} size must be in [1, {pool}] (the {dataset} train split "
                         f"under {root} holds {pool} images), got {n}")
    # The decoded draw is cached (uint8, 3 MB for 1,024 CIFAR images) because a study decodes
    # the same images for every run, and so that a machine holding only <root>/cache (a GPU
    # runner given the test-split cache and these files) reproduces the draw exactly. The key
    # holds the train-split size: a draw from 30,000 images differs from one from 50,000.
    stem = f"{dataset}-{part}-{resolution}-n{n}-seed{seed}-of"
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
        perm = torch.randperm(len(source), generator=g)
        idx = (perm[:n] if part == "calib" else perm[len(perm) - n:]).numpy()
        native = spec.default_resolution if dataset.startswith("cifar") else None
        arr = _decode_many(source, idx, resolution, native)
        if npy is not None:
            tmp = npy.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, arr)
            tmp.replace(npy)
    images = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
    return normalize(images, dataset)
