"""Pieces shared by the CIFAR families: the weight initialiser, the pre-activation head and the
activation-quantisation marker :class:`QuantPoint`."""

from __future__ import annotations

import torch
from torch import nn


def init_conv_bn(model: nn.Module, mode: str = "fan_out") -> None:
    """He-normal convolutions (``mode`` fan_in or fan_out), BatchNorm at weight 1 / bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class QuantPoint(nn.Identity):
    """Activation-quantisation point: identity in full precision; :func:`rolekd.quant.quantize_model`
    turns it into an activation quantiser.

    A model that registers ``QuantPoint`` modules declares *where* a low-bit copy quantizes its
    activations (and nowhere else). It has no parameters or buffers, so ``state_dict`` keys do not
    change and weights load strictly between a full-precision model and its quantized copy.
    """


def relu_into(point: nn.Module, relu: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``point(relu(x))`` for a ReLU whose output feeds only the activation-quantisation point ``point``: a
    point that offers ``after_relu`` (a DoReFa quantizer, :class:`rolekd.quant.ActQuant`) computes both in one
    node while training; a full-precision :class:`QuantPoint` (or anything else) is called as it is."""
    fused = getattr(point, "after_relu", None)
    return fused(relu, x) if fused is not None else point(relu(x))


class GlobalAvgPool(nn.Module):
    """The global average pool ``(B, C, H, W) -> (B, C, 1, 1)`` as a mean over H and W: the numbers of
    ``nn.AdaptiveAvgPool2d(1)`` (bit for bit on the CPU, tested), without its in-place ``as_strided_`` on
    channels-last input, which has no vmap batching rule (the fused search executor's stacked members fell back
    to a slow per-member loop, with a warning). No parameters or buffers: ``state_dict`` keys are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class PreActHead(nn.Module):
    """Mixin for pre-activation nets: the final BN-ReLU, global average pool and classifier.

    ``_build_head(channels, num_classes)`` registers ``bn``, ``relu``, ``avgpool``, ``flatten``, ``fc``
    (in data-flow order, after the stages); ``_head(x)`` applies them.
    """

    def _build_head(self, channels: int, num_classes: int) -> None:
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = GlobalAvgPool()
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn(x)))))
