"""DoReFa-Net low-bit weights and activations, with the straight-through estimator.

References (read for the definitions; the code is our own):

* Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth
  Gradients", arXiv:1606.06160 (eq. 5 for activations, eq. 7-8 for weights);
* tensorpack's ``examples/DoReFa-Net/dorefa.py`` (BWN for 1-bit weights, first and last layer kept
  in full precision), which the role-wise KD authors used.

Definitions (``n = 2**k - 1``, ``Q(r) = round(n * r) / n`` with the gradient of ``round`` taken as 1):

* weights, ``2 <= k <= 8``: ``2 * Q(tanh(w) / (2 * max|tanh(w)|) + 1/2) - 1`` (max over the whole tensor;
  the gradient flows through ``tanh`` and the max);
* weights, ``k = 1``: ``sign(w) * mean|w|`` (BWN), gradient identity (``mean|w|`` is treated as a constant);
* activations, ``1 <= k <= 8``: ``Q(clip(x, 0, 1))`` (gradient 1 inside [0, 1], 0 outside);
* ``k = 32``: identity.

:func:`quantize_model` returns a low-bit copy of a model: every ``nn.Conv2d``/``nn.Linear`` except the
first conv and the last linear layer becomes a :class:`QConv2d`/:class:`QLinear`, which quantizes its
*weight*. Where activations are quantized depends on the model:

* a model that declares activation-quantisation points - :class:`rolekd.models.common.QuantPoint`
  modules (identities in full precision), as ``resnet18``/``resnet_tiny`` and ``alexnet`` do to follow
  the paper authors' code - gets its activations quantized *exactly at those points and nowhere else*:
  each ``QuantPoint`` becomes an :class:`ActQuant`, and the quantized layers do not quantize their
  input (``quantize_input=False``), so no activation is quantized twice;
* a model without ``QuantPoint`` modules (``wrn_*``, ``preresnet*``, ``pyramidnet_*``, users' models)
  gets the *input activation* of every quantized layer quantized (``quantize_input=True``).

Parameter names are unchanged and :class:`ActQuant` has no parameters or buffers, so ``state_dict``
keys are identical and a full-precision teacher's weights load into the student with ``strict=True``.
"""

from __future__ import annotations

import copy
import functools
import operator
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import peek_interpreter_stack
from torch.nn.modules import module as _module

from ..errors import UserError
from ..models.common import QuantPoint

FULL_PRECISION = 32


def check_bits(bits, what: str = "bits") -> int:
    """Return ``bits`` as an int if it is 1..8 or 32, else raise :class:`UserError`."""
    try:
        if isinstance(bits, bool):
            raise TypeError
        bits = operator.index(bits)
    except TypeError:
        raise UserError(f"{what}={bits!r} is not supported: use an integer 1..8, or 32 for full precision") from None
    if not (1 <= bits <= 8 or bits == FULL_PRECISION):
        raise UserError(f"{what}={bits} is not supported: use 1..8, or 32 for full precision")
    return bits


_M_FLOOR = 1e-12  # lower bound of max|tanh(w)|


