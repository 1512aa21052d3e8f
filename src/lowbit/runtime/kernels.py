"""Exact integer kernels: convolution, matrix product and pooling on integer codes.

Each kernel takes codes and zero points and returns the exact integer accumulator
``acc = sum((x - z_x) * (w - z_w))`` as int64. The sums run through torch's float64 conv/matmul on
integer-valued tensors: every product and partial sum is an integer below 2^53, so float64 holds it exactly
and the result is the same as an int32 loop (for 8-bit codes 2^53 allows ~10^11 products per output), while
using the optimized BLAS paths (a ResNet-18 forward takes about a second on two cores).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UnsupportedLayerError

__all__ = ["centered", "conv_integer", "matmul_integer", "max_pool", "sum_pool", "pool_counts", "onnx_pads"]


def centered(codes: np.ndarray, zero_point: np.ndarray | int, axis: int | None = None) -> torch.Tensor:
    """``codes - zero_point`` as a float64 torch tensor (exact); a 1-D ``zero_point`` runs along ``axis``."""
    t = torch.from_numpy(np.asarray(codes).astype(np.float64))
    z = torch.from_numpy(np.asarray(zero_point).astype(np.float64))
    if z.ndim == 1 and z.numel() > 1:
        shape = [1] * t.ndim
        shape[axis if axis is not None else 0] = -1
        z = z.reshape(shape)
    return t - z


def onnx_pads(
    auto_pad: str, in_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
    dilations: Sequence[int], pads: Sequence[int] | None,
) -> list[int]:
    """Explicit ONNX pads ``[b_1..b_n, e_1..e_n]`` from the ``auto_pad`` / ``pads`` attributes."""
    n = len(in_spatial)
    if auto_pad in ("", "NOTSET"):
        return list(pads) if pads else [0] * (2 * n)
    if auto_pad == "VALID":
        return [0] * (2 * n)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(n):
            out = -(-in_spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_spatial[i])
            small, big = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else big)
            ends.append(big if auto_pad == "SAME_UPPER" else small)
        return begins + ends
    raise UnsupportedLayerError(f"auto_pad={auto_pad!r} is not an ONNX value; use NOTSET, VALID, SAME_UPPER or SAME_LOWER.")


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX ``[b_1..b_n, e_1..e_n]`` -> torch ``F.pad`` order (last axis first)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[i + n])]
    return out


def conv_integer(
    x: torch.Tensor, w: torch.Tensor, strides: Sequence[int], pads: Sequence[int],
    dilations: Sequence[int], group: int,
) -> torch.Tensor:
    """Exact ``ConvInteger`` accumulator of centred inputs.

    ``x``: (N, C, *spatial) float64 holding ``x_codes - z_x``; ``w``: (M, C/group, *kernel) holding
    ``w_codes - z_w``. Padding adds zeros to the centred input, i.e. the input zero point, as ONNX
    ``ConvInteger`` / ``QLinearConv`` specify. Returns (N, M, *out) int64.
    """
    nd = x.ndim - 2
    if nd not in (1, 2, 3):
        raise UnsupportedLayerError(f"integer Conv supports 1-D, 2-D and 3-D convolutions, got {nd}-D input.")
    xp = F.pad(x, _torch_pad(pads)) if any(pads) else x
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    y = conv(xp, w, stride=list(strides), dilation=list(dilations), groups=group)
    return torch.round(y).to(torch.int64)


def matmul_integer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``MatMulInteger`` of centred float64 operands (numpy ``matmul`` broadcasting); int64 out."""
    return torch.round(torch.matmul(a, b)).to(torch.int64)


def max_pool(
    codes: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
    dilations: Sequence[int], ceil_mode: bool,
) -> np.ndarray:
    """MaxPool directly on integer codes (dequantization is monotone, so max commutes with it).

    Padded positions never win (padded with -inf). (N, C, *spatial) codes in, codes of the same dtype out.
    """
    nd = codes.ndim - 2
    if nd not in (1, 2, 3):
        raise UnsupportedLayerError(f"integer MaxPool supports 1-D to 3-D pooling, got {nd}-D input.")
    t = torch.from_numpy(codes.astype(np.float64))
    if any(pads):
        t = F.pad(t, _torch_pad(pads), value=float("-inf"))
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    y = pool(t, list(kernel), stride=list(strides), dilation=list(dilations), ceil_mode=bool(ceil_mode))
    return y.numpy().astype(codes.dtype)


