"""PyTorch-native integer execution: ``convert(qmodel, backend="torch")``.

Swaps each quantized Linear for a module that really computes in integers and really stores integers:

* :class:`Int8Linear` (int8 symmetric weights, per-channel or per-tensor): the input is quantized per
  token (per row) at run time, ``s_x = max|x_row| / 127``, ``q_x = clamp(round(x / s_x), -127, 127)``;
  ``acc = torch._int_mm(q_x, q_w^T)`` (int8 x int8 -> int32, exact); ``y = acc * s_x * s_w + b``.
  ``torch._int_mm`` on CUDA needs M > 16 and K, N multiples of 8: M is zero-padded to 17 rows; K or N
  not multiples of 8 fall back to a float matmul of the integer codes (logged once per layer).
* :class:`PackedWeightLinear` (weight-only 2..8-bit codes, any granularity): codes stored in uint8 with
  4-bit codes packed two per byte (low nibble = even column), dequantized to the input dtype at every
  call: ``W = (q - z) * s``. Activations stay float.

The output side of the layer (fused ``activation``, ``output_quantizer``) is kept, so the rest of a
statically quantized graph sees what it saw before.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..granularity import PerChannel, PerGroup, PerTensor, broadcast_param, to_blocks
from ..ops import quantize
from .layers import OutputSideMixin, QuantLinear
from .root import set_root_attr

log = logging.getLogger("lowbit")

__all__ = ["Int8Linear", "PackedWeightLinear", "convert", "pack_int4", "unpack_int4", "module_nbytes"]


def module_nbytes(module: nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers (each tensor counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (values 0..15) two per byte: ``byte = lo | hi << 4`` with ``lo`` the even
    column. ``(..., K)`` -> ``(..., ceil(K / 2))`` uint8; an odd ``K`` gets a zero high nibble in its last byte
    (pass ``K`` to :func:`unpack_int4` to drop it)."""
    c = codes.to(torch.uint8)
    if c.shape[-1] % 2:
        c = F.pad(c, (0, 1))
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``(..., K2)`` uint8 -> ``(..., k)`` uint8 codes 0..15 (``k`` defaults
    to ``2 * K2``; pass the original odd ``K`` to drop the padding nibble)."""
    lo, hi = packed & 0x0F, packed >> 4
    u = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return u if k is None else u[..., :k]


class _OutputSide(OutputSideMixin, nn.Module):
    pass


class Int8Linear(_OutputSide):
    """int8 x int8 -> int32 Linear (module docstring). Input ``(*, in_features)`` float, output
    ``(*, out_features)`` in the input's dtype. Buffers: ``weight_int8`` (N, K) int8, ``weight_scale``
    (N,) float32, ``bias`` (N,) float or None."""

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 activation: nn.Module | None = None, output_quantizer: nn.Module | None = None, name: str = "linear"):
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", weight_scale.float().expand(self.out_features).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.activation, self.output_quantizer, self.lowbit_name = activation, output_quantizer, name
        self._warned = False

    @classmethod
    def from_quant(cls, layer: QuantLinear) -> Int8Linear:
        wq = layer.weight_quantizer
        codes = quantize(layer.weight.detach().float(), wq.scale, wq.zero_point, wq.spec)
        return cls(codes, wq.scale.detach(), layer.bias, layer.activation, layer.output_quantizer, layer.lowbit_name)

    def _int_mm(self, qx: torch.Tensor) -> torch.Tensor:
        m, k, n = qx.shape[0], self.in_features, self.out_features
        if qx.is_cuda and (k % 8 or n % 8):
            if not self._warned:
                log.info("lowbit: %s: torch._int_mm on CUDA needs K and N multiples of 8 (K=%d, N=%d); "
                         "using a float matmul of the int8 codes", self.lowbit_name, k, n)
                self._warned = True
            # float64 holds every int32 partial sum exactly (float32 would round once K * 127^2 > 2^24)
            return (qx.double() @ self.weight_int8.t().double()).to(torch.int32)
        pad = 17 - m if qx.is_cuda and m <= 16 else 0
        if pad:
            qx = F.pad(qx, (0, 0, 0, pad))
        acc = torch._int_mm(qx, self.weight_int8.t())
        return acc[:m] if pad else acc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features).float()
        s_x = (x2.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=torch.finfo(torch.float32).eps)
        qx = torch.clamp(torch.round(x2 / s_x), -127, 127).to(torch.int8)
        y = self._int_mm(qx).float() * s_x * self.weight_scale
        if self.bias is not None:
            y = y + self.bias.float()
        return self._post(y.to(dtype).reshape(*shape[:-1], self.out_features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8 -> int32 (torch._int_mm)"


class PackedWeightLinear(_OutputSide):
    """Weight-only Linear with integer codes stored compactly (module docstring). Input ``(*, K)`` float,
    output ``(*, N)``; ``W = (codes - zero_point) * scale`` per the weight spec's granularity."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        wq = layer.weight_quantizer
        spec = wq.spec
        self.spec, self.lowbit_name = spec, layer.lowbit_name
        self.in_features, self.out_features = layer.in_features, layer.out_features
        codes = quantize(layer.weight.detach().float(), wq.scale, wq.zero_point, spec).to(torch.int16)
        self.offset = -int(spec.format.min_value)  # store unsigned: code + offset in [0, 2^bits - 1]
        u = (codes + self.offset).to(torch.uint8)
        self.packed4 = spec.format.bits <= 4
        self.register_buffer("weight_codes", pack_int4(u) if self.packed4 else u)
        self.register_buffer("weight_scale", wq.scale.detach().float().clone())
        zp = wq.zero_point.detach().to(torch.int16) if not spec.symmetric else torch.zeros_like(wq.scale, dtype=torch.int16)
        self.register_buffer("weight_zero_point", (zp + self.offset).to(torch.uint8))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.activation, self.output_quantizer = layer.activation, layer.output_quantizer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(N, K)`` the codes stand for (bit-exact with the simulation's)."""
        u = unpack_int4(self.weight_codes, self.in_features) if self.packed4 else self.weight_codes
        g = self.spec.granularity
        ub = to_blocks(u.float(), g)
        shape = (self.out_features, self.in_features)
        s = broadcast_param(self.weight_scale, shape, g)
        z = broadcast_param(self.weight_zero_point.float(), shape, g)
        return ((ub - z) * s).reshape(shape).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return self._post(F.linear(x, self.dequantized_weight(x.dtype), b))

    def extra_repr(self) -> str:
        packing = "4-bit packed 2/byte" if self.packed4 else "uint8 codes"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.format.name} {packing}"