class _WeightQuant(torch.autograd.Function):
    """k-bit DoReFa weights (2 <= k <= 8) in one node: forward ``(2 round(n r) - n) / n`` with
    ``r = tanh(w) / (2M) + 1/2``, ``M = max|tanh(w)|`` (levels exact, e.g. +-1/3 for 2 bits); backward the
    straight-through gradient of the un-rounded ``tanh(w) / M``, through ``tanh`` and ``M`` (``M``'s share
    split evenly among tied maxima, as autograd's ``max``).

    Written in the ``setup_context`` form with a generated vmap rule, so that under
    :func:`torch.func.vmap` (the fused search executor's stacked members) every member's weight takes
    its *own* maximum. ``forward`` also returns ``tanh(w)`` and ``M`` (non-differentiable) for the
    backward; :func:`quantize_weight` returns the quantized weight only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w: torch.Tensor, n: float):
        t = torch.tanh(w)
        m = t.abs().max().clamp_min(_M_FLOOR)  # all-zero weights: levels +-1/n, finite gradients
        return (t / (2.0 * m)).add_(0.5).mul_(n).round_().mul_(2.0).sub_(n).div_(n), t, m

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, t, m = output
        ctx.mark_non_differentiable(t, m)
        ctx.set_materialize_grads(False)  # no zero gradients made for t and m
        ctx.save_for_backward(t, m)

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_t, _g_m):
        t, m = ctx.saved_tensors
        at_max = t.abs() == m
        g_m = -(g * t).sum() / m / m  # d/dM of sum(g * t / M)
        g_t = g / m + torch.sign(t) * at_max * (g_m / at_max.sum().clamp_min(1))
        return g_t * (1.0 - t * t), None


class _ActQuant(torch.autograd.Function):
    """k-bit DoReFa activations in one node: forward ``round(n clip(x, 0, 1)) / n``; backward the
    gradient of the clip (1 for ``0 <= x <= 1``, else 0) - the rounding is straight-through.

    The backward is one operator on the saved input (no mask made in the forward): ``hardtanh_backward``
    passes the gradient where ``lo < x < hi``, and with ``lo``, ``hi`` the neighbours of 0 and 1 below and
    above in ``x``'s dtype (:func:`_clip_bounds`) that is exactly ``0 <= x <= 1`` - the clip's mask, to the
    bit, for every input but NaN (whose gradient it passes; its output is NaN either way). The input is
    kept alive already where the network saves it for its own backward (a ReLU's output). Before: a float
    mask ``clip(x, 0, 1) == x`` made in the forward (two more operators a call) and multiplied in.

    ``relu=True``: the quantizer of ``relu(x)`` in the same node - the same values (the clip starts at 0), and
    the ReLU's gradient folded in: 1 for ``0 < x <= 1`` (``lo = 0``), as ReLU's backward (zero where its output
    is 0) followed by the clip's. ``setup_context`` form with a generated vmap rule (see :class:`_WeightQuant`).
    Without gradients (evaluation) :func:`quantize_activation` skips this node."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, n: float, relu: bool = False):
        return _quantize_levels(x, n)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.relu = inputs[2]
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, = ctx.saved_tensors
        lo, hi = _clip_bounds(x.dtype)
        return torch.ops.aten.hardtanh_backward(g, x, 0.0 if ctx.relu else lo, hi), None, None


@functools.cache
def _clip_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """The largest value below 0 and the smallest above 1 in ``dtype``: ``lo < x < hi`` iff ``0 <= x <= 1``."""
    zero, one = torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)
    return float(torch.nextafter(zero, -one)), float(torch.nextafter(one, one + one))


def _round_levels_(c: torch.Tensor, n: float) -> torch.Tensor:
    """``round(n c) / n`` in place, for ``c`` already clipped to [0, 1]."""
    return c.mul_(n).round_().div_(n)


def _quantize_levels(x: torch.Tensor, n: float) -> torch.Tensor:
    """``round(n clip(x, 0, 1)) / n`` without a graph (the forward of :class:`_ActQuant`)."""
    return _round_levels_(torch.clamp(x, 0.0, 1.0), n)


