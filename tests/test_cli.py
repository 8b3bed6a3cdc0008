"""Command line and run configuration: RunConfig (run) and TrainConfig (train) are the one source
of their commands' defaults, user input with unknown keys is refused, `train` never replaces a
checkpoint unasked, and `eval` reports the whole split unless asked for a subset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sparse_repair.allocation import list_allocators
from sparse_repair.cli import build_parser, main
from sparse_repair.run import RunConfig
from sparse_repair.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "baselines" / "checkpoints" / "resnet8-digits.pt")


def _subparser(name: str):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def test_run_flags_take_every_default_from_runconfig():
    p = _subparser("run")
    defaults = vars(p.parse_args([]))
    for f in dataclasses.fields(RunConfig):
        want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert defaults[f.name] == want, f"--{f.name}: CLI default differs from RunConfig"


def test_eval_defaults_to_the_full_split():
    assert vars(_subparser("eval").parse_args([]))["n_eval"] is None
    assert vars(_subparser("eval").parse_args(["--n-eval", "500"]))["n_eval"] == 500
    assert vars(_subparser("run").parse_args(["--n-eval", "full"]))["n_eval"] is None


@pytest.mark.parametrize("command", ["eval", "run", "select"])
def test_n_eval_help_and_errors_speak_the_command_line(capsys, command):
    """The help says 'full' (the Python API's None is not a command-line value), and a bad
    value is argparse's usage error naming the flag, not an internal function."""
    help_text = " ".join(_subparser(command).format_help().split())
    n_eval_help = help_text.split("--n-eval N|full ", 2)[-1].split(" --", 1)[0]
    assert "'full' = " in n_eval_help and "None" not in n_eval_help, n_eval_help
    with pytest.raises(SystemExit):
        _subparser("eval").parse_args(["--n-eval", "None"])
    err = capsys.readouterr().err
    assert ("argument --n-eval: expected an image count >= 1, or 'full' for the whole split, "
            "got 'None'") in err


@pytest.mark.parametrize("command", ["eval", "run", "select"])
@pytest.mark.parametrize("value", ["0", "-5", "1.5", "None"])
def test_n_eval_below_one_is_a_usage_error_before_anything_loads(capsys, command, value):
    """0 and negative counts were parsed and refused only later (eval: after loading the model
    and, with --download, the data; select/run: as "int >= 1 or None", the API's spelling)."""
    with pytest.raises(SystemExit):
        _subparser(command).parse_args(["--n-eval", value])
    err = capsys.readouterr().err
    assert f"argument --n-eval: expected an image count >= 1, or 'full' for the whole split, " \
           f"got {value!r}" in err, err


def test_runconfig_from_dict_refuses_unknown_keys_and_names_valid_ones():
    with pytest.raises(ValueError, match=r"'calibration'.*valid settings: model, dataset"):
        RunConfig.from_dict({"model": "resnet20", "calibration": 512})


def test_repair_options_reach_the_run_and_labelled_variants_need_a_method():
    cfg = RunConfig.from_dict({"repairs": ["asr", "asr_pooled"], "repair_options": {
        "asr_pooled": {"method": "asr", "shrinkage": "pooled"}}})
    assert cfg.repair_calls() == [("asr", "asr", {}),
                                  ("asr_pooled", "asr", {"shrinkage": "pooled"})]
    with pytest.raises(ValueError, match="labelled variant needs"):
        RunConfig.from_dict({"repairs": ["asr_pooled"]})
    with pytest.raises(ValueError, match="not in repairs"):
        RunConfig.from_dict({"repairs": ["asr"], "repair_options": {"bn_recal": {}}})


def test_eval_prints_which_images_it_used(capsys):
    assert main(["eval", "--model", "resnet8", "--dataset", "digits", "--weights", DIGITS,
                 "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["subset"] == "full" and full["n"] == 364 and full["split"] == "test"
    # the asset root in effect is recorded, even when it came from the environment
    from sparse_repair.assets import asset_root

    assert full["config"]["assets"] == str(asset_root())
    assert main(["eval", "--model", "resnet8", "--dataset", "digits", "--weights", DIGITS,
                 "--n-eval", "100"]) == 0
    out = capsys.readouterr().out
    assert "stratified subset of the test split, 100 images" in out


def test_run_with_a_labelled_variant(capsys):
    assert main(["run", "--model", "resnet8", "--dataset", "digits", "--weights", DIGITS,
                 "--sparsity", "0.8", "--n-eval", "full", "--calib", "128",
                 "--repair", "bn_recal,asr_pooled",
                 "--repair-options", '{"asr_pooled": {"method": "asr", "shrinkage": "pooled"}}',
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["repair"], r["method"]) for r in rows] == [("bn_recal", "bn_recal"),
                                                          ("asr_pooled", "asr")]
    assert rows[1]["options"]["shrinkage"] == "pooled"


@pytest.mark.parametrize("command, splits", [("eval", ["test"]), ("run", ["train", "test"])])
def test_download_fetches_the_weights_and_every_split_the_command_reads(command, splits,
                                                                        monkeypatch):
    """--download was accepted by `run` but ignored: the weights and data were then read
    without a download. Each command fetches what it reads, before anything else runs."""
    from sparse_repair import data as D
    from sparse_repair import weights as W

    fetched = []

    def fake_weights(name, allow_download=False):
        fetched.append(("weights", name, allow_download))

    def fake_split(name, split):
        fetched.append((name, split, True))
        if split == splits[-1]:
            raise RuntimeError("stop after the downloads")

    monkeypatch.setattr(W, "pretrained_path", fake_weights)
    monkeypatch.setattr(D, "fetch_split", fake_split)
    with pytest.raises(RuntimeError, match="stop after the downloads"):
        main([command, "--model", "resnet20", "--dataset", "cifar10", "--pretrained",
              "--download"])
    assert fetched == [("weights", "resnet20", True)] + [("cifar10", s, True) for s in splits]


def test_folder_data_set_already_in_place_is_not_a_download_error(tmp_path):
    """ImageFolder data sets have no automatic download; --download refuses only when the
    folder is missing, and names where to place it."""
    from sparse_repair.assets import AssetMissingError
    from sparse_repair.data import get_spec

    spec = get_spec("imagenette")
    with pytest.raises(AssetMissingError, match="no automatic download; place it under"):
        spec.source("val", tmp_path, download=True)
    (tmp_path / "imagenette" / "val" / "n01440764").mkdir(parents=True)
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (8, 8)).save(tmp_path / "imagenette" / "val" / "n01440764" / "a.JPEG")
    assert len(spec.source("val", tmp_path, download=True)) == 1


@pytest.mark.parametrize("argv, message", [
    # each was accepted and silently replaced: the published weights, the env asset root,
    # the data set's default resolution, the default store
    (["run", "--weights", ""], "--weights is an empty path"),
    (["eval", "--weights", ""], "--weights is an empty path"),
    (["eval", "--assets", "", "--model", "resnet8", "--dataset", "digits", "--weights", DIGITS],
     "empty asset root"),
    (["eval", "--model", "resnet8", "--dataset", "digits", "--weights", DIGITS,
      "--resolution", "0"], "--resolution must be an int >= 1"),
    (["study", "status", "studies/evidence.toml", "--db", ""], "empty --db path"),
])
def test_an_empty_or_zero_value_is_refused_not_replaced_by_a_default(argv, message, capsys,
                                                                     monkeypatch):
    monkeypatch.setenv("SPARSE_REPAIR_ASSETS", str(ROOT / "no-such-root"))  # restored after
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_load_split_refuses_a_resolution_it_would_have_replaced():
    import numpy as np

    from sparse_repair.data import load_split
    from sparse_repair.evaluate import evaluate
    from sparse_repair.weights import load_trained

    for bad in (0, -3, True, 8.0):
        with pytest.raises(ValueError, match=r"resolution must be an integer >= 1 \(px\)"):
            load_split("digits", "test", resolution=bad)
    # numpy integers are integers
    assert load_split("digits", "test", resolution=np.int64(8))[0].shape[-1] == 8
    model, _ = load_trained(DIGITS)  # checked before the weights' fit, not read as "0 px"
    with pytest.raises(ValueError, match=r"resolution must be an integer >= 1"):
        evaluate(model, "digits", 50, resolution=0)


def test_download_fetches_files_without_decoding_them(monkeypatch):
    """--download fetched by load_split, which decoded and cached the whole split at the
    default size (imagenet100 at 224 px: ~19 GB) although the run reads another size."""
    from sparse_repair import data as D
    from sparse_repair.cli import _fetch

    monkeypatch.setattr(D, "load_split", lambda *a, **k: pytest.fail("decoded a split"))
    seen = []
    spec = dataclasses.replace(D.get_spec("digits"), source=lambda split, root, download=False:
                               seen.append((split, download)))
    monkeypatch.setitem(D.DATASETS, "digits", spec)
    _fetch("resnet8", "digits", False, DIGITS, spec.splits)
    assert seen == [("train", True), ("test", True)]


def test_missing_optional_dependency_is_one_clear_error(monkeypatch, capsys):
    import sys

    from sparse_repair import data as D

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    D._MEMO.clear()
    assert main(["eval", "--model", "resnet8", "--dataset", "digits", "--weights", DIGITS]) == 2
    assert "pip install" in capsys.readouterr().err


def test_allocate_min_keep_flag_removes_layer_collapse_and_keeps_the_total(capsys):
    """`--min-keep K` reaches allocate(min_keep=K): on the digits ResNet-8 at 0.999, global
    magnitude empties 4 layers; with --min-keep 1 none is empty and the total is unchanged."""
    args = ["allocate", "--model", "resnet8", "--weights", DIGITS, "--method",
            "global_magnitude", "--sparsity", "0.999", "--json"]
    with pytest.warns(UserWarning, match="keeps 0 weights in 4 layer"):
        assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["min_keep"] == 0
    assert plain["collapsed"] == ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv1",
                                  "layer3.0.conv2"]
    assert main(args + ["--min-keep", "1"]) == 0
    floored = json.loads(capsys.readouterr().out)
    assert floored["min_keep"] == 1 and floored["collapsed"] == []
    assert all(layer["kept"] >= 1 for layer in floored["layers"])
    assert floored["total"]["kept"] == plain["total"]["kept"] == 75  # 74800 - round(.999 N)
    assert main(args + ["--min-keep", "-1"]) == 2
    assert "--min-keep must be >= 0" in capsys.readouterr().err  # named as the flag typed
    assert "--min-keep" in _subparser("allocate").format_help()


@pytest.mark.parametrize(("bad", "match"), [
    ({"sparsity": 1.0}, "sparsity"), ({"scoring": -5}, "scoring must be an int >= 0"),
    ({"seed": 1.5}, "seed must be an int"), ({"calib": 0}, "calib must be an int >= 1"),
    ({"seed": 2**64}, r"seed must be an int in \[0, 2\*\*64 - 1\]"),  # was torch's "Overflow"
    ({"n_eval": 0}, "n_eval"), ({"resolution": 0}, "resolution"),
    ({"device": "foo"}, "not a torch device"), ({"repairs": "bn_recal"}, "list of names"),
    ({"exclude": "conv1"}, "list of names"), ({"repair_options": ["bn_recal"]}, "JSON object"),
    ({"repairs": ["bn_recal"], "repair_options": {"bn_recal": 5}}, "JSON object"),
])
def test_runconfig_refuses_values_that_would_fail_only_after_loading(bad, match):
    """A study file or command line with such a value is refused before any model loads (a
    bad-input pass found them failing every run after its retries, or mid-run)."""
    with pytest.raises((ValueError, TypeError), match=match):
        RunConfig.from_dict(bad)


def test_cuda_device_without_cuda_is_one_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["run", "--model", "resnet8", "--dataset", "digits", "--weights", DIGITS,
                 "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_bad_json_in_repair_options_is_a_usage_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        _subparser("run").parse_args(["--repair-options", "{bad"])
    err = capsys.readouterr().err
    assert "argument --repair-options: not valid JSON" in err, err
    assert "expected an object such as" in err


# ----------------------------------------------------------------------------- train / allocate

def test_train_flags_take_every_default_and_help_from_trainconfig():
    """`train --help` shows, for every TrainConfig field, the field's own help text and its
    default; parsing no flags gives exactly TrainConfig's defaults (the CLI restates none)."""
    p = _subparser("train")
    defaults = vars(p.parse_args([]))
    actions = {a.dest: a for a in p._actions}
    help_text = " ".join(p.format_help().split())
    for f in dataclasses.fields(TrainConfig):
        assert defaults[f.name] == f.default, f"--{f.name}: CLI default differs from TrainConfig"
        assert f.metadata["help"], f"TrainConfig.{f.name} has no help text"
        # the API's None is spelled 'none' on the command line
        text = f"{f.metadata['help']} (default: {f.default})"
        if f.default is None:
            text = text.replace("None = ", "'none' = ").replace("(default: None)",
                                                                 "(default: none)")
        if f.name in ("model", "dataset"):  # the help names the registry's choices
            text += "; one of: "
        assert actions[f.name].help.startswith(text)
        assert text in help_text
    assert "--overwrite, --no-overwrite" in help_text


def test_trainconfig_from_dict_refuses_unknown_keys_and_names_valid_ones():
    with pytest.raises(ValueError, match=r"'epoch'.*valid settings: model, dataset, epochs, "):
        TrainConfig.from_dict({"epoch": 3})


@pytest.mark.parametrize("out", ["", "   ", None, 5])
def test_train_refuses_an_empty_or_non_string_out(out):
    with pytest.raises(ValueError, match=r"out must be a checkpoint path \(a non-empty string\)"):
        TrainConfig.from_dict({"model": "resnet8", "dataset": "digits", "out": out})


@pytest.mark.parametrize(("bad", "match"), [
    ({"model": "resnet9"}, "unknown model 'resnet9'; choose one of"),
    ({"dataset": "digit"}, "unknown data set 'digit'; choose one of"),
    ({"device": "gpu0"}, "not a torch device"), ({"overwrite": "false"}, "true or false"),
])
def test_train_refuses_a_bad_name_or_flag_before_any_data_is_read(tmp_path, bad, match):
    """A typo in the model name failed only after the train split was loaded."""
    with pytest.raises((ValueError, TypeError), match=match):
        TrainConfig.from_dict({"out": str(tmp_path / "m.pt"), **bad})


class _DataRead(Exception):
    """Raised by a stubbed load_split: training got as far as reading data."""


def test_train_refuses_an_existing_checkpoint_before_any_data_is_read(tmp_path, monkeypatch,
                                                                        capsys):
    """Hours of training must not silently replace a checkpoint: an existing `out` is refused
    (naming the path and both fixes) before any data is read, and the file is left as it was;
    `--overwrite` lifts the refusal."""
    import sparse_repair.train as T

    def load_split(*args, **kwargs):
        raise _DataRead

    monkeypatch.setattr(T, "load_split", load_split)
    out = tmp_path / "model.pt"
    out.write_bytes(b"an earlier checkpoint")
    args = ["train", "--model", "resnet8", "--dataset", "digits", "--epochs", "1",
            "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"out {str(out)!r} already exists" in err, err
    assert "pass --overwrite (overwrite=True)" in err and "choose another --out" in err
    with pytest.raises(ValueError, match="already exists"):
        train(TrainConfig(model="resnet8", dataset="digits", out=str(out)), progress=False)
    assert out.read_bytes() == b"an earlier checkpoint"
    with pytest.raises(_DataRead):  # past the check: training would start
        main(args + ["--overwrite"])
    with pytest.raises(_DataRead):  # a new path needs no --overwrite
        main(args[:-1] + [str(tmp_path / "new.pt")])


def test_allocate_help_lists_the_allocators_and_runconfigs_default():
    help_text = " ".join(_subparser("allocate").format_help().split())
    default = next(f.default for f in dataclasses.fields(RunConfig) if f.name == "allocation")
    assert "{" + ",".join(list_allocators()) + "}" in help_text
    assert f"allocator (sparse_repair.allocation registry) (default: {default})" in help_text
    assert vars(_subparser("allocate").parse_args(["--model", "resnet8", "--sparsity", "0.9"])
                )["method"] == default
    assert "number of classes of the model's head (default: 10)" in help_text
    assert "architecture (sparse_repair.models registry)" in help_text


def test_allocate_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["allocate", "--model", "resnet8", "--sparsity", "0.9", "--method", "ekr"])
    assert exit_.value.code == 2
    assert "argument --method/--allocation: invalid choice: 'ekr'" in capsys.readouterr().err


# ------------------------------------------- bad input refused before training (a hostile pass)

def _no_data(monkeypatch):
    """Stub train's load_split: a config that gets past the checks raises _DataRead."""
    import sparse_repair.train as T

    def load_split(*args, **kwargs):
        raise _DataRead

    monkeypatch.setattr(T, "load_split", load_split)


@pytest.mark.parametrize(("layout", "out", "match"), [
    ({"afile": "x"}, "afile/m.pt", r"'.*afile' is a file, not a directory; choose an --out"),
    ({"afile": "x"}, "afile/sub/m.pt", r"'.*afile' is a file, not a directory"),
    ({"m.pt.json": None}, "m.pt", r"its JSON sidecar path '.*m.pt.json' is a directory"),
    ({"m.pt.json": "{}"}, "m.pt", r"its JSON sidecar '.*m.pt.json' already exists and training "
                                  r"would replace it; pass --overwrite"),
    ({}, "m\0.pt", "contains a NUL character"),
])
def test_train_refuses_an_out_it_could_not_write_before_any_data_is_read(
        tmp_path, monkeypatch, capsys, layout, out, match):
    """An --out under a file, or whose sidecar path is a directory, trained to the end and then
    failed to write (FileExistsError traceback, the training lost); an existing sidecar was
    replaced silently. Each is refused before any data is read, and nothing is written."""
    _no_data(monkeypatch)
    for name, text in layout.items():
        (tmp_path / name).mkdir() if text is None else (tmp_path / name).write_text(text)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({"model": "resnet8", "dataset": "digits",
                               "out": str(tmp_path / out)})
    if "\0" not in out:
        assert main(["train", "--model", "resnet8", "--dataset", "digits", "--epochs", "1",
                     "--out", str(tmp_path / out)]) == 2
        assert "sparse-repair: error: --out " in capsys.readouterr().err  # the flag typed
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_train_refuses_an_out_in_a_directory_it_cannot_write(tmp_path, monkeypatch):
    """A read-only directory (os.access stubbed: the tests may run as root) is named."""
    import sparse_repair.train as T

    _no_data(monkeypatch)
    monkeypatch.setattr(T.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=r"directory '.*' is not writable; choose an --out in a "
                                         r"writable directory"):
        TrainConfig.from_dict({"model": "resnet8", "dataset": "digits",
                               "out": str(tmp_path / "new" / "m.pt")})


@pytest.mark.parametrize(("device", "cuda", "match"), [
    ("cuda:3", (True, 1), r"'cuda:3': this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"),
    ("cuda", (False, 0), r"'cuda': CUDA is not available on this machine; use --device cpu"),
    ("meta", (False, 0), r"'meta': only cpu, cuda and mps devices run models here"),
])
def test_train_refuses_a_device_this_machine_lacks_before_any_data_is_read(
        tmp_path, monkeypatch, device, cuda, match):
    """`--device cuda` without CUDA (and cuda:99, meta, mps) reached torch and ended in a
    traceback, `meta` only after the data was read. The config still loads (a config is
    machine-independent); train refuses it first."""
    _no_data(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda[0])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda[1])
    cfg = TrainConfig.from_dict({"model": "resnet8", "dataset": "digits", "device": device,
                                 "out": str(tmp_path / "m.pt")})
    with pytest.raises(ValueError, match=match):
        train(cfg, progress=False)


def test_train_refuses_more_threads_than_cpus_before_setting_them(tmp_path, monkeypatch):
    """torch.set_num_threads(10**6) was accepted and the process died with SIGSEGV."""
    import os

    _no_data(monkeypatch)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("threads were set"))
    cfg = TrainConfig(model="resnet8", dataset="digits", out=str(tmp_path / "m.pt"),
                      threads=10**6)
    with pytest.raises(ValueError, match=rf"threads=1000000 is more than this machine's "
                                         rf"{os.cpu_count()} CPUs; pass --threads"):
        train(cfg, progress=False)


@pytest.mark.parametrize(("bad", "match"), [
    ({"seed": 2**64}, r"seed must be an int in \[0, 2\*\*64 - 1\]"),  # was torch's "Overflow"
    ({"device": 0}, r"device must be a device name \(a string\), got int 0; use 'cuda:0'"),
    ({"device": None}, r"device must be a device name \(a string\), got NoneType None"),
    ({"dataset": None}, r"unknown data set None; choose one of"),
])
def test_trainconfig_names_the_setting_for_values_torch_would_misread(tmp_path, bad, match):
    """A seed past 2**64 - 1 failed in torch.manual_seed naming no setting; device 0 was read
    by torch as cuda:0, None gave torch's multi-line signature dump."""
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({"model": "resnet8", "dataset": "digits",
                               "out": str(tmp_path / "m.pt"), **bad})


def test_config_from_dict_names_a_non_string_setting_name():
    """{1: 3} was refused as "must be a dict ... got dict"."""
    with pytest.raises(TypeError, match=r"setting names must be strings, got int 1; valid "
                                        r"settings: model, dataset"):
        TrainConfig.from_dict({1: 3})


def test_allocate_refuses_an_empty_weights_path(capsys):
    """`--weights ""` (an unset shell variable) silently pruned a random model, exit 0."""
    assert main(["allocate", "--model", "resnet8", "--sparsity", "0.5", "--weights", ""]) == 2
    assert ("--weights is empty; pass a checkpoint file, or drop --weights"
            in capsys.readouterr().err)


def test_allocate_names_num_classes_when_the_model_cannot_be_built(monkeypatch, capsys):
    """--num-classes 1000000000 asked torch for a 256 GB head: a RuntimeError traceback."""
    import sparse_repair.models as M

    def create_model(name, num_classes):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "256000000000 bytes")

    monkeypatch.setattr(M, "create_model", create_model)
    assert main(["allocate", "--model", "resnet8", "--sparsity", "0.5",
                 "--num-classes", "1000000000"]) == 2
    err = capsys.readouterr().err
    assert "cannot build resnet8 with --num-classes 1000000000 (DefaultCPUAllocator" in err
    assert "pass the number of classes of the model's head" in err


