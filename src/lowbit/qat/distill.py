"""Knowledge distillation from the float teacher (Hinton et al. 2015), the usual companion of QAT."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError, ShapeMismatchError

__all__ = ["distillation_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Soft-target loss ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    ``T^2`` keeps the gradient scale independent of ``T`` (Hinton et al. 2015, section 2). The teacher is
    detached (no gradient reaches it). Mix with the hard-label loss as ``a * kd + (1 - a) * ce``.

    Args:
        student_logits, teacher_logits: ``(N, C)`` (or ``(N, ..., C)``, classes last), float.
        T: temperature > 0.

    Returns:
        A float32 scalar tensor; 0 when the two distributions are equal.

    >>> z = torch.tensor([[1.0, 2.0, 3.0]])
    >>> float(distillation_loss(z, z, T=2.0))
    0.0
    """
    if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
        raise ConfigError(f"distillation temperature T must be a finite number > 0, got {T!r}; 1 to 8 is usual.")
    if student_logits.shape != teacher_logits.shape:
        raise ShapeMismatchError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                                 f"{tuple(teacher_logits.shape)} must have the same shape.")
    c = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, c) / T, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float().reshape(-1, c) / T, dim=-1)
    kl = (t.exp() * (t - s)).sum(dim=-1).mean()
    return kl * (T * T)