def _why_not(layer: QuantLinear, activations: str) -> tuple[str | None, str]:
    """(kind, reason): kind is "int8", "packed" or None (kept as is, reason says why)."""
    wq = layer.weight_quantizer
    if wq is None or not bool(wq.quant_enabled):
        return None, "weight not quantized"
    spec = wq.spec
    if not spec.format.is_integer:
        return None, f"weight format {spec.format.name} is not an integer format"
    if not wq.is_calibrated:
        return None, "weight quantizer not calibrated"
    g = spec.granularity
    if (activations == "dynamic" and spec.format.bits == 8 and spec.symmetric and spec.format.min_value < 0
            and isinstance(g, PerChannel | PerTensor) and (isinstance(g, PerTensor) or g.axis in (0, -2))):
        return "int8", "int8 x int8 -> int32 with dynamic per-token activations"
    if spec.format.bits <= 8 and isinstance(g, PerChannel | PerGroup | PerTensor):
        return "packed", f"weight-only {spec.format.name} codes"
    return None, f"no integer kernel for {spec}"


def convert(
    qmodel: nn.Module,
    backend: Literal["torch"] = "torch",
    *,
    activations: Literal["dynamic", "none"] = "dynamic",
    inplace: bool = False,
) -> nn.Module:
    """Replace every :class:`QuantLinear` by an integer-storing module that runs in PyTorch; or, for a model
    from :func:`lowbit.prepare_qat`, finish quantization-aware training.

    A QAT model (``prepare_qat`` output, also wrapped in DDP) goes to :func:`lowbit.qat.convert.convert`:
    BatchNorm folded into the convolutions, learned scales frozen, the result the same structure
    :func:`lowbit.quantize` returns (export it with :func:`lowbit.export_onnx`); ``backend`` and
    ``activations`` do not apply there.

    Args:
        qmodel: a lowbit quantized model, or a QAT model.
        backend: only ``"torch"`` (``torch._int_mm``, CPU and CUDA).
        activations: ``"dynamic"``: int8 symmetric weights run as :class:`Int8Linear` (dynamic per-token
            int8 activations); ``"none"``: every layer weight-only (:class:`PackedWeightLinear`).
            Weights narrower than 8 bits are always weight-only (packed two per byte at 4 bits or less).
        inplace: modify ``qmodel`` instead of a deep copy.

    Returns the converted model; ``model.lowbit_convert_log`` lists ``(name, kind or "kept", reason)``.
    """
    # QAT path (issue 7): fold BN, freeze LSQ -> the structure lowbit.quantize returns and the exporter takes.
    from ..qat.prepare import is_qat_model

    if is_qat_model(getattr(qmodel, "module", qmodel)):
        from ..qat.convert import convert as convert_qat

        return convert_qat(qmodel, inplace=inplace)
    if backend != "torch":
        raise ConfigError(f"convert backend {backend!r} is not supported; use backend='torch' (ONNX: lowbit.export_onnx).")
    if activations not in ("dynamic", "none"):
        raise ConfigError(f"activations must be 'dynamic' or 'none', got {activations!r}.")
    model = qmodel if inplace else copy.deepcopy(qmodel)
    decisions = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantLinear):
            continue
        kind, reason = _why_not(mod, activations)
        if kind is None:
            log.info("lowbit: convert kept %s as simulation: %s", name, reason)
            decisions.append((name, "kept", reason))
            continue
        new = Int8Linear.from_quant(mod) if kind == "int8" else PackedWeightLinear(mod)
        decisions.append((name, kind, reason))
        if not name:  # the model is itself one quantized Linear
            set_root_attr(new, "lowbit_convert_log", decisions)
            return new
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    set_root_attr(model, "lowbit_convert_log", decisions)
    return model
