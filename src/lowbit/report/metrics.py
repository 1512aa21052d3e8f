"""How far a quantized tensor or model is from the float one: SQNR, cosine, error in steps, top-1.

All reductions run in float64 so the figures do not depend on the dtype of the inputs. Inputs may be
torch tensors, numpy arrays or anything ``torch.as_tensor`` accepts.

* :func:`sqnr_db`: ``10 log10(sum x^2 / sum (x - x_hat)^2)`` (``+inf`` when ``x_hat == x``);
* :func:`cosine_similarity`: ``<a, b> / (|a| |b|)`` over all elements;
* :func:`step_error`: ``|a - b| / scale`` (max and mean), the error counted in quantization steps
  (Brevitas' ONNX Runtime parity tests measure it this way, independent of the tensor's magnitude);
* :func:`top1_agreement` and :func:`top1_accuracy`: classification figures on logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ShapeMismatchError, check_finite
from ..granularity import Granularity, PerTensor, broadcast_param, to_blocks

__all__ = ["sqnr_db", "cosine_similarity", "StepError", "step_error", "top1_agreement", "top1_accuracy"]


def _as_f64(x: Any, name: str) -> torch.Tensor:
    # python numbers and lists go straight to float64 (not through float32, torch's default dtype)
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)
    if t.is_complex():
        raise ShapeMismatchError(f"{name} is complex; lowbit metrics take real tensors.")
    t = t.to(device="cpu", dtype=torch.float64)
    check_finite(t, name)
    return t


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ShapeMismatchError(
            f"{what}: the two tensors must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}; "
            "compare the float and quantized outputs of the same layer for the same inputs."
        )


def sqnr_db(x: Any, x_hat: Any) -> float:
    """Signal-to-quantization-noise ratio in decibels.

    ``SQNR = 10 log10( sum(x^2) / sum((x - x_hat)^2) )``, reduced over every element in float64.
    ``+inf`` when ``x_hat`` equals ``x`` exactly, ``-inf`` when ``x`` is all zeros but ``x_hat`` is not.
    Each bit of a uniform quantizer adds about 6.02 dB on a full-range signal.

    Args:
        x: the reference (float) tensor, any shape.
        x_hat: the approximation, same shape.

    >>> sqnr_db([3.0, 4.0], [3.0, 3.0])   # 25 / 1
    13.979400086720377
    """
    a = _as_f64(x, "x (reference)")
    b = _as_f64(x_hat, "x_hat (approximation)")
    _same_shape(a, b, "sqnr_db")
    noise = float(((a - b) ** 2).sum())
    signal = float((a**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_similarity(a: Any, b: Any) -> float:
    """Cosine of the angle between ``a`` and ``b`` (same shape) flattened: ``<a, b> / (|a|_2 |b|_2)`` in float64.

    Two all-zero tensors give 1.0 (identical); one all-zero tensor against a non-zero one gives 0.0.

    >>> cosine_similarity([1.0, 0.0], [1.0, 1.0])   # 1 / sqrt(2)
    0.7071067811865475
    """
    u, v = _as_f64(a, "a"), _as_f64(b, "b")
    _same_shape(u, v, "cosine_similarity")  # before flattening: (2, 3) against (3, 2) is a mistake
    u, v = u.reshape(-1), v.reshape(-1)
    nu, nv = float(u.norm()), float(v.norm())
    if nu == 0.0 and nv == 0.0:
        return 1.0
    if nu == 0.0 or nv == 0.0:
        return 0.0
    return float(torch.dot(u, v)) / (nu * nv)


@dataclass(frozen=True)
class StepError:
    """Absolute error in units of the quantization step: ``|a - b| / scale``."""

    max: float
    mean: float

    def __str__(self) -> str:
        return f"max {self.max:.3g} steps, mean {self.mean:.3g} steps"


def step_error(a: Any, b: Any, scale: Any, granularity: Granularity | None = None) -> StepError:
    """Max and mean of ``|a - b| / scale``: how many quantization steps two tensors are apart.

    Args:
        a, b: tensors of the same shape (e.g. the simulated and the ONNX Runtime outputs).
        scale: the quantization scale; a scalar, or shaped ``granularity.scale_shape(a.shape)``
            (``(C,)`` per channel, the group grid per group).
        granularity: the block each scale covers; default per tensor.

    Returns:
        :class:`StepError` (``max``, ``mean``), floats rounded to 12 significant digits, so that an
        error of exactly k steps reads k and not k - 1e-16 (float64 division noise). A parity test
        asserts e.g. ``max <= 1``.

    >>> step_error([0.0, 0.5], [0.1, 0.5], 0.1)
    StepError(max=1.0, mean=0.5)
    """
    x = _as_f64(a, "a")
    y = _as_f64(b, "b")
    _same_shape(x, y, "step_error")
    s = _as_f64(scale, "scale")
    if bool((s <= 0).any()):
        raise ShapeMismatchError(f"step_error: scale must be positive everywhere, got min {float(s.min())}.")
    g = granularity or PerTensor()
    shape = tuple(x.shape) or (1,)
    diff = to_blocks((x - y).abs().reshape(shape), g)
    steps = diff / broadcast_param(s.reshape(-1) if s.dim() else s.reshape(1), shape, g)
    if steps.numel() == 0:
        return StepError(0.0, 0.0)
    # round to 12 significant digits: (a - b) / s in float64 leaves 1-ulp noise on exact multiples
    return StepError(float(f"{float(steps.max()):.12g}"), float(f"{float(steps.mean()):.12g}"))


def _argmax_last(logits: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(logits).detach().cpu()
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ShapeMismatchError(f"{name}: expected logits of shape (..., num_classes), got {tuple(t.shape)}.")
    return t.argmax(dim=-1)


def top1_agreement(logits_a: Any, logits_b: Any) -> float:
    """Fraction of samples whose top-1 class is the same under both models.

    Args:
        logits_a, logits_b: ``(N, num_classes)`` (or ``(..., num_classes)``), any float dtype.

    Returns:
        ``mean(argmax(a) == argmax(b))`` in [0, 1] (ties go to the lowest index, as ``torch.argmax``).

    >>> top1_agreement([[0.1, 0.9], [0.8, 0.2]], [[0.3, 0.7], [0.4, 0.6]])
    0.5
    """
    ia, ib = _argmax_last(logits_a, "logits_a"), _argmax_last(logits_b, "logits_b")
    if ia.shape != ib.shape:
        raise ShapeMismatchError(
            f"top1_agreement: logits shapes differ ({tuple(ia.shape)} vs {tuple(ib.shape)} samples); "
            "run both models on the same batch."
        )
    if ia.numel() == 0:
        raise ShapeMismatchError("top1_agreement: no samples (empty batch).")
    return float((ia == ib).double().mean())


def top1_accuracy(logits: Any, labels: Any) -> float:
    """Fraction of samples whose argmax over the last dim equals the integer label.

    Args:
        logits: ``(N, num_classes)``.
        labels: ``(N,)`` integer class indices.

    >>> top1_accuracy([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], [1, 1, 1])
    0.6666666666666666
    """
    pred = _argmax_last(logits, "logits")
    lab = torch.as_tensor(labels).detach().cpu()
    if lab.is_floating_point() or lab.shape != pred.shape:
        raise ShapeMismatchError(
            f"top1_accuracy: labels must be integer class indices of shape {tuple(pred.shape)}, "
            f"got dtype {lab.dtype} and shape {tuple(lab.shape)}."
        )
    if pred.numel() == 0:
        raise ShapeMismatchError("top1_accuracy: no samples (empty batch).")
    return float((pred == lab.to(pred.dtype)).double().mean())
