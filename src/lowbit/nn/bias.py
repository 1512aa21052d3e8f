"""The int32 bias of an int8 Conv / Gemm: one formula shared by the simulation and the ONNX export.

An int8 backend (ONNX Runtime's QLinearConv / QGemm, TFLite, TensorRT ...) accumulates
``sum((x_q - z_x) (w_q - z_w))`` in int32 and adds the bias there, stored as int32 codes at scale
``s_b = f32(s_x * s_w)`` (one per output channel for per-channel weights) with zero point 0::

    b_q = clamp(round_half_even(f64(b) / f64(s_b)), -2**31, 2**31 - 1)        (int32)
    b_deployed = b_q * s_b                                                    (what the backend adds)

which differs from the float bias by up to ``s_b / 2``. The same holds for 4-bit (int4 / uint4) weights on an
int8 input: ONNX Runtime runs such a Conv / Gemm in float but rounds its bias this way itself when the layer's
output is quantized, so lowbit stores it so. :mod:`lowbit.nn.layers` adds ``b_deployed`` in
the simulation and :mod:`lowbit.export._qdq_graph` writes ``b_q``, both through :func:`int32_bias`, so
they agree bit for bit.

Fitting in int32 (as ONNX Runtime's ``quantize_static`` does): a channel whose weights are (almost) all
zero gets a tiny weight scale, so ``b / s_b`` plus the largest accumulation can pass 2**31. Such channels
get the smallest weight scale that fits, ``s_w' = f32(|b| / (s_x L) (1 + 1e-6))`` with
``L = 2**31 - 1 - K * 255 * 128`` (K = fan-in), and their weight codes are re-rounded at ``s_w'``
(:func:`rerounded_weight_codes`). That needs per-channel weights along axis 0 with zero point 0; otherwise
the bias stays float (:func:`int32_bias` returns None).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Int32Bias", "int32_bias", "accumulator_limit", "rerounded_weight_codes", "INT32_MIN", "INT32_MAX"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class Int32Bias:
    """The deployed form of one layer's bias.

    Attributes:
        codes: int32 ``b_q``, shape ``(C,)``.
        scale: float32 ``s_b = f32(s_x * s_w')``, shape ``()`` (per-tensor weight) or ``(C,)``.
        weight_scale: float32 ``s_w'``: the weight scale, raised on the channels in ``raised``.
        raised: bool ``(C,)`` of the channels whose weight scale was raised to fit, or None when none was.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    weight_scale: torch.Tensor
    raised: torch.Tensor | None

    def dequantize(self) -> torch.Tensor:
        """``b_q * s_b`` in float32 (ONNX DequantizeLinear of the int32 bias), shape ``(C,)``."""
        return self.codes.to(torch.float32) * self.scale


def accumulator_limit(fan_in: int) -> float:
    """``L = 2**31 - 1 - fan_in * 255 * 128``: the largest ``|b_q|`` that leaves room for any accumulation."""
    return float(INT32_MAX - fan_in * 255 * 128)


def int32_bias(
    bias: torch.Tensor,
    s_x: torch.Tensor,
    s_w: torch.Tensor,
    fan_in: int,
    weight_zero_point: torch.Tensor | None = None,
    channel_axis: int = 0,
) -> Int32Bias | None:
    """The int32 bias of a layer (module docstring), or None where it must stay float.

    Args:
        bias: float bias, shape ``(C,)``.
        s_x: the input's per-tensor scale (one element).
        s_w: the weight scale, one element (per tensor) or ``(C,)`` (per output channel).
        fan_in: weight elements per output channel (``weight.numel() // C``).
        weight_zero_point: the weight's zero point(s) (None for symmetric weights).
        channel_axis: the weight's output-channel axis (a scale can only be raised along axis 0).

    Returns None when some channel's bias does not fit in int32 and its weight scale cannot be raised
    (per-tensor or asymmetric weights, weight axis other than 0, fan-in too large).

    >>> b = int32_bias(torch.tensor([0.30, -0.07]), torch.tensor(0.02), torch.tensor([0.1, 0.05]), 9)
    >>> b.codes.tolist(), [round(v, 4) for v in b.dequantize().tolist()]
    ([150, -70], [0.3, -0.07])
    """
    b32 = bias.detach().to(torch.float32).reshape(-1)
    sx32 = s_x.detach().to(torch.float32).reshape(())
    sw32 = s_w.detach().to(torch.float32)
    out_ch = b32.numel()
    limit = accumulator_limit(fan_in)
    need = b32.double().abs() / (sx32.double() * limit)
    sw_ch = sw32.double().reshape(-1).expand(out_ch) if sw32.numel() == 1 else sw32.double().reshape(-1)
    bad = need > sw_ch
    raised = None
    if bool(bad.any()):
        zp_nonzero = weight_zero_point is not None and bool((weight_zero_point != 0).any())
        if limit <= 0 or zp_nonzero or sw32.numel() == 1 or channel_axis != 0 or sw32.numel() != out_ch:
            return None
        sw32 = sw32.reshape(-1).clone()
        sw32[bad] = (need[bad] * (1 + 1e-6)).to(torch.float32)
        raised = bad
    s_b = sx32 * sw32  # float32 product, as the ONNX exporter has always stored it
    q = torch.clamp(torch.round(b32.double() / s_b.double()), INT32_MIN, INT32_MAX).to(torch.int32)
    return Int32Bias(q, s_b, sw32, raised)


def rerounded_weight_codes(codes: torch.Tensor, s_old: torch.Tensor, s_new: torch.Tensor, raised: torch.Tensor,
                           signed: bool) -> torch.Tensor:
    """Weight codes of the ``raised`` output channels (axis 0) re-rounded at the raised scale:
    ``clamp(round(f64(q s_old) / f64(s_new)), qmin, qmax)`` with the storage type's range (int8
    [-128, 127] when ``signed``, else uint8 [0, 255]); other channels unchanged. Codes' dtype."""
    qmin, qmax = (-128, 127) if signed else (0, 255)
    shape = (-1,) + (1,) * (codes.dim() - 1)
    w = codes.double() * s_old.double().reshape(shape)
    new = torch.clamp(torch.round(w / s_new.double().reshape(shape)), qmin, qmax).to(codes.dtype)
    return torch.where(raised.reshape(shape), new, codes)
