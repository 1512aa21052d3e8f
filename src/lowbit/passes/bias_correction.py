"""Bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Quantizing a weight ``W`` to ``W_q`` shifts the expected output of the layer by
``E[(W_q - W) x] = (W_q - W) E[x]`` (per output channel, summed over the kernel for convs). Subtracting
that from the bias restores the expected output::

    b <- b - (W_q - W) E[x]

``E[x]`` comes either from data (*empirical*: the mean over the calibration batches of
``layer(x; W_q - W, no bias)``, exact on those batches, zero padding included) or, data-free, from the
BatchNorm statistics of the layer that feeds this one (*analytic*): its pre-activation is
``N(beta, gamma^2)``, and through ``clip(., lo, hi)`` (ReLU: ``[0, inf)``, ReLU6: ``[0, 6]``) the mean is
that of a clipped normal, :func:`clipped_normal_mean`.

``W_q`` is the nearest-rounding fake quantization of ``W`` with min/max ranges under ``spec``; the layer's
weight stays float, only the bias changes, so quantize the weight with the same ``spec`` afterwards.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import EmptyCalibrationError
from ..spec import QuantSpec
from ._graph import CONV_TYPES, LAYER_TYPES, Link, channel_mismatch, find_links, get_module
from ._layer import batches, channel_dim, forward_with, quantize_weight, spec_of, weight_times_channel_vector
from .bn_ranges import clipped_normal_moments
from .clip import ChannelClip
from .fold_bn import output_stats, unfolded_batchnorm
from .log import PassLog

log = logging.getLogger(__name__)

__all__ = ["correct_bias", "correct_layer_bias", "clipped_normal_mean"]

_TYPES = (*CONV_TYPES, nn.Linear)


def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor, lo: float | torch.Tensor = 0.0,
                        hi: float | torch.Tensor = math.inf) -> torch.Tensor:
    """``E[clip(X, lo, hi)]`` for ``X ~ N(mean, std^2)``, elementwise (float64)::

        E = lo Phi(a) + hi (1 - Phi(b)) + mean (Phi(b) - Phi(a)) + std (phi(a) - phi(b)),
        a = (lo - mean) / std,  b = (hi - mean) / std

    (terms with an infinite bound vanish). ``std = 0`` gives ``clip(mean, lo, hi)``. The first moment of
    :func:`~lowbit.passes.bn_ranges.clipped_normal_moments`.

    >>> round(float(clipped_normal_mean(torch.tensor(0.0), torch.tensor(1.0))), 6)  # E[relu(N(0,1))] = 1/sqrt(2 pi)
    0.398942
    """
    return clipped_normal_moments(mean, std, lo, hi)[0]


@torch.no_grad()
def correct_layer_bias(layer: nn.Module, spec: QuantSpec, input_mean: torch.Tensor) -> torch.Tensor:
    """Analytic correction of one Conv/Linear layer in place: ``b -= (W_q - W) E[x]``.

    ``input_mean``: ``E[x]`` per input channel, shape ``(in_channels,)``. Returns the subtracted shift,
    shape ``(out_channels,)`` float32. Zero padding of convs is ignored (the paper's approximation)."""
    dw = quantize_weight(layer.weight, spec) - layer.weight.detach()
    shift = weight_times_channel_vector(layer, dw, input_mean).float()
    _sub_bias(layer, shift)
    return shift


def _sub_bias(layer: nn.Module, shift: torch.Tensor) -> None:
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype, device=layer.weight.device))
    with torch.no_grad():  # not .data: the version counter must move (the layers' int32-bias cache)
        layer.bias.sub_(shift.to(layer.bias.dtype))


def _input_mean(model: nn.Module, link: Link) -> tuple[torch.Tensor | None, str]:
    """``E[x]`` of the consumer's input from the producer's BatchNorm statistics, or None and why."""
    producer = get_module(model, link.producer)
    mismatch = channel_mismatch(producer, get_module(model, link.consumer))
    if mismatch:
        return None, f"{mismatch}; pass data for empirical correction"
    st = output_stats(producer)
    if st is None:
        return None, f"{link.producer} (its input) has no BatchNorm statistics; pass data for empirical correction"
    mean: torch.Tensor | None = None
    for name, kind in zip(link.between, link.kinds):
        m = None if name.startswith("<") else get_module(model, name)
        if kind == "identity":
            continue
        if kind in ("relu", "relu6") and mean is None and not isinstance(m, nn.LeakyReLU) and m is not None:
            hi = math.inf if kind == "relu" else (m.upper if isinstance(m, ChannelClip) else float(m.max_val))
            mean = clipped_normal_mean(st.mean, st.std, 0.0, hi)
        elif kind == "pool" and isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) \
                and mean is not None:
            continue  # averaging keeps the mean (padding aside)
        else:
            return None, f"{name} ({kind}) between the layers: the expected input is not known in closed form"
    return (st.mean.double() if mean is None else mean), ""


