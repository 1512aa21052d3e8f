"""High-bias absorption (Nagel et al. 2019, "Data-Free Quantization", section 4.1.1).

After equalization some channels carry large biases, which widen the activation range. If a layer's
pre-activation ``x_i`` is (by its BatchNorm statistics) ``N(beta_i, gamma_i^2)``, then with

    c_i = max(0, beta_i - 3 |gamma_i|)

almost every ``x_i >= c_i`` (the 3-sigma assumption), so ``relu(x_i) = relu(x_i - c_i) + c_i`` and the
constant ``c`` moves into the next layer's bias::

    b1 <- b1 - c            b2 <- b2 + W2 c        (W2 c summed over the kernel for convs)

Exact whenever every pre-activation is ``>= c`` and the next layer has no zero padding (borders of a
padded conv see zeros, not ``-c``, as in the paper). Through a :class:`ChannelClip` (an equalized
ReLU6) the upper bound moves with the shift: ``upper <- upper - c``.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ._graph import CONV_TYPES, LAYER_TYPES, channel_mismatch, find_links, get_module
from ._layer import weight_times_channel_vector
from .clip import ChannelClip
from .fold_bn import output_stats, set_output_stats, unfolded_batchnorm
from .log import PassLog

log = logging.getLogger(__name__)

__all__ = ["absorb_high_bias", "absorb_pair"]


@torch.no_grad()
def absorb_pair(first: nn.Module, second: nn.Module, num_std: float = 3.0, clip: ChannelClip | None = None) -> torch.Tensor:
    """Absorb ``c = max(0, mean - num_std * std)`` (from ``first``'s recorded BatchNorm statistics) into
    ``second``; returns ``c`` (shape ``(C,)``, float32). Raises ValueError when ``first`` has no statistics."""
    st = output_stats(first)
    if st is None:
        raise ValueError("first layer has no BatchNorm statistics")
    c = torch.clamp(st.mean - num_std * st.std, min=0.0)
    shift = weight_times_channel_vector(second, second.weight.detach(), c)
    if first.bias is None:
        first.bias = nn.Parameter(torch.zeros_like(c).to(first.weight.dtype))
    first.bias.sub_(c.to(first.bias.dtype))
    if second.bias is None:
        second.bias = nn.Parameter(torch.zeros(second.weight.shape[0], dtype=second.weight.dtype, device=second.weight.device))
    second.bias.add_(shift.to(second.bias.dtype))
    set_output_stats(first, st.shifted(c))
    if clip is not None:
        clip.upper.sub_(c)
    return c


def absorb_high_bias(model: nn.Module, *, num_std: float = 3.0, inplace: bool = False) -> tuple[nn.Module, PassLog]:
    """High-bias absorption for every pair ``layer -> ReLU (or ChannelClip) -> layer`` whose first layer
    has BatchNorm statistics (run :func:`fold_bn` first, then usually :func:`equalize`).

    Args:
        model: float model; copied unless ``inplace``.
        num_std: how many standard deviations below the mean the cut ``c`` lies (3 in the paper).

    Returns:
        ``(model, log)`` with one record per pair (absorbed channels and ``sum(c)``) or skip reason.
    """
    model = model if inplace else copy.deepcopy(model)
    plog = PassLog()
    links, _, _ = find_links(model, lambda m: isinstance(m, LAYER_TYPES))
    for link in links:
        first, second = get_module(model, link.producer), get_module(model, link.consumer)
        pair = (link.producer, link.consumer)
        if output_stats(first) is None:
            plog.add("hba", pair, False, f"{link.producer} has no BatchNorm statistics (fold_bn found none)")
            continue
        if not isinstance(second, (*CONV_TYPES, nn.Linear)):
            plog.add("hba", pair, False, f"{link.consumer} is a {type(second).__name__}")
            continue
        mismatch = channel_mismatch(first, second)
        if mismatch:
            plog.add("hba", pair, False, mismatch)
            continue
        acts = [(n, k) for n, k in zip(link.between, link.kinds) if k != "identity"]
        clip = None
        if len(acts) != 1 or acts[0][1] not in ("relu", "relu6"):
            plog.add("hba", pair, False, "needs exactly one ReLU (or equalized ReLU6) between the layers, found "
                     f"{[k for _, k in acts] or 'none'}")
            continue
        if acts[0][1] == "relu6":
            m = get_module(model, acts[0][0]) if not acts[0][0].startswith("<") else None
            if not isinstance(m, ChannelClip):
                plog.add("hba", pair, False, "a ReLU6 follows; run equalize(relu6='channel_clip') first so its "
                         "clip point can move with the absorbed bias")
                continue
            clip = m
        if isinstance(get_module(model, acts[0][0]) if not acts[0][0].startswith("<") else None, nn.LeakyReLU):
            plog.add("hba", pair, False, "LeakyReLU does not commute with a shift")
            continue
        c = absorb_pair(first, second, num_std, clip)
        plog.add("hba", pair, True, f"absorbed {int((c > 0).sum())}/{c.numel()} channels, sum(c)={float(c.sum()):.4g}")
    if unfolded_batchnorm(model):
        plog.add("hba", (), False, "no layer has BatchNorm statistics but the model has BatchNorm layers: run "
                 "fold_bn first (it records the statistics this pass reads)")
    log.info("hba: %d pair(s) absorbed, %d skipped", len(plog.applied), len(plog.skipped))
    return model, plog
