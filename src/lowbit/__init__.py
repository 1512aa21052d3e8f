"""lowbit: turn a trained PyTorch model into a smaller, faster, low-precision model, and prove it still works."""

from __future__ import annotations

from . import formats
from .errors import (
    ConfigError,
    EmptyCalibrationError,
    NonFiniteError,
    QuantizationError,
    ShapeMismatchError,
    UnsupportedLayerError,
)
from .granularity import PerChannel, PerGroup, PerTensor, PerToken
from .ops import dequantize, fake_quantize, quantize
from .spec import QuantSpec, compute_qparams

__version__ = "0.1.0"

__all__ = [
    "formats", "QuantSpec", "compute_qparams", "PerTensor", "PerChannel", "PerGroup", "PerToken",
    "quantize", "dequantize", "fake_quantize",
    "QuantizationError", "ConfigError", "NonFiniteError", "EmptyCalibrationError", "ShapeMismatchError",
    "UnsupportedLayerError",
]
