"""ResNets: the classic CIFAR ResNet-20, MLPerf Tiny's ResNet-8, ResNet-18 for 32x32 inputs, and
ImageNet-style 18/34."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn

from .common import Normalize


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut; a 1x1 conv-BN shortcut when the shape changes."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: 3x3 stem, no max-pool, BasicBlock stages, global average pool."""

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(cin, w, stride if j == 0 else 1))
                cin = w
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet20(num_classes, mean, std, in_channels=3) -> nn.Module:
    return CifarResNet((3, 3, 3), (16, 32, 64), num_classes, mean, std, in_channels)


class TinyResBlock(nn.Module):
    """MLPerf Tiny's residual stack: conv-BN-ReLU, conv-BN, plus the input (a plain 1x1 conv with
    bias and no BatchNorm where the stack halves the resolution), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride) if stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)


class MlperfResNet8(nn.Module):
    """The MLPerf Tiny image-classification model (mlcommons/tiny, benchmark/training/
    image_classification/keras_model.py, ``resnet_v1_eembc``): a 3x3 conv of 16 filters, three
    residual stacks of 16, 32 and 64 filters (stride 2 and a 1x1 shortcut conv in the last two),
    average pool, dense. 12.5 M MACs per 32x32 image. One difference from the Keras model: 'same'
    padding of a stride-2 3x3 conv is symmetric here (PyTorch), bottom/right only in Keras."""

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stacks, cin = [], widths[0]
        for i, w in enumerate(widths):
            stacks.append(TinyResBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.stacks = nn.Sequential(*stacks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.avgpool(self.stacks(x))
        return self.fc(torch.flatten(x, 1))


def resnet_cifar10(num_classes, mean, std, in_channels=3) -> nn.Module:
    """ResNet-18 adapted to 32x32 inputs (3x3 stem, no max-pool)."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, mean, std, in_channels)


def imagenet_resnet(depth: int, num_classes, mean, std, in_channels=3) -> nn.Module:
    """torchvision's ImageNet ResNet (7x7 stem, max-pool), preceded by the input normalization."""
    build = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34}[depth]
    net = build(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return nn.Sequential(Normalize(mean, std), net)
