"""The device the GPU tests run on, and helpers shared by them.

``DEVICE`` is CUDA. ``LOWBIT_TEST_DEVICE=cpu`` runs the same tests with the CPU standing in for the GPU
(CPU against CPU), which exercises every test's logic on a machine without CUDA; the gpu marker still
skips them there unless the skip is lifted (development only).
"""

from __future__ import annotations

import contextlib
import os

import torch

DEVICE = torch.device(os.environ.get("LOWBIT_TEST_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"


@contextlib.contextmanager
def ieee_fp32():
    """Float32 matmuls and convolutions in full float32 (no TF32), so CUDA and CPU differ only by
    summation order. cuDNN convolutions use TF32 by default on Ampere and later (10-bit mantissa)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit pattern (any NaN == any NaN: CUDA and CPU produce different NaN
    payloads and signs; -0.0 != +0.0); ``a`` and ``b`` on any devices."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        if not torch.equal(nan_a, nan_b):
            return False
        view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
        return torch.equal(a[~nan_a].contiguous().view(view), b[~nan_b].contiguous().view(view))
    return torch.equal(a, b)


def assert_ulp_close(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 4) -> None:
    """Equal to within ``ulps`` units in the last place of float32 (relative ``ulps * eps``).

    For results whose last step is a float multiply-add (``acc * s_x * s_w + b``, ``(q - z) * s``, BatchNorm
    folding): nvcc contracts such pairs into fused multiply-adds, the CPU kernels round twice, so the
    two devices can differ in the last bit or two while every integer code is the same."""
    a, e = actual.detach().cpu().float(), expected.detach().cpu().float()
    tol = ulps * torch.finfo(torch.float32).eps
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * float(e.abs().max()))
