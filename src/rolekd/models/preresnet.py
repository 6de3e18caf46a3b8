"""Pre-activation ResNets for CIFAR (He et al., "Identity Mappings in Deep Residual Networks", 2016):
``preresnet<depth>``.

A 3x3 stem conv to 16 channels, three stages (strides 1/2/2) of pre-activation residual units, a
final BN-ReLU, global average pool and ``fc``. Stage widths 16/32/64; bottleneck units expand 4x
(outputs 64/128/256).

* basic unit: BN-ReLU-conv3x3-BN-ReLU-conv3x3, ``(depth - 2) / 6`` units per stage;
* bottleneck unit: BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1, ``(depth - 2) / 9`` per stage;
* shortcut: identity on the raw input, or - when width or stride changes - a 1x1 conv (no BN) on
  the pre-activated input.

Block choice: ``block="basic"|"bottleneck"`` if given; otherwise bottleneck for depth >= 164 (the
paper's 164/1001 nets), else basic when ``(depth - 2) % 6 == 0`` (20, 32, 44, 56, 110, ...), else
bottleneck when ``(depth - 2) % 9 == 0`` (e.g. 11, 29, 47).

Parameter counts for 10 classes: PreResNet-20 272,282; PreResNet-56 855,578; PreResNet-110
1,730,522; PreResNet-164 1,703,258 (published: 0.85M for 56 layers, 1.7M for 110 and for 164).

KD taps: ``stage1..stage3`` = raw stage outputs (the last unit's sum, before any BN-ReLU; can be
negative). The last stage's BN-ReLU is the head's ``bn``/``relu``; the embedding is the input of
``fc`` (its pooled output, 64 or 256-d).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from rolekd.errors import UserError
from rolekd.models.common import PreActHead, init_conv_bn
from rolekd.models.registry import register_family

__all__ = ["PreActBasicBlock", "PreActBottleneck", "PreResNet", "preresnet", "resolve_block"]


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, out, 3, 1, 1, bias=False)
        self.projection = stride != 1 or in_planes != out
        self.shortcut = nn.Conv2d(in_planes, out, 1, stride, bias=False) if self.projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        shortcut = self.shortcut(o) if self.projection else x
        return self.conv2(self.relu2(self.bn2(self.conv1(o)))) + shortcut


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu3 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(planes, out, 1, 1, bias=False)
        self.projection = stride != 1 or in_planes != out
        self.shortcut = nn.Conv2d(in_planes, out, 1, stride, bias=False) if self.projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        shortcut = self.shortcut(o) if self.projection else x
        out = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return self.conv3(self.relu3(self.bn3(out))) + shortcut


_BLOCKS = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}


def resolve_block(family: str, depth: int, block: str | None) -> tuple[str, int]:
    """Pick ``(block kind, units per stage)`` for a 3-stage CIFAR net of ``depth`` weighted layers.

    Shared with PyramidNet: explicit ``block`` wins; else bottleneck for depth >= 164, else basic
    when ``(depth - 2) % 6 == 0``, else bottleneck when ``(depth - 2) % 9 == 0``.
    """
    per_unit = {"basic": 6, "bottleneck": 9}
    if block is not None:
        kind = str(block).lower()
        if kind not in per_unit:
            raise UserError(f"{family}: block must be 'basic' or 'bottleneck', got {block!r}")
    elif depth >= 164 and (depth - 2) % 9 == 0:
        kind = "bottleneck"
    elif (depth - 2) % 6 == 0:
        kind = "basic"
    elif (depth - 2) % 9 == 0:
        kind = "bottleneck"
    else:
        raise UserError(f"{family}: depth {depth} fits neither basic units (6n+2: 20, 32, 56, 110) "
                        "nor bottleneck units (9n+2: 11, 29, 164)")
    k = per_unit[kind]
    if depth < k + 2 or (depth - 2) % k:
        raise UserError(f"{family}: depth {depth} does not fit {kind} units; use {k}n+2 "
                        f"(e.g. {k + 2}, {2 * k + 2}, {3 * k + 2})")
    return kind, (depth - 2) // k


class PreResNet(PreActHead, nn.Module):
    """CIFAR pre-activation ResNet."""

    kd_taps = {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3"}
    kd_embedding = "fc"

    def __init__(self, depth: int = 56, num_classes: int = 10, block: str | None = None):
        super().__init__()
        kind, n = resolve_block(f"preresnet{depth}", depth, block)
        unit = _BLOCKS[kind]
        self.depth, self.block = depth, kind
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            units = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                units.append(unit(in_planes, planes, stride))
                in_planes = planes * unit.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
        self._build_head(in_planes, num_classes)
        init_conv_bn(self, "fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self._head(x)


@register_family(r"preresnet_?(\d+)", "preresnet<depth>",
                 ("preresnet20", "preresnet32", "preresnet56", "preresnet110", "preresnet164"))
def preresnet(match: re.Match, num_classes: int = 10, block: str | None = None) -> PreResNet:
    """``preresnet56`` -> PreResNet-56 (basic); ``preresnet164`` -> bottleneck; ``block=`` overrides."""
    return PreResNet(int(match.group(1)), num_classes, block)
