"""ONNX Runtime's integer arithmetic in the simulation: ``with lowbit.nn.ort_arithmetic(qmodel): qmodel(x)``.

The simulation (fake quantization in float32) and an int8 backend compute the same real numbers up to
float rounding, so an output lying within ~1e-7 of a rounding tie ``k + 1/2`` can land one code apart;
a flipped code then moves later layers by a fraction of a step, flipping more ties, layer after layer.
With the int32 bias (:mod:`lowbit.nn.bias`) the simulation already gets every code of EfficientNet-Lite0
right but ~1 in 500 000 (docs/benchmarks.md, Deployment parity). The rest is the backend's own float
arithmetic: ONNX Runtime's QLinearConv / QGemm requantize the exact int32 accumulator as
(``onnxruntime/core/mlas/lib/quantize.cpp``, ``MlasRequantizeOutput``)::

    acc = sum((x_q - z_x)(w_q - z_w)) + b_q                  exact integer (int32 bias, lowbit.nn.bias)
    M   = f32(f32(s_x * s_w) / s_y)                          per output channel for per-channel weights
    y_q = z_y + rint(clamp(f32(acc) * M, qmin - z_y, qmax - z_y))       float32 multiply, half to even

Inside :func:`ort_arithmetic`, every quantized Conv1d / Conv2d / Linear (2-D input) that ORT runs as
QLinearConv / QGemm computes its output exactly so (the integer accumulator in float32 where
``fan_in * max|x_q - z_x| * max|w_q - z_w| < 2**24``, else float64: exact either way), without gradient, returning ``(y_q - z_y) s_y`` as its output quantizer would. That
is, where the export writes ``DQ -> Conv/Gemm -> Q``: an enabled static per-tensor int8/uint8 input
quantizer and output quantizer, an int8/uint8 per-tensor or per-channel weight, the int32 bias (or no
bias), and a fused activation that the export removes because the output quantizer already saturates
there (ReLU with ``z_y = qmin``; ReLU6 / Hardtanh ``[lo, hi]`` with ``Q(lo) = qmin`` and ``Q(hi) = qmax``),
or an equalized ReLU6 (:class:`~lowbit.passes.clip.ChannelClip`, ``z_y = qmin``), which the ``ort-cpu``
export writes as a ``Min`` of the output codes with ``Q(upper_c)`` after the QuantizeLinear.
A quantized residual Add whose two inputs and output are static per-tensor int8/uint8 tensors computes as
QLinearAdd (``onnxruntime/core/mlas/lib/qladd_avx2.cpp``)::

    r_a = f32(s_a / s_c),  r_b = f32(s_b / s_c),  k = f32(z_c) - fma(r_a, z_a, f32(r_b z_b))
    c_q = clamp(rint(fma(a_q, r_a, fma(b_q, r_b, k))), qmin, qmax)      fma: float32, one rounding

A Linear whose input is quantized dynamically (``W8A8Dynamic``: uint8 per tensor, ONNX
``DynamicQuantizeLinear``) and whose weight is int8/uint8 per tensor or per output channel, computes as
ORT's DynamicQuantizeMatMul / MatMulIntegerToFloat (what the export's ``MatMulInteger -> Cast -> Mul -> Add``
fuses into; ``onnxruntime/contrib_ops/cpu/quantization/matmul_integer_to_float.cc``)::

    acc = sum((x_q - z_x)(w_q - z_w))                        exact integer
    y   = f32(f32(acc) * f32(s_x * s_w)) + b                 float32 multiply, then the float bias

(bit-exact with ORT 1.32 on every output of 384x384, 1536x384 and 384x1536 layers; the default
simulation's float32 GEMM of the dequantized operands equals it on ~11 % of outputs, within 5e-7 of the
range). The input's codes come from the scale and zero point the dynamic quantizer kept for its batch
(:data:`lowbit.nn.quantizer.DYNAMIC_QPARAMS_ATTR`).

Any other op computes as usual (pooling, concat and matmul joins included). This is ORT's CPU arithmetic,
not every backend's (TFLite requantizes with a fixed-point multiplier, :mod:`lowbit.runtime.fixed_point`),
so it is a scoped mode, not the default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["ort_arithmetic", "ORT_MODE_ATTR", "ort_requantized_output", "ort_dynamic_linear_output", "ort_qlinear_add"]

ORT_MODE_ATTR = "_lowbit_ort_arithmetic"
_OUT_FORMATS = frozenset({"int8", "uint8"})


@contextlib.contextmanager
def ort_arithmetic(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, the quantized Conv/Linear layers of ``model`` requantize as ONNX Runtime's
    QLinearConv / QGemm do (module docstring); restored on exit.

    >>> import lowbit, torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    >>> q = lowbit.quantize(net, lowbit.recipes.W8A8(), [torch.randn(2, 3, 8, 8)], progress=False)
    >>> with lowbit.nn.ort_arithmetic(q), torch.no_grad():
    ...     y = q(torch.randn(1, 3, 8, 8))
    >>> tuple(y.shape)
    (1, 2, 6, 6)
    """
    from .layers import QuantAdd, QuantLayerMixin

    layers = [m for m in model.modules() if isinstance(m, QuantLayerMixin | QuantAdd)]
    for m in layers:
        m.__dict__[ORT_MODE_ATTR] = True
    try:
        yield model
    finally:
        for m in layers:
            m.__dict__.pop(ORT_MODE_ATTR, None)


