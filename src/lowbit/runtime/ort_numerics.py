"""The float arithmetic ONNX Runtime's CPU (MLAS) kernels use around integer accumulators, reproduced bit-exactly.

Every function works on numpy arrays and does each float operation in float32 in the same order as the
kernel it names, so the integer codes match ORT's. Sources (onnxruntime ``core/mlas/lib`` and
``core/providers/cpu``): ``quantize.cpp`` (QuantizeLinear, MlasRequantizeOutput), ``qlinearconv.cc`` /
``qgemm.cc`` (output scale ``s_x * s_w / s_y``), ``qladd_avx2.cpp`` (QLinearAdd), ``qlgavgpool.cpp``
(QLinearGlobalAveragePool), ``qlinear_pool.cc`` (QLinearAveragePool), ``qlinear_lookup_table.cc``
(QLinearConcat and every DQ -> float op -> Q pair ORT does not fuse).

Rounding is always round-half-to-even (``cvtps2dq`` under the default MXCSR), as ``np.rint``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "qrange",
    "quantize_linear",
    "dequantize_linear",
    "requantize_output",
    "output_scale",
    "qlinear_add",
    "global_average_pool_scale",
    "requantize_dq_q",
]

F32 = np.float32


def qrange(dtype: np.dtype | type) -> tuple[int, int]:
    """``(qmin, qmax)`` of an integer numpy dtype: (-128, 127) for int8, (0, 255) for uint8."""
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def quantize_linear(x: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, dtype) -> np.ndarray:
    """MLAS ``QuantizeLinear``: ``clamp(rint(f32(x / s)), qmin - z, qmax - z) + z``; a true float32 division.

    ``scale`` / ``zero_point`` broadcast against ``x``. Returns ``dtype`` codes.
    """
    qmin, qmax = qrange(dtype)
    z = np.asarray(zero_point).astype(np.int64)
    v = np.asarray(x, dtype=F32) / np.asarray(scale, dtype=F32)
    v = np.clip(v, (qmin - z).astype(F32), (qmax - z).astype(F32))
    return (np.rint(v).astype(np.int64) + z).astype(dtype)


def dequantize_linear(q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int) -> np.ndarray:
    """ONNX ``DequantizeLinear``: ``f32(q - z) * s`` in float32 (the int difference is exact)."""
    diff = np.asarray(q).astype(np.int64) - np.asarray(zero_point).astype(np.int64)
    return diff.astype(F32) * np.asarray(scale, dtype=F32)


def output_scale(s_x: float, s_w: np.ndarray | float, s_y: float) -> np.ndarray:
    """Requantization scale of QLinearConv / QLinearMatMul / QGemm: ``f32(f32(s_x * s_w) / s_y)``."""
    return (F32(s_x) * np.asarray(s_w, dtype=F32)) / F32(s_y)


def requantize_output(acc: np.ndarray, scale: np.ndarray, zero_point: int, dtype) -> np.ndarray:
    """MLAS ``MlasRequantizeOutput``: ``clamp(f32(acc) * scale) -> rint -> + z`` (acc includes the bias).

    ``acc`` int32 values (int64 array, wrapped to int32 as the kernel's int32 add does); ``scale`` float32
    broadcastable to ``acc`` (per output channel for per-channel weights). The int32 -> float32 conversion
    rounds to nearest even, so accumulators beyond 2^24 lose low bits exactly as in ORT.
    """
    qmin, qmax = qrange(dtype)
    acc32 = np.asarray(acc).astype(np.int64).astype(np.int32)
    v = acc32.astype(F32) * np.asarray(scale, dtype=F32)
    v = np.clip(v, F32(qmin - zero_point), F32(qmax - zero_point))
    return (np.rint(v).astype(np.int64) + zero_point).astype(dtype)


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add ``f32(a * b + c)`` with a single rounding.

    ``a`` is an 8-bit integer and ``b`` a float32, so ``a * b`` is exact in float64; the float64 sum then
    holds every bit the float32 rounding needs for the magnitudes that occur here (|a| <= 255).
    """
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(F32)


def qlinear_add(
    a: np.ndarray, s_a: float, z_a: int,
    b: np.ndarray, s_b: float, z_b: int,
    s_c: float, z_c: int, dtype,
) -> np.ndarray:
    """QLinearAdd as MLAS's AVX2 kernel computes it (``MlasQLinearAddKernelAvx2Helper``).

    ``r_a = f32(s_a / s_c)``, ``r_b = f32(s_b / s_c)``, ``fixed = f32(z_c) - fma(r_a, z_a, f32(r_b * z_b))``
    (the product sum is contracted to one fma: checked against ORT 1.32 on every code pair of 300 random
    scale sets, where separate roundings differed on 51 pairs);
    elementwise ``c = rint(fma(a, r_a, fma(b, r_b, fixed)))`` saturated to the output type. A one-element
    operand is folded into ``fixed`` with a separate multiply and add, as the kernel does. Shapes broadcast.
    """
    r_a = F32(F32(s_a) / F32(s_c))
    r_b = F32(F32(s_b) / F32(s_c))
    fixed = F32(F32(z_c) - _fma32(z_a, r_a, F32(r_b * F32(z_b))))  # contracted to an fma in the kernel's build
    a = np.asarray(a).astype(np.int64)
    b = np.asarray(b).astype(np.int64)
    if a.size == 1 and b.size != 1:
        fixed = F32(fixed + F32(F32(a.reshape(())) * r_a))
        v = _fma32(b, r_b, fixed)
        shape = np.broadcast_shapes(a.shape, b.shape)
    elif b.size == 1:
        fixed = F32(fixed + F32(F32(b.reshape(())) * r_b))
        v = _fma32(a, r_a, fixed)
        shape = np.broadcast_shapes(a.shape, b.shape)
    else:
        v = _fma32(a, r_a, _fma32(b, r_b, fixed))
        shape = v.shape
    qmin, qmax = qrange(dtype)
    return np.clip(np.rint(v).astype(np.int64), qmin, qmax).astype(dtype).reshape(shape)


def global_average_pool_scale(s_x: float, s_y: float, image_size: int) -> np.float32:
    """Scale of QLinearGlobalAveragePool: ``f32(s_x / f32(s_y * f32(image_size)))``; the accumulator is
    ``sum(q) - z_x * image_size`` and goes through :func:`requantize_output`."""
    return F32(F32(s_x) / F32(F32(s_y) * F32(image_size)))


def requantize_dq_q(
    q: np.ndarray, s_in: np.ndarray | float, z_in: np.ndarray | int, s_out: float, z_out: int, dtype
) -> np.ndarray:
    """A DequantizeLinear -> QuantizeLinear pair in float32 (also QLinearConcat's and the lookup-table
    kernels' arithmetic): ``quantize_linear(dequantize_linear(q))``. Identity when the parameters match."""
    return quantize_linear(dequantize_linear(q, s_in, z_in), s_out, z_out, dtype)
