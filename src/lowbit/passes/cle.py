"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1).

For two layers joined by a positive-homogeneous, per-channel operation ``f`` (ReLU, LeakyReLU,
identity, pooling: ``f(x / s) = f(x) / s`` for ``s > 0``), dividing output channel ``i`` of the first
layer by ``s_i`` and multiplying input channel ``i`` of the second by ``s_i`` leaves the pair's function
unchanged. With ``r1_i`` the range (max |W|) of output channel ``i`` of the first layer and ``r2_i`` that
of input channel ``i`` of the second, the choice

    s_i = sqrt(r1_i * r2_i) / r2_i

makes both ranges equal to ``sqrt(r1_i r2_i)``, so per-tensor weight quantization wastes less of its
grid on small channels. Longer chains (conv -> depthwise conv -> pointwise conv) are equalized pair by
pair, sweeping until every ``|log s_i|`` is below ``tol``.

ReLU6 is not positive homogeneous: ``relu6(x / s) = min(relu(x), 6 s) / s`` clips at ``6 s``. With
``relu6="channel_clip"`` (default, exact) the ReLU6 module is replaced by :class:`ChannelClip` whose
per-channel upper bound becomes ``6 / s_i``; ``relu6="to_relu"`` replaces it by ReLU as the paper does
for MobileNetV2 (changes the float function); ``relu6="skip"`` leaves such pairs alone. Functional
``F.relu6`` calls cannot be rewritten in place and are skipped.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ._graph import (
    CONV_TYPES,
    LAYER_TYPES,
    Link,
    channel_mismatch,
    find_links,
    get_module,
    set_module,
    unshare_call_sites,
)
from ._layer import in_channel_absmax, out_channel_absmax, scale_in_channels, scale_out_channels
from .clip import ChannelClip
from .fold_bn import output_stats, set_output_stats
from .log import PassLog

log = logging.getLogger(__name__)

__all__ = ["equalize", "equalize_pair", "ChannelClip"]

ReLU6Mode = Literal["channel_clip", "to_relu", "skip"]
_CLE_TYPES = (*CONV_TYPES, nn.Linear)


@torch.no_grad()
def equalize_pair(first: nn.Module, second: nn.Module) -> torch.Tensor:
    """Equalize one pair in place and return the scale ``s`` (shape ``(C,)``, float32).

    ``first``: Conv/Linear with ``C`` output channels; ``second``: Conv/Linear with ``C`` input channels
    (grouped and depthwise convs included). ``W1[i] /= s_i``, ``b1[i] /= s_i``, ``W2[:, i] *= s_i``;
    channels whose range is 0 in either layer keep ``s_i = 1``. Output statistics recorded by fold_bn
    are rescaled with the first layer.
    """
    r1 = out_channel_absmax(first).double()
    r2 = in_channel_absmax(second).double()
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 * r2) / r2.clamp_min(1e-300), torch.ones_like(r1))
    s = s.float()
    scale_out_channels(first, s)
    scale_in_channels(second, s)
    st = output_stats(first)
    if st is not None:
        set_output_stats(first, st.scaled(s))
    return s


def _check_pair(model: nn.Module, link: Link, relu6: ReLU6Mode) -> str | None:
    a, b = get_module(model, link.producer), get_module(model, link.consumer)
    for name, m in ((link.producer, a), (link.consumer, b)):
        if not isinstance(m, _CLE_TYPES):
            return f"{name} is a {type(m).__name__}; equalization handles Conv1d/2d/3d and Linear"
    mismatch = channel_mismatch(a, b)
    if mismatch:
        return mismatch
    for name, kind in zip(link.between, link.kinds):
        if kind == "relu6":
            if relu6 == "skip":
                return f"{name} is a ReLU6, which clips at 6 and does not commute with scaling (relu6='skip')"
            if name.startswith("<"):
                return f"a functional relu6/hardtanh follows {link.producer}; it cannot be rewritten in place (use nn.ReLU6)"
        elif kind not in ("relu", "identity", "pool"):
            return f"{name} ({kind}) does not commute with per-channel scaling"
    if sum(k == "relu6" for k in link.kinds) > 1:
        return "more than one ReLU6 between the layers"
    return None


