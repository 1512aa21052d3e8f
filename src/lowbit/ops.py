"""Quantize, dequantize and fake-quantize with any format and granularity; STE and LSQ gradients.

Integer formats (affine), the ONNX ``QuantizeLinear`` / ``DequantizeLinear`` formulas::

    q = clamp(round(x / s) + z, qmin, qmax)          x_hat = (q - z) * s

Other formats round themselves: ``q = format.round(x / s)``, ``x_hat = q * s``.

``x / s`` is a true division, as ONNX Runtime computes it; ``torch.fake_quantize_per_tensor_affine``
multiplies by ``1 / s`` instead, which can differ by one step at exact ties when ``1 / s`` is not exact in
float32 (never when ``s`` is a power of two). lowbit follows the deployed runtime.

Every function takes ``scale`` / ``zero_point`` in the granularity's scale shape (``()`` per tensor,
``(C,)`` per channel, the group grid per group) and works on any float dtype and device.
"""

from __future__ import annotations

import torch

from .errors import NonFiniteError
from .formats.base import NumberFormat, Rounding, round_integer
from .granularity import Granularity, PerTensor, broadcast_param, to_blocks
from .spec import QuantSpec

__all__ = ["quantize", "dequantize", "fake_quantize", "fake_quantize_lsq", "quantization_bounds"]


def _blocks(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, granularity: Granularity):
    shape = tuple(x.shape) or (1,)
    xb = to_blocks(x.reshape(shape), granularity)
    s = broadcast_param(scale.to(x.device, torch.float32), shape, granularity)
    z = None if zero_point is None else broadcast_param(zero_point.to(x.device), shape, granularity)
    return xb, s, z


def _codes_and_mask(v: torch.Tensor, z, fmt: NumberFormat, rounding: Rounding, generator, want_mask: bool):
    """Codes (as floats) of already-scaled values ``v = x / s`` and, when ``want_mask`` and the format is
    integer, the bool mask of the codes that needed no clamping (``qmin <= round(v) + z <= qmax``); else None."""
    if fmt.is_integer:
        q = round_integer(v, rounding, generator)
        if z is not None:
            q = q + z.to(q.dtype)
        unclipped = (q >= fmt.min_value) & (q <= fmt.max_value) if want_mask else None
        return torch.clamp(q, fmt.min_value, fmt.max_value), unclipped
    return fmt.round(v, rounding, generator), None


def _round_codes(v: torch.Tensor, z, fmt: NumberFormat, rounding: Rounding, generator) -> torch.Tensor:
    """Codes (as floats) of already-scaled values ``v = x / s``."""
    return _codes_and_mask(v, z, fmt, rounding, generator, want_mask=False)[0]


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Storage codes of ``x``: integer codes in ``format.code_dtype`` for integer formats, the format's
    bit patterns otherwise. Shape of ``x``.

    Raises:
        NonFiniteError: NaN in ``x`` (or in ``scale``) with an integer format, which has no code for it
            (``±inf`` saturates to ``qmin`` / ``qmax``, as in :func:`fake_quantize`).
    """
    fmt = spec.format
    xb, s, z = _blocks(x.float(), scale, zero_point, spec.granularity)
    q = _round_codes(xb / s, z, fmt, spec.rounding, generator).reshape(x.shape)
    if fmt.is_integer:
        n_nan = int(torch.isnan(q).sum())
        if n_nan:
            raise NonFiniteError(
                f"quantize: {n_nan} of {q.numel()} values are NaN (in the data or the scale), and {fmt.name} has "
                "no code for NaN (casting would store an arbitrary integer); remove them first "
                "(torch.nan_to_num) or find where they come from."
            )
        return q.to(fmt.code_dtype)
    return fmt.quantize(q)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Float32 values of storage codes: ``(q - z) * s`` (integers) or ``format.dequantize(q) * s`` (other
    formats take no zero point; one passed is ignored, as in :func:`quantize`)."""
    fmt = spec.format
    vals = codes.to(torch.float32) if fmt.is_integer else fmt.dequantize(codes)
    vb, s, z = _blocks(vals, scale, zero_point if fmt.is_integer else None, spec.granularity)
    if z is not None:
        vb = vb - z.to(torch.float32)
    return (vb * s).reshape(codes.shape)


