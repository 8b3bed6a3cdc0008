"""Checkpoints that are not what they claim (issue #18 items 9 and 12): every loader checks the
whole file before it touches the model and raises one CheckpointError naming the file, what is
wrong and the fix; weights that do not fit the data set (classes, label space, resolution,
NaN/Inf) are refused before any image is read; the CLI exits 2 with the message, no traceback.

All checkpoints are small tmp files of ResNet-8 (44 tensors, 78k weights)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from sparse_repair.assets import AssetMissingError
from sparse_repair.cli import main
from sparse_repair.evaluate import evaluate
from sparse_repair.models import create_model
from sparse_repair.weights import (
    CheckpointError,
    check_finite,
    check_weights_fit,
    forget_weights_record,
    guess_architecture,
    load_checkpoint_into,
    load_trained,
    read_state_dict,
    weights_record,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "baselines" / "checkpoints" / "resnet8-digits.pt"


def _model(seed: int = 0, num_classes: int = 10, name: str = "resnet8") -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k])
                                                  for k in before)


@pytest.fixture
def target():
    """A ResNet-8 (seed 1) and a copy of its state, to prove a refused load changed nothing."""
    model = _model(seed=1)
    return model, _state(model)


@pytest.fixture
def good(tmp_path) -> Path:
    """A valid zip-format checkpoint of ResNet-8 (seed 0)."""
    path = tmp_path / "good.pt"
    torch.save(_model(seed=0).state_dict(), path)
    return path


def _refused(target, path, *match: str) -> str:
    model, before = target
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_into(model, path, arch="resnet8")
    msg = str(e.value)
    assert str(path) in msg, msg
    for m in match:
        assert m in msg, f"{m!r} not in: {msg}"
    assert _unchanged(model, before), "a refused checkpoint changed the model"
    assert weights_record(model) is None
    return msg


# ----------------------------------------------------------------------------- formats

def test_valid_checkpoints_load_in_every_supported_layout(tmp_path, good, target):
    want = _model(seed=0).state_dict()
    sd = torch.load(good, weights_only=True)
    layouts = {
        "bare.pt": sd,
        "upstream.th": {"state_dict": {"module." + k: v for k, v in sd.items()}},  # DataParallel
        "trainer.pt": {"model": sd},
        "compiled.pt": {"_orig_mod." + k: v for k, v in sd.items()},  # torch.compile
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    # BatchNorm fills a missing num_batches_tracked (the published CIFAR files have none).
    torch.save({k: v for k, v in sd.items() if "num_batches_tracked" not in k},
               tmp_path / "no_nbt.pt")
    for name in [*layouts, "legacy.pt", "no_nbt.pt"]:
        model = _model(seed=1)
        assert load_checkpoint_into(model, tmp_path / name, arch="resnet8") is model
        got = model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if "num_batches" not in k), name
        assert weights_record(model).source == str(tmp_path / name)


def test_missing_file_is_file_not_found(tmp_path, target):
    with pytest.raises(AssetMissingError, match="checkpoint not found"):
        load_checkpoint_into(target[0], tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="a directory"):
        read_state_dict(tmp_path)


def test_empty_file(tmp_path, target):
    (tmp_path / "empty.pt").write_bytes(b"")
    _refused(target, tmp_path / "empty.pt", "is empty (0 bytes)", "torch.save")


@pytest.mark.parametrize(("content", "what"), [
    (b"hello world\n", "a text file (first line 'hello world')"),
    (b"<!DOCTYPE html>\n<html><body>Not Found</body></html>", "an HTML page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", "git lfs pull"),
    (b"\x89HDF\r\n\x1a\n" + bytes(64), "an HDF5 file"),
    (bytes(range(200, 256)) * 3, "not a format torch.save writes"),
])
def test_not_a_torch_checkpoint(tmp_path, target, content, what):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    _refused(target, path, "is not a torch checkpoint", what, "torch.save(model.state_dict()")


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
@pytest.mark.parametrize("legacy", [False, True])
def test_truncated(tmp_path, good, target, keep, legacy):
    src = tmp_path / "src.pt"
    torch.save(torch.load(good, weights_only=True), src,
               _use_new_zipfile_serialization=not legacy)
    data = src.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    _refused(target, cut, "is truncated", "legacy torch pickle" if legacy else "zip archive",
             "download the file again")


def test_flipped_bytes_inside_a_tensor_are_caught_by_the_crc(tmp_path, good, target):
    """torch.load does not check CRCs: without the check these bytes load as wrong weights."""
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 256)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 64
    data[start:start + 4] = bytes(4) if data[start:start + 4] != bytes(4) else b"\x01" * 4
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    _refused(target, bad, "is corrupt", f"{info.filename!r} fails its CRC check")


def test_pickled_whole_model_is_refused_with_the_fix(tmp_path, target):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    _refused(target, tmp_path / "whole.pt", "pickled Python objects", "Linear",
             "save model.state_dict() instead")


def test_content_that_is_not_a_state_dict(tmp_path, good, target):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    _refused(target, tmp_path / "list.pt", "holds a list, not a state dict")
    sd = torch.load(good, weights_only=True)
    torch.save({"epoch": 3, "net": sd}, tmp_path / "nested.pt")
    _refused(target, tmp_path / "nested.pt", "2 entries that are not tensors", "'epoch'",
             "'state_dict' or 'model'")


# ----------------------------------------------------------------------------- contents

def test_wrong_architecture_names_missing_unexpected_and_the_match(tmp_path, target):
    torch.save(_model(name="resnet20").state_dict(), tmp_path / "r20.pt")
    msg = _refused(target, tmp_path / "r20.pt", "does not fit resnet8",
                   "116 tensors in the file, 44 in the model",
                   "the checkpoint has 72 tensors the model does not (e.g. layer1.1.bn1.bias",
                   "These are resnet20 weights (10 classes): pass --model resnet20")
    assert "missing" not in msg  # resnet8's keys are a subset of resnet20's
    # (num_batches_tracked is optional: BatchNorm fills it, so layer3.0 lacks 10, not 12.)
    # Fewer tensors than the model: the missing ones are counted and named.
    sd = torch.load(tmp_path / "r20.pt", weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer3")}, tmp_path / "p.pt")
    _refused(target, tmp_path / "p.pt", "10 of the model's 44 tensors are missing from the "
             "checkpoint (e.g. layer3.0.bn1.bias", "Pass a checkpoint saved from resnet8")


def test_guess_architecture_any_class_count():
    assert guess_architecture(_model(num_classes=100, name="resnet20").state_dict()) == \
        ("resnet20", 100)
    assert guess_architecture({"foo.weight": torch.zeros(3)}) is None


def test_shape_mismatch_names_each_tensor(tmp_path, target):
    sd = _state(_model())
    sd["conv1.weight"] = torch.zeros(16, 1, 3, 3)   # a 1-channel (grayscale) stem
    sd["bn1.running_var"] = torch.ones(8)
    torch.save(sd, tmp_path / "gray.pt")
    _refused(target, tmp_path / "gray.pt", "2 tensors have other shapes",
             "conv1.weight: checkpoint [16, 1, 3, 3], model [16, 3, 3, 3]",
             "bn1.running_var: checkpoint [8], model [16]")


def test_wrong_class_count(tmp_path, target):
    torch.save(_model(num_classes=100).state_dict(), tmp_path / "c100.pt")
    _refused(target, tmp_path / "c100.pt", "has 100 output classes (linear [100, 64]) but "
             "resnet8 was built for 10", "--num-classes 100")


def test_nan_in_a_checkpoint_names_the_first_bad_tensor(tmp_path, target):
    sd = _state(_model())
    sd["layer2.0.bn1.running_var"][3] = float("nan")
    sd["linear.weight"][0, 0] = float("inf")
    torch.save(sd, tmp_path / "nan.pt")
    _refused(target, tmp_path / "nan.pt", "tensor 'layer2.0.bn1.running_var' holds 1 NaN/Inf "
             "values of 32 (and 1 more tensors)")


# ----------------------------------------------------------------------------- trained + sidecar

def test_load_trained_checks_the_sidecar(tmp_path, good):
    side = tmp_path / "good.pt.json"
    side.write_text(json.dumps({"model": "resnet8", "dataset": "digits", "num_classes": 10,
                                "resolution": 8}))
    model, meta = load_trained(good)
    assert weights_record(model).dataset == "digits" and weights_record(model).resolution == 8
    assert not model.training
    for text, match in [("{\"model\": ", "is not valid JSON"), ("[1]", "holds a list"),
                        ('{"model": "resnet8"}', "lacks num_classes"),
                        ('{"model": "resnet9", "num_classes": 10}', "'resnet9', which is not"),
                        ('{"model": "resnet8", "num_classes": 0}', "num_classes=0")]:
        side.write_text(text)
        with pytest.raises(CheckpointError, match=match) as e:
            load_trained(good)
        assert str(side) in str(e.value) and "delete it to load" in str(e.value)
    side.write_text(json.dumps({"model": "resnet20", "num_classes": 10}))
    with pytest.raises(CheckpointError, match="These are resnet8 weights"):
        load_trained(good)


# ----------------------------------------------------------------------------- weights vs data

def test_check_weights_fit(tmp_path, good):
    (tmp_path / "good.pt.json").write_text(json.dumps(
        {"model": "resnet8", "dataset": "cifar10", "num_classes": 10, "resolution": 32}))
    model, _ = load_trained(good)
    check_weights_fit(model, "cifar10", 10, 32)
    check_weights_fit(model, "cifar10-jpeg", 10, 32)   # same labels, shifted images
    with pytest.raises(CheckpointError, match=r"trained on cifar10, whose classes are not "
                       r"those of imagenette.*--dataset imagenette --out FILE"):
        check_weights_fit(model, "imagenette", 10, 32)
    with pytest.raises(CheckpointError, match=r"trained at 32 px but would run on cifar10 at "
                       r"64 px: pass --resolution 32"):
        check_weights_fit(model, "cifar10", 10, 64)
    with pytest.raises(CheckpointError, match=r"output layer 'linear' has 10 classes but "
                       r"cifar100 has 100"):
        check_weights_fit(model, "cifar100", 100, 32)
    forget_weights_record(model)                        # e.g. after fine-tuning elsewhere
    check_weights_fit(model, "imagenette", 10, 160)
    with torch.no_grad():
        model.layer1[0].bn2.running_var[5] = float("nan")
    with pytest.raises(CheckpointError, match=r"the model: tensor 'layer1.0.bn2.running_var' "
                       r"holds 1 NaN/Inf values of 16"):
        check_weights_fit(model, "imagenette", 10, 160)
    check_finite({"a": torch.zeros(2), "n": torch.tensor(3)}, "x")  # ints are not checked


def test_evaluate_refuses_before_reading_any_image(monkeypatch, good):
    """evaluate() checks the model against the data set first: a model that cannot fit never
    reaches load_split (which would read the data set)."""
    import sparse_repair.evaluate as E

    def no_data(*a, **k):
        raise AssertionError("load_split was called")

    monkeypatch.setattr(E, "load_split", no_data)
    model = _model()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="tensor 'conv1.weight' holds 1 NaN/Inf"):
        evaluate(model, "digits")
    with pytest.raises(CheckpointError, match="'linear' has 100 classes but digits has 10"):
        evaluate(_model(num_classes=100), "digits")


# ----------------------------------------------------------------------------- command line

def _cli_refuses(capsys, argv: list[str], *match: str) -> None:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("sparse-repair: error: ") and "Traceback" not in err, err
    for m in match:
        assert m in err, f"{m!r} not in: {err}"


def test_cli_allocate_eval_run_exit_2_on_bad_checkpoints(tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    r20 = tmp_path / "r20.pt"
    torch.save(_model(name="resnet20").state_dict(), r20)
    common = ["--model", "resnet8", "--weights"]
    _cli_refuses(capsys, ["allocate", *common, str(text), "--sparsity", "0.9"],
                 str(text), "is not a torch checkpoint")
    _cli_refuses(capsys, ["allocate", *common, str(r20), "--sparsity", "0.9"],
                 "does not fit resnet8", "pass --model resnet20")
    _cli_refuses(capsys, ["eval", *common, str(text), "--dataset", "digits"],
                 "is not a torch checkpoint")
    _cli_refuses(capsys, ["run", *common, str(r20), "--dataset", "digits", "--calib", "16"],
                 "does not fit resnet8", "pass --model resnet20")
    r8 = tmp_path / "r8.pt"
    torch.save(_model().state_dict(), r8)
    _cli_refuses(capsys, ["eval", *common, str(r8), "--dataset", "cifar100"],
                 "has 10 output classes (linear [10, 64]) but resnet8 was built for 100")


def test_cli_refuses_weights_that_do_not_fit_the_data_set(tmp_path, capsys, monkeypatch):
    """The digits checkpoint's sidecar says digits at 8 px: another data set or resolution is
    refused before any image is read (so the test needs no other data set)."""
    import sparse_repair.evaluate as E

    def no_data(*a, **k):
        raise AssertionError("load_split was called")

    monkeypatch.setattr(E, "load_split", no_data)
    for dataset in ("cifar10", "imagenette"):
        _cli_refuses(capsys, ["eval", "--model", "resnet8", "--weights", str(DIGITS),
                              "--dataset", dataset],
                     f"trained on digits, whose classes are not those of {dataset}")
    _cli_refuses(capsys, ["run", "--model", "resnet8", "--weights", str(DIGITS), "--dataset",
                          "digits", "--resolution", "16", "--repair", "none"],
                 "trained at 8 px but would run on digits at 16 px: pass --resolution 8")
    nan = tmp_path / "nan.pt"
    sd = torch.load(DIGITS, weights_only=True)["model"]
    sd["layer1.0.bn1.running_var"][0] = float("nan")
    torch.save(sd, nan)
    _cli_refuses(capsys, ["eval", "--model", "resnet8", "--weights", str(nan), "--dataset",
                          "digits"], "tensor 'layer1.0.bn1.running_var' holds 1 NaN/Inf")
    _cli_refuses(capsys, ["run", "--model", "resnet8", "--weights", str(nan), "--dataset",
                          "digits", "--repair", "none"], "layer1.0.bn1.running_var")


def test_published_weights_on_another_data_set(capsys):
    """The issue's example: CIFAR-10 weights on Imagenette (needs the published file)."""
    from sparse_repair.assets import asset_root
    from sparse_repair.weights import PRETRAINED
    if not (asset_root() / "weights" / PRETRAINED["resnet20"].filename).exists():
        pytest.skip("published resnet20 weights not under the asset root")
    _cli_refuses(capsys, ["run", "--pretrained", "--dataset", "imagenette", "--repair", "none"],
                 "(published resnet20) were trained on cifar10, whose classes are not those "
                 "of imagenette")


@pytest.mark.parametrize("resolution", [0, -4, "eight", 1.5, True])
def test_sidecar_resolution_must_be_a_positive_int(tmp_path, resolution):
    """resolution 0 was read as "the data set's default" (a silent substitution) and "eight"
    reached torch's interpolate; both are refused by the sidecar check, naming the file."""
    import json
    import shutil

    from sparse_repair.weights import CheckpointError, read_sidecar

    src = Path(__file__).resolve().parents[1] / "baselines" / "checkpoints" / "resnet8-digits.pt"
    ckpt = tmp_path / "m.pt"
    shutil.copy(src, ckpt)
    meta = json.loads(Path(str(src) + ".json").read_text())
    meta["resolution"] = resolution
    Path(str(ckpt) + ".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"m\.pt\.json has resolution="):
        read_sidecar(ckpt)
