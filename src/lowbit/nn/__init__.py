"""Quantized-simulation modules: TensorQuantizer and the quantized layers."""

from .layers import (
    QUANT_LAYERS,
    QuantAdd,
    QuantCat,
    QuantConv1d,
    QuantConv2d,
    QuantConvTranspose2d,
    QuantEmbedding,
    QuantJoin,
    QuantLayerMixin,
    QuantLinear,
    QuantMatMul,
    QuantMul,
    is_quant_layer,
    quant_class_for,
    weight_spec_for,
)
from .quantizer import TensorQuantizer, calibrating, quantizers
from .requant import ort_arithmetic

__all__ = [
    "TensorQuantizer", "calibrating", "quantizers",
    "QuantLayerMixin", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantConvTranspose2d", "QuantEmbedding",
    "QuantJoin", "QuantMatMul", "QuantAdd", "QuantMul", "QuantCat",
    "QUANT_LAYERS", "quant_class_for", "weight_spec_for", "is_quant_layer", "ort_arithmetic",
]
