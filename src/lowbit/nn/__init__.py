"""Quantized-simulation modules: TensorQuantizer and the quantized layers."""

from .quantizer import TensorQuantizer, calibrating, quantizers

__all__ = ["TensorQuantizer", "calibrating", "quantizers"]
