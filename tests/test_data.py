"""Data layer: offline loading of every format, clear errors, label-free calibration,
stratified subsets, and the pretrained accuracy that pins normalization and label order."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_repair import data as D
from sparse_repair.assets import AssetMissingError, download, sha256_of, verify_sha256

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def asset_root(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_REPAIR_ASSETS", str(tmp_path))
    D._MEMO.clear()
    D._TRAIN_SIZE.clear()
    yield tmp_path
    D._MEMO.clear()
    D._TRAIN_SIZE.clear()


def _write_cifar100(root: Path, n: int = 20):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": list(range(n)), "coarse_labels": [0] * n}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
    return entry


def test_cifar100_loads_offline_from_torchvision_format(asset_root):
    entry = _write_cifar100(asset_root)
    images, labels = D.load_split("cifar100", "test")
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == list(range(20))
    assert torch.equal(images[3], torch.from_numpy(entry["data"][3].reshape(3, 32, 32)))


def _write_folder(root: Path, sub: str, split: str, classes=("a", "b"), per_class=3,
                  size=40, gray=False):
    for c in classes:
        d = root / sub / split / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            mode = "L" if gray else "RGB"
            Image.new(mode, (size, size), color=(i * 40 if gray else (i * 40, 0, 0))).save(
                d / f"{i}.JPEG")


def test_image_folder_loads_and_converts_grayscale(asset_root):
    _write_folder(asset_root, "imagenette", "val", gray=True)
    images, labels = D.load_split("imagenette", "val", resolution=16)
    assert images.shape == (6, 3, 16, 16), "grayscale JPEGs must come out as 3-channel RGB"
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_an_image_folder_class_without_images_is_refused(asset_root):
    """An empty class folder gave a split without that class (or an empty [0, 3, H, W] split):
    accuracy and calibration draws silently lost a class. It is refused, naming the folder."""
    _write_folder(asset_root, "imagenette", "val")
    (asset_root / "imagenette" / "val" / "c").mkdir()
    with pytest.raises(AssetMissingError, match=r"1 class folder\(s\) hold no image.*'c'"):
        D.load_split("imagenette", "val", resolution=16)


def test_missing_asset_error_names_the_path(asset_root):
    with pytest.raises(AssetMissingError, match=str(asset_root / "cifar10-jpeg" / "test")):
        D.load_split("cifar10-jpeg", "test")


def test_checksum_mismatch_raises(tmp_path):
    f = tmp_path / "w.th"
    f.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify_sha256(f, "12fca82f")


def test_download_passes_the_hash_to_torch_hub(tmp_path, monkeypatch):
    """download() hands the expected sha256 to torch.hub as hash_prefix (no network here)."""
    import torch.hub

    calls = []

    def fake(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake)
    dest = tmp_path / "weights" / "resnet20-12fca82f.th"
    assert download("https://example.invalid/r20.th", dest, "12fca82f") == dest
    assert calls == [("https://example.invalid/r20.th", str(dest), "12fca82f")]
    assert dest.read_bytes() == b"weights"


def test_download_hash_mismatch_is_the_checksum_valueerror(tmp_path):
    """torch.hub's RuntimeError on a bad hash becomes the ValueError naming the file and the
    fix; a file:// URL runs the real torch.hub code offline. Nothing lands at dest."""
    src = tmp_path / "src.th"
    src.write_bytes(b"not the weights")
    dest = tmp_path / "weights" / "w.th"
    with pytest.raises(ValueError, match=r"checksum mismatch for .*w\.th: expected sha256 "
                                         r"12fca82f\.\.\., got [0-9a-f]{64}; delete the file"):
        download(src.as_uri(), dest, "12fca82f")
    assert not dest.exists()
    digest = sha256_of(src)
    assert download(src.as_uri(), dest, digest[:8]).read_bytes() == b"not the weights"


