"""Wide ResNets for CIFAR (Zagoruyko & Komodakis, 2016): ``wrn_<depth>_<width>``.

``WRN-d-k``: a 3x3 stem conv to 16 channels, three stages of ``(d - 4) / 6`` pre-activation wide
basic blocks of widths 16k/32k/64k (strides 1/2/2), a final BN-ReLU, global average pool and
``fc``. Block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus the shortcut: identity on the raw
input, or - when width or stride changes - a 1x1 conv on the *pre-activated* input (as in the
authors' code). Convs have no bias. Depth must satisfy ``(d - 4) % 6 == 0``.

Parameter counts for 10 classes: WRN-28-10 36,479,194; WRN-40-2 2,243,546; WRN-16-2 691,674.

KD taps: ``stage1..stage3`` = the raw output of each stage (the sum of the last block, before
any BN-ReLU; it can be negative - these are pre-activation networks, and the last stage's
BN-ReLU is applied by the head, ``bn``/``relu``). The embedding is the input of ``fc``: the pooled
output of that final BN-ReLU (64k-d, non-negative).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from rolekd.errors import UserError
from rolekd.models.common import PreActHead, init_conv_bn
from rolekd.models.registry import register_family

__all__ = ["WideBasicBlock", "WideResNet", "wrn"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block with optional dropout between the two convs."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.projection = stride != 1 or in_planes != planes
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, bias=False) if self.projection
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        shortcut = self.shortcut(o) if self.projection else x
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(o)))))
        return out + shortcut


class WideResNet(PreActHead, nn.Module):
    """WRN-depth-width for 32x32 inputs."""

    kd_taps = {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3"}
    kd_embedding = "fc"

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise UserError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if width < 1:
            raise UserError(f"WRN width factor must be >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"WRN dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        in_planes = 16
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBasicBlock(in_planes, w, stride, dropout))
                in_planes = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self._build_head(in_planes, num_classes)
        init_conv_bn(self, "fan_out")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self._head(x)


@register_family(r"wrn_(\d+)_(\d+)", "wrn_<depth>_<width>",
                 ("wrn_10_1", "wrn_16_2", "wrn_16_4", "wrn_28_10", "wrn_40_2"))
def wrn(match: re.Match, num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """``wrn_28_10`` -> WRN-28-10; ``dropout`` is the rate between the two convs of each block."""
    return WideResNet(int(match.group(1)), int(match.group(2)), num_classes, dropout)
