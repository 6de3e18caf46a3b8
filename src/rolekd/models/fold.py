"""Folding a frozen network's BatchNorm into the convolutions before it (for a KD teacher's forward).

In eval mode a BatchNorm after a convolution is an affine map per channel, so the pair is one convolution
with scaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``). :func:`fold_batchnorm` returns
a folded copy: the same outputs up to float rounding (the products are formed in another order), one pass
over each activation fewer per pair. The copy keeps every module path (a folded BatchNorm becomes an
``nn.Identity`` in its place), so feature taps and hooks by name find the same points.

A pair is folded only where that cannot change what the network computes or what a hook reads: a plain
``nn.Conv2d`` (not a quantized subclass) whose output goes only to an eval-mode ``nn.BatchNorm2d`` with
running statistics, each module called once, the convolution not itself a declared feature tap. The pairs
are found by tracing the forward (``torch.fx``); a network that does not trace is copied unfolded.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["conv_bn_pairs", "fold_batchnorm"]


class _LeafTracer(torch.fx.Tracer):
    """Every module without children is one node (a quantized layer or a custom activation is not traced
    into); only the containers' forwards are traced."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return next(m.children(), None) is None or super().is_leaf_module(m, module_qualified_name)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv path, batchnorm path)`` of each convolution whose output only feeds a BatchNorm (in forward
    order); empty when the forward does not trace."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # data-dependent control flow, untraceable ops: fold nothing
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    tapped = set(getattr(model, "kd_taps", {}).values())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.BatchNorm2d:
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = modules.get(src.target), modules[node.target]
        if (type(conv) is nn.Conv2d and bn.track_running_stats and bn.running_mean is not None
                and calls[src.target] == 1 and calls[node.target] == 1 and src.target not in tapped):
            pairs.append((src.target, node.target))
    return pairs


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each foldable convolution-BatchNorm pair (:func:`conv_bn_pairs`)
    made one convolution; gradients off. ``model`` itself is not changed."""
    folded = copy.deepcopy(model).eval().requires_grad_(False)
    for conv_path, bn_path in conv_bn_pairs(folded):
        conv = folded.get_submodule(conv_path)
        fused = fuse_conv_bn_eval(conv, folded.get_submodule(bn_path))
        # the weight keeps the convolution's memory format (channels-last stays channels-last)
        fmt = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) and \
            not conv.weight.is_contiguous() else torch.contiguous_format
        fused.weight.data = fused.weight.data.contiguous(memory_format=fmt)
        _set(folded, conv_path, fused.requires_grad_(False))
        _set(folded, bn_path, nn.Identity())
    return folded