def _clip_of(model: nn.Module, link: Link, relu6: ReLU6Mode) -> ChannelClip | None:
    """Replace the ReLU6 of a link (if any) by ChannelClip / ReLU; return the ChannelClip to update."""
    for name, kind in zip(link.between, link.kinds):
        m = get_module(model, name)
        if isinstance(m, ChannelClip):
            return m
        if kind != "relu6":
            continue
        if relu6 == "to_relu":
            set_module(model, name, nn.ReLU())
            return None
        producer = get_module(model, link.producer)
        c = producer.weight.shape[0]
        upper = float(m.max_val) if isinstance(m, nn.Hardtanh) else 6.0
        linear = isinstance(producer, nn.Linear)
        clip = ChannelClip(torch.full((c,), upper, device=producer.weight.device), dim=-1 if linear else 1,
                           ndim=None if linear else producer.weight.dim())
        set_module(model, name, clip)
        return clip
    return None


def equalize(
    model: nn.Module,
    *,
    relu6: ReLU6Mode = "channel_clip",
    max_iter: int = 100,
    tol: float = 1e-4,
    inplace: bool = False,
) -> tuple[nn.Module, PassLog]:
    """Cross-layer equalization of every eligible pair of ``model`` (fold BatchNorms first: :func:`fold_bn`).

    A pair is two Conv/Linear layers where the first's output reaches only the second, through ReLU,
    LeakyReLU, ReLU6 (see ``relu6``), identity, dropout or pooling. Branches and residual additions end
    a chain; every layer left out is in the log with the reason.

    Args:
        model: float model (eval mode); copied unless ``inplace``.
        relu6: ``"channel_clip"`` (exact), ``"to_relu"`` (DFQ paper) or ``"skip"``; see the module doc.
        max_iter: most sweeps over all pairs; ``tol``: stop when ``max |log s_i| < tol`` in a sweep.

    When a ReLU6 module is reused at several call sites (``self.act`` after two layers), each site
    needs its own clip, so the model is returned as its torch.fx GraphModule with one module per site.

    Returns:
        ``(model, log)``; ``log`` has one applied record per equalized pair and one skipped record per
        pair or layer left out.

    >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> eq, log = equalize(m)
    >>> len(log.applied)
    1
    """
    if relu6 not in ("channel_clip", "to_relu", "skip"):
        raise ConfigError(f"relu6 must be 'channel_clip', 'to_relu' or 'skip', got {relu6!r}.")
    if max_iter < 1 or tol <= 0:
        raise ConfigError(f"max_iter must be >= 1 and tol > 0, got {max_iter} and {tol}.")
    model = model if inplace else copy.deepcopy(model)
    plog = PassLog()
    if relu6 != "skip":
        model, n_split = unshare_call_sites(model, (nn.ReLU6, nn.Hardtanh))
        if n_split:
            plog.add("cle", (), True, f"split {n_split} reused ReLU6 call site(s) into their own modules so each "
                     "can be rewritten; the result is a torch.fx GraphModule")
    links, dead, method = find_links(model, lambda m: isinstance(m, LAYER_TYPES))
    pairs = []
    for link in links:
        reason = _check_pair(model, link, relu6)
        if reason:
            plog.add("cle", (link.producer, link.consumer), False, reason)
        else:
            pairs.append((link, _clip_of(model, link, relu6)))
    for d in dead:
        plog.add("cle", (d.producer,), False, f"no layer to pair its output with: {d.reason}")
    sweeps = 0
    with torch.no_grad():
        for sweeps in range(1, max_iter + 1):  # noqa: B007 (sweeps is reported below)
            worst = 0.0
            for link, clip in pairs:
                s = equalize_pair(get_module(model, link.producer), get_module(model, link.consumer))
                if clip is not None:
                    clip.upper.div_(s)
                worst = max(worst, float(s.double().log().abs().max()))
            if worst < tol:
                break
    for link, _ in pairs:
        via = ", ".join(k for k in link.kinds) or "direct"
        plog.add("cle", (link.producer, link.consumer), True, f"equalized (via {via}) in {sweeps} sweep(s)")
    log.info("cle: %d pair(s) equalized in %d sweep(s), %d skipped (%s view)", len(pairs), sweeps,
             len(plog.skipped), method)
    if pairs and sweeps == max_iter:
        log.info("cle: stopped after max_iter=%d sweeps", max_iter)
    return model, plog
