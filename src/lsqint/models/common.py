"""Pieces shared by every model: the input normalization that makes models take raw pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Raw pixels (uint8, or floats holding 0..255) -> ``(x / 255 - mean) / std`` per channel.

    It is the first module of every lsqint model, so a model takes exactly what a dataset yields
    and the integer program can take raw uint8 pixels (the input op folds this affine map).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise UsageError(f"Normalize: mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise UsageError(f"Normalize: std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.mean.dtype)  # uint8 or float pixels; no branch, so torch.fx can trace it
        mean = self.mean.view(1, -1, 1, 1)
        std = self.std.view(1, -1, 1, 1)
        return (x / 255.0 - mean) / std

    def extra_repr(self) -> str:
        mean = tuple(round(v, 4) for v in self.mean.tolist())
        std = tuple(round(v, 4) for v in self.std.tolist())
        return f"mean={mean}, std={std}"


def default_stats(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for RGB, (0.5, 0.5) per channel otherwise."""
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * in_channels, (0.5,) * in_channels


def conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
