"""Conv-BN (and Linear-BN) units for QAT: BatchNorm kept as a training-time fold.

Jacob et al. 2018 (section 3.2) and torch.ao's fused ``ConvBn`` modules fold the BatchNorm into the
weight *inside* the forward, so the quantizer sees the weight the deployed model will use, while the
BatchNorm still learns. With ``t = gamma / sqrt(running_var + eps)`` per output channel:

* training, statistics live:   ``y = BN_batch( conv(x, fq(W t)) / t + b )``
  (the batch statistics normalise, the running statistics update; dividing by ``t`` undoes the fold so
  the BatchNorm sees the unscaled output, torch.ao's "approximate" form: one convolution);
* eval, or statistics frozen:  ``y = conv(x, fq(W t), (b - running_mean) t + beta)``
  which is exactly the layer :func:`lowbit.convert` writes out (same float32 operations, same outputs).

``fq`` is the layer's weight quantizer; the activation and output quantizer follow as in every
quantized layer (:mod:`lowbit.nn.layers`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import QuantConv1d, QuantConv2d, QuantLayerMixin, QuantLinear
from ..nn.quantizer import buffer_flag

__all__ = ["ConvBnMixin", "QuantConvBn1d", "QuantConvBn2d", "QuantLinearBn1d", "CONV_BN_TYPES", "fuse_bn"]


class ConvBnMixin:
    """Shared parts of the Conv-BN units. ``weight``/``bias`` are the *unfolded* float parameters,
    ``bn`` the BatchNorm (trained as usual), ``bn_frozen`` a bool buffer (state_dict and DDP carry it)."""

    bn: nn.Module
    bn_frozen: torch.Tensor
    plain_class: type[nn.Module]

    def _bn_factor(self) -> torch.Tensor:
        """``t = gamma / sqrt(running_var + eps)``, shape ``(C,)``, float32 (gradient flows to gamma)."""
        bn = self.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        return gamma / std

    def _w_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape((-1,) + (1,) * (self.weight.dim() - 1))

    def folded_weight(self) -> torch.Tensor:
        """``W * t`` along the output-channel axis (the weight of the deployed layer), weight's shape."""
        return self.weight * self._w_view(self._bn_factor())

    def folded_bias(self) -> torch.Tensor:
        """``(b - running_mean) * t + beta``, shape ``(C,)`` (the bias of the deployed layer)."""
        bn = self.bn
        t = self._bn_factor()
        b = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        return (b - bn.running_mean) * t + beta

    @torch.no_grad()
    def calibrate_weight(self) -> None:
        """Set the weight quantizer's qparams from the current *folded* weight."""
        if self.weight_quantizer is not None:
            self.weight_quantizer.calibrate_now(self.folded_weight().detach())

    def quantized_weight(self) -> torch.Tensor:
        w = self.folded_weight()
        wq = self.weight_quantizer
        return w if wq is None else wq(w)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pre(x)
        if self.training and not buffer_flag(self, "bn_frozen"):
            t = self._bn_factor()
            y = self._op(x, self.quantized_weight(), None)
            view = (1, -1) + (1,) * (y.dim() - 2)
            # A channel with gamma = 0 has a zero folded weight; divide by 1 there (BN outputs beta anyway).
            t = torch.where(t == 0, torch.ones_like(t), t)
            y = y / t.reshape(view)
            if self.bias is not None:
                y = y + self.bias.reshape(view)
            y = self.bn(y)
        else:  # the deployed layer's arithmetic, int32 bias included (convert's output is bit-identical)
            y = self._op(x, *self.deployed_weight_and_bias(self.quantized_weight(), self.folded_bias(), x.dim()))
        return self._post(y)

    @classmethod
    def from_quant(cls, qlayer: nn.Module, float_layer: nn.Module, bn: nn.Module):
        """A Conv-BN unit built from the quantized layer ``qlayer`` (its quantizers, fused activation and
        name are reused), the *unfolded* ``float_layer`` (its weight and bias are copied) and ``bn``
        (deep-copied). The weight quantizer is recalibrated on the folded weight."""
        new = copy.copy(qlayer)
        new.__dict__ = dict(qlayer.__dict__)
        for key in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"):
            if key in new.__dict__:
                new.__dict__[key] = copy.copy(qlayer.__dict__[key])
        new.__dict__.pop("_lowbit_wcache", None)
        new.__class__ = cls
        new.weight = nn.Parameter(float_layer.weight.detach().clone())
        new.bias = None if float_layer.bias is None else nn.Parameter(float_layer.bias.detach().clone())
        new.bn = copy.deepcopy(bn)
        new.register_buffer("bn_frozen", torch.tensor(False, device=new.weight.device))  # NCCL broadcasts it
        new.calibrate_weight()
        return new

    @torch.no_grad()
    def to_plain(self) -> nn.Module:
        """The deployable layer (``plain_class``): weight ``W t``, bias ``(b - mean) t + beta``, the same
        quantizer objects (their qparams are kept, not recalibrated), no BatchNorm."""
        w, b = self.folded_weight().detach().clone(), self.folded_bias().detach().clone()
        new = copy.copy(self)
        new.__dict__ = dict(self.__dict__)
        for key in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"):
            if key in new.__dict__:
                new.__dict__[key] = copy.copy(self.__dict__[key])
        new.__class__ = self.plain_class
        del new._modules["bn"]
        del new._buffers["bn_frozen"]
        new.weight = nn.Parameter(w)
        new.bias = nn.Parameter(b)
        return new

    def extra_repr(self) -> str:
        state = "frozen (running statistics)" if bool(self.bn_frozen) else "live (batch statistics in training)"
        return f"{super().extra_repr()}, bn {state}"


class QuantConvBn1d(ConvBnMixin, QuantConv1d):
    """Conv1d + BatchNorm1d with the BatchNorm folded in the forward (see the module docstring)."""

    plain_class = QuantConv1d

    def _op(self, x, w, b):
        return self._conv_forward(x, w, b)


class QuantConvBn2d(ConvBnMixin, QuantConv2d):
    """Conv2d + BatchNorm2d with the BatchNorm folded in the forward (see the module docstring)."""

    plain_class = QuantConv2d

    def _op(self, x, w, b):
        return self._conv_forward(x, w, b)


class QuantLinearBn1d(ConvBnMixin, QuantLinear):
    """Linear + BatchNorm1d on ``(N, C)`` outputs with the BatchNorm folded in the forward."""

    plain_class = QuantLinear

    def _op(self, x, w, b):
        return F.linear(x, w, b)


CONV_BN_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    QuantConv1d: QuantConvBn1d,
    QuantConv2d: QuantConvBn2d,
    QuantLinear: QuantLinearBn1d,
}
"""Quantized layer type -> its Conv-BN unit (exact types)."""


def fuse_bn(qlayer: QuantLayerMixin, float_layer: nn.Module, bn: nn.Module) -> nn.Module | None:
    """The Conv-BN unit for ``qlayer`` (None when its type has none, e.g. ConvTranspose2d)."""
    cls = CONV_BN_TYPES.get(type(qlayer))
    return None if cls is None else cls.from_quant(qlayer, float_layer, bn)
