"""Bad input is refused up front, with an error that names the problem and the fix.

Each test specifies one refusal found by an adversarial pass over the public API: the error
type, the words of its message, and, where a model is passed, that the model is exactly as it
was afterwards (no partial write, no silent clamp, no NaN, no raw torch/numpy traceback).
Covered: repair options of the wrong type or range (clipped_asr's gain bounds,
memory_limit_gb, reconstruct's damping, unhashable choices), a repair method that is not a
string; allocate's exclude, model argument and empty layers; prune_/apply_masks_/
sparsity_report with a wrong allocation or masks; RunConfig / SelectConfig settings that used
to pass the checks and fail only after the dense model was loaded (names, types, empty or
repeated repairs, unused shrinkage, repair option names and values); study grid axes of the
wrong type or with repeats; evaluate's batch size; the training recipe's numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparse_repair.allocation import allocate
from sparse_repair.evaluate import evaluate
from sparse_repair.models import create_model, random_with_batch_statistics
from sparse_repair.pruning import apply_masks_, prune_, sparsity_report
from sparse_repair.repair import repair
from sparse_repair.run import RunConfig
from sparse_repair.select import SelectConfig
from sparse_repair.study.spec import load_study
from sparse_repair.train import TrainConfig, train


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed by a refused call"


@pytest.fixture(scope="module")
def pair():
    dense = random_with_batch_statistics("resnet8", batches=1, batch_size=8)
    pruned = copy.deepcopy(dense)
    prune_(pruned, allocate(pruned, "erk", 0.9))
    return dense, pruned, torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- repair options

@pytest.mark.parametrize(("method", "options", "match"), [
    # g_min > g_max used to set every gain to g_max without a word
    ("clipped_asr", {"g_min": 5.0, "g_max": 1.0}, r"g_min=5.0 is above g_max=1.0"),
    ("clipped_asr", {"g_min": -1.0}, r"g_min must be a number >= 0"),
    ("clipped_asr", {"g_max": "4"}, r"g_max must be a number >= 0"),   # was torch's clamp error
    ("clipped_asr", {"g_max": float("nan")}, r"g_max must be a number"),  # was "please report"
    ("clipped_asr", {"g_max": None}, r"g_max must be a number"),
    ("clipped_asr", {"g_min": float("inf"), "g_max": float("inf")}, r"g_min must be finite"),
    ("asr", {"memory_limit_gb": "8"}, r"memory_limit_gb must be a number of GiB > 0"),
    ("asr", {"memory_limit_gb": 0}, r"memory_limit_gb must be a number of GiB > 0"),
    ("asr", {"memory_limit_gb": -1.0}, r"memory_limit_gb must be a number of GiB > 0"),
    ("asr", {"memory_limit_gb": float("nan")}, r"memory_limit_gb must be"),
    ("bn_recal", {"memory_limit_gb": True}, r"memory_limit_gb must be"),
    # the re-run path has no one-pass frontier: the limit was accepted and ignored
    ("asr", {"memory_limit_gb": 4, "path": "rerun"}, r"path='rerun' never takes it"),
    ("reconstruct", {"memory_limit_gb": 4, "path": "rerun"}, r"path='rerun' never takes it"),
    ("asr", {"shrinkage": ["relative"]}, r"unknown shrinkage \['relative'\]"),  # was unhashable
    ("asr", {"scope": {"all"}}, r"unknown scope"),
    ("reconstruct", {"damping": float("inf")}, r"damping must be a finite number >= 0"),
    ("reconstruct", {"target": ["dense"]}, r"unknown target"),
])
def test_bad_option_values_are_refused_before_the_model_is_touched(pair, method, options,
                                                                   match):
    dense, pruned, calib = pair
    model = copy.deepcopy(pruned)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        repair(model, method, calib, dense=dense, **options)
    _unchanged(model, before)


def test_clipped_asr_still_takes_an_infinite_upper_bound(pair):
    dense, pruned, calib = pair
    report = repair(copy.deepcopy(pruned), "clipped_asr", calib, dense=dense,
                    g_min=0.25, g_max=float("inf"))
    assert report.options["g_max"] == float("inf")


@pytest.mark.parametrize("method", [["asr"], None, 3])
def test_a_repair_method_that_is_not_a_name_is_named(pair, method):
    dense, pruned, calib = pair
    model = copy.deepcopy(pruned)
    before = _state(model)
    with pytest.raises(ValueError, match=r"unknown repair method .*; choose one of none"):
        repair(model, method, calib, dense=dense)
    _unchanged(model, before)


# ----------------------------------------------------------------------------- allocate / prune

def test_allocate_refuses_exclude_given_as_one_string_or_none():
    model = create_model("resnet8")
    # a string used to be split into characters: "excluded layer(s) ['c', 'o', ...]"
    with pytest.raises(TypeError, match=r"exclude must be a list of layer names.*\['conv1'\]"):
        allocate(model, "erk", 0.9, exclude="conv1")
    with pytest.raises(TypeError, match=r"exclude must be a list of layer names \(\(\) for"):
        allocate(model, "erk", 0.9, exclude=None)


@pytest.mark.parametrize("bad", ["resnet8", None, [1, 2]])
def test_allocate_refuses_what_is_neither_a_model_nor_layer_specs(bad):
    with pytest.raises(TypeError, match=r"allocate takes a torch.nn.Module or a list of "
                                        r"LayerSpec"):
        allocate(bad, "erk", 0.9)


def test_allocate_refuses_an_unhashable_method_by_name():
    with pytest.raises(ValueError, match=r"unknown allocation method \['erk'\]"):
        allocate(create_model("resnet8"), ["erk"], 0.9)


@pytest.mark.parametrize("method", ["erk", "er", "uniform", "lamp"])
def test_allocate_refuses_an_empty_layer_instead_of_dividing_by_zero(method):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 0))
    with pytest.raises(ValueError, match=r"layer\(s\) \['1'\] have an empty weight"):
        allocate(model, method, 0.5)


def test_prune_refuses_what_is_not_an_allocation():
    model = create_model("resnet8")
    before = _state(model)
    with pytest.raises(TypeError, match=r"allocation must be an Allocation \(from allocate"):
        prune_(model, {"conv1": 3})
    with pytest.raises(TypeError, match=r"prune_ takes a torch.nn.Module, got str"):
        prune_("resnet8", allocate(model, "erk", 0.9))
    _unchanged(model, before)


@pytest.fixture
def masked():
    model = create_model("resnet8")
    masks = prune_(copy.deepcopy(model), allocate(model, "erk", 0.9))
    return model, masks


@pytest.mark.parametrize(("value", "match"), [
    (lambda m: m.float() * 0.5, r"values other than 0 and 1"),        # used to scale weights
    (lambda m: torch.full(m.shape, float("nan")), r"values other than 0 and 1"),  # NaN weights
    (lambda m: m.long() * 2, r"values other than 0 and 1"),
])
def test_apply_masks_refuses_a_mask_that_is_not_zero_one(masked, value, match):
    model, masks = masked
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        apply_masks_(model, {**masks, "conv1": value(masks["conv1"])})
    _unchanged(model, before)


def test_apply_masks_refuses_a_non_tensor_mask_before_any_layer_changes(masked):
    model, masks = masked
    before = _state(model)
    # the last layer's mask a numpy array: every earlier mask used to be applied first
    with pytest.raises(TypeError, match=r"mask for 'linear' is a ndarray; pass a torch tensor"):
        apply_masks_(model, {**masks, "linear": masks["linear"].numpy()})
    with pytest.raises(TypeError, match=r"masks must be a dict"):
        apply_masks_(model, list(masks.items()))
    _unchanged(model, before)


def test_sparsity_report_refuses_masks_that_do_not_fit_the_model(masked):
    model, masks = masked
    with pytest.raises(ValueError, match=r"mask for 'conv1' has shape \(432,\)"):
        sparsity_report(model, {**masks, "conv1": masks["conv1"].flatten()})
    with pytest.raises(ValueError, match=r"names layers \['nope'\] that the model does not"):
        sparsity_report(model, {"nope": torch.ones(3, dtype=torch.bool)})


# ----------------------------------------------------------------------------- run / select

@pytest.mark.parametrize(("bad", "error", "match"), [
    ({"repairs": ["asr"], "repair_options": {"asr": {"shrinkge": "pooled"}}}, TypeError,
     r"asr has no option 'shrinkge'; valid options: shrinkage"),
    ({"repairs": ["asr"], "repair_options": {"asr": {"scope": "middle"}}}, ValueError,
     r"unknown scope 'middle'"),
    ({"model": "resnet21"}, ValueError, r"unknown model 'resnet21'; choose one of"),
    ({"dataset": "cifar11"}, ValueError, r"unknown data set 'cifar11'"),
    ({"dataset": ["cifar10"]}, ValueError, r"dataset must be a data set name"),
    ({"allocation": "erkk"}, ValueError, r"unknown allocation 'erkk'; choose one of"),
    ({"pretrained": "false"}, TypeError, r"pretrained must be true or false"),  # "false" is true
    ({"weights": 3}, TypeError, r"weights must be a checkpoint path"),
    ({"repairs": []}, ValueError, r"repairs is empty"),
    ({"repairs": ["asr", "asr"]}, ValueError, r"repairs lists \['asr'\] more than once"),
    ({"exclude": [1]}, TypeError, r"exclude must be a list of names \(strings\)"),
    ({"shrinkage": "bogus"}, ValueError, r"unknown shrinkage 'bogus'"),
    ({"shrinkage": "pooled", "repairs": ["bn_recal"]}, ValueError,
     r"shrinkage='pooled' applies to asr and clipped_asr only"),
    # silently resolved before: an empty path loaded the published weights, and the
    # repair_options shrinkage won over the shorthand
    ({"weights": ""}, ValueError, r"weights is an empty path"),
    ({"weights": "  "}, ValueError, r"weights is an empty path"),
    ({"shrinkage": "pooled", "repairs": ["asr"],
      "repair_options": {"asr": {"shrinkage": "relative"}}}, ValueError,
     r"shrinkage='pooled' and repair_options give \['asr'\] another shrinkage"),
])
def test_runconfig_refuses_settings_that_used_to_fail_only_after_loading(bad, error, match):
    with pytest.raises(error, match=match):
        RunConfig.from_dict(bad)


@pytest.mark.parametrize("kw, match", [
    ({"repairs": []}, r"repairs is empty"),  # returned no rows
    ({"repairs": ["bn_recal"], "shrinkage": "relative"}, r"applies to asr and clipped_asr"),
])
def test_a_runconfig_built_directly_is_checked_before_any_work(kw, match, monkeypatch):
    """RunConfig(...) skips from_dict's check; run_single checks it before loading a model."""
    from sparse_repair import run as R

    monkeypatch.setattr(R, "load_dense", lambda cfg: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=match):
        R.run_single(RunConfig(**kw))