class _WeightQuantGroup(torch.autograd.Function):
    """:class:`_WeightQuant` for a list of weights at once, in ``torch._foreach_*`` operators: one node whose
    forward is ~15 operators and whose backward is ~10 plus one sum per weight, where the per-weight node took
    ~12 and 18 per weight (ResNet18's 19 quantized weights: 228 and 342; the KD objective's clipped step runs
    the backward twice). The same arithmetic element by element, so the quantized weights and their gradients
    are bit-identical to :class:`_WeightQuant`'s (tested). The parts of the backward that depend only on the
    weights (``1 - t^2``, where the maxima are and how many) are made once in the forward. A weight whose output
    gets no gradient gets none (``None``, as autograd gives an unused input). No vmap rule: under a functorch
    transform :func:`quantize_weights` quantizes each weight with :class:`_WeightQuant`."""

    @staticmethod
    def forward(ctx, n: float, *ws: torch.Tensor):
        t, a, m, q = _group_levels(ws, n)
        ms = m.unbind()
        d = torch._foreach_mul(t, t)  # 1 - t^2, as (-t^2) + 1 (the same rounding as 1 - t^2)
        torch._foreach_neg_(d)
        torch._foreach_add_(d, 1.0)
        at_max = torch._foreach_sub(a, ms)  # <= 0, exactly 0 where |t| == M
        torch._foreach_sign_(at_max)
        torch._foreach_add_(at_max, 1.0)  # 1 at a maximum, else 0
        count = torch.stack(torch._foreach_norm(at_max, 1)).clamp_min_(1)  # the L1 norm of 0/1 entries: a count
        tie = torch._foreach_sign(t)  # where M's gradient goes: +-1 at the maxima (split evenly among ties)
        torch._foreach_mul_(tie, at_max)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(m, count, *t, *d, *tie)
        return tuple(q)

    @staticmethod
    def backward(ctx, *gs):
        m, count, *saved = ctx.saved_tensors
        k = len(gs)
        t, d, tie = saved[:k], saved[k:2 * k], saved[2 * k:]
        idx = [i for i, g in enumerate(gs) if g is not None]
        out: list = [None] * k
        if not idx:
            return (None, *out)
        g = [gs[i] for i in idx]
        if len(idx) < k:
            m, count = m[idx], count[idx]
        prod = torch._foreach_mul(g, [t[i] for i in idx])
        g_m = -torch.stack([p.sum() for p in prod]) / m / m  # d/dM of sum(g * t / M)
        # (g / M + tie * g_M / count) (1 - t^2): the straight-through gradient of tanh(w) / M, through tanh
        gt = torch._foreach_div(g, m.unbind())
        torch._foreach_add_(gt, torch._foreach_mul([tie[i] for i in idx], (g_m / count).unbind()))
        torch._foreach_mul_(gt, [d[i] for i in idx])
        for i, gi in zip(idx, gt):
            out[i] = gi
        return (None, *out)


def _group_levels(ws, n: float):
    """``tanh(w)``, ``|tanh(w)|``, ``M`` (stacked) and the quantized weights of a list of weights, as
    :class:`_WeightQuant`'s forward computes each (the same operations, as foreach operators)."""
    t = torch._foreach_tanh(ws)
    a = torch._foreach_abs(t)
    m = torch.stack(torch._foreach_max(a)).clamp_min_(_M_FLOOR)
    q = torch._foreach_div(t, (2.0 * m).unbind())
    torch._foreach_add_(q, 0.5)
    torch._foreach_mul_(q, n)
    torch._foreach_round_(q)
    torch._foreach_mul_(q, 2.0)
    torch._foreach_sub_(q, n)
    torch._foreach_div_(q, n)
    return t, a, m, q