def _qmin_qmax(q) -> tuple[int, int]:
    fmt = q.spec.format
    return int(fmt.min_value), int(fmt.max_value)


def _quantize_codes(v: torch.Tensor, s: torch.Tensor, z: int, qmin: int, qmax: int) -> torch.Tensor:
    """ONNX QuantizeLinear of float32 values with a per-tensor scale: ``clamp(rint(v / s) + z)`` in float32."""
    return torch.clamp(torch.round(v.to(torch.float32) / s.to(torch.float32).reshape(())) + z, qmin, qmax)


def _quantize_scalar(v: float, s: torch.Tensor, z: int, qmin: int, qmax: int) -> int:
    """ONNX QuantizeLinear of one float32 value (the test the exporter's Clip/Relu removal makes)."""
    return int(_quantize_codes(torch.tensor(v, dtype=torch.float32), s, z, qmin, qmax))


def _channel_clip_codes(act: nn.Module | None, oq, ndim: int) -> torch.Tensor | None:
    """For a :class:`~lowbit.passes.clip.ChannelClip` activation under a quantizer whose zero point is its
    minimum code: the centred codes ``Q(upper) - z`` the export clips the output codes with
    (``lowbit.export._ort_cpu.quantize_before_channel_min``), shaped to broadcast over a ``ndim`` output;
    else None."""
    from ..passes.clip import ChannelClip

    if type(act) is not ChannelClip:
        return None
    qmin, qmax = _qmin_qmax(oq)
    z = int(oq.zero_point)
    if z != qmin:
        return None
    codes = _quantize_codes(act.upper.detach(), oq.scale.detach(), z, qmin, qmax) - z
    shape = [1] * ndim
    shape[act.dim] = -1
    return codes.double().reshape(shape)


def _activation_is_removed(act: nn.Module | None, oq) -> bool:
    """True when the export drops ``act`` before the output QuantizeLinear (the quantizer saturates there)."""
    if act is None:
        return True
    qmin, qmax = _qmin_qmax(oq)
    z = int(oq.zero_point)
    if type(act) is nn.ReLU:
        return z == qmin
    if type(act) in (nn.ReLU6, nn.Hardtanh):
        lo, hi = (0.0, 6.0) if type(act) is nn.ReLU6 else (float(act.min_val), float(act.max_val))
        return _quantize_scalar(lo, oq.scale, z, qmin, qmax) == qmin and _quantize_scalar(hi, oq.scale, z, qmin, qmax) == qmax
    return False


