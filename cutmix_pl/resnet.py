"""The CIFAR ResNet of He et al. 2016, "Deep Residual Learning for Image Recognition", section 4.2.

A 3x3 stem with 16 channels, three stages of n basic blocks with 16, 32 and 64 channels (stride 2 at the
first block of stages 2 and 3), global average pooling and a linear head: depth 6n + 2 weighted layers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cifar

Shortcut = Literal["A", "B"]

__all__ = ["ResNet", "resnet_n"]


def resnet_n(depth: int) -> int:
    """Blocks per stage for a CIFAR ResNet of ``depth`` layers; raises unless depth = 6n + 2, n >= 1."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth={depth!r} is not a CIFAR ResNet depth: it must be 6n+2 with n >= 1 "
                         "(8, 14, 20, 32, 44, 56, 110, ...)")
    return (depth - 2) // 6


class _PadShortcut(nn.Module):
    """Option A of the paper: identity, subsampled by the stride, new channels zero-padded. No parameters."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016, Fig. 2 left)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: Shortcut) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride == 1 and in_ch == out_ch:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(stride, out_ch - in_ch)
        else:  # option B: a 1x1 projection where the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2).

    Args:
        depth: number of weighted layers, 6n + 2: 20, 32, 44, 56, 110, ...
        num_classes: size of the linear head. At least 2.
        shortcut: ``A`` parameter-free zero-padded identity (the paper's CIFAR choice, 0.27M parameters for
            ResNet-20) or ``B`` 1x1 projections where the shape changes.
        in_channels: channels of the input images.
        width: channels of the first stage; the paper uses 16 (stages: width, 2*width, 4*width).
    """

    def __init__(self, depth: int = 20, num_classes: int = cifar.NUM_CLASSES, shortcut: Shortcut = "A", in_channels: int = 3,
                 width: int = 16) -> None:
        super().__init__()
        n = resnet_n(depth)
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={shortcut!r} is not allowed: choose 'A' or 'B'")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} is out of range: it must be >= 2")
        if width < 1:
            raise ValueError(f"width={width!r} is out of range: it must be >= 1")
        self.depth, self.num_classes = depth, num_classes
        # what builds this network again (ImageClassifier records it in checkpoints as model.net's init_args)
        self.init_args = {"depth": depth, "num_classes": num_classes, "shortcut": shortcut, "in_channels": in_channels,
                          "width": width}
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages, in_ch = [], width
        for i, out_ch in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_ch, out_ch, 2 if (i > 0 and j == 0) else 1, shortcut))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He et al. 2015 initialisation, as the paper uses
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """The last stage's feature map [B, 4*width, H/4, W/4], for class activation maps."""
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))