@pytest.mark.parametrize("command", ["run", "select", "train"])
def test_an_int_or_none_setting_takes_none_on_the_command_line(command):
    """A field whose API default is None (resolution: the data set's default) can be written
    out as 'none', so every value the API takes has a spelling on the command line."""
    p = _subparser(command)
    assert p.parse_args(["--resolution", "none"]).resolution is None
    assert p.parse_args(["--resolution", "None"]).resolution is None
    assert p.parse_args(["--resolution", "64"]).resolution == 64
    assert "'none' = " in p.format_help() and "N|none" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--resolution", "sixty"])


@pytest.mark.parametrize(("command", "flag", "dest"), [
    ("run", "--exclude", "exclude"), ("run", "--repairs", "repairs"),
    ("select", "--allocations", "allocations"), ("select", "--repairs", "repairs"),
    ("allocate", "--exclude", "exclude"),
])
def test_a_list_flag_is_comma_separated_and_repeatable_and_replaces_its_default(command, flag,
                                                                                dest):
    """Repeating a list flag used to keep only its last use (run, select) or to refuse a
    comma list (allocate --exclude); now both forms work on every subcommand, and the first use
    replaces the default instead of adding to it (argparse's own "extend" would)."""
    required = ["--model", "resnet20", "--sparsity", "0.9"] if command == "allocate" else []
    p = _subparser(command)
    assert getattr(p.parse_args(required + [flag, "a,b", flag, "c"]), dest) == ["a", "b", "c"]
    assert getattr(p.parse_args(required + [flag, "c"]), dest) == ["c"]
    default = getattr(p.parse_args(required), dest)
    assert getattr(p.parse_args(required), dest) == default   # the default is not mutated
    assert "comma-separated, repeatable" in " ".join(p.format_help().split())