def quantization_bounds(scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: NumberFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """The real-valued interval ``[(qmin - z) s, (qmax - z) s]`` that quantizes without clipping."""
    z = zero_point.to(torch.float32) if zero_point is not None and fmt.is_integer else 0.0
    return (fmt.min_value - z) * scale, (fmt.max_value - z) * scale


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize-dequantize in ``x``'s dtype, with the clipped straight-through estimator:
    ``d x_hat / d x = 1`` where ``x`` is not clipped, 0 where it is. For integer formats "not clipped" means
    the code before clamping, ``round(x / s) + z``, lies in ``[qmin, qmax]`` (the mask of
    ``torch.fake_quantize_per_tensor_affine``), so a value that rounds onto ``qmax`` keeps its gradient:
    with min/max scales the largest ``|x|`` is ``qmax * s`` only up to float rounding, and a test in the
    value domain would drop its gradient or not depending on the last bit (seen between CPU and CUDA).
    Other formats: ``x`` inside :func:`quantization_bounds`.

    >>> spec = QuantSpec("int8", symmetric=True)
    >>> fake_quantize(torch.tensor([0.26, -2.0]), torch.tensor(0.1), torch.tensor(0), spec).tolist()
    [0.30000001192092896, -2.0]
    """
    dtype = x.dtype
    xf = x.float()
    xb, s, z = _blocks(xf, scale, zero_point, spec.granularity)
    fmt = spec.format
    with torch.no_grad():
        q, inside = _codes_and_mask(xb / s, z, fmt, spec.rounding, generator, want_mask=x.requires_grad)
        if z is not None and fmt.is_integer:
            q = q - z.to(q.dtype)
        y = q * s
    if x.requires_grad:
        if inside is None:
            lo, hi = quantization_bounds(s, z, fmt)
            inside = (xb >= lo) & (xb <= hi)
        y = _ClippedSTE.apply(xb, y, inside)
    return y.reshape(x.shape).to(dtype)


class _ClippedSTE(torch.autograd.Function):
    """Value ``y`` (the quantize-dequantized ``xb``, computed without a graph), gradient to ``xb`` 1 where
    ``inside``, 0 elsewhere. One saved bool mask and one ``where`` in the backward pass: the expression it
    replaced, ``y + where(inside, -(xb.detach() - xb), -0.0)``, cost three more full-size passes forward and
    as many backward on every quantizer of a QAT step (the step is bound by such passes on a GPU)."""

    @staticmethod
    def forward(ctx, xb: torch.Tensor, y: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inside)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def fake_quantize_lsq(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    spec: QuantSpec,
    grad_scale: float | None = None,
) -> torch.Tensor:
    """LSQ (Esser et al. 2020) and LSQ+ (Bhalgat et al. 2020) fake quantization with learnable
    ``scale`` (and learnable real-valued ``offset`` for LSQ+)::

        v = clamp((x - offset) / s, qmin, qmax);   x_hat = round_ste(v) * s + offset

    ``round_ste`` passes the gradient straight through; the scale gradient is multiplied by
    ``grad_scale`` (default ``1 / sqrt(numel_per_scale * qmax)``, the paper's choice). Integer formats.
    """
    fmt = spec.format
    xf = x.float()
    n_per = max(1, xf.numel() // max(1, scale.numel()))
    g = grad_scale if grad_scale is not None else 1.0 / (n_per * max(1.0, float(fmt.max_value))) ** 0.5
    s = _GradScale.apply(scale, g)
    xb, sb, ob = _blocks(xf, s, offset, spec.granularity if scale.dim() else PerTensor())
    if ob is not None:
        xb = xb - ob
    v = torch.clamp(xb / sb, fmt.min_value, fmt.max_value)
    if fmt.is_integer:
        vq = v + (torch.round(v) - v).detach()
    else:
        vq = v + (fmt.round(v.detach()) - v).detach()
    y = vq * sb
    if ob is not None:
        y = y + ob
    return y.reshape(x.shape).to(x.dtype)
