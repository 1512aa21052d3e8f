"""The evaluation harness: run any ``nn.Module`` (float or quantized) over real data and report.

``data`` is any iterable of batches: ``(x, y)`` tuples (a ``DataLoader`` of a labelled dataset) or bare
``x`` tensors (calibration-style lists). Statistics are accumulated batch by batch, so memory does not
grow with the data set. Every function returns one frozen :class:`EvalResult`; fields that do not apply
are ``None``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import nn

from ..errors import ConfigError, EmptyCalibrationError
from . import metrics
from .data import SentencePairs


@dataclass(frozen=True)
class EvalResult:
    """Everything the harness measures in one run.

    Attributes:
        num_samples: samples (images, sentence pairs) evaluated.
        top1: top-1 accuracy of the evaluated (quantized) model against the labels.
        float_top1: top-1 of the reference float model (``compare`` only, measured in the same run).
        agreement: fraction of samples where ``argmax`` of float and quantized outputs agree.
        kl: mean ``KL(softmax(float) || softmax(quant))`` over samples, in nats.
        cosine: mean per-sample cosine similarity of float and quantized outputs (logits or embeddings).
        spearman: STS Spearman of the evaluated model's cosine similarities against the gold scores.
        float_spearman: the same for the float model (``compare_sts`` only).
        size_bytes: :func:`metrics.model_size_bytes` of the evaluated model.
        float_size_bytes: the same for the float model.
        seconds: wall-clock time of the run.
    """

    num_samples: int
    top1: float | None = None
    float_top1: float | None = None
    agreement: float | None = None
    kl: float | None = None
    cosine: float | None = None
    spearman: float | None = None
    float_spearman: float | None = None
    size_bytes: int | None = None
    float_size_bytes: int | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """The fields as a plain dict (for JSON reports), ``None`` fields dropped."""
        return {k: v for k, v in asdict(self).items() if v is not None}


class Encoder(Protocol):
    def encode(self, sentences: Sequence[str]) -> torch.Tensor: ...


def _split(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise ConfigError(f"each batch must be a tensor or an (inputs, labels) tuple, got {type(batch).__name__}")


def _output(out) -> torch.Tensor:
    """Model output -> tensor: a tensor, the ``logits`` of a HF-style output, or the first of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"model returned {type(out).__name__}; the harness needs a tensor (or .logits / tuple)")


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _progress(data: Iterable, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    total = len(data) if hasattr(data, "__len__") else None
    return tqdm(data, desc=desc, total=total, disable=not enabled, leave=False)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: Iterable, progress: bool = True) -> EvalResult:
    """Top-1 accuracy of ``model`` on labelled ``data`` (batches ``(x, y)``: ``x`` any input shape,
    ``y`` int64 ``(B,)``; the model returns logits ``(B, C)``). Also reports the model's size."""
    model.eval()
    dev = _device(model)
    correct = n = 0
    t0 = time.perf_counter()
    for batch in _progress(data, "evaluate", progress):
        x, y = _split(batch)
        if y is None:
            raise ConfigError("evaluate_classifier needs labelled batches (x, y); got inputs only. Use "
                              "compare() to measure a quantized model against its float model without labels.")
        logits = _output(model(x.to(dev)))
        correct += metrics.top1_correct(logits, y)
        n += len(y)
    if n == 0:
        raise EmptyCalibrationError("evaluate_classifier: the data yielded no samples")
    return EvalResult(num_samples=n, top1=correct / n, size_bytes=metrics.model_size_bytes(model),
                      seconds=time.perf_counter() - t0)


