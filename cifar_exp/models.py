"""Model registry: architecture name -> builder of an ``nn.Module`` mapping (B, 3, 32, 32) to logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cifar_exp.errors import ConfigError

NUM_CLASSES = 10

ModelBuilder = Callable[[int], nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def add(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = builder
        return builder

    return add


def model_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def build_model(name: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(model_names())}"
        ) from None
    return builder(num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _seed_network(pool: int, features: int, num_classes: int) -> nn.Sequential:
    def block(in_channels: int) -> list[nn.Module]:
        return [nn.Conv2d(in_channels, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(pool)]

    return nn.Sequential(
        *block(3),
        *block(64),
        *block(64),
        nn.Flatten(),
        nn.Linear(features, 1024),
        nn.ReLU(inplace=True),
        nn.Linear(1024, num_classes),
    )


@register("seed")
def seed(num_classes: int = NUM_CLASSES) -> nn.Module:
    # The report's network: three Conv3x3(64) -> ReLU -> MaxPool blocks, then Linear(64 -> 1024)
    # -> ReLU -> Linear(1024 -> 10). A first linear layer of 64 inputs and "~150k parameters" hold
    # together only if pooling collapses 32x32 to 1x1, which MaxPool2d(3) in every block does:
    # 32 -> 10 -> 3 -> 1, so (B, 64, 1, 1) -> 64 features and exactly 152,458 parameters.
    return _seed_network(pool=3, features=64, num_classes=num_classes)


@register("seed-wide")
def seed_wide(num_classes: int = NUM_CLASSES) -> nn.Module:
    # The other reading of the report: MaxPool2d(2) gives 32 -> 16 -> 8 -> 4, (B, 64, 4, 4) ->
    # 1024 features, Linear(1024 -> 1024): 1,135,498 parameters.
    return _seed_network(pool=2, features=4 * 4 * 64, num_classes=num_classes)


class Classifier(nn.Module):
    """A network with its input normalisation built in, as shipped and logged to MLflow.

    Takes float images in [0, 1] of shape (B, 3, 32, 32) and returns logits (B, classes), so that
    whoever loads the model needs no knowledge of the training normalisation.
    """

    def __init__(self, network: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.full((1, 3, 1, 1), float(mean)))
        self.register_buffer("std", torch.full((1, 3, 1, 1), float(std)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images - self.mean) / self.std)
