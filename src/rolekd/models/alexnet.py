"""CIFAR AlexNet with batch norm, as in the paper authors' code.

Layer sizes follow ``AlexNetCifar`` in ``bigaidream-projects/role-kd`` (``pba/kd/nets/ResNet.py``),
the TensorFlow/tensorpack code released with the Role-KD paper (itself the CIFAR AlexNet of the
DoReFa/KD literature):

=========  ===========================================================  ===============
block      layers                                                       output (N,C,H,W)
=========  ===========================================================  ===============
conv1      conv 11x11, 64, stride 1, pad 5 - BN - ReLU - max-pool 2/2    (N, 64, 16, 16)
conv2      conv 5x5, 192, pad 2 - BN - ReLU - max-pool 2/2                (N, 192, 8, 8)
conv3      conv 3x3, 384, pad 1 - BN - ReLU                               (N, 384, 8, 8)
conv4      conv 3x3, 256, pad 1 - BN - ReLU                               (N, 256, 8, 8)
conv5      conv 3x3, 256, pad 1 - BN - ReLU - max-pool 2/2                (N, 256, 4, 4)
fc1        flatten (4096) - linear 4096 - BN - ReLU                       (N, 4096)
fc2        linear 4096 - BN - ReLU                                        (N, 4096)
fc         linear num_classes                                             (N, num_classes)
=========  ===========================================================  ===============

As in the authors' code no conv or linear layer has a bias (each is followed by BN), the
classifier ``fc`` included: 36,041,664 + 4096 * num_classes parameters
(36,082,624 for 10 classes).

KD taps: each ``convK`` block is an ``nn.Sequential`` (``conv``, ``bn``, ``relu``, ``act``[, ``pool``])
whose output is post-ReLU (post-pool where there is one). The authors distil four features - after
conv2 (pooled), conv3, conv4 and conv5 (pooled); conv1's output is not one of them - so by default
``kd_taps`` is ``conv2..conv5``; ``create("alexnet", tap_conv1=True)`` adds ``conv1`` in front.
The embedding is the input of ``fc`` (the 4096-d output of ``fc2``).

Quantisation points of the authors' DoReFa student: ``fa(clip(x, 0, 1))`` right after the ReLU of
every conv block (before its pool; max-pool commutes with the monotone quantiser) and after the
ReLU of ``fc1``, but not after ``fc2``'s ReLU (``fc`` sees full-precision input). Each point is a
:class:`~rolekd.models.common.QuantPoint` module named ``act`` (``convK.act``, ``fc1.act``): an
identity in the full-precision model, an activation quantiser in the copy made by
:func:`rolekd.quant.quantize_model`, which then quantizes activations only there (the quantized
layers do not quantize their own input again). The tapped student features (block outputs) are
therefore the quantised ones. Weights: all quantised except ``conv1.conv`` and ``fc``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from rolekd.errors import UserError
from rolekd.models.common import QuantPoint
from rolekd.models.registry import register_model

__all__ = ["AlexNetCifar", "alexnet"]


def _conv_block(cin: int, cout: int, k: int, pool: bool) -> nn.Sequential:
    layers = [("conv", nn.Conv2d(cin, cout, k, 1, k // 2, bias=False)),
              ("bn", nn.BatchNorm2d(cout)),
              ("relu", nn.ReLU(inplace=False)),
              ("act", QuantPoint())]
    if pool:
        layers.append(("pool", nn.MaxPool2d(2, 2)))
    return nn.Sequential(OrderedDict(layers))


def _fc_block(cin: int, cout: int, quantize_output: bool) -> nn.Sequential:
    layers = [("fc", nn.Linear(cin, cout, bias=False)),
              ("bn", nn.BatchNorm1d(cout)),
              ("relu", nn.ReLU(inplace=False))]
    if quantize_output:
        layers.append(("act", QuantPoint()))
    return nn.Sequential(OrderedDict(layers))


class AlexNetCifar(nn.Module):
    """5 conv + 3 FC AlexNet for 32x32 inputs, BN after every layer but the classifier."""

    kd_taps = {"conv2": "conv2", "conv3": "conv3", "conv4": "conv4", "conv5": "conv5"}
    kd_embedding = "fc"

    def __init__(self, num_classes: int = 10, tap_conv1: bool = False, width: float = 1.0):
        super().__init__()
        if not 0 < width <= 4:
            raise UserError(f"alexnet: model.kwargs.width must be in (0, 4], got {width}")
        c1, c2, c3, c4, c5, f = (max(1, round(c * width)) for c in (64, 192, 384, 256, 256, 4096))
        self.conv1 = _conv_block(3, c1, 11, pool=True)
        self.conv2 = _conv_block(c1, c2, 5, pool=True)
        self.conv3 = _conv_block(c2, c3, 3, pool=False)
        self.conv4 = _conv_block(c3, c4, 3, pool=False)
        self.conv5 = _conv_block(c4, c5, 3, pool=True)
        self.flatten = nn.Flatten(1)
        self.fc1 = _fc_block(c5 * 4 * 4, f, quantize_output=True)
        self.fc2 = _fc_block(f, f, quantize_output=False)  # the authors leave fc's input unquantised
        self.fc = nn.Linear(f, num_classes, bias=False)
        self.num_features = f
        if tap_conv1:
            self.kd_taps = {"conv1": "conv1", **type(self).kd_taps}
        # The authors' initialiser: variance scaling (He, fan-in) for every conv and linear layer.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x)))))
        return self.fc(self.fc2(self.fc1(self.flatten(x))))


@register_model
def alexnet(num_classes: int = 10, tap_conv1: bool = False, width: float = 1.0) -> AlexNetCifar:
    """CIFAR AlexNet with BN of the Role-KD authors' code (36.1M parameters); ``width`` scales every layer's
    channels and the FC width (``model.kwargs={width: 0.25}``: a 16x smaller network of the same layers)."""
    return AlexNetCifar(num_classes, tap_conv1=tap_conv1, width=width)
