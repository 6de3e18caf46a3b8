"""Grouped-convolution kernels for the fused executor (``search.fused_kernel=grouped``), after HFTA
(Wang et al., MLSys 2021): ``n`` same-shaped networks run as one network whose every layer holds the
``n`` members side by side along the channel dimension.

Layout: a batch of member ``j`` occupies channels ``[j*C, (j+1)*C)`` of one ``(N, n*C, H, W)`` tensor
(``(N, n*F)`` after flattening). Each layer keeps the members apart:

* ``Conv2d(C, C', groups=g)`` -> one convolution over ``n*C`` channels with ``n*g`` groups; its weight is
  the members' stacked ``(n, C', C/g, k, k)`` weights viewed as ``(n*C', C/g, k, k)``. A DoReFa
  :class:`~rolekd.quant.QConv2d` quantizes each member's weight with its own maximum (the quantizer
  ``vmap``-ped over the member dimension) and its input elementwise;
* ``BatchNorm1d/2d(C)`` -> one BatchNorm over ``n*C`` channels: statistics are per channel, so per member;
  the running statistics are views of the stacked ``(n, C)`` buffers and are updated in place;
* ``Linear(F, F')`` -> a batched matrix product (``baddbmm``) of ``(n, N, F)`` with the stacked
  ``(n, F', F)`` weights;
* elementwise modules, pooling, ``Flatten`` and residual sums act on the joint tensor unchanged.

A network whose ``forward`` mixes channels by position (PyramidNet's zero-padded shortcut, a channel
concatenation) is not member-separable in this layout: :func:`check_grouped` evaluates two differing copies
as one grouped network against each copy's own forward and refuses such a network with one line (the run's
config check does, before its run directory is made, and the fused executor again when it starts). A module
with parameters or buffers other than the above is refused when the network is built.

With ``channels_last`` (the members' trainers' choice: on by default on CUDA) the joint input is laid out
channels-last, so every grouped convolution runs on NHWC activations (the weights stay views of the stacked
tensors). Weights are never copied: :meth:`GroupedNet.run` hands every layer a reshaped *view* of the stacked
tensors (``torch.func.functional_call``), so gradients arrive at the stacked leaves in their ``(n, ...)``
shape and BatchNorm's updates land in the stacked buffers, exactly as with the vmapped kernel.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..errors import UserError
from ..models.taps import TappedNet
from ..quant.dorefa import FULL_PRECISION, QConv2d, QLinear, quantize_activation, quantize_weight


def _member_weights(w: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """``w`` (the ``n`` members' weights, leading dimension ``n * C'`` or ``n``) with each member's weight
    DoReFa-quantized with its own maximum; same shape."""
    if bits == FULL_PRECISION:
        return w
    return vmap(partial(quantize_weight, bits=bits))(w.unflatten(0, (n, -1))).reshape(w.shape)


class _GroupedConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, n: int, path: str):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UserError(f"search.fused_kernel=grouped: {path} uses padding {conv.padding!r} / "
                            f"{conv.padding_mode!r}; use search.fused_kernel=vmap")
        self.n, self.stride, self.padding, self.dilation = n, conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups * n
        self.w_bits = conv.w_bits if isinstance(conv, QConv2d) else FULL_PRECISION
        self.a_bits = conv.a_bits if isinstance(conv, QConv2d) and conv.quantize_input else FULL_PRECISION
        meta = {"device": "meta", "dtype": conv.weight.dtype}
        self.weight = nn.Parameter(torch.empty(n * conv.weight.shape[0], *conv.weight.shape[1:], **meta))
        self.bias = None if conv.bias is None else nn.Parameter(torch.empty(n * conv.bias.shape[0], **meta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_activation(x, self.a_bits)
        w = _member_weights(self.weight, self.n, self.w_bits)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _GroupedLinear(nn.Module):
    def __init__(self, lin: nn.Linear, n: int):
        super().__init__()
        self.n = n
        self.w_bits = lin.w_bits if isinstance(lin, QLinear) else FULL_PRECISION
        self.a_bits = lin.a_bits if isinstance(lin, QLinear) and lin.quantize_input else FULL_PRECISION
        meta = {"device": "meta", "dtype": lin.weight.dtype}
        self.weight = nn.Parameter(torch.empty(n, *lin.weight.shape, **meta))
        self.bias = None if lin.bias is None else nn.Parameter(torch.empty(n, lin.bias.shape[0], **meta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_activation(x, self.a_bits)
        w = _member_weights(self.weight, self.n, self.w_bits)
        xs = x.unflatten(1, (self.n, -1)).transpose(0, 1)  # (n, N, F)
        out = (torch.bmm(xs, w.transpose(1, 2)) if self.bias is None
               else torch.baddbmm(self.bias.unsqueeze(1), xs, w.transpose(1, 2)))
        return out.transpose(0, 1).flatten(1)  # (N, n*F')


class _GroupedBatchNorm(nn.Module):
    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, n: int, path: str):
        super().__init__()
        if bn.momentum is None or not bn.track_running_stats:
            raise UserError(f"search.fused_kernel=grouped: {path} uses a cumulative or untracked BatchNorm; "
                            f"use search.fused_kernel=vmap")
        self.n, self.eps, self.momentum = n, bn.eps, bn.momentum
        c = bn.num_features
        meta = {"device": "meta"}
        if bn.affine:
            self.weight = nn.Parameter(torch.empty(n * c, dtype=bn.weight.dtype, **meta))
            self.bias = nn.Parameter(torch.empty(n * c, dtype=bn.bias.dtype, **meta))
        else:
            self.weight = self.bias = None
        self.register_buffer("running_mean", torch.empty(n * c, dtype=bn.running_mean.dtype, **meta))
        self.register_buffer("running_var", torch.empty(n * c, dtype=bn.running_var.dtype, **meta))
        self.register_buffer("num_batches_tracked", torch.empty(n, dtype=torch.long, **meta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


def _convert(module: nn.Module, n: int, prefix: str = "") -> None:
    """Replace, in place, every layer of ``module`` by its grouped counterpart (see the module docstring)."""
    for name, child in list(module.named_children()):
        path = prefix + name
        if isinstance(child, nn.Conv2d):
            new = _GroupedConv2d(child, n, path)
        elif isinstance(child, nn.Linear):
            new = _GroupedLinear(child, n)
        elif isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = _GroupedBatchNorm(child, n, path)
        else:
            own = list(child.parameters(recurse=False)) + list(child.buffers(recurse=False))
            if own:
                raise UserError(f"search.fused_kernel=grouped: {path} ({type(child).__name__}) has parameters or "
                                f"buffers but is not a Conv2d, Linear or BatchNorm; use search.fused_kernel=vmap")
            _convert(child, n, path + ".")
            continue
        new.train(child.training)
        setattr(module, name, new)


def _to_members(t: torch.Tensor, n: int) -> torch.Tensor:
    """A joint ``(N, n*C, ...)`` tensor as ``(n, N, C, ...)`` (a view)."""
    return t.unflatten(1, (n, -1)).transpose(0, 1)


class GroupedNet(nn.Module):
    """``n`` copies of the network ``net`` (a hook-free copy of a member's network) in the layout of the
    module docstring, with the feature taps a KD loss reads. Parameter and buffer names are those of
    :class:`~rolekd.models.taps.TappedNet` (``net.*``): :meth:`run` takes the stacked parameters and
    buffers (``(n, ...)`` each, as :class:`~rolekd.search.fused.StackedWeights` gives them) and returns
    what the vmapped ``functional_call`` of a :class:`TappedNet` returns."""

    def __init__(self, net: nn.Module, n: int, features: bool = False, embedding: bool = False,
                 channels_last: bool = False):
        super().__init__()
        self.n = n
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        grouped = copy.deepcopy(net)
        _convert(grouped, n, "")
        self.tapped = TappedNet(grouped, features, embedding)
        self.shapes = {k: v.shape for k, v in self.tapped.named_parameters()}
        self.shapes.update({k: v.shape for k, v in self.tapped.named_buffers()})

    def _call(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], joint: torch.Tensor,
              tapped: bool) -> dict[str, torch.Tensor]:
        views = ({k: v.reshape(self.shapes[k]) for k, v in params.items()},
                 {k: v.reshape(self.shapes[k]) for k, v in buffers.items()})
        joint = joint.contiguous(memory_format=self.memory_format)
        out = functional_call(self.tapped, views, (joint,), {"tapped": tapped})
        return {k: _to_members(v, self.n) for k, v in out.items()}

    def run(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
            x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every member's outputs on its own batch: ``x`` is ``(n, N, C, H, W)``; outputs ``(n, N, ...)``."""
        return self._call(params, buffers, x.transpose(0, 1).flatten(1, 2), True)  # (N, n*C, H, W)

    def run_shared(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                   x: torch.Tensor) -> torch.Tensor:
        """Every member's logits ``(n, N, K)`` on the same images ``x`` ``(N, C, H, W)``."""
        return self._call(params, buffers, x.repeat(1, self.n, 1, 1), False)["logits"]


def check_grouped(net: nn.Module, x: torch.Tensor) -> None:
    """Raise :class:`UserError` (one line) if the grouped kernel cannot run ``net``: two copies of it (the
    second's parameters scaled, so the members differ), evaluated on the images ``x`` as one grouped network,
    must give each copy's own logits."""
    nets = [copy.deepcopy(net).eval() for _ in range(2)]
    with torch.no_grad():
        for p in nets[1].parameters():
            p.mul_(1.5)
        params, buffers = stack_module_state(nets)
        g = GroupedNet(nets[0], 2).eval()
        got = g.run_shared({"net." + k: v for k, v in params.items()}, {"net." + k: v for k, v in buffers.items()}, x)
        want = torch.stack([m(x) for m in nets])
    scale = float(want.abs().max())
    if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-4 * scale):
        raise UserError(f"search.fused_kernel=grouped: {type(net).__name__}'s forward mixes the members' channels "
                        f"(its grouped outputs differ from the members' own); use search.fused_kernel=vmap")
