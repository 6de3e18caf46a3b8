"""Low-bit (DoReFa) students: weight/activation quantizers and :func:`quantize_model`."""

from .dorefa import (
    FULL_PRECISION,
    ActQuant,
    QConv2d,
    QLinear,
    activation_points,
    check_bits,
    full_precision_layers,
    quantizable_layers,
    quantize_activation,
    quantize_model,
    quantize_weight,
)

__all__ = [
    "FULL_PRECISION", "ActQuant", "QConv2d", "QLinear", "activation_points", "check_bits",
    "full_precision_layers", "quantizable_layers", "quantize_activation", "quantize_model",
    "quantize_weight",
]
