"""Tensor-level metrics of the evaluation harness; each is a closed formula over whole tensors.

All return Python floats computed in float64. ``N`` is the number of samples (dim 0).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ShapeMismatchError


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ShapeMismatchError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; both models "
                                 "must produce outputs of the same shape for the same inputs")


def top1_correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Number of rows with ``argmax(logits[i]) == labels[i]``; logits ``(N, C)``, labels ``(N,)`` int."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ShapeMismatchError(f"top-1 needs logits (N, C) and labels (N,), got {tuple(logits.shape)} and "
                                 f"{tuple(labels.shape)}")
    return int((logits.argmax(dim=1) == labels.to(logits.device)).sum())


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """``mean_i [argmax_c logits[i, c] == labels[i]]``.

    >>> top1_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    0.5
    """
    return top1_correct(logits, labels) / len(labels)


def agreement_count(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of rows where the two ``(N, C)`` outputs pick the same class."""
    _check_pair(a, b, "top-1 agreement")
    return int((a.argmax(dim=1) == b.argmax(dim=1)).sum())


def kl_sum(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """``sum_i KL(softmax(p_i) || softmax(q_i)) = sum_i sum_c p_ic (log p_ic - log q_ic)`` in nats, over the
    last dimension, via log-softmax (stable for large logits). Inputs ``(N, C)``."""
    _check_pair(p_logits, q_logits, "KL divergence")
    logp = torch.log_softmax(p_logits.double(), dim=-1)
    logq = torch.log_softmax(q_logits.double(), dim=-1)
    return float((logp.exp() * (logp - logq)).sum())


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over rows of ``KL(softmax(p) || softmax(q))`` (p: float model, q: quantized model)."""
    return kl_sum(p_logits, q_logits) / len(p_logits)


def cosine_sum(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> float:
    """``sum_i <a_i, b_i> / (|a_i| |b_i|)`` with each sample flattened; a zero row counts as cosine 0
    against a non-zero row and 1 against a zero row (identical outputs)."""
    _check_pair(a, b, "cosine similarity")
    a2, b2 = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    na, nb = a2.norm(dim=1), b2.norm(dim=1)
    cos = (a2 * b2).sum(dim=1) / (na * nb).clamp_min(eps)
    both_zero = (na == 0) & (nb == 0)
    return float(torch.where(both_zero, torch.ones_like(cos), cos).sum())


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-sample cosine similarity of two ``(N, ...)`` outputs."""
    return cosine_sum(a, b) / len(a)


def rank_average(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given the mean of the ranks they span (scipy's ``rankdata``).

    >>> rank_average(torch.tensor([10.0, 20.0, 10.0])).tolist()
    [1.5, 3.0, 1.5]
    """
    if x.ndim != 1:
        raise ShapeMismatchError(f"ranks need a 1-D tensor, got shape {tuple(x.shape)}")
    values, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # mean of (end - count + 1) .. end
    ranks = torch.empty(len(x), dtype=torch.float64, device=x.device)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation: the Pearson correlation of :func:`rank_average` ranks of ``x`` and
    ``y`` (1-D, same length >= 2). NaN when either is constant, as scipy returns."""
    x, y = x.reshape(-1), y.reshape(-1)
    _check_pair(x, y, "Spearman correlation")
    if len(x) < 2:
        raise ShapeMismatchError(f"Spearman correlation needs at least 2 pairs, got {len(x)}")
    rx, ry = rank_average(x.detach().cpu()), rank_average(y.detach().cpu())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float("nan") if denom == 0 else float((rx * ry).sum()) / denom


def model_size_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, ``sum numel * element_size``, each storage
    region counted once (tied weights are not double-counted). A quantized model that keeps int8/packed
    weights as buffers and drops its float copies is measured by what it keeps."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.nbytes)
        if key in seen:
            continue
        seen.add(key)
        total += t.nbytes
    return total
