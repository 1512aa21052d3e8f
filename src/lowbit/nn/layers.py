"""Quantized-simulation layers: float layers that quantize-dequantize their weight, input and output.

Contract (the ONNX QDQ exporter and the runtime read models through it)
-----------------------------------------------------------------------
Every quantized layer **subclasses its float layer** (``QuantLinear(nn.Linear)``, ``QuantConv2d(nn.Conv2d)``
...), keeps the float parameters (``weight``, ``bias``) unchanged, and is built with
``Cls.from_float(module, weight_spec, *, input_spec=None, output_spec=None, activation=None, name=...)``.
It holds four optional parts, always under these attribute names:

==================  ==========================  ===================================================
attribute           type                        role
==================  ==========================  ===================================================
``weight_quantizer``  ``TensorQuantizer | None``   quantizes ``weight`` on the fly at every forward
                                                   (calibrates itself from the weight when not yet
                                                   calibrated; ``from_float`` calibrates it at once)
``input_quantizer``   ``TensorQuantizer | None``   quantizes the layer's input: used for dynamic
                                                   activation quantization and by the module-swap
                                                   fallback (no graph, so each layer guards its input)
``activation``        ``nn.Module | None``         fused activation (ReLU, ReLU6, GELU ...) applied to
                                                   the layer's output: Conv-BN-ReLU is one unit
``output_quantizer``  ``TensorQuantizer | None``   quantizes the output *after* ``activation``
==================  ==========================  ===================================================

Forward of a weighted layer, exactly::

    x = input_quantizer(x)        if present
    w = weight_quantizer(weight)  if present
    w, b = deployed_weight_and_bias(w, bias, x.dim())
                                  the int32 bias an int8 backend adds (below), else the float bias
    y = float_op(x, w, b)
    y = activation(y)             if present
    y = output_quantizer(y)       if present

In graph mode the capture puts an activation quantizer where an int8 backend (ONNX Runtime QDQ)
puts a Q/DQ pair: on each model input and on each quantized op's output (after the fused activation),
exactly one quantizer per tensor, shared by all consumers, so ``DQ -> op -> Q`` is fusable into
QLinearConv / QLinearMatMul / QLinearAdd. Quantized joins (:class:`QuantMatMul`, :class:`QuantAdd`,
:class:`QuantMul`, :class:`QuantCat`) hold ``input_quantizers`` (an ``nn.ModuleList`` with one entry
per tensor input: a ``TensorQuantizer``, or ``nn.Identity`` where the input is already quantized
upstream), the same optional ``activation`` and ``output_quantizer``.

Weight quantizer names are ``"<layer>.weight"``, input ``"<layer>.input"``, output ``"<layer>.output"``.

The bias (:meth:`QuantLayerMixin.deployed_weight_and_bias`)
-----------------------------------------------------------
Where the ONNX export stores the bias as int32 at scale ``s_b = s_x * s_w`` (Conv / ConvTranspose, and
Linear on 2-D inputs, which the tracer writes as Gemm; an enabled static per-tensor int8/uint8 input
quantizer and an enabled int8/uint8 per-tensor or per-channel weight quantizer), the simulation adds that
same deployed bias, ``clamp(round(b / s_b), int32) * s_b``, computed by :func:`lowbit.nn.bias.int32_bias`
(the function the exporter calls, with the same fallbacks: where a channel's weight scale is raised to fit
int32 the weight codes of that channel are re-rounded here too; where the export keeps the bias float, so
does the simulation). The gradient reaches the float bias unchanged (straight-through). The input scale
``s_x`` comes from ``input_quantizer`` (module swap) or, in graph mode, from the quantizer that produces
the layer's input (:func:`link_input_quantizer`, set by the capture). Without it the bias stays float:
``|b - b_deployed| <= s_b / 2`` per channel, and these half-steps are what made one-code flips compound
over the 49 layers of EfficientNet-Lite0 (docs/benchmarks.md, Deployment parity). What remains between
the simulation and an int8 backend is the backend's float32 requantization at rounding ties;
``with lowbit.nn.ort_arithmetic(qmodel):`` reproduces ONNX Runtime's (:mod:`lowbit.nn.requant`).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedLayerError
from ..granularity import PerChannel, PerGroup, PerTensor
from ..spec import QuantSpec
from .bias import Int32Bias, int32_bias, rerounded_weight_codes
from .quantizer import TensorQuantizer, buffer_flag, version_counters_trusted
from .requant import ORT_MODE_ATTR, ort_qlinear_add, ort_requantized_output

__all__ = [
    "QuantLayerMixin",
    "QuantLinear",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConvTranspose2d",
    "QuantEmbedding",
    "QuantJoin",
    "QuantMatMul",
    "QuantAdd",
    "QuantMul",
    "QuantCat",
    "QUANT_LAYERS",
    "quant_class_for",
    "weight_spec_for",
    "is_quant_layer",
    "link_input_quantizer",
]

_BIAS_WEIGHT_FORMATS = frozenset({"int8", "uint8", "int8_narrow", "int4", "uint4"})  # ONNX INT8 / UINT8 / INT4 / UINT4
_BIAS_INPUT_FORMATS = frozenset({"int8", "uint8"})
_INPUT_LINK = "_lowbit_input_quantizer"  # a plain attribute (not a submodule): the quantizer stays owned upstream


def link_input_quantizer(layer: nn.Module, quantizer: TensorQuantizer | list[TensorQuantizer | None] | None) -> None:
    """Record (graph mode) the quantizer that produces ``layer``'s input (a list, one per input, for a
    join), so the layer can add the int32 bias the export stores (it needs the input scale ``s_x``).
    Kept out of ``_modules`` and ``state_dict``: the quantizer belongs to its producer;
    ``copy.deepcopy`` of the whole model keeps the link."""
    layer.__dict__[_INPUT_LINK] = quantizer


def _tensors_key(*tensors: torch.Tensor) -> tuple:
    """(data pointer, version, device) of each tensor: equal keys mean unchanged values. ``(None,)`` when
    a tensor has no version counter (an inference tensor) or version counters cannot be trusted
    (:func:`~lowbit.nn.quantizer.version_counters_trusted`): such a value is not cached."""
    if not version_counters_trusted():
        return (None,)
    key = []
    for t in tensors:
        try:
            key += [t.data_ptr(), t._version, t.device]
        except RuntimeError:
            return (None,)
    return tuple(key)


def _cached(module: nn.Module, attr: str, key: tuple, compute):
    """``compute()``, kept in ``module.__dict__[attr]`` under ``key`` (from :func:`_tensors_key`) and
    returned again while the key is unchanged; never kept when the key starts with None."""
    if key[0] is None:
        return compute()
    hit = module.__dict__.get(attr)
    if hit is None or hit[0] != key:
        hit = (key, compute())
        module.__dict__[attr] = hit
    return hit[1]


def _static_int_quantizer(q, formats: frozenset[str]) -> bool:
    return (isinstance(q, TensorQuantizer) and buffer_flag(q, "quant_enabled") and not q.spec.dynamic
            and q.spec.format.name in formats and q.is_calibrated and q.lsq_offset is None)


def _weight_axes(module: nn.Module) -> tuple[int, int]:
    """(output-channel axis, input-channel axis) of ``module.weight``."""
    if isinstance(module, nn.ConvTranspose2d):
        return 1, 0
    if isinstance(module, nn.Embedding):
        return 0, 1  # one scale per row (token) of the table
    return 0, 1


def weight_spec_for(module: nn.Module, spec: QuantSpec, name: str = "layer") -> QuantSpec:
    """Adapt a recipe's weight spec to ``module``'s weight layout and check the layer can take it.

    * ``PerChannel(axis=0)`` means "per output channel": it becomes axis 1 for ConvTranspose2d, whose
      weight is ``(in, out / groups, kH, kW)``;
    * ``PerGroup(g, axis=-1)`` means "groups along the reduction (input) dimension": for convolutions
      it becomes axis 1 (input channels), for Linear it stays the last axis.

    Raises :class:`~lowbit.errors.UnsupportedLayerError` when the layer cannot take the spec (group size
    not dividing the input channels, per-channel on a grouped ConvTranspose2d, a dynamic weight spec).
    """
    w = module.weight
    g = spec.granularity
    out_axis, in_axis = _weight_axes(module)
    if spec.dynamic:
        raise UnsupportedLayerError(
            f"{name}: a weight spec cannot be dynamic (weights are constant; their range is measured once). "
            "Use dynamic=True on the activation spec instead."
        )
    if isinstance(g, PerChannel):
        if g.axis == 0 and out_axis != 0:
            if getattr(module, "groups", 1) != 1:
                raise UnsupportedLayerError(
                    f"{name}: per-channel weights of a grouped {type(module).__name__} (groups={module.groups}) "
                    "have no single output-channel axis; use granularity='tensor' for this layer (overrides=) "
                    "or exclude it."
                )
            spec = spec.replace(granularity=PerChannel(out_axis))
        elif not -w.dim() <= g.axis < w.dim():
            raise UnsupportedLayerError(
                f"{name}: per-channel axis {g.axis} does not exist on a weight of shape {tuple(w.shape)}."
            )
    elif isinstance(g, PerGroup):
        axis = in_axis if (g.axis in (-1, w.dim() - 1) and w.dim() > 2) else g.axis
        size = w.shape[axis]
        if size % g.group_size:
            raise UnsupportedLayerError(
                f"{name}: group size {g.group_size} does not divide the {size} input channels of its weight "
                f"{tuple(w.shape)}; choose a group size that divides {size} or exclude this layer."
            )
        spec = spec.replace(granularity=PerGroup(g.group_size, axis))
    return spec


def _quantizer(spec: QuantSpec | None, name: str) -> TensorQuantizer | None:
    return None if spec is None else TensorQuantizer(spec, name=name, is_weight=name.endswith(".weight"))


class OutputSideMixin:
    """The output side every quantized module shares: fused ``activation``, then ``output_quantizer``
    (either may be None)."""

    def _post(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            y = self.activation(y)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y


class QuantLayerMixin(OutputSideMixin):
    """Shared parts of the weighted quantized layers (see the module docstring for the contract)."""

    weight_quantizer: TensorQuantizer | None
    input_quantizer: TensorQuantizer | None
    activation: nn.Module | None
    output_quantizer: TensorQuantizer | None

    def _init_quant(
        self,
        weight_spec: QuantSpec | None,
        input_spec: QuantSpec | None,
        output_spec: QuantSpec | None,
        activation: nn.Module | None,
        name: str,
    ) -> None:
        self.lowbit_name = name
        if weight_spec is not None:
            weight_spec = weight_spec_for(self, weight_spec, name)
        self.weight_quantizer = _quantizer(weight_spec, f"{name}.weight")
        self.input_quantizer = _quantizer(input_spec, f"{name}.input")
        self.activation = activation
        self.output_quantizer = _quantizer(output_spec, f"{name}.output")
        if self.weight_quantizer is not None:
            self.calibrate_weight()

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight_spec: QuantSpec | None,
        *,
        input_spec: QuantSpec | None = None,
        output_spec: QuantSpec | None = None,
        activation: nn.Module | None = None,
        name: str = "layer",
    ):
        """A quantized copy of float ``module`` sharing its parameters (same ``weight``/``bias`` objects).

        Args:
            module: the float layer: the float base class of ``cls``, or a subclass that keeps its ``forward``.
            weight_spec: spec of the weight, or None to keep it float.
            input_spec: spec of the input (dynamic activation quantization, module-swap fallback).
            output_spec: spec of the output, applied after ``activation``.
            activation: fused activation module (ReLU, ReLU6, GELU, SiLU, Hardswish ...).
            name: the layer's qualified name in the model (used for quantizer names and errors).
        """
        base = next(k for k in cls.__mro__[1:] if issubclass(k, nn.Module) and not issubclass(k, QuantLayerMixin))
        if type(module) is not base and not isinstance(module, base):
            raise UnsupportedLayerError(f"{cls.__name__}.from_float takes a {base.__name__}, got {type(module).__name__}.")
        if type(module).forward is not base.forward:  # the quantized class would silently drop that forward
            raise UnsupportedLayerError(
                f"{name}: {type(module).__name__} subclasses {base.__name__} with its own forward, which "
                f"{cls.__name__} would replace; quantize it through lowbit.quantize (torch.fx turns its "
                "F.conv/F.linear call into a plain layer) or exclude it."
            )
        new = copy.copy(module)  # shares parameters and buffers; new object for the new class
        new.__dict__ = dict(module.__dict__)
        for key in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"):
            if key in new.__dict__:
                new.__dict__[key] = copy.copy(module.__dict__[key])
        new.__class__ = cls
        new._init_quant(weight_spec, input_spec, output_spec, activation, name)
        return new

    @torch.no_grad()
    def calibrate_weight(self) -> None:
        """Set the weight quantizer's scale and zero point from the current weight (``calibrate_now``)."""
        if self.weight_quantizer is not None:
            self.weight_quantizer.calibrate_now(self.weight.detach())

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the quantized model uses it (fake-quantized, float dtype, weight's shape)."""
        wq = self.weight_quantizer
        if wq is None:
            return self.weight
        if wq.needs_calibration and not wq.is_calibrated:
            self.calibrate_weight()
        if torch.is_grad_enabled() and (self.weight.requires_grad or wq.learnable):
            return wq(self.weight)  # training (QAT): no cache, gradients flow through the STE
        # Inference: the fake-quantized weight only changes when the weight or the qparams do.
        key = _tensors_key(self.weight, wq.scale, wq.zero_point) + (buffer_flag(wq, "quant_enabled"),
                                                                     "forward" in wq.__dict__)
        return _cached(self, "_lowbit_wcache", key, lambda: wq(self.weight).detach())

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def bias_input_quantizer(self) -> TensorQuantizer | None:
        """The quantizer of this layer's input: ``input_quantizer``, else the graph link (None if neither)."""
        q = self.input_quantizer
        return q if q is not None else self.__dict__.get(_INPUT_LINK)

    def int32_bias(self, bias: torch.Tensor | None, x_dim: int) -> Int32Bias | None:
        """The int32 bias the ONNX export stores for ``bias`` (module docstring), or None where it keeps it
        float: no bias, an input or weight quantizer that is missing, disabled, dynamic, not int8/uint8 (the
        weight may also be int4/uint4: ONNX Runtime rounds such a layer's float bias so itself),
        per-group or asymmetric-and-out-of-int32; a Linear on an input that is not 2-D (exported as
        MatMul + float Add); or a per-channel weight not along axis 0 whose bias needs a raised scale."""
        if bias is None:
            return None
        wq, iq = self.weight_quantizer, self.bias_input_quantizer()
        if not (_static_int_quantizer(wq, _BIAS_WEIGHT_FORMATS) and _static_int_quantizer(iq, _BIAS_INPUT_FORMATS)):
            return None
        if not isinstance(wq.spec.granularity, PerTensor | PerChannel) or not isinstance(iq.spec.granularity, PerTensor):
            return None
        if iq.scale.numel() != 1 or (isinstance(self, nn.Linear) and x_dim != 2):
            return None
        out_axis = self.weight_quantizer.spec.granularity.axis % self.weight.dim() if wq.scale.numel() > 1 else 0
        # Cached like the fake-quantized weight: the int32 bias (a few dozen small ops and a host sync)
        # only changes when the bias, a scale or the weight zero point does. It is computed from detached
        # values, so the cache is also right in training (the gradient passes straight through).
        key = _tensors_key(bias, iq.scale, wq.scale, wq.zero_point) + (out_axis, id(iq))
        return _cached(self, "_lowbit_bcache", key, lambda: int32_bias(
            bias, iq.scale, wq.scale, self.weight.numel() // max(bias.numel(), 1),
            None if wq.spec.symmetric else wq.zero_point, out_axis))

    def deployed_weight_and_bias(self, w: torch.Tensor, bias: torch.Tensor | None,
                                 x_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(w, b)`` as the deployed int8 model has them: the int32 bias dequantized (straight-through:
        the gradient reaches ``bias`` unchanged), and ``w`` re-rounded on the channels whose weight scale
        had to be raised for the bias to fit int32. ``(w, bias)`` unchanged where the export keeps the bias
        float (:meth:`int32_bias`)."""
        return self._apply_int32_bias(w, bias, self._deployed_bias(bias, x_dim))

    def _deployed_bias(self, bias: torch.Tensor | None, x_dim: int) -> Int32Bias | None:
        """:meth:`int32_bias`, except while tracing: the ONNX export traces the float bias and writes the
        int32 form itself."""
        return None if torch.jit.is_tracing() else self.int32_bias(bias, x_dim)

    def _apply_int32_bias(self, w: torch.Tensor, bias: torch.Tensor | None,
                          dep: Int32Bias | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if dep is None:
            return w, bias
        b = bias + (dep.dequantize().to(bias.dtype) - bias).detach()
        if dep.raised is not None:
            wq = self.weight_quantizer
            shape = (-1,) + (1,) * (w.dim() - 1)
            codes = torch.round(w.detach() / wq.scale.reshape(shape))
            signed = wq.spec.format.min_value < 0
            new = rerounded_weight_codes(codes, wq.scale.detach(), dep.weight_scale, dep.raised, signed)
            w = w + (new.to(w.dtype) * dep.weight_scale.reshape(shape) - w).detach()
        return w, b

    def _linear_forward(self, x: torch.Tensor, op) -> torch.Tensor:
        """``_post(op(x, w, b))`` with the deployed weight and bias; inside :func:`lowbit.nn.ort_arithmetic`
        the integer kernel's output where ORT runs one (:func:`lowbit.nn.requant.ort_requantized_output`)."""
        x = self._pre(x)
        dep = self._deployed_bias(self.bias, x.dim())  # once: the simulation and ORT's arithmetic both use it
        w, b = self._apply_int32_bias(self.quantized_weight(), self.bias, dep)
        if self.__dict__.get(ORT_MODE_ATTR):
            y = ort_requantized_output(self, x, w, dep, lambda xx, ww: op(xx, ww, None))
            if y is not None:
                return y
        return self._post(op(x, w, b))

    def quant_extra_repr(self) -> str:
        parts = []
        if self.activation is not None:
            parts.append(f"fused={type(self.activation).__name__}")
        return ", ".join(parts)


class QuantLinear(QuantLayerMixin, nn.Linear):
    """``y = act(q_in(x) @ q_w(W)^T + b)`` (``b`` the deployed bias), then ``q_out``. Input ``(*, in_features)``, output ``(*, out_features)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear_forward(x, F.linear)


class QuantConv1d(QuantLayerMixin, nn.Conv1d):
    """Conv1d with quantized weight/input/output; input ``(N, C_in, L)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear_forward(x, self._conv_forward)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """Conv2d (any groups: depthwise, grouped) with quantized weight/input/output; input ``(N, C_in, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear_forward(x, self._conv_forward)


class QuantConvTranspose2d(QuantLayerMixin, nn.ConvTranspose2d):
    """ConvTranspose2d with quantized weight (per output channel = weight axis 1)/input/output."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        x = self._pre(x)
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        w, b = self.deployed_weight_and_bias(self.quantized_weight(), self.bias, x.dim())
        y = F.conv_transpose2d(x, w, b, self.stride, self.padding, output_padding, self.groups, self.dilation)
        return self._post(y)


class QuantEmbedding(QuantLayerMixin, nn.Embedding):
    """Embedding with a quantized table (weight-only; one scale per row with ``PerChannel(0)``).
    Input: integer indices of any shape; output ``(*indices.shape, embedding_dim)``. An
    ``output_quantizer`` may be set (the looked-up rows are activations for the next layer)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        y = F.embedding(idx, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)
        return self._post(y)


QUANT_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Embedding: QuantEmbedding,
}
"""The registry float layer type -> quantized layer type (exact types; subclasses of these float
layers that override ``forward`` are not swapped)."""


def quant_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The quantized class for ``module``'s exact type, or None when it has none."""
    return QUANT_LAYERS.get(type(module))


def is_quant_layer(module: nn.Module) -> bool:
    """True for the quantized weighted layers and joins of this module."""
    return isinstance(module, QuantLayerMixin | QuantJoin)


# ------------------------------------------------------------------------------------------ joins
class QuantJoin(OutputSideMixin, nn.Module):
    """Base of the quantized functional ops with several tensor inputs (matmul, add, mul, cat).

    Args:
        input_specs: one entry per tensor input: a spec (a quantizer is created for that input) or None
            (the input is already quantized upstream: an ``nn.Identity`` takes its place).
        output_spec: spec of the output (after ``activation``), or None.
        activation: fused activation (e.g. the ReLU after a residual add), or None.
        name: qualified name (quantizers are ``<name>.input<i>`` and ``<name>.output``).
    """

    def __init__(
        self,
        input_specs: tuple[QuantSpec | None, ...] | list[QuantSpec | None] = (None, None),
        output_spec: QuantSpec | None = None,
        activation: nn.Module | None = None,
        name: str = "join",
    ) -> None:
        super().__init__()
        self.lowbit_name = name
        self.input_quantizers = nn.ModuleList(
            nn.Identity() if s is None else TensorQuantizer(s, name=f"{name}.input{i}") for i, s in enumerate(input_specs)
        )
        self.activation = activation
        self.output_quantizer = _quantizer(output_spec, f"{name}.output")

    def _q(self, i: int, x):
        if i < len(self.input_quantizers) and torch.is_tensor(x):
            return self.input_quantizers[i](x)
        return x

    def input_quantizer_of(self, i: int) -> TensorQuantizer | None:
        """The quantizer of input ``i``: its own entry of ``input_quantizers``, else (graph mode, input
        quantized upstream) the producer's quantizer recorded by the capture, else None."""
        own = self.input_quantizers[i] if i < len(self.input_quantizers) else None
        if isinstance(own, TensorQuantizer):
            return own
        links = self.__dict__.get(_INPUT_LINK)
        return links[i] if links is not None and i < len(links) else None


class QuantMatMul(QuantJoin):
    """``torch.matmul(q0(a), q1(b))`` (also used for ``bmm`` and the ``@`` operator), then ``q_out``."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._post(torch.matmul(self._q(0, a), self._q(1, b)))


class QuantAdd(QuantJoin):
    """``q0(a) + q1(b)`` (tensors or a tensor and a number), then fused activation and ``q_out``."""

    def forward(self, a, b, alpha=None) -> torch.Tensor:
        a, b = self._q(0, a), self._q(1, b)
        if alpha is None and self.__dict__.get(ORT_MODE_ATTR):
            y = ort_qlinear_add(self, a, b)
            if y is not None:
                return y
        y = a + b if alpha is None else torch.add(a, b, alpha=alpha)
        return self._post(y)


class QuantMul(QuantJoin):
    """``q0(a) * q1(b)``, then ``q_out``."""

    def forward(self, a, b) -> torch.Tensor:
        return self._post(self._q(0, a) * self._q(1, b))


class QuantCat(QuantJoin):
    """``torch.cat([q_i(x_i)], dim)``, then ``q_out`` (one scale for the joined tensor, as QLinearConcat)."""

    def __init__(self, input_specs=(None, None), output_spec=None, activation=None, name="cat", dim: int = 0) -> None:
        super().__init__(input_specs, output_spec, activation, name)
        self.dim = dim

    def forward(self, tensors, dim: int | None = None) -> torch.Tensor:
        xs = [self._q(i, t) for i, t in enumerate(tensors)]
        return self._post(torch.cat(xs, self.dim if dim is None else dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def spec_summary(spec: QuantSpec | None) -> dict | None:
    """A plain-dict view of a spec (for tables and logs)."""
    if spec is None:
        return None
    return {f.name: str(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
