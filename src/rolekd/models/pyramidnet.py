"""Additive PyramidNets for CIFAR (Han, Kim & Kim, "Deep Pyramidal Residual Networks", CVPR 2017):
``pyramidnet_<depth>_<alpha>``.

A 3x3 stem conv to 16 channels + BN (no ReLU), then three stages (strides 1/2/2) of ``n`` pyramidal
units whose width grows additively by ``alpha / (3n)`` per unit (rounded to the nearest integer,
the running width kept as a float), a final BN-ReLU, global average pool and ``fc``.

* basic unit: BN-conv3x3-BN-ReLU-conv3x3-BN, ``n = (depth - 2) / 6``;
* bottleneck unit: BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(x4)-BN, ``n = (depth - 2) / 9``;
* shortcut: identity, 2x2 average pooling where the unit downsamples, zero-padded along channels to
  the unit's (wider) output - no projection parameters.

Block choice as for PreResNet (``block=`` overrides; else bottleneck for depth >= 164, else
basic when ``(depth - 2) % 6 == 0``, else bottleneck when ``(depth - 2) % 9 == 0``).

Output feature dimension (published): 16 + alpha (basic) or 4 (16 + alpha) (bottleneck), e.g. 64 for
PyramidNet-110 (alpha 48), 1024 for PyramidNet-200 (alpha 240). Parameter counts for 10 classes
(published figures from the authors' README in brackets): pyramidnet_164_48 1,715,442 (1.7M),
pyramidnet_200_240 26,752,702 (26.6M), pyramidnet_272_200 26,210,842 (26.0M), i.e. within 1% for
the bottleneck nets; the basic nets come out 0.7-4% above the published figures
(pyramidnet_110_48 1,772,706 vs 1.7M, pyramidnet_110_84 3,904,446 vs 3.8M, pyramidnet_110_270
28,485,477 vs 28.3M) although the unit structure and widening rule follow the authors' Lua and
PyTorch code; the published numbers seem to count slightly differently.

KD taps: ``stage1..stage3`` = raw stage outputs (can be negative); the last stage's BN-ReLU is the
head's ``bn``/``relu``. The embedding is the input of ``fc`` (its pooled output).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from rolekd.models.preresnet import resolve_block
from rolekd.models.common import PreActHead, init_conv_bn
from rolekd.models.registry import register_family

__all__ = ["PyramidBasicBlock", "PyramidBottleneck", "PyramidNet", "pyramidnet"]


def _add_shortcut(out: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    extra = out.shape[1] - shortcut.shape[1]
    if extra:
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, extra))
    return out + shortcut


class PyramidBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = nn.AvgPool2d(2, 2, ceil_mode=True) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.bn2(self.conv1(self.bn1(x)))))
        return _add_shortcut(self.bn3(out), self.downsample(x))


class PyramidBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = nn.AvgPool2d(2, 2, ceil_mode=True) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu1(self.bn2(self.conv1(self.bn1(x)))))
        out = self.bn4(self.conv3(self.relu2(self.bn3(out))))
        return _add_shortcut(out, self.downsample(x))


_BLOCKS = {"basic": PyramidBasicBlock, "bottleneck": PyramidBottleneck}


class PyramidNet(PreActHead, nn.Module):
    """Additive PyramidNet for 32x32 inputs."""

    kd_taps = {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3"}
    kd_embedding = "fc"

    def __init__(self, depth: int = 110, alpha: int = 48, num_classes: int = 10, block: str | None = None):
        super().__init__()
        kind, n = resolve_block(f"pyramidnet_{depth}_{alpha}", depth, block)
        unit = _BLOCKS[kind]
        self.depth, self.alpha, self.block = depth, alpha, kind
        step = alpha / (3 * n)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes, width = 16, 16.0
        for i in range(3):
            units = []
            for j in range(n):
                width += step
                planes = int(round(width))
                units.append(unit(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes * unit.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
        self._build_head(in_planes, num_classes)
        init_conv_bn(self, "fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self._head(x)


@register_family(r"pyramidnet_(\d+)_(\d+)", "pyramidnet_<depth>_<alpha>",
                 ("pyramidnet_110_48", "pyramidnet_164_48", "pyramidnet_200_240", "pyramidnet_272_200"))
def pyramidnet(match: re.Match, num_classes: int = 10, block: str | None = None) -> PyramidNet:
    """``pyramidnet_200_240`` -> PyramidNet-200, alpha 240 (bottleneck); ``block=`` overrides."""
    return PyramidNet(int(match.group(1)), int(match.group(2)), num_classes, block)