def test_calibration_returns_images_only_and_is_seeded(asset_root):
    _write_folder(asset_root, "cifar10-jpeg", "train", classes=tuple("abcd"), per_class=5,
                  size=32)
    a = D.calibration_set("cifar10-jpeg", n=8, seed=3)
    b = D.calibration_set("cifar10-jpeg", n=8, seed=3)
    c = D.calibration_set("cifar10-jpeg", n=8, seed=4)
    assert isinstance(a, torch.Tensor) and a.dtype == torch.float32, "images only, no labels"
    assert a.shape == (8, 3, 32, 32)
    assert torch.equal(a, b), "same seed must give the same calibration images"
    assert not torch.equal(a, c), "another seed must draw other images"


def test_calibration_draw_is_cached_and_reproduced_without_the_train_folder(asset_root):
    _write_folder(asset_root, "cifar10-jpeg", "train", classes=tuple("abcd"), per_class=5,
                  size=32)
    first = D.calibration_set("cifar10-jpeg", n=8, seed=3)
    shutil.rmtree(asset_root / "cifar10-jpeg" / "train")
    again = D.calibration_set("cifar10-jpeg", n=8, seed=3)
    assert torch.equal(first, again), "the cached draw must equal the decoded one, bit for bit"
    with pytest.raises(AssetMissingError, match="train"):
        D.calibration_set("cifar10-jpeg", n=8, seed=4)  # not cached: needs the folder again


def test_stratified_subset_is_class_balanced():
    labels = np.repeat(np.arange(10), 1000)  # sorted by class, like ImageFolder
    idx = D.stratified_indices(labels, 2000)
    counts = np.bincount(labels[idx], minlength=10)
    assert (counts == 200).all(), f"per-class counts {counts}"
    assert np.array_equal(idx, D.stratified_indices(labels, 2000)), "subset must be fixed"


def test_digits_without_scikit_learn_says_what_to_install(asset_root, monkeypatch):
    """scikit-learn is not a base dependency: a base install asking for digits is told the
    install command (None in sys.modules makes the import fail, as if it were absent)."""
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    want = r'pip install scikit-learn \(or pip install "sparse-repair\[digits\]"'
    with pytest.raises(ModuleNotFoundError, match=want) as err:
        D.load_split("digits", "test")
    assert err.value.name == "sklearn"
    with pytest.raises(ModuleNotFoundError, match=want):
        D.calibration_set("digits", n=8)
    assert not (asset_root / "cache").exists(), "nothing may happen before the error"


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="cifar10-jpeg"):
        D.get_spec("mnist")


def test_imagenet100_class_list_is_shipped():
    from importlib import resources

    wnids = resources.files("sparse_repair.data").joinpath("imagenet100_wnids.txt").read_text()
    assert len(set(wnids.split())) == 100


