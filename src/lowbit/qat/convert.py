"""``lowbit.convert``: a QAT model -> the deployable quantized-simulation model the exporter takes."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.quantizer import TensorQuantizer, quantizers
from ..spec import SCALE_EPS
from .conv_bn import ConvBnMixin
from .prepare import _set_module, is_qat_model
from .schedule import uninstall

log = logging.getLogger("lowbit.qat")

__all__ = ["convert"]


@torch.no_grad()
def _freeze_quantizer(q: TensorQuantizer) -> None:
    """LSQ parameters -> plain buffers; observers off. LSQ+ offset ``o`` -> integer zero point
    ``z = clamp(round(-o / s), qmin, qmax)`` (the ONNX grid has integer zero points)."""
    q.observer_enabled.fill_(False)
    if hasattr(q.observer, "inner"):
        q.observer = q.observer.inner  # drop the torch.distributed wrapper: the deployed model is local
    if not q.learnable:
        return
    scale = q.scale.detach().clone().clamp_min(SCALE_EPS)
    zp = q.zero_point.detach().clone()
    if q.lsq_offset is not None:
        fmt = q.spec.format
        zp = torch.clamp(torch.round(-q.lsq_offset.detach() / scale), fmt.min_value, fmt.max_value).to(torch.int32)
        q.lsq_offset = None
    del q.scale
    q.register_buffer("scale", scale)
    q.learnable = False
    q.zero_point = zp.to(torch.int32)


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The deployable model from a QAT model (:func:`lowbit.prepare_qat`), in eval mode.

    * every Conv-BN unit becomes the plain quantized layer with ``W' = W t`` and
      ``b' = (b - running_mean) t + beta`` (``t = gamma / sqrt(running_var + eps)``), keeping its
      quantizers' current scales and zero points;
    * learnable (LSQ) scales become buffers (clamped to ``>= float32 eps``); an LSQ+ offset ``o`` becomes
      the integer zero point ``round(-o / s)``;
    * observers stop; the QAT hooks, step counter and config are removed.

    The result has the structure :func:`lowbit.quantize` produces, so :func:`lowbit.export_onnx`, the
    runtime and the reports take it. Its outputs equal the QAT model's in eval mode: bit for bit with
    ``learnable="ste"``; with LSQ the fake quantization is rewritten from ``round((x - o)/s) s + o`` to
    ``(clamp(round(x/s) + z) - z) s``, equal up to float rounding (a rare one-step difference at exact
    ties), and LSQ+ moves each offset to the nearest integer zero point (at most half a step).

    Args:
        model: a model returned by :func:`lowbit.prepare_qat` (plain ``nn.Module`` or inside DDP:
            pass ``ddp.module``).
        inplace: convert ``model`` itself instead of a copy.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if not is_qat_model(model):
        if any(True for _ in quantizers(model)):
            log.info("lowbit.convert: the model was not prepared for QAT; it is already deployable (returned as is)")
            return model if inplace else copy.deepcopy(model)
        raise ConfigError("lowbit.convert takes a model returned by lowbit.prepare_qat (or lowbit.quantize); "
                          "this one holds no quantizers.")
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    units = [(name, m) for name, m in out.named_modules() if isinstance(m, ConvBnMixin)]
    for name, m in units:
        _set_module(out, name, m.to_plain())
    for _, q in quantizers(out):
        _freeze_quantizer(q)
    uninstall(out)
    for m in out.modules():
        m.__dict__.pop("_lowbit_wcache", None)
    dlog = getattr(out, "lowbit_decisions", None)
    if dlog is not None:
        dlog.note(f"converted from QAT: {len(units)} Conv-BN unit(s) folded with running statistics")
    return out.eval()
