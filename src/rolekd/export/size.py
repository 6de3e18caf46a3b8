"""A model's size at its true bit widths, from its architecture and bits alone (no onnx needed).

What a deployed DoReFa student has to store:

* every quantized weight tensor (a :class:`~rolekd.quant.QConv2d` / :class:`~rolekd.quant.QLinear` with
  ``w_bits`` < 32) as ``w_bits`` bits per weight, packed (``ceil(numel * w_bits / 8)`` bytes per tensor),
  plus, for 1-bit weights, its float32 scale ``mean|w|`` (for k >= 2 bits the scale 1/(2^k - 1) follows
  from k);
* everything else in float32: the full-precision first conv and last linear layer, biases, and each
  BatchNorm's weight, bias, running mean and running variance (``num_batches_tracked`` is a training
  counter, not needed for inference).

The fp32 size is the same tensors all in float32. Activation bits cost no storage. Sizes are exact byte
counts (1 MB = 10^6 bytes); they depend only on the architecture, the number of classes and the bits.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..config import Config
from ..errors import UserError
from ..experiment import build_model
from ..models import on_meta
from ..quant import FULL_PRECISION, QConv2d, QLinear, full_precision_layers

_FLOAT_BYTES = 4


def _inference_tensors(model: nn.Module):
    """``(name, tensor)`` of what inference needs: parameters and floating-point buffers."""
    for name, t in model.named_parameters():
        yield name, t
    for name, t in model.named_buffers():
        if t.is_floating_point():
            yield name, t


def model_size(model: nn.Module) -> dict:
    """The storage of ``model`` (a full-precision or DoReFa network, on any device, the meta device
    included) at its true bit widths and in float32: a dict of byte counts and tensor counts."""
    quantized = {}
    for path, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear)) and m.w_bits != FULL_PRECISION:
            quantized[f"{path}.weight" if path else "weight"] = m.w_bits
    fp32 = packed = packed_weights = n_quantized = n_float = 0
    for name, t in _inference_tensors(model):
        numel = t.numel()
        fp32 += _FLOAT_BYTES * numel
        bits = quantized.get(name)
        if bits is None:
            packed += _FLOAT_BYTES * numel
            n_float += numel
        else:
            nbytes = math.ceil(numel * bits / 8) + (_FLOAT_BYTES if bits == 1 else 0)
            packed += nbytes
            packed_weights += nbytes
            n_quantized += numel
    return {"fp32_bytes": fp32, "packed_bytes": packed, "packed_weight_bytes": packed_weights,
            "float_bytes": _FLOAT_BYTES * n_float, "quantized_weights": n_quantized, "float_values": n_float,
            "quantized_tensors": len(quantized), "ratio": fp32 / packed if packed else 1.0}


def config_size(cfg: Config, num_classes: int) -> dict:
    """:func:`model_size` of the model a run of ``cfg`` trains (built on the meta device: no memory, no
    weights), with its model name and bits."""
    with on_meta():
        model = build_model(cfg, num_classes)
    return {"model": cfg.model.name, "w_bits": cfg.quant.w_bits, "a_bits": cfg.quant.a_bits,
            **model_size(model)}


def num_classes_of(cfg: Config, weights: str | Path) -> int:
    """The number of classes of the model in ``weights`` (a run's ``model.safetensors``): the output width
    of its last linear layer, read from the file's header only."""
    with on_meta():
        probe = build_model(cfg, 1, quantize=False)
    _, last = full_precision_layers(probe)
    if last is None:
        raise UserError(f"model {cfg.model.name} has no conv or linear layer: its number of classes is unknown")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return int(f.get_slice(f"{last}.weight").get_shape()[0])
    except Exception as e:  # a missing, corrupt or foreign file
        raise UserError(f"cannot read the classifier {last}.weight from {weights} ({type(e).__name__}); "
                        f"give a finished run's model.safetensors") from None


def megabytes(nbytes: int) -> str:
    """``nbytes`` in MB (10^6 bytes) with enough digits for a small model."""
    mb = nbytes / 1e6
    return f"{mb:.3f} MB" if mb < 10 else f"{mb:.2f} MB"


def size_cell(size: dict) -> str:
    """A short table cell: packed size at the true bit widths and the fp32 size."""
    if size["packed_bytes"] == size["fp32_bytes"]:
        return f"{megabytes(size['fp32_bytes'])} (fp32)"
    return f"{megabytes(size['packed_bytes'])} (fp32 {megabytes(size['fp32_bytes'])}, {size['ratio']:.1f}×)"