def _empirical_shifts(model: nn.Module, spec: QuantSpec | Mapping[str, QuantSpec], names: list[str],
                      data: Iterable) -> dict[str, torch.Tensor]:
    """Mean over all batches and positions of ``layer(x; W_q - W)`` per output channel, float64."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    dws = {n: quantize_weight(get_module(model, n).weight, spec_of(spec, n)) - get_module(model, n).weight.detach()
           for n in names}

    def hook(name):
        def fn(mod, inputs, output):
            y = forward_with(mod, inputs[0], dws[name].to(inputs[0].dtype), None).double()
            d = channel_dim(mod) % y.dim()
            dims = [i for i in range(y.dim()) if i != d]
            sums[name] = sums.get(name, 0) + y.sum(dim=dims)
            counts[name] += y.numel() // y.shape[d]
        return fn

    handles = [get_module(model, n).register_forward_hook(hook(n)) for n in names]
    param = next(model.parameters(), None)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # train mode would update BatchNorm running statistics and drop activations out
    try:
        with torch.no_grad():
            for x in batches(data):
                model(x if param is None else x.to(param.device))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if not any(counts.values()):
        raise EmptyCalibrationError("correct_bias got data but no batch reached a Conv/Linear layer; "
                                    "pass an iterable of input batches (or (input, target) pairs).")
    return {n: sums[n] / counts[n] for n in names if counts[n]}


def correct_bias(model: nn.Module, spec: QuantSpec | Mapping[str, QuantSpec], data: Iterable | None = None, *,
                 inplace: bool = False) -> tuple[nn.Module, PassLog]:
    """Bias correction of every Conv1d/2d/3d and Linear layer for weight quantization with ``spec``.

    Args:
        model: float model, BatchNorms folded (:func:`fold_bn`) for the analytic mode; copied unless ``inplace``.
        spec: the weight :class:`~lowbit.spec.QuantSpec` the layers will be quantized with (integer format),
            or ``{layer name: spec}`` when layers differ (layers not in the map are left alone, logged).
        data: None for the analytic (data-free) correction; else an iterable of input batches (or
            ``(input, target)`` pairs) for the empirical one, measured on the float model in one pass
            in eval mode (each module's train/eval flag is restored afterwards).

    Returns:
        ``(model, log)``; the log names each corrected layer (with ``max |shift|``) and each skipped one.
    """
    model = model if inplace else copy.deepcopy(model)
    plog = PassLog()
    layers = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    for n in layers:
        if not isinstance(get_module(model, n), _TYPES):
            plog.add("bias_correction", (n,), False, f"{type(get_module(model, n)).__name__} is not supported")
    layers = [n for n in layers if isinstance(get_module(model, n), _TYPES)]
    for n in [n for n in layers if spec_of(spec, n) is None]:
        plog.add("bias_correction", (n,), False, "no weight spec given for this layer (its weight stays float)")
    layers = [n for n in layers if spec_of(spec, n) is not None]
    if data is not None:
        shifts = _empirical_shifts(model, spec, layers, data)
        for n in layers:
            if n not in shifts:
                plog.add("bias_correction", (n,), False, "no calibration batch reached this layer")
                continue
            _sub_bias(get_module(model, n), shifts[n].float())
            plog.add("bias_correction", (n,), True, f"empirical, max |shift| = {float(shifts[n].abs().max()):.3g}")
        return model, plog
    links, _, _ = find_links(model, lambda m: isinstance(m, LAYER_TYPES))
    by_consumer = {lk.consumer: lk for lk in links}
    if unfolded_batchnorm(model):
        plog.add("bias_correction", (), False, "no layer has BatchNorm statistics but the model has BatchNorm "
                 "layers: run fold_bn first (the analytic correction reads the statistics it records)")
    for n in layers:
        link = by_consumer.get(n)
        if link is None:
            plog.add("bias_correction", (n,), False, "its input does not come straight from a layer with BatchNorm "
                     "statistics (model input, branch or unsupported op); pass data for empirical correction")
            continue
        mean, why = _input_mean(model, link)
        if mean is None:
            plog.add("bias_correction", (n,), False, why)
            continue
        shift = correct_layer_bias(get_module(model, n), spec_of(spec, n), mean)
        plog.add("bias_correction", (n,), True, f"analytic, max |shift| = {float(shift.abs().max()):.3g}")
    log.info("bias_correction: %d corrected, %d skipped", len(plog.applied), len(plog.skipped))
    return model, plog
