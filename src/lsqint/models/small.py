"""The VGG-style net of the seed project and a small CNN for the embedded digits data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import UsageError
from .common import Normalize


class TinyVGG(nn.Module):
    """4 stages of 3x3 conv-BN-ReLU6 (stride-2 first conv per stage), then three linear layers."""

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        in_channels: int = 3,
        image_size: int = 32,
        widths: Sequence[int] = (32, 64, 128, 256),
        hidden: int = 512,
    ) -> None:
        super().__init__()
        if image_size % 16:
            raise UsageError(f"tiny_vgg needs an image size divisible by 16, got {image_size}")
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            for stride in (2, 1):
                layers += [
                    nn.Conv2d(cin, w, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU6(inplace=True),
                ]
                cin = w
        self.features = nn.Sequential(*layers)
        # Large images are pooled to 2x2 so the classifier stays small at ImageNet resolution.
        side = image_size // 16
        self.pool = nn.AdaptiveAvgPool2d(2) if side > 2 else nn.Identity()
        side = min(side, 2)
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(cin * side * side, hidden),
            nn.ReLU6(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(hidden, hidden),
            nn.ReLU6(inplace=True),
            nn.Dropout(0.2),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(self.normalize(x))))


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 (or larger) grayscale digits: conv, strided conv, ReLU6, max-pool."""

    def __init__(
        self, num_classes: int, mean: Sequence[float], std: Sequence[float], in_channels: int = 1
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.relu6(self.bn3(self.conv3(x)))
        x = self.gap(self.pool(x))
        return self.fc(torch.flatten(x, 1))
