"""CIFAR ResNet18 (and a tiny ResNet18-shaped net for tests).

Architecture (the CIFAR variant used by the paper authors' ``ResNet18`` in
``bigaidream-projects/role-kd``, ``pba/kd/nets/ResNet.py``, and by most CIFAR KD code):

* stem: 3x3 conv (stride 1, 64 channels) - BN - ReLU, no max-pool;
* 4 stages of 2 basic blocks, widths 64/128/256/512, strides 1/2/2/2 (32 -> 16 -> 8 -> 4);
* basic block: conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut (identity, or 1x1 conv + BN
  when stride or width changes), then the block's own final ReLU (``relu2``), so the block output
  is post-ReLU;
* global average pool, ``fc`` (Linear with bias). Convolutions have no bias (BN follows).

11,173,962 parameters for 10 classes (11,220,132 for 100).

KD taps: ``stage1..stage4`` = output of the last block of each stage (post-ReLU), as in the
authors' ``feat`` collection; the embedding is the input of ``fc`` (the pooled 512-d vector).

Quantisation points of the authors' DoReFa student: inside each block the activation quantiser
``fa(clip(x, 0, 1))`` is applied (1) to the *block input*, before it feeds both the residual branch
and the shortcut (identity or projection), so an identity shortcut adds the *quantised* input -
module ``act_in`` - and (2) after ``relu1``, before ``conv2`` - module ``act_mid``. Both are
:class:`~rolekd.models.common.QuantPoint` markers: identities in the full-precision model (which
computes a plain ResNet), turned into activation quantisers by :func:`rolekd.quant.quantize_model`,
which then quantizes activations only there (the quantized convs do not quantize their own input
again). The block output (``relu2``, the tapped feature) is *not* quantised in its block; it is
quantised by the next block's ``act_in``; the last block's output goes to the pool and ``fc``
unquantised. ``relu1`` feeds only ``act_mid``: a quantized student computes the two in one node while
training (:func:`~rolekd.models.common.relu_into`; the same numbers, without the ReLU's passes). Weights of
every conv are quantised except the stem ``conv1``; ``fc`` is not quantised.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rolekd.models.common import GlobalAvgPool, QuantPoint, init_conv_bn, relu_into
from rolekd.models.registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "resnet18", "resnet_tiny"]


class BasicBlock(nn.Module):
    """Post-activation basic block whose output is post-ReLU (the ReLU is part of the block)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.act_in = QuantPoint()  # activation-quantisation point of the block input (both branches)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.act_mid = QuantPoint()  # activation-quantisation point before conv2
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_in(x)
        out = relu_into(self.act_mid, self.relu1, self.bn1(self.conv1(x)))  # act_mid(relu1(.)), one node if quantized
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, no max-pool, 4 stages of basic blocks."""

    kd_taps = {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3", "stage4": "layer4"}
    kd_embedding = "fc"

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512),
                 blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, stem_width: int | None = None):
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4:
            raise ValueError("CifarResNet needs 4 widths and 4 block counts")
        stem = stem_width or widths[0]
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=False)
        in_planes = stem
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, w, stride if j == 0 else 1))
                in_planes = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = GlobalAvgPool()
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes
        # The authors' initialisers: variance scaling (He, fan-in) for convs, Xavier for the classifier.
        init_conv_bn(self, "fan_in")
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


@register_model
def resnet18(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet18: widths 64/128/256/512, 2 blocks per stage (11.17M parameters)."""
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes)


@register_model
def resnet_tiny(num_classes: int = 10) -> CifarResNet:
    """ResNet18-shaped test net: widths 8/16/32/64, 1 block per stage, same taps as resnet18."""
    return CifarResNet((8, 16, 32, 64), (1, 1, 1, 1), num_classes)