def test_runconfig_from_dict_refuses_a_non_dict():
    with pytest.raises(TypeError, match=r"run settings must be a dict .*valid settings: model"):
        RunConfig.from_dict(["model", "resnet20"])


@pytest.mark.parametrize(("bad", "error", "match"), [
    ({"model": "resnet21"}, ValueError, r"unknown model 'resnet21'"),
    ({"pretrained": "no"}, TypeError, r"pretrained must be true or false"),
    ({"repairs": ["clipped_asr"], "repair_options": {"clipped_asr": {"g_min": 2.0,
                                                                     "g_max": 1.0}}},
     ValueError, r"g_min=2.0 is above g_max=1.0"),
])
def test_selectconfig_refuses_the_same_settings(bad, error, match):
    with pytest.raises(error, match=match):
        SelectConfig.from_dict(bad)


# ----------------------------------------------------------------------------- study files

STUDY = """name = "t"
seeds = {seeds}
allocations = {allocations}
sparsities = {sparsities}
repairs = ["none"]

[[models]]
model = "resnet8"
dataset = "digits"
"""


@pytest.mark.parametrize(("axes", "match"), [
    ({"seeds": "[0.5]"}, r"seeds must be a list of ints, got seeds = \[0.5\]"),  # was int(0.5)
    ({"seeds": '["1"]'}, r"seeds must be a list of ints"),                       # was int("1")
    ({"seeds": "[0, 0]"}, r"seeds lists \[0\] more than once"),
    ({"sparsities": '"0.9"'}, r"sparsities must be a list of numbers.*e.g. sparsities = "
                              r"\['0.9'\]"),
    ({"sparsities": '["0.9"]'}, r"sparsities must be a list of numbers"),
    ({"sparsities": "[true]"}, r"sparsities must be a list of numbers"),
    ({"allocations": '"erk"'}, r"allocations must be a list of names"),
    ({"allocations": '["erk", "erk"]'}, r"allocations lists \['erk'\] more than once"),
])
def test_study_axes_of_the_wrong_type_or_repeated_are_refused(tmp_path, axes, match):
    text = STUDY.format(**{"seeds": "[0]", "allocations": '["erk"]', "sparsities": "[0.9]",
                           **axes})
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_study(path)