def _write_cifar10(root: Path, batches=(1, 2, 3), n: int = 10, seed: int = 0):
    """Small files in torchvision's CIFAR-10 pickle layout (n images per batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in batches] + ["test_batch"]
    for name in names:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder


def test_cifar10_partial_train_split_uses_batches_present_and_warns_once(asset_root):
    _write_cifar10(asset_root, batches=(1, 2, 3))
    D._WARNED.clear()
    with pytest.warns(UserWarning, match=r"data_batch_4, data_batch_5 not found.*3 of 5") as w:
        images, labels = D.load_split("cifar10", "train")
    assert [x.filename for x in w] == [__file__], "the warning names the caller's line"
    assert images.shape == (30, 3, 32, 32), "the train split is the batches present, no more"
    assert D.train_split_size("cifar10") == 30
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning in the same process would raise
        D._MEMO.clear()
        D.calibration_set("cifar10", n=4, seed=0)
    test, _ = D.load_split("cifar10", "test")
    assert test.shape[0] == 10, "the test split is test_batch, whatever the train batches"


def test_cifar10_without_any_batch_names_the_folder(asset_root):
    with pytest.raises(AssetMissingError, match="cifar-10-batches-py"):
        D.load_split("cifar10", "test")


def test_calibration_cache_key_holds_the_train_split_size(asset_root):
    """A draw from 30 images is never served where the pool has 50 (nor the reverse)."""
    _write_cifar10(asset_root, batches=(1, 2, 3), n=10)
    small = D.calibration_set("cifar10", n=4, seed=0)
    assert list((asset_root / "cache").glob("cifar10-calib-32-n4-seed0-of30.npy"))
    _write_cifar10(asset_root, batches=(1, 2, 3, 4, 5), n=10)  # same first batches, 50 images
    D._TRAIN_SIZE.clear()
    D._MEMO.clear()
    full = D.calibration_set("cifar10", n=4, seed=0)
    assert list((asset_root / "cache").glob("cifar10-calib-32-n4-seed0-of50.npy"))
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(torch.randperm(30, generator=g)[:4],
                           torch.randperm(50, generator=torch.Generator().manual_seed(0))[:4])
    assert not torch.equal(small, full), "draws from pools of different size must differ"


def test_run_records_the_train_split_size(asset_root):
    from sparse_repair.models import create_model
    from sparse_repair.run import RunConfig, run_single

    _write_cifar10(asset_root, batches=(1, 2), n=20)
    torch.manual_seed(0)
    dense = create_model("resnet8")
    cfg = RunConfig(model="resnet8", dataset="cifar10", sparsity=0.5, repairs=["none"],
                    calib=8, n_eval=None, pretrained=False)
    (row,) = run_single(cfg, dense=dense)
    assert row["train_images"] == 40


needs_assets = pytest.mark.skipif(
    not (os.environ.get("SPARSE_REPAIR_ASSETS") and
         (Path(os.environ["SPARSE_REPAIR_ASSETS"]) / "cifar10-jpeg").exists()),
    reason="set SPARSE_REPAIR_ASSETS to an asset root holding cifar10-jpeg and weights "
           "(../shared/assets/unpack.sh .assets)")


_ROOT_ENV = os.environ.get("SPARSE_REPAIR_ASSETS")
needs_cifar10 = pytest.mark.skipif(
    not (_ROOT_ENV and (Path(_ROOT_ENV) / "cifar-10-batches-py" / "test_batch").exists()),
    reason="set SPARSE_REPAIR_ASSETS to an asset root holding cifar-10-batches-py and weights "
           "(../shared/assets/unpack.sh .assets)")

_STORED = json.loads((ROOT / "baselines" / "pretrained_eval.json").read_text())


@needs_cifar10
@pytest.mark.parametrize("model", ["resnet20", "resnet56"])
@pytest.mark.parametrize("subset", ["full", "stratified2000"])
def test_pretrained_accuracy_on_canonical_cifar10(model, subset, request):
    """The published checkpoints score 91.73 / 93.39 on the 10,000 canonical test images
    (upstream figures, assets README); anything else means the data, the normalization or the
    label order is wrong. The 2,000-image stratified subset is pinned too."""
    from sparse_repair.evaluate import evaluate
    from sparse_repair.weights import load_pretrained

    if (model, subset) == ("resnet56", "full") and not request.config.getoption("--nightly"):
        pytest.skip("ResNet-56 on 10,000 images takes ~3 min on 2 cores: --nightly")
    res = evaluate(load_pretrained(model), "cifar10", None if subset == "full" else 2000)
    want = _STORED["cifar10"][model][subset]
    assert res["n"] == (10_000 if subset == "full" else 2000)
    assert abs(res["top1"] - want) <= _STORED["tolerance_pt"], \
        f"{model} on cifar10 ({subset}): {res['top1']:.2f}% vs stored {want:.2f}%"


@needs_assets
def test_pretrained_resnet20_accuracy_matches_stored_value():
    from sparse_repair.evaluate import evaluate
    from sparse_repair.weights import load_pretrained

    stored = _STORED
    got = evaluate(load_pretrained("resnet20"), "cifar10-jpeg", n=2000)["top1"]
    want = stored["cifar10-jpeg"]["resnet20"]["stratified2000"]
    assert abs(got - want) <= stored["tolerance_pt"], \
        f"resnet20 on the stratified 2,000 subset: {got:.2f}% vs stored {want:.2f}%"


def test_scoring_set_is_disjoint_from_the_calibration_set_and_checked(asset_root):
    """The scoring images of sparse_repair.select are the tail of the calibration seed's
    permutation: never a calibration image, never a test image, and a size that would make the
    two overlap is refused."""
    _write_cifar10(asset_root, batches=(1, 2, 3), n=20)  # 60 training images, all distinct
    calib = D.calibration_set("cifar10", n=40, seed=3)
    score = D.scoring_set("cifar10", n=20, seed=3, calib=40)
    assert score.shape == (20, 3, 32, 32) and score.dtype == torch.float32
    together = torch.cat([calib, score]).flatten(1)
    assert len(torch.unique(together, dim=0)) == 60, "scoring and calibration images overlap"
    test, _ = D.load_split("cifar10", "test")
    test = D.normalize(test, "cifar10").flatten(1)
    assert not (score.flatten(1)[:, None] == test[None]).all(-1).any(), "a test image was drawn"
    with pytest.raises(ValueError, match="would overlap"):
        D.scoring_set("cifar10", n=21, seed=3, calib=40)
    with pytest.raises(ValueError, match="scoring size"):
        D.scoring_set("cifar10", n=0, seed=3, calib=40)
    assert torch.equal(score, D.scoring_set("cifar10", n=20, seed=3, calib=40)), "not seeded"


@pytest.mark.parametrize("kw", [{"n": "5"}, {"n": 5.5}, {"n": True}, {"seed": "0"},
                                {"seed": 1.0}])
def test_draw_sizes_and_seeds_must_be_ints(asset_root, kw):
    """A string or float size / seed is refused by name (it once surfaced as torch's slice
    error or a str-int comparison) before any image is read."""
    _write_cifar10(asset_root, batches=(1,), n=10)
    for draw, args in ((D.calibration_set, {"n": 4}), (D.scoring_set, {"n": 4, "calib": 4})):
        with pytest.raises(TypeError, match="must be an int"):
            draw("cifar10", **{**args, **kw})


@pytest.mark.parametrize("name, split", [("digits", "val"), ("cifar10", "validation"),
                                         ("cifar10", "Train")])
def test_an_unknown_split_is_refused_not_read_as_another(name, split):
    """digits "val" returned the train images and cifar10 "validation" the test split: an
    evaluation on training data that looks like a result. Now the split names are checked."""
    with pytest.raises(ValueError, match=r"has the splits \['train', '(test|val)'\]"):
        D.load_split(name, split)
    from sparse_repair.evaluate import evaluate

    with pytest.raises(ValueError, match=f"got split={split!r}"):  # before the model is read
        evaluate(torch.nn.Linear(1, 1), name, split=split)


@pytest.mark.parametrize("name", D.list_datasets())
def test_a_data_set_downloads_only_from_its_registered_upstream(name, asset_root, monkeypatch):
    """``DatasetSpec.upstream`` is the one record of which data sets can be downloaded (the
    benchmark suite's --download fetches exactly those): with an upstream, fetch_split asks
    torchvision for every split; without one, it never tries, and missing files are an
    AssetMissingError that says where to place them."""
    import torchvision

    calls = []

    class Recorder:
        def __init__(self, root, train, download):
            calls.append((train, download))

    for cls in ("CIFAR10", "CIFAR100"):
        monkeypatch.setattr(torchvision.datasets, cls, Recorder)
    spec = D.get_spec(name)
    for split in spec.splits:
        try:
            D.fetch_split(name, split)
        except AssetMissingError as e:  # the recorder wrote nothing: the files stay missing
            assert str(asset_root) in str(e), f"the error says where to place them: {e}"
    if spec.upstream:
        assert calls == [(True, True), (False, True)], "train and test splits downloaded"
    else:
        assert calls == [], f"{name} has no upstream and must not download"