@torch.no_grad()
def compare(float_model: nn.Module, quant_model: nn.Module, data: Iterable, progress: bool = True) -> EvalResult:
    """Run both models on the same batches and measure how far the quantized one drifts.

    Always: mean cosine of the outputs and both sizes. When outputs are ``(B, C)`` with ``C > 1``:
    top-1 agreement and mean ``KL(float || quant)``. When batches carry labels: both top-1 accuracies.
    """
    float_model.eval()
    quant_model.eval()
    dev_f, dev_q = _device(float_model), _device(quant_model)
    n = agree = correct_f = correct_q = labelled = 0
    kl = cos = 0.0
    classes = True
    t0 = time.perf_counter()
    for batch in _progress(data, "compare", progress):
        x, y = _split(batch)
        fo = _output(float_model(x.to(dev_f))).float().cpu()
        qo = _output(quant_model(x.to(dev_q))).float().cpu()
        cos += metrics.cosine_sum(fo, qo)
        classes = classes and fo.ndim == 2 and fo.shape[1] > 1
        if classes:
            agree += metrics.agreement_count(fo, qo)
            kl += metrics.kl_sum(fo, qo)
        if y is not None:
            correct_f += metrics.top1_correct(fo, y.cpu())
            correct_q += metrics.top1_correct(qo, y.cpu())
            labelled += len(y)
        n += len(fo)
    if n == 0:
        raise EmptyCalibrationError("compare: the data yielded no samples")
    has_labels = labelled == n
    return EvalResult(
        num_samples=n,
        top1=correct_q / n if has_labels else None,
        float_top1=correct_f / n if has_labels else None,
        agreement=agree / n if classes else None,
        kl=kl / n if classes else None,
        cosine=cos / n,
        size_bytes=metrics.model_size_bytes(quant_model),
        float_size_bytes=metrics.model_size_bytes(float_model),
        seconds=time.perf_counter() - t0,
    )


def _sts_embeddings(encoder: Encoder, pairs: SentencePairs) -> tuple[torch.Tensor, torch.Tensor]:
    e1 = encoder.encode(list(pairs.sentences1))
    e2 = encoder.encode(list(pairs.sentences2))
    return e1.float().cpu(), e2.float().cpu()


def _sts_spearman(e1: torch.Tensor, e2: torch.Tensor, scores: torch.Tensor) -> float:
    sims = torch.nn.functional.cosine_similarity(e1.double(), e2.double(), dim=1)
    return metrics.spearman(sims, scores)


def _size(encoder) -> int | None:
    return metrics.model_size_bytes(encoder) if isinstance(encoder, nn.Module) else None


@torch.no_grad()
def evaluate_sts(encoder: Encoder, pairs: SentencePairs) -> EvalResult:
    """STS Spearman: rank correlation of ``cos(encode(s1_i), encode(s2_i))`` with the gold scores.

    ``encoder`` is anything with ``encode(list[str]) -> (N, D)`` tensor (e.g. :func:`lowbit.zoo.minilm`).
    """
    t0 = time.perf_counter()
    e1, e2 = _sts_embeddings(encoder, pairs)
    return EvalResult(num_samples=len(pairs), spearman=_sts_spearman(e1, e2, pairs.scores),
                      size_bytes=_size(encoder), seconds=time.perf_counter() - t0)


@torch.no_grad()
def compare_sts(float_encoder: Encoder, quant_encoder: Encoder, pairs: SentencePairs) -> EvalResult:
    """Both encoders' STS Spearman, and the mean cosine between their embeddings of the same sentences."""
    t0 = time.perf_counter()
    f1, f2 = _sts_embeddings(float_encoder, pairs)
    q1, q2 = _sts_embeddings(quant_encoder, pairs)
    cos = (metrics.cosine_sum(f1, q1) + metrics.cosine_sum(f2, q2)) / (2 * len(pairs))
    return EvalResult(num_samples=len(pairs), spearman=_sts_spearman(q1, q2, pairs.scores),
                      float_spearman=_sts_spearman(f1, f2, pairs.scores), cosine=cos,
                      size_bytes=_size(quant_encoder), float_size_bytes=_size(float_encoder),
                      seconds=time.perf_counter() - t0)