def quantize_weights(ws: list[torch.Tensor], bits: int) -> list[torch.Tensor]:
    """:func:`quantize_weight` of each weight in ``ws``, as one node (:class:`_WeightQuantGroup`): the same
    quantized weights in a fraction of the operators. Under a functorch transform (vmap: the fused search
    executor) and for ``bits`` 1 or 32, each weight on its own."""
    bits = check_bits(bits, "w_bits")
    if bits in (1, FULL_PRECISION) or not ws or peek_interpreter_stack() is not None:
        return [quantize_weight(w, bits) for w in ws]
    n = float(2 ** bits - 1)
    if torch.is_grad_enabled() and any(w.requires_grad for w in ws):
        return list(_WeightQuantGroup.apply(n, *ws))
    with torch.no_grad():
        return _group_levels(ws, n)[3]


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa weight quantizer (see the module docstring); ``bits`` in 1..8 or 32."""
    bits = check_bits(bits, "w_bits")
    if bits == FULL_PRECISION:
        return w
    if bits == 1:
        scale = w.detach().abs().mean()
        return (torch.sign(w) * scale).detach() + (w - w.detach())
    return _WeightQuant.apply(w, float(2 ** bits - 1))[0]


def quantize_activation(x: torch.Tensor, bits: int, relu: bool = False) -> torch.Tensor:
    """DoReFa activation quantizer ``Q(clip(x, 0, 1))``; ``bits`` in 1..8 or 32. ``relu=True``: of ``relu(x)``,
    in one node (the same values and gradient as a ReLU followed by the quantizer, without the ReLU's own
    forward and backward passes)."""
    bits = check_bits(bits, "a_bits")
    if bits == FULL_PRECISION:
        return torch.relu(x) if relu else x
    n = float(2 ** bits - 1)
    if not torch.is_grad_enabled():
        return _quantize_levels(x, n)
    return _ActQuant.apply(x, n, relu)


class _QuantMixin:
    """Adds ``w_bits`` / ``a_bits`` / ``quantize_input`` to a conv/linear layer class (parameter names
    unchanged). With ``quantize_input=False`` the input activation is left as it is (the model
    quantizes activations at its own :class:`~rolekd.models.common.QuantPoint` modules)."""

    w_bits: int = FULL_PRECISION
    a_bits: int = FULL_PRECISION
    quantize_input: bool = True

    def __init__(self, *args, w_bits: int = FULL_PRECISION, a_bits: int = FULL_PRECISION,
                 quantize_input: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_bits = check_bits(w_bits, "w_bits")
        self.a_bits = check_bits(a_bits, "a_bits")
        self.quantize_input = bool(quantize_input)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_activation(x, self.a_bits) if self.quantize_input else x

    def extra_repr(self) -> str:  # noqa: D401 - nn.Module hook
        return (f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}, "
                f"quantize_input={self.quantize_input}")


class QConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` that quantizes its input activation (if ``quantize_input``), then its weight
    (same parameter names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        return self._conv_forward(x, _quantized_weight(self), self.bias)


class QLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` that quantizes its input activation (if ``quantize_input``), then its weight
    (same parameter names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quantize_input(x)
        return F.linear(x, _quantized_weight(self), self.bias)


# The weights a model's forward pre-hook quantized together (quantize_weights_first), taken by each layer's
# forward: layer -> (the weight it was made from, that weight's version, grad mode, the quantized weight). Outside
# the modules, so nothing of it is copied, pickled or saved with them.
_QUANTIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _version(w: torch.Tensor) -> int | None:
    try:
        return w._version
    except RuntimeError:  # an inference-mode tensor has no version counter
        return None


def _quantized_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's quantized weight: the one its model's pre-hook made for this forward if it was made from this
    very weight, unchanged since, in this grad mode; else quantized here (a layer called on its own, a weight
    updated in between, a functorch transform)."""
    if torch.compiler.is_compiling():  # torch.compile fuses the per-layer quantizer itself
        return quantize_weight(layer.weight, layer.w_bits)
    made = _QUANTIZED.pop(layer, None)
    w = layer.weight
    if made is not None and made[0] is w and made[1] == _version(w) and made[1] is not None \
            and made[2] == torch.is_grad_enabled():
        return made[3]
    return quantize_weight(w, layer.w_bits)


def quantize_weights_first(model: nn.Module, args) -> None:
    """Forward pre-hook :func:`quantize_model` puts on the model: the weights of all its quantized layers quantized
    as one group (:func:`quantize_weights`; a few dozen operators instead of ~12 per layer forward and 18 per
    layer backward), each layer then takes its own (:func:`_quantized_weight`). Under a functorch transform
    (the fused search executor's vmap) and under ``torch.compile`` (which fuses each layer's quantizer, and would
    recompile for the hand-over) it does nothing: each layer quantizes its own weight."""
    if peek_interpreter_stack() is not None or torch.compiler.is_compiling():
        return None
    by_bits: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        if type(m) in (QConv2d, QLinear) and 2 <= m.w_bits <= 8:
            by_bits.setdefault(m.w_bits, []).append(m)
    grad = torch.is_grad_enabled()
    for bits, layers in by_bits.items():
        if len(layers) < 2:
            continue
        ws = [m.weight for m in layers]
        for m, w, q in zip(layers, ws, quantize_weights(ws, bits)):
            _QUANTIZED[m] = (w, _version(w), grad, q)
    return None


