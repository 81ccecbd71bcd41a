"""Downstream classifiers: a small CNN family for the embedded default, ResNet-18/50 for 224-pixel images.

Our own definitions (torchvision is not usable on the CPU machines). All are
plain ``nn.Module``s whose forward is a pure function of parameters and
inputs, so ``torch.func.functional_call``, forward-mode JVPs and the TODV
look-ahead step work on them. The CNN family uses GroupNorm rather than
BatchNorm: per-sample losses then do not depend on the rest of the batch and
there are no running statistics to update inside a functional virtual step.
The ResNets keep BatchNorm, as their published definitions do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    groups = min(8, out_channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Stages of two 3x3 conv blocks, each stage halving the resolution, then global pooling.

    Input (N, C, H, W) with H = W >= 2**len(widths); output logits (N, K).
    """

    def __init__(self, num_classes: int, in_channels: int, widths: Sequence[int], dropout: float = 0.0):
        super().__init__()
        stages, channels = [], in_channels
        for width in widths:
            stages += [_conv_block(channels, width), _conv_block(width, width), nn.AvgPool2d(2)]
            channels = width
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images)  # (N, C', H', W')
        return self.head(features.mean(dim=(2, 3), keepdim=True))  # (N, K)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = _shortcut(in_channels, channels * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)  # stride on the 3x3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class ResNet(nn.Module):
    """ResNet (He et al. 2016). Images of 64 pixels or more get the ImageNet stem
    (7x7 stride 2 + max pool); smaller ones the CIFAR stem (3x3 stride 1), which
    keeps a 16-32 pixel image from collapsing to 1x1 before the last stage."""

    def __init__(self, block: type, layers: Sequence[int], num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        if image_size >= 64:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
            )
        stages, channels = [], 64
        for index, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            for block_index in range(blocks):
                stride = 2 if index > 0 and block_index == 0 else 1
                stages.append(block(channels, width, stride))
                channels = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(images))  # (N, C', H', W')
        return self.fc(features.mean(dim=(2, 3)))  # (N, K)


CLASSIFIERS = ("cnn-small", "cnn-medium", "resnet18", "resnet50")


def build_classifier(name: str = "cnn-small", *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A fresh classifier producing logits (N, num_classes) for (N, in_channels, image_size, image_size) images.

    cnn-small (~70k parameters) is the embedded default: a step on a batch of
    128 16x16 images takes milliseconds on 2 CPU cores. resnet18 / resnet50
    are for 224-pixel datasets on a GPU.
    """
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    if name == "cnn-small":
        return SmallCNN(num_classes, in_channels, (32, 64), dropout=0.1)
    if name == "cnn-medium":
        return SmallCNN(num_classes, in_channels, (64, 128, 256), dropout=0.2)
    if name == "resnet18":
        return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, image_size)
    if name == "resnet50":
        return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, image_size)
    raise ValueError(f"unknown classifier {name!r}; choose one of {', '.join(CLASSIFIERS)}")