def ort_requantized_output(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, bias_int32,
                           op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """``layer``'s output computed as ONNX Runtime's QLinearConv / QGemm (module docstring), or None when
    the layer is not in :func:`ort_arithmetic` mode or is not one ORT runs as an integer kernel.

    Args:
        layer: a quantized Conv1d / Conv2d / Linear.
        x: its input (already on the input quantizer's grid), float.
        w: its quantized weight (deployed: re-rounded channels included).
        bias_int32: :class:`lowbit.nn.bias.Int32Bias` of the layer, or None for a layer without bias.
        op: ``op(x, w)`` the layer's linear operation without bias (conv / linear), applied in float64.
    """
    from .layers import _BIAS_INPUT_FORMATS, _BIAS_WEIGHT_FORMATS, _static_int_quantizer

    if not layer.__dict__.get(ORT_MODE_ATTR) or torch.is_grad_enabled() or torch.jit.is_tracing():
        return None
    if isinstance(layer, nn.Linear) and getattr(layer.input_quantizer, "spec", None) is not None \
            and layer.input_quantizer.spec.dynamic:
        return ort_dynamic_linear_output(layer, x, w)
    if layer.bias is not None and bias_int32 is None:
        return None
    iq, wq, oq = layer.bias_input_quantizer(), layer.weight_quantizer, layer.output_quantizer
    if not (_static_int_quantizer(iq, _BIAS_INPUT_FORMATS) and _static_int_quantizer(wq, _BIAS_WEIGHT_FORMATS)
            and _static_int_quantizer(oq, _OUT_FORMATS)):
        return None
    if iq.scale.numel() != 1 or oq.scale.numel() != 1 or (isinstance(layer, nn.Linear) and x.dim() != 2):
        return None
    clip_codes = _channel_clip_codes(layer.activation, oq, x.dim())
    if type(layer).__name__.startswith("QuantConvTranspose") or not (
            clip_codes is not None or _activation_is_removed(layer.activation, oq)):
        return None
    s_x = iq.scale.detach().to(torch.float32).reshape(())
    s_w = (bias_int32.weight_scale if bias_int32 is not None else wq.scale.detach()).to(torch.float32)
    wshape = (-1,) + (1,) * (w.dim() - 1)
    x_c = torch.round(x.detach().double() / s_x.double())  # x = (q - z_x) s_x exactly: the centred codes
    # the fake-quantized weight is (w_q - z_w) s_w: w / s_w gives the centred weight codes
    w_c = torch.round(w.detach().double() / s_w.double().reshape(wshape if s_w.numel() > 1 else ()))
    # float32 sums of integers are exact while every partial sum stays below 2**24 (then any summation
    # order gives the same integer); beyond that bound, float64 (exact below 2**53)
    bound = float(x_c.abs().max()) * float(w_c.abs().max()) * (w.numel() // max(w.shape[0], 1)) if x_c.numel() else 0.0
    acc = op(x_c.float(), w_c.float()).double() if bound < 2**24 else op(x_c, w_c)
    oshape = (1, -1) + (1,) * (acc.dim() - 2)
    if bias_int32 is not None:
        acc = acc + bias_int32.codes.double().reshape(oshape)
    m = (s_x * s_w) / oq.scale.detach().to(torch.float32).reshape(())
    m = m.reshape(oshape) if m.numel() > 1 else m.reshape(())
    acc32 = torch.clamp(acc, -(2**31), 2**31 - 1).to(torch.int64).to(torch.float32)
    qmin, qmax = _qmin_qmax(oq)
    z_y = int(oq.zero_point)
    v = torch.round(torch.clamp(acc32 * m, float(qmin - z_y), float(qmax - z_y)))
    if clip_codes is not None:  # QLinearConv's codes, then the per-channel Min on codes
        v = torch.minimum(v, clip_codes)
    return (v * oq.scale.detach().to(torch.float32)).to(x.dtype)


_EXACT_F32 = 2**24  # float32 holds every integer up to this: sums of integer products below it are exact


def _integer_linear(x_c: torch.Tensor, w_c: torch.Tensor) -> torch.Tensor:
    """``x_c @ w_c.T`` of integer-valued tensors, exactly, as float64: float32 GEMMs over slices of the
    inner dimension short enough that no partial sum can reach 2**24, summed in float64."""
    bound = float(x_c.abs().max()) * float(w_c.abs().max()) if x_c.numel() and w_c.numel() else 0.0
    k = x_c.shape[-1]
    step = k if bound * k < _EXACT_F32 else max(1, int(_EXACT_F32 // max(bound, 1.0)))
    acc = None
    for i in range(0, k, step):
        part = torch.nn.functional.linear(x_c[..., i:i + step].float(), w_c[:, i:i + step].float()).double()
        acc = part if acc is None else acc + part
    return acc


def ort_dynamic_linear_output(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s output (a quantized Linear with a dynamic input quantizer) computed as ONNX Runtime's
    DynamicQuantizeMatMul / MatMulIntegerToFloat (module docstring), then its fused activation and output
    quantizer as usual; None when ORT would not run it so: the input quantizer not uint8 per tensor affine
    (DynamicQuantizeLinear), the weight not int8/uint8 per tensor or per output channel, or no batch
    quantized yet. ``x``: the input, already on its dynamic grid; ``w``: the quantized weight."""
    from .layers import _BIAS_WEIGHT_FORMATS, _static_int_quantizer
    from .quantizer import DYNAMIC_QPARAMS_ATTR

    iq, wq = layer.input_quantizer, layer.weight_quantizer
    qp = iq.__dict__.get(DYNAMIC_QPARAMS_ATTR)
    if qp is None or not bool(iq.quant_enabled) or iq.spec.format.name != "uint8" or iq.spec.symmetric:
        return None
    if qp[0].numel() != 1 or not _static_int_quantizer(wq, _BIAS_WEIGHT_FORMATS):
        return None
    if wq.scale.numel() not in (1, w.shape[0]) or (wq.scale.numel() > 1 and wq.spec.granularity.axis % 2 != 0):
        return None
    s_x = qp[0].detach().to(torch.float32).reshape(())
    s_w = wq.scale.detach().to(torch.float32).reshape(-1)
    x_c = torch.round(x.detach().double() / s_x.double())  # x = (q - z_x) s_x exactly: the centred codes
    w_c = torch.round(w.detach().double() / s_w.double().reshape(-1, 1))
    acc = _integer_linear(x_c, w_c).to(torch.float32)  # |acc| < 2**31: ORT's int32, then Cast to float
    y = acc * (s_x * s_w)  # f32(s_x * s_w) per column, one float32 multiply
    if layer.bias is not None:
        y = y + layer.bias.detach().to(torch.float32)
    return layer._post(y.to(x.dtype))


def _f32(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32).reshape(())


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 ``a * b + c`` with one rounding (``a`` an 8-bit code, so the float64 product and sum are exact)."""
    return (a.double() * b.double() + c.double()).to(torch.float32)


def ort_qlinear_add(join: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``join``'s (a :class:`~lowbit.nn.QuantAdd`) output as ONNX Runtime's QLinearAdd computes it
    (module docstring), or None when not in :func:`ort_arithmetic` mode or not an integer Add in ORT:
    an input or the output without a static per-tensor int8/uint8 quantizer, operands of different shapes,
    a fused activation the export keeps. ``a``, ``b``: the inputs, already on their quantizers' grids."""
    from .layers import _static_int_quantizer

    if not join.__dict__.get(ORT_MODE_ATTR) or torch.is_grad_enabled() or torch.jit.is_tracing():
        return None
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
        return None
    qa, qb = join.input_quantizer_of(0), join.input_quantizer_of(1)
    oq = join.output_quantizer
    if not all(_static_int_quantizer(q, _OUT_FORMATS) and q.scale.numel() == 1 for q in (qa, qb, oq)):
        return None
    if not _activation_is_removed(join.activation, oq):
        return None
    s_a, s_b, s_c = _f32(qa.scale.detach()), _f32(qb.scale.detach()), _f32(oq.scale.detach())
    z_a, z_b, z_c = int(qa.zero_point), int(qb.zero_point), int(oq.zero_point)
    r_a, r_b = s_a / s_c, s_b / s_c
    k = _f32(z_c) - _fma32(_f32(z_a), r_a, r_b * _f32(z_b))  # the kernel's compiler contracts this to an fma
    a_q = torch.round(a.detach().double() / s_a.double()) + z_a  # a = (a_q - z_a) s_a exactly
    b_q = torch.round(b.detach().double() / s_b.double()) + z_b
    v = _fma32(a_q, r_a, _fma32(b_q, r_b, k))
    qmin, qmax = _qmin_qmax(oq)
    c = torch.clamp(torch.round(v), qmin, qmax)
    return ((c - z_c) * s_c).to(a.dtype)