class ActQuant(nn.Module):
    """DoReFa activation quantiser ``Q(clip(x, 0, 1))`` as a module (no parameters or buffers);
    :func:`quantize_model` turns each :class:`~rolekd.models.common.QuantPoint` into one."""

    a_bits: int = FULL_PRECISION

    def __init__(self, a_bits: int = FULL_PRECISION):
        super().__init__()
        self.a_bits = check_bits(a_bits, "a_bits")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_activation(x, self.a_bits)

    def after_relu(self, relu: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``self(relu(x))``: while training with gradients, a plain ``nn.ReLU`` and this quantizer in one node
        (:func:`quantize_activation` with ``relu=True``: the same values and gradients, bit for bit - an input of
        -0 quantizes to -0 rather than +0, equal as a number - without the ReLU's forward and its two backward
        operators per pass); otherwise (evaluation, export, hooks on either
        module, another activation) the two modules as they are. Models call it through
        :func:`rolekd.models.common.relu_into`."""
        if (self.a_bits == FULL_PRECISION or not torch.is_grad_enabled() or type(relu) is not nn.ReLU
                or _hooked(relu) or _hooked(self)):
            return self(relu(x))
        return quantize_activation(x, self.a_bits, relu=True)

    def extra_repr(self) -> str:  # noqa: D401 - nn.Module hook
        return f"a_bits={self.a_bits}"


def _hooked(m: nn.Module) -> bool:
    """Whether a forward hook would see ``m``'s call (its own or a global one)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)


_SWAP = {nn.Conv2d: QConv2d, nn.Linear: QLinear, QConv2d: QConv2d, QLinear: QLinear}
_ACT_POINTS = (QuantPoint, ActQuant)


def activation_points(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every declared activation-quantisation point (a
    :class:`~rolekd.models.common.QuantPoint`, or an :class:`ActQuant` of an already quantized copy)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _ACT_POINTS)]


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every ``nn.Conv2d``/``nn.Linear`` in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def full_precision_layers(model: nn.Module) -> tuple[str | None, str | None]:
    """Paths of the layers DoReFa keeps in full precision: the first conv and the last linear layer.

    "First"/"last" follow registration order (the model zoo registers modules in data-flow order). A
    model without a linear layer keeps its last conv/linear layer instead; one without convs, its first.
    """
    layers = quantizable_layers(model)
    convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    first = convs[0] if convs else (layers[0][0] if layers else None)
    last = linears[-1] if linears else (layers[-1][0] if layers else None)
    return first, last


def quantize_model(model: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
    """A DoReFa low-bit deep copy of ``model`` (the input is not modified).

    Every ``nn.Conv2d``/``nn.Linear`` except the first conv and the last linear layer becomes a
    :class:`QConv2d`/:class:`QLinear` with the given bits. If the model declares activation-quantisation
    points (:class:`~rolekd.models.common.QuantPoint` modules), each becomes an :class:`ActQuant` with
    ``a_bits`` and the quantized layers get ``quantize_input=False``: activations are quantized exactly
    at the declared points. Otherwise every quantized layer quantizes its input (``quantize_input=True``).
    Module paths and parameter names are kept, so ``kd_taps``/``kd_embedding`` and ``state_dict`` keys
    are unchanged. An already quantized copy can be quantized again (its layers and :class:`ActQuant`
    modules take the new bits). The copy records ``w_bits`` and ``a_bits`` as attributes. Bits must be
    1..8 or 32 (:class:`UserError` otherwise).
    """
    w_bits = check_bits(w_bits, "w_bits")
    a_bits = check_bits(a_bits, "a_bits")
    q = copy.deepcopy(model)
    points = activation_points(q)
    first, last = full_precision_layers(q)
    for name, m in quantizable_layers(q):
        if name in (first, last):
            continue
        cls = _SWAP.get(type(m))
        if cls is None:
            raise UserError(f"cannot quantize {name!r}: {type(m).__name__} is a custom subclass of "
                            f"nn.Conv2d/nn.Linear; use plain nn.Conv2d/nn.Linear layers in the model")
        # Re-class in place (on the copy): parameters, buffers and hooks stay exactly as they are.
        m.__class__ = cls
        m.w_bits, m.a_bits = w_bits, a_bits
        m.quantize_input = not points  # declared points quantize activations; never twice
    for name, m in points:
        if type(m) not in _ACT_POINTS:
            raise UserError(f"cannot quantize {name!r}: {type(m).__name__} is a custom subclass of "
                            f"QuantPoint; use QuantPoint itself to mark activation-quantisation points")
        m.__class__ = ActQuant
        m.a_bits = a_bits
    q.w_bits, q.a_bits = w_bits, a_bits
    if not any(h is quantize_weights_first for h in q._forward_pre_hooks.values()):
        q.register_forward_pre_hook(quantize_weights_first)
    return q