def test_study_run_help_shows_every_executor_default():
    from sparse_repair.study.executors import ExecutorConfig

    parser = build_parser()
    study = next(a for a in parser._actions if a.dest == "command").choices["study"]
    run = next(a for a in study._actions if a.dest == "study_command").choices["run"]
    text = " ".join(run.format_help().split())
    d = ExecutorConfig()
    for shown in (f"(default: {d.name})", f"(default: {d.retries})",
                  f"(default: {d.cpus_per_task})", f"(default: {d.slurm_time_min})",
                  f"(default: {d.slurm_parallelism})", f"(default: {d.slurm_folder})"):
        assert shown in text
    assert all(a.help for a in run._actions), "every study run flag has a help text"


def test_an_error_names_the_flag_the_user_typed_not_the_python_setting(capsys, tmp_path):
    """Config checks speak of settings ("batch_size must be ..."); the command line names the
    flag (--batch-size). A message that starts with a positional's name (study) is unchanged."""
    assert main(["train", "--model", "resnet8", "--dataset", "digits", "--batch-size", "0",
                 "--out", str(tmp_path / "m.pt")]) == 2
    assert capsys.readouterr().err.startswith("sparse-repair: error: --batch-size must be an int")
    assert main(["study", "status", str(tmp_path / "none.toml")]) == 2
    assert capsys.readouterr().err.startswith("sparse-repair: error: study file not found")


@pytest.mark.parametrize("command", ["run", "select", "train"])
def test_model_and_dataset_help_list_the_registered_names(command):
    from sparse_repair.data import list_datasets
    from sparse_repair.models import list_models

    text = " ".join(_subparser(command).format_help().split())
    assert f"one of: {', '.join(list_models())}" in text
    assert f"one of: {', '.join(list_datasets())}" in text
