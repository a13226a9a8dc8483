"""Plain float models and their registry: ``create_model(name, num_classes, image_size)``.

Every model takes images as uint8 (or floats holding 0..255) and starts with its normalization.
``torchvision:<name>`` wraps any torchvision classification model the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torchvision
from torch import nn

from ..errors import UsageError
from .common import IMAGENET_MEAN, IMAGENET_STD, Normalize, default_stats
from .resnet import MlperfResNet8, imagenet_resnet, resnet20, resnet_cifar10
from .small import DigitsCNN, TinyVGG

# name -> builder(num_classes, image_size, mean, std, in_channels) -> nn.Module
MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def decorate(builder):
        MODELS[name] = builder
        return builder

    return decorate


@register_model("resnet18")
def _resnet18(num_classes, image_size, mean, std, in_channels):
    return imagenet_resnet(18, num_classes, mean, std, in_channels)


@register_model("resnet34")
def _resnet34(num_classes, image_size, mean, std, in_channels):
    return imagenet_resnet(34, num_classes, mean, std, in_channels)


@register_model("resnet_cifar10")
def _resnet_cifar10(num_classes, image_size, mean, std, in_channels):
    return resnet_cifar10(num_classes, mean, std, in_channels)


@register_model("resnet20")
def _resnet20(num_classes, image_size, mean, std, in_channels):
    return resnet20(num_classes, mean, std, in_channels)


@register_model("mlperf_resnet8")
def _mlperf_resnet8(num_classes, image_size, mean, std, in_channels):
    return MlperfResNet8(num_classes, mean, std, in_channels)


@register_model("tiny_vgg")
def _tiny_vgg(num_classes, image_size, mean, std, in_channels):
    return TinyVGG(num_classes, mean, std, in_channels, image_size)


@register_model("digits_cnn")
def _digits_cnn(num_classes, image_size, mean, std, in_channels):
    return DigitsCNN(num_classes, mean, std, in_channels)


def model_names() -> list[str]:
    return sorted(MODELS) + ["torchvision:<name>"]


def create_model(
    name: str,
    num_classes: int = 10,
    image_size: int = 32,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build a registered model (randomly initialized; no weights are ever downloaded)."""
    if in_channels is None:
        in_channels = len(mean) if mean is not None else (1 if name == "digits_cnn" else 3)
    if mean is None or std is None:
        mean, std = default_stats(in_channels)
    if name.startswith("torchvision:"):
        tv_name = name.split(":", 1)[1]
        try:
            build = torchvision.models.get_model_builder(tv_name)
        except ValueError:
            raise UsageError(
                f"unknown torchvision model {tv_name!r}; see torchvision.models.list_models()"
            ) from None
        return nn.Sequential(Normalize(mean, std), build(weights=None, num_classes=num_classes))
    if name not in MODELS:
        import difflib

        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown model {name!r}{hint} (available: {', '.join(model_names())})")
    return MODELS[name](num_classes, image_size, tuple(mean), tuple(std), in_channels)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODELS",
    "Normalize",
    "create_model",
    "model_names",
    "register_model",
]
