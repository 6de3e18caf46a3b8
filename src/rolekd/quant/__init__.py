"""Low-bit (DoReFa) students: weight/activation quantizers and :func:`quantize_model`."""

from .dorefa import (
    FULL_PRECISION,
    QConv2d,
    QLinear,
    check_bits,
    full_precision_layers,
    quantizable_layers,
    quantize_activation,
    quantize_model,
    quantize_weight,
    uniform_quantize,
)

__all__ = [
    "FULL_PRECISION", "QConv2d", "QLinear", "check_bits", "full_precision_layers", "quantizable_layers",
    "quantize_activation", "quantize_model", "quantize_weight", "uniform_quantize",
]
