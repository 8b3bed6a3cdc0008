"""Data sets as decoded uint8 tensors, calibration sets (images only) and stratified subsets.

The implementation lives in three modules, read in this order:

- ``datasets``: the registry (``DATASETS``, ``get_spec``), the source of each format, and the
  size of the train split present (``train_split_size``);
- ``splits``: whole splits decoded once and cached (``load_split``), ``normalize``;
- ``subsets``: ``stratified_indices`` for evaluation, ``calibration_set`` and the disjoint
  ``scoring_set`` (label-free selection).

This module re-exports their public names, and the module-level caches that tests clear
(``_MEMO``, ``_TRAIN_SIZE``, ``_WARNED``: the same objects, so clearing them here clears them
there).
"""

# The private caches are re-exported as themselves (``X as X``), the explicit re-export form.
from .datasets import _TRAIN_SIZE as _TRAIN_SIZE
from .datasets import _WARNED as _WARNED
from .datasets import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetSpec,
    Source,
    get_spec,
    list_datasets,
    train_split_size,
)
from .splits import _MEMO as _MEMO
from .splits import check_split, fetch_split, load_split, normalize
from .subsets import calibration_set, scoring_set, stratified_indices

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetSpec",
    "Source",
    "calibration_set",
    "check_split",
    "fetch_split",
    "get_spec",
    "list_datasets",
    "load_split",
    "normalize",
    "scoring_set",
    "stratified_indices",
    "train_split_size",
]