def test_study_models_must_be_tables(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('models = "resnet8"\nseeds = [0]\n')
    with pytest.raises(ValueError, match=r"models must be \[\[models\]\] tables"):
        load_study(path)


# ----------------------------------------------------------------------------- evaluate / train

@pytest.mark.parametrize("batch_size", [0, -5, 8.0, True])
def test_evaluate_refuses_a_bad_batch_size_before_reading_data(batch_size):
    # was torch.split's RuntimeError after the split was loaded
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1"):
        evaluate(create_model("resnet8"), "digits", batch_size=batch_size)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("epochs", 0, r"epochs must be an int >= 1, got 0"),   # was OneCycleLR's "total_steps"
    ("epochs", -1, r"epochs must be an int >= 1"),
    ("batch_size", 0, r"batch_size must be an int >= 1"),  # was a ZeroDivisionError
    ("lr", float("nan"), r"lr must be a finite number > 0"),
    ("lr", -0.1, r"lr must be a finite number > 0"),
    ("momentum", 0.0, r"momentum must be a number in \(0, 1\)"),
    ("label_smoothing", 1.5, r"label_smoothing must be a number in \[0, 1\)"),
    ("weight_decay", -1.0, r"weight_decay must be a finite number >= 0"),
])
def test_train_refuses_bad_numbers_before_any_data_is_read(tmp_path, field, value, match):
    cfg = TrainConfig(model="resnet8", dataset="digits", out=str(tmp_path / "m.pt"),
                      **{field: value})
    with pytest.raises(ValueError, match=match):
        train(cfg, progress=False)
    assert not (tmp_path / "m.pt").exists()


def test_run_single_refuses_a_dense_model_of_another_architecture():
    """run_single(cfg, dense=...) is checked like select: another architecture ran silently
    under cfg.model's name."""
    from sparse_repair.models import create_model
    from sparse_repair.run import RunConfig, run_single

    cfg = RunConfig(model="resnet8", dataset="digits", allocation="erk", sparsity=0.5,
                    repairs=["none"], pretrained=False, weights=None)
    with pytest.raises(ValueError, match="not a resnet8 for digits"):
        run_single(cfg, dense=create_model("resnet20", 10))
