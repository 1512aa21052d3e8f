"""Fold every BatchNorm that directly follows a Conv/ConvTranspose/Linear into that layer.

For a BatchNorm in eval mode, ``y = gamma (x - mean) / sqrt(var + eps) + beta``; with
``t = gamma / sqrt(var + eps)`` per output channel the preceding layer becomes::

    W' = W * t        (along the output-channel axis)       b' = (b - mean) * t + beta

and the BatchNorm is replaced by ``nn.Identity``. The BatchNorm's ``beta`` and ``|gamma|`` are the
mean and standard deviation of the folded layer's output per channel (the data-free statistics that
high-bias absorption and analytic bias correction use, Nagel et al. 2019 section 4); they are kept on
the folded layer and read back with :func:`output_stats`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ._graph import (
    BN_TYPES,
    LAYER_TYPES,
    channel_mismatch,
    find_links,
    get_module,
    out_channel_axis,
    out_channels,
    set_module,
)

log = logging.getLogger(__name__)

__all__ = ["fold_bn", "fold_bn_into", "BNStats", "output_stats", "set_output_stats"]

_STATS_ATTR = "lowbit_output_stats"


@dataclass(frozen=True)
class BNStats:
    """Per-channel mean and standard deviation of a layer's output (pre-activation), shape ``(C,)``
    float32, taken from the BatchNorm folded into it: ``mean = beta``, ``std = |gamma|``."""

    mean: torch.Tensor
    std: torch.Tensor

    def scaled(self, s: torch.Tensor) -> BNStats:
        """Statistics of the output divided by ``s`` (per channel, ``s > 0``)."""
        return BNStats(self.mean / s, self.std / s)

    def shifted(self, c: torch.Tensor) -> BNStats:
        """Statistics of the output minus ``c``."""
        return BNStats(self.mean - c, self.std)


def output_stats(layer: nn.Module) -> BNStats | None:
    """The :class:`BNStats` recorded on ``layer`` by :func:`fold_bn` (kept up to date by the other
    passes), or None when no BatchNorm was folded into it."""
    return getattr(layer, _STATS_ATTR, None)


def set_output_stats(layer: nn.Module, stats: BNStats | None) -> None:
    """Record (or clear, with None) the output statistics of ``layer``."""
    if stats is None:
        layer.__dict__.pop(_STATS_ATTR, None)
    else:
        layer.__dict__[_STATS_ATTR] = stats


def unfolded_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` has BatchNorm layers but no layer with recorded statistics (fold_bn not run)."""
    mods = list(model.modules())
    return any(isinstance(m, BN_TYPES) for m in mods) and all(output_stats(m) is None for m in mods)


def _can_fold(bn: nn.Module) -> str | None:
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False), so its eval output depends on the batch"
    return None


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``layer`` in place (``layer``'s weight and bias change; ``bn`` is untouched).

    ``layer``: Conv1d/2d/3d, ConvTranspose1d/2d or Linear with ``C`` output channels; ``bn``:
    BatchNorm with ``C`` features and running statistics. Computed in float64, stored in the layer's dtype.
    Records :class:`BNStats` on the layer.

    >>> conv, bn = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3).eval()
    >>> x = torch.randn(1, 2, 4, 4); ref = bn(conv(x)); fold_bn_into(conv, bn)
    >>> bool(torch.allclose(conv(x), ref, atol=1e-6))
    True
    """
    from ..errors import ShapeMismatchError, UnsupportedLayerError

    if not isinstance(layer, LAYER_TYPES) or not isinstance(bn, BN_TYPES):
        raise UnsupportedLayerError(
            f"cannot fold {type(bn).__name__} into {type(layer).__name__}; fold_bn_into takes a "
            "Conv/ConvTranspose/Linear and a BatchNorm1d/2d/3d."
        )
    reason = _can_fold(bn)
    if reason:
        raise UnsupportedLayerError(f"cannot fold {type(bn).__name__}: {reason}. Leave it unfolded.")
    c = out_channels(layer)
    if bn.num_features != c:
        raise ShapeMismatchError(f"BatchNorm has {bn.num_features} features but the layer has {c} output channels.")
    dt = layer.weight.dtype
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.affine else torch.ones_like(mean)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(mean)
    t = gamma / torch.sqrt(var + bn.eps)
    w = layer.weight.double()
    if out_channel_axis(layer) == 1:  # ConvTranspose weight: (in, out / groups, *kernel)
        g = layer.groups
        shape = (g, w.shape[0] // g, w.shape[1]) + tuple(w.shape[2:])
        w = (w.reshape(shape) * t.reshape(g, 1, -1, *([1] * (w.dim() - 2)))).reshape(w.shape)
    else:
        w = w * t.reshape(-1, *([1] * (w.dim() - 1)))
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
    layer.weight.copy_(w.to(dt))
    new_bias = ((b - mean) * t + beta).to(dt)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)
    set_output_stats(layer, BNStats(beta.float(), gamma.abs().float()))


def fold_bn(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fold every BatchNorm that directly follows a Conv/ConvTranspose/Linear whose output feeds only it.

    The pairs come from the torch.fx graph when ``model`` traces, else from the order of
    ``nn.Sequential`` containers. Each folded BatchNorm is replaced by ``nn.Identity``; the eval-mode
    output of the model is unchanged (up to float rounding). BatchNorms that cannot be folded are left
    as they are and logged with the reason.

    Args:
        model: a float model (or torch.fx GraphModule); not modified unless ``inplace``.

    Returns:
        ``(folded_model, [(layer_name, bn_name), ...])``; the folded model is in the same train/eval
        mode as the input.

    >>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> folded, pairs = fold_bn(m)
    >>> pairs, type(folded[1]).__name__
    ([('0', '1')], 'Identity')
    """
    model = model if inplace else copy.deepcopy(model)
    links, _, method = find_links(model, lambda m: isinstance(m, BN_TYPES))
    pairs: list[tuple[str, str]] = []
    for link in links:
        if link.between:
            continue
        bn = get_module(model, link.consumer)
        reason = _can_fold(bn) or channel_mismatch(get_module(model, link.producer), bn)
        if reason:
            log.info("fold_bn: %s not folded: %s", link.consumer, reason)
            continue
        fold_bn_into(get_module(model, link.producer), bn)
        set_module(model, link.consumer, nn.Identity())
        pairs.append((link.producer, link.consumer))
    for name, m in model.named_modules():
        if isinstance(m, BN_TYPES):
            log.info("fold_bn: %s not folded: it does not directly follow a Conv/Linear whose output feeds "
                     "only it (found by %s)", name, method)
    log.info("fold_bn: folded %d BatchNorm(s) using the %s view", len(pairs), method)
    return model, pairs
