"""Integer-only reference runtime: fixed-point requantization and a QDQ ONNX interpreter.

``IntegerRuntime(model, requant="float")`` executes a QDQ model with integer codes and int32 accumulators,
bit-exact with ONNX Runtime's CPU kernels; ``requant="fixed_point"`` replaces every float rescale by an
int32 multiplier and shift (:mod:`lowbit.runtime.fixed_point`).
"""

from __future__ import annotations

from .fixed_point import (
    FixedPointMultiplier,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    requantize_fixed_point,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from .interpreter import IntegerRuntime, QTensor, RequantComparison, RequantMode, compare_requant_modes

__all__ = [
    "FixedPointMultiplier", "quantize_multiplier", "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot", "multiply_by_quantized_multiplier", "requantize_fixed_point",
    "IntegerRuntime", "QTensor", "RequantComparison", "RequantMode", "compare_requant_modes",
]
