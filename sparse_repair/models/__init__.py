"""Model zoo: a ``str -> constructor`` registry. Imports nothing else of the package."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from .cifar_resnet import CifarResNet
from .densenet import DenseNetCifar
from .resnet import BasicBlock, Bottleneck, ResNet

# name -> constructor(num_classes). CIFAR variants take 32x32 inputs, *_imagenet take 224x224.
MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet8": lambda k: CifarResNet(8, k),  # the embedded digits regime's small model
    "resnet20": lambda k: CifarResNet(20, k),
    "resnet32": lambda k: CifarResNet(32, k),
    "resnet44": lambda k: CifarResNet(44, k),
    "resnet56": lambda k: CifarResNet(56, k),
    "resnet110": lambda k: CifarResNet(110, k),
    "resnet18": lambda k: ResNet(BasicBlock, [2, 2, 2, 2], k),
    "resnet34": lambda k: ResNet(BasicBlock, [3, 4, 6, 3], k),
    "resnet50": lambda k: ResNet(Bottleneck, [3, 4, 6, 3], k),
    "densenet121": lambda k: DenseNetCifar((6, 12, 24, 16), 32, 0.5, k),
    "resnet18_imagenet": lambda k: torchvision.models.resnet18(num_classes=k),
    "resnet34_imagenet": lambda k: torchvision.models.resnet34(num_classes=k),
    "resnet50_imagenet": lambda k: torchvision.models.resnet50(num_classes=k),
    "densenet121_imagenet": lambda k: torchvision.models.densenet121(num_classes=k),
}

# Input side length (pixels) each family was designed for; used by tests and the CLI.
INPUT_SIZE: dict[str, int] = {name: (224 if name.endswith("_imagenet") else 32) for name in MODELS}


def list_models() -> list[str]:
    return sorted(MODELS)


def random_with_batch_statistics(name: str, seed: int = 0, batches: int = 2,
                                 batch_size: int = 32) -> nn.Module:
    """A randomly initialised model whose BN running statistics are real batch statistics (a few
    train-mode passes on Gaussian noise), in eval mode. Pruning then damages its BN statistics
    the way it damages a trained model's; tests and timing benchmarks use it."""
    torch.manual_seed(seed)
    model = create_model(name)
    side = INPUT_SIZE[name]
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch_size, 3, side, side))
    return model.eval()


def create_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a registered architecture with random initialisation."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return MODELS[name](num_classes)
