"""Per-layer weight arithmetic shared by the passes: channel views, weight quantization, layer calls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import make_observer
from ..calibration.config import MinMax
from ..granularity import reduce_blocks
from ..ops import fake_quantize
from ..spec import QuantSpec, compute_qparams


def in_channel_groups(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Linear) else layer.groups


def scale_out_channels(layer: nn.Module, s: torch.Tensor) -> None:
    """``W[o] /= s[o]``, ``b[o] /= s[o]`` (Conv/Linear, output channels on weight axis 0).

    In place under ``no_grad`` rather than through ``.data``: that bumps the tensors' version counters,
    which the quantized layers' caches (fake-quantized weight, int32 bias) are keyed on."""
    w = layer.weight
    with torch.no_grad():
        w.div_(s.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1))))
        if layer.bias is not None:
            layer.bias.div_(s.to(w.dtype))


def _in_view(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """Weight as ``(groups, out/groups, in/groups, rest)``: input channel ``c`` is ``[c // cin_g, :, c % cin_g]``."""
    g = in_channel_groups(layer)
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1)


def in_channel_absmax(layer: nn.Module) -> torch.Tensor:
    """``max |W|`` over every weight that multiplies input channel ``c``; shape ``(in_channels,)``."""
    v = _in_view(layer, layer.weight.detach()).abs()
    return v.amax(dim=(1, 3)).reshape(-1)


def scale_in_channels(layer: nn.Module, s: torch.Tensor) -> None:
    """Multiply every weight of input channel ``c`` by ``s[c]`` (grouped and depthwise convs included)."""
    w = layer.weight
    g = in_channel_groups(layer)
    with torch.no_grad():  # not .data: the version counter must move (scale_out_channels)
        v = _in_view(layer, w.detach()) * s.to(w.dtype).reshape(g, 1, -1, 1)
        w.copy_(v.reshape(w.shape))


def out_channel_absmax(layer: nn.Module) -> torch.Tensor:
    """``max |W[o]|`` per output channel; shape ``(out_channels,)``."""
    return layer.weight.detach().abs().reshape(layer.weight.shape[0], -1).amax(dim=1)


def weight_times_channel_vector(layer: nn.Module, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Output of the layer with weight ``w``, no bias and zero padding ignored, for an input that is the
    constant ``v[c]`` on every position of channel ``c``: ``y[o] = sum_{c, k} w[o, c, k] v[c]``.
    ``v`` shape ``(in_channels,)``; returns ``(out_channels,)`` float64."""
    g = in_channel_groups(layer)
    wv = _in_view(layer, w.double()).sum(dim=3)  # (g, out/g, in/g)
    return torch.einsum("goi,gi->go", wv, v.double().reshape(g, -1)).reshape(-1)


def weight_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a weight per block of ``spec.granularity``, from the range that
    ``spec.calibrator`` picks (min/max by default; e.g. ``"mse"``), as the layer's weight quantizer
    (``calibrate_now``) computes them. Returned on ``w``'s device."""
    w = w.detach().float()
    if isinstance(spec.calibrator, MinMax):
        return compute_qparams(spec, reduce_blocks(w, spec.granularity, "amin"), reduce_blocks(w, spec.granularity, "amax"))
    obs = make_observer(spec, "weight")
    obs.update(w.cpu())  # the histogram estimators work on the CPU; a weight is small
    lo, hi = obs.compute_range()
    scale, zp = compute_qparams(spec, lo, hi)
    return scale.to(w.device), zp.to(w.device)


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``fake_quantize(w)`` with min/max qparams (nearest rounding), same dtype as ``w``."""
    s, z = weight_qparams(w, spec)
    return fake_quantize(w.detach(), s, z, spec)


_PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Direct(nn.Module):
    """Calls ``layer``'s own ``forward`` without its hooks (a pass's forward hook may call
    :func:`forward_with` on the same layer)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.layer).forward(self.layer, x)


def forward_with(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``layer``'s operation with another weight and bias (Conv1d/2d/3d or Linear).

    Subclasses with their own ``forward`` (e.g. TensorFlow "same"-padding convs that pad inside
    ``forward``) run that forward with the weight and bias swapped in (``torch.func.functional_call``),
    so the padding is part of the operation; ``bias=None`` then means a zero bias."""
    if type(layer) not in _PLAIN and (layer.bias is not None or bias is None):
        params = {"layer.weight": weight}
        if layer.bias is not None:
            params["layer.bias"] = torch.zeros_like(layer.bias) if bias is None else bias
        return torch.func.functional_call(_Direct(layer), params, (x,))
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


def spec_of(spec: QuantSpec | Mapping[str, QuantSpec], name: str) -> QuantSpec | None:
    """The weight spec of layer ``name``: ``spec`` itself, or its entry when ``spec`` maps layer names
    to specs (None: the layer is not in the map and is left alone)."""
    if isinstance(spec, QuantSpec):
        return spec
    return spec.get(name)


def channel_dim(layer: nn.Module) -> int:
    """Channel dimension of the layer's input and output activations: -1 for Linear, 1 for convs."""
    return -1 if isinstance(layer, nn.Linear) else 1


def batch_input(batch) -> torch.Tensor:
    """The model input of one calibration batch: the batch itself or its first element ``(x, y)``."""
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def batches(data: Iterable) -> Iterable[torch.Tensor]:
    for b in data:
        yield batch_input(b)