def _pool_geometry(
    spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int], ceil_mode: bool,
) -> tuple[list[int], list[tuple[int, int]]]:
    """ONNX pooling output size per spatial axis, ``floor`` (or ``ceil`` with ``ceil_mode``) of
    ``(size + pad_begin + pad_end - kernel) / stride`` plus 1, and the ``(begin, end)`` zero padding that
    makes every one of those windows whole: ``end = max(0, (out - 1) * stride + kernel - size - begin)``,
    which may exceed ``pad_end`` with ``ceil_mode`` (padding beyond it is read as zeros, never counted)."""
    n = len(spatial)
    out_shape, padded = [], []
    for i in range(n):
        span = spatial[i] + pads[i] + pads[i + n] - kernel[i]
        out = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        out_shape.append(out)
        padded.append((int(pads[i]), max(0, (out - 1) * strides[i] + kernel[i] - spatial[i] - int(pads[i]))))
    return out_shape, padded


def sum_pool(
    values: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int], ceil_mode: bool,
) -> torch.Tensor:
    """Window sums of ``values`` (N, C, *spatial), zero padding; exact (rounded) for integer-valued float64.

    The output size is ONNX's (``ceil_mode`` included, as :func:`pool_counts`). The end padding is extended
    with zeros so every window is whole, then ``avg_pool`` (``ceil_mode=False``) times the kernel volume:
    torch's own ``ceil_mode`` divides a window that overhangs the end by its clipped size, not the volume.
    """
    nd = values.ndim - 2
    if nd not in (1, 2, 3):
        raise UnsupportedLayerError(f"AveragePool supports 1-D to 3-D pooling, got {nd}-D input.")
    out_shape, padded = _pool_geometry(values.shape[2:], kernel, strides, pads, ceil_mode)
    full = [b for b, _ in padded] + [e for _, e in padded]
    vp = F.pad(values, _torch_pad(full)) if any(full) else values
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    volume = int(np.prod(kernel))
    y = pool(vp, list(kernel), stride=list(strides), ceil_mode=False, count_include_pad=True)
    y = y[(slice(None), slice(None)) + tuple(slice(0, o) for o in out_shape)]
    return torch.round(y * volume)


def pool_counts(
    spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int],
    ceil_mode: bool, count_include_pad: bool,
) -> np.ndarray:
    """Divisor of each AveragePool output (shape ``out_spatial``): the kernel volume, or the number of
    window elements inside the unpadded input (ORT ``qlinear_pool.cc``: ``(hend - hstart) * ...``)."""
    per_axis = []
    out_shape, _ = _pool_geometry(spatial, kernel, strides, pads, ceil_mode)
    for i, out in enumerate(out_shape):
        start = np.arange(out) * strides[i] - pads[i]
        if count_include_pad:
            cnt = np.full(out, kernel[i])
        else:
            cnt = np.minimum(start + kernel[i], spatial[i]) - np.maximum(start, 0)
        per_axis.append(cnt)
    grid = per_axis[0]
    for c in per_axis[1:]:
        grid = np.multiply.outer(grid, c)
    return grid.astype(np.int64)


def float32_window_sum(
    values: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int], ceil_mode: bool,
) -> np.ndarray:
    """Float32 window sums accumulated one kernel element at a time in row-major kernel order, starting
    from 0.0, as ORT's ``QLinearAveragePool`` loops (padding contributes exact zeros, a no-op in float).

    ``values``: (N, C, *spatial) float32. Returns (N, C, *out) float32.
    """
    n = values.ndim - 2
    out_shape, padded = _pool_geometry(values.shape[2:], kernel, strides, pads, ceil_mode)
    vp = np.pad(values, [(0, 0), (0, 0)] + padded)
    acc = np.zeros(values.shape[:2] + tuple(out_shape), dtype=np.float32)
    for offset in np.ndindex(*kernel):
        sl = tuple(
            slice(offset[i], offset[i] + (out_shape[i] - 1) * strides[i] + 1, strides[i]) for i in range(n)
        )
        acc = acc + vp[(slice(None), slice(None)) + sl]
    return acc
