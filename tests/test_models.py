"""Model zoo: every registered model builds, runs, has its published size, and traces."""

import pytest
import torch
import torch.fx

from sparse_repair.models import INPUT_SIZE, create_model, list_models

# Published parameter counts (millions): He et al. 2016 Table 6 for CIFAR ResNets;
# kuangliu/pytorch-cifar for CIFAR ResNet-18/34/50 and DenseNet-121 (10 classes);
# torchvision's model cards for the ImageNet variants (1000 classes).
PUBLISHED_M = {
    "resnet8": (0.078, 10),  # no published figure: 6n+2 with n=1, counted from the formula
    "resnet20": (0.27, 10), "resnet32": (0.46, 10), "resnet44": (0.66, 10),
    "resnet56": (0.85, 10), "resnet110": (1.73, 10),
    "resnet18": (11.17, 10), "resnet34": (21.28, 10), "resnet50": (23.52, 10),
    "densenet121": (6.96, 10),
    "resnet18_imagenet": (11.69, 1000), "resnet34_imagenet": (21.80, 1000),
    "resnet50_imagenet": (25.56, 1000), "densenet121_imagenet": (7.98, 1000),
}


def test_every_model_has_a_published_size():
    assert set(PUBLISHED_M) == set(list_models()), "add the published size of new models here"


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_matches_published(name):
    millions, classes = PUBLISHED_M[name]
    count = sum(p.numel() for p in create_model(name, classes).parameters())
    assert abs(count / 1e6 - millions) < 0.01 * millions + 0.005, \
        f"{name}: {count / 1e6:.3f}M parameters, published {millions}M"


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_fx_trace(name):
    torch.manual_seed(0)
    model = create_model(name, 7).eval()
    x = torch.randn(2, 3, INPUT_SIZE[name], INPUT_SIZE[name])
    with torch.no_grad():
        y = model(x)
        traced = torch.fx.symbolic_trace(model)
        y_traced = traced(x)
    assert y.shape == (2, 7), f"{name}: logits shape {tuple(y.shape)}"
    assert torch.allclose(y, y_traced, atol=1e-5), f"{name}: fx-traced graph computes otherwise"


def test_unknown_model_error_lists_choices():
    with pytest.raises(ValueError, match="resnet20"):
        create_model("resnet7")
