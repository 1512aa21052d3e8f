"""Integer-only reference interpreter for QDQ ONNX models.

A QDQ model stores every quantized tensor as ``QuantizeLinear -> DequantizeLinear`` and leaves the float
operators in between. The interpreter never dequantizes inside the graph: a ``DequantizeLinear`` yields a
:class:`QTensor` (codes + scale + zero point), compute operators consume QTensors and produce the exact
integer accumulator, and the ``QuantizeLinear`` after them requantizes it to output codes:

* Conv / Gemm / MatMul: ``acc = sum((x - z_x)(w - z_w)) + bias_int32``; ``y = z_y + round(acc * M)``,
  ``M = s_x * s_w / s_y`` (per output channel for per-channel weights).
* Add: both inputs rescaled to the output scale; GlobalAveragePool / AveragePool: window sums over the
  count; Concat: each input requantized to the output parameters; Clip: clamped in the input's codes.
* MaxPool, Relu, constant Pad, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity work on the codes themselves
  (dequantization is monotone and exact on the grid), keeping the input's parameters.

``requant="float"`` does the requantization in float32 exactly as ONNX Runtime's CPU kernels do after ORT
fuses ``DQ -> op -> Q`` into QLinearConv / QGemm / QLinearMatMul / QLinearAdd / QLinearGlobalAveragePool /
QLinearAveragePool / QLinearConcat (see :mod:`.ort_numerics`), so the codes are bit-exact with ORT.
``requant="fixed_point"`` uses only integer arithmetic (int32 multiplier + shift, :mod:`.fixed_point`) and
lands within one step of float mode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import ConfigError, ModelFileError, ShapeMismatchError, UnsupportedLayerError
from . import kernels as K
from . import ort_numerics as ortn
from .fixed_point import multiply_by_quantized_multiplier, quantize_multiplier

__all__ = ["QTensor", "IntegerRuntime", "RequantMode", "compare_requant_modes", "RequantComparison"]

log = logging.getLogger(__name__)

RequantMode = Literal["float", "fixed_point"]
_MODES = ("float", "fixed_point")
_LAYOUT_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
_SUPPORTED = {
    "QuantizeLinear", "DequantizeLinear", "Constant", "Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "Min",
    "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Pad",
} | _LAYOUT_OPS


@dataclass(frozen=True)
class QTensor:
    """Integer codes with their affine parameters: real value ``(codes - zero_point) * scale``.

    ``codes``: int8/uint8/int32 numpy array; ``scale`` float32 and ``zero_point`` (same dtype as codes)
    scalars, or 1-D along ``axis`` for per-channel tensors.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1

    def dequantize(self) -> np.ndarray:
        """float32 ``(codes - z) * s`` (ONNX DequantizeLinear)."""
        s, z = self.scale, self.zero_point
        if not self.per_tensor:
            shape = [1] * self.codes.ndim
            shape[self.axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return ortn.dequantize_linear(self.codes, s, z)

    def with_codes(self, codes: np.ndarray) -> QTensor:
        return QTensor(codes, self.scale, self.zero_point, self.axis)


@dataclass
class _Pending:
    """An integer result waiting for the QuantizeLinear that fixes its output scale and zero point."""

    op: str
    node: str
    requant: Callable[[np.float32, int, np.dtype, str], np.ndarray]


@dataclass(frozen=True)
class RequantComparison:
    """How far ``fixed_point`` requantization lands from ``float`` (ORT) requantization, per Q output."""

    differing: dict[str, int]
    total: dict[str, int]
    max_abs_diff: dict[str, int]

    @property
    def n_differing(self) -> int:
        return sum(self.differing.values())

    @property
    def n_total(self) -> int:
        return sum(self.total.values())

    @property
    def worst(self) -> int:
        return max(self.max_abs_diff.values(), default=0)


@dataclass
class _Node:
    proto: onnx.NodeProto
    attrs: dict = field(default_factory=dict)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


class IntegerRuntime:
    """Run a QDQ ONNX model with integer codes, int32 accumulators and int32 bias.

    ``model``: an ``onnx.ModelProto`` or a path. ``requant``: ``"float"`` (bit-exact with ONNX Runtime's
    CPU provider) or ``"fixed_point"`` (int32 multiplier + shift only).

    >>> rt = IntegerRuntime("model.qdq.onnx")                                  # doctest: +SKIP
    >>> out = rt.run({"input": x})                     # {output name: np.ndarray}  # doctest: +SKIP
    >>> out, codes = rt.run_with_intermediates({"input": x})  # doctest: +SKIP
    >>> # codes: of every QuantizeLinear output
    """

    def __init__(self, model: onnx.ModelProto | str | Path, requant: RequantMode = "float") -> None:
        if requant not in _MODES:
            raise ConfigError(f"requant must be one of {_MODES}, got {requant!r}.")
        if not isinstance(model, onnx.ModelProto):
            path = Path(model)
            if not path.is_file():
                raise ModelFileError(f"no ONNX model at {path}; pass an existing .onnx file or an onnx.ModelProto.")
            try:
                model = onnx.load(str(path))
            except Exception as e:  # onnx raises several unrelated types for corrupt files
                raise ModelFileError(f"{path} is not a readable ONNX model ({e}).") from e
        self.model = model
        self.requant: RequantMode = requant
        self._shadow: dict[str, np.ndarray] | None = None
        graph = model.graph
        self._init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self._inputs = [i.name for i in graph.input if i.name not in self._init]
        self._input_types = {i.name: i.type.tensor_type for i in graph.input}
        self._outputs = [o.name for o in graph.output]
        self._nodes = [_Node(n, _attrs(n)) for n in graph.node]
        bad = sorted({n.proto.op_type for n in self._nodes if n.proto.op_type not in _SUPPORTED
                      or n.proto.domain not in ("", "ai.onnx")})
        if bad:
            raise UnsupportedLayerError(
                f"the integer runtime does not implement {', '.join(bad)}; supported operators: "
                f"{', '.join(sorted(_SUPPORTED))}. Leave those layers in float (outside QDQ) or run the model "
                "with onnxruntime instead."
            )

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute the graph. ``feeds``: graph input name -> array (float32, or codes for integer inputs).
        Returns graph output name -> array (float32 for dequantized outputs, codes for Q outputs)."""
        return self.run_with_intermediates(feeds)[0]

    def run_with_intermediates(
        self, feeds: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Like :meth:`run`, also returning the integer codes of every ``QuantizeLinear`` output (the
        per-op integer results), keyed by the Q output's tensor name."""
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise ShapeMismatchError(f"missing graph inputs {missing}; the model expects {self._inputs}.")
        env: dict[str, object] = dict(self._init)
        env.update({k: self._check_feed(k, v) for k, v in feeds.items()})
        codes: dict[str, np.ndarray] = {}
        for node in self._nodes:
            outs = self._execute(node, env)
            for name, value in zip(node.proto.output, outs):
                env[name] = value
                if node.proto.op_type == "QuantizeLinear":
                    codes[name] = value
        result = {}
        for name in self._outputs:
            result[name] = self._materialize(env[name], name)
        return result, codes

    # ------------------------------------------------------------------ helpers

    def _check_feed(self, name: str, value) -> np.ndarray:
        """The feed as an array, refused (as ONNX Runtime refuses it) when the name is not a graph input,
        integer codes are not of the declared type (a float or other-signedness array would be read as
        wrong codes), or a fixed dimension differs."""
        if name not in self._input_types:
            raise ShapeMismatchError(f"'{name}' is not an input of the model; its inputs are {self._inputs}.")
        arr = np.asarray(value)
        tt = self._input_types[name]
        if tt.elem_type:
            want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
            if want.kind in "iu" and arr.dtype != want:
                raise ConfigError(
                    f"input '{name}' takes {want} codes, got a {arr.dtype} array; quantize the input to {want} "
                    f"with the model's scale and zero point (or cast codes already in the {want} range)."
                )
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if len(dims) != arr.ndim or any(d is not None and d != n for d, n in zip(dims, arr.shape)):
                shown = [d if d is not None else "?" for d in dims]
                raise ShapeMismatchError(f"input '{name}' must have shape {shown}, got {list(arr.shape)}.")
        return arr

    def _materialize(self, value: object, name: str) -> np.ndarray:
        if isinstance(value, QTensor):
            return value.dequantize()
        if isinstance(value, _Pending):
            raise UnsupportedLayerError(
                f"the output of {value.op} node '{value.node}' ({name}) is used without a QuantizeLinear "
                "after it; the integer runtime needs QDQ around every compute operator."
            )
        return np.asarray(value)

    def _q(self, env: dict, name: str, node: _Node) -> QTensor:
        value = env[name]
        if isinstance(value, QTensor):
            return value
        raise UnsupportedLayerError(
            f"{node.proto.op_type} node '{node.proto.name}' input '{name}' does not come from "
            "DequantizeLinear; the integer runtime only executes operators whose inputs are quantized (QDQ)."
        )

    def _const(self, env: dict, name: str) -> np.ndarray | None:
        if name == "":
            return None
        value = env[name]
        if isinstance(value, QTensor | _Pending):
            raise UnsupportedLayerError(f"'{name}' must be a constant tensor (shape, axes or bounds).")
        return np.asarray(value)

    def _execute(self, node: _Node, env: dict) -> list[object]:
        op = node.proto.op_type
        ins = list(node.proto.input)
        if op == "Constant":
            a = node.attrs
            if "value" in a:
                return [numpy_helper.to_array(a["value"])]
            for key, dt in (("value_float", np.float32), ("value_int", np.int64),
                            ("value_floats", np.float32), ("value_ints", np.int64)):
                if key in a:
                    return [np.asarray(a[key], dtype=dt)]
            raise UnsupportedLayerError(f"Constant node '{node.proto.name}' has an unsupported value attribute.")
        if op == "DequantizeLinear":
            return [self._dequantize_node(node, env)]
        if op == "QuantizeLinear":
            return [self._quantize_node(node, env)]
        if op in _LAYOUT_OPS:
            return [self._layout(node, env)]
        handler = getattr(self, f"_op_{op}")
        return [handler(node, env, ins)]

    def _dequantize_node(self, node: _Node, env: dict) -> QTensor:
        ins = node.proto.input
        codes = np.asarray(env[ins[0]])
        if isinstance(env[ins[0]], QTensor | _Pending):
            raise UnsupportedLayerError(f"DequantizeLinear '{node.proto.name}' input must be integer codes.")
        scale = _scale_of(node, self._const(env, ins[1]))
        zp = self._const(env, ins[2]) if len(ins) > 2 else None
        zp = np.zeros(scale.shape, dtype=codes.dtype) if zp is None else np.asarray(zp)
        if zp.dtype != codes.dtype:
            raise ConfigError(f"DequantizeLinear '{node.proto.name}': zero point {zp.dtype} and codes {codes.dtype} "
                              "must have the same type (ONNX requires it).")
        axis = None
        if scale.size > 1:
            axis = int(node.attrs.get("axis", 1))
            axis = axis + codes.ndim if axis < 0 else axis
        if "block_size" in node.attrs and node.attrs["block_size"]:
            raise UnsupportedLayerError("blocked DequantizeLinear (block_size) is not supported by the integer runtime.")
        return QTensor(codes, scale.reshape(-1) if scale.size > 1 else scale.reshape(()),
                       zp.reshape(-1) if zp.size > 1 else zp.reshape(()), axis)

    def _quantize_node(self, node: _Node, env: dict) -> np.ndarray:
        ins = node.proto.input
        scale = _scale_of(node, self._const(env, ins[1]))
        zp = self._const(env, ins[2]) if len(ins) > 2 else None
        dtype = np.dtype(np.uint8) if zp is None else np.asarray(zp).dtype
        if scale.size != 1:
            raise UnsupportedLayerError(
                f"QuantizeLinear '{node.proto.name}' is per-channel; activations must be quantized per tensor."
            )
        s = np.float32(scale.reshape(()))
        z = 0 if zp is None else int(np.asarray(zp).reshape(()))
        value = env[ins[0]]
        if isinstance(value, _Pending):
            out = value.requant(s, z, dtype, self.requant)
            if self._shadow is not None:  # same inputs, the other rounding: per-op (not compounded) gap
                self._shadow[node.proto.output[0]] = value.requant(s, z, dtype, _other(self.requant))
            return out
        if isinstance(value, QTensor):
            out = self._requant_qtensor(value, s, z, dtype, self.requant)
            if self._shadow is not None:
                self._shadow[node.proto.output[0]] = self._requant_qtensor(value, s, z, dtype, _other(self.requant))
            return out
        return ortn.quantize_linear(np.asarray(value, dtype=np.float32), s, z, dtype)

    def _requant_qtensor(self, x: QTensor, s: np.float32, z: int, dtype, mode: str) -> np.ndarray:
        """Requantize codes to new per-tensor parameters (a DQ -> Q pair) with ``mode``'s rounding."""
        if not x.per_tensor:
            raise UnsupportedLayerError("a per-channel tensor cannot be requantized to an activation directly.")
        zin = int(x.zero_point)
        if float(x.scale) == float(s) and zin == z and x.codes.dtype == np.dtype(dtype):
            return x.codes
        if mode == "float":
            return ortn.requantize_dq_q(x.codes, x.scale, x.zero_point, s, z, dtype)
        m = np.float64(x.scale) / np.float64(s)
        acc = torch.from_numpy(x.codes.astype(np.int64) - zin)
        return _fixed(acc, torch.tensor(m, dtype=torch.float64), z, dtype)

    # ------------------------------------------------------------------ layout and code-level ops

    def _layout(self, node: _Node, env: dict) -> QTensor:
        op, ins, a = node.proto.op_type, node.proto.input, node.attrs
        x = self._q(env, ins[0], node)
        if not x.per_tensor and op != "Identity":
            raise UnsupportedLayerError(f"{op} '{node.proto.name}' on a per-channel tensor is not supported.")
        c = x.codes
        if op == "Identity":
            out = c
        elif op == "Reshape":
            shape = self._const(env, ins[1]).astype(np.int64).tolist()
            if not a.get("allowzero", 0):
                shape = [c.shape[i] if d == 0 else d for i, d in enumerate(shape)]
            out = c.reshape(shape)
        elif op == "Flatten":
            axis = int(a.get("axis", 1))
            axis = axis + c.ndim if axis < 0 else axis
            out = c.reshape(int(np.prod(c.shape[:axis])), -1)
        elif op == "Transpose":
            perm = a.get("perm")
            out = np.transpose(c, perm)
        elif op == "Squeeze":
            axes = a.get("axes")
            if len(ins) > 1 and ins[1]:
                axes = self._const(env, ins[1]).tolist()
            out = np.squeeze(c, axis=tuple(axes) if axes is not None else None)
        else:  # Unsqueeze
            axes = a.get("axes")
            if len(ins) > 1 and ins[1]:
                axes = self._const(env, ins[1]).tolist()
            out = c
            for ax in sorted(int(v) + (c.ndim + len(axes) if v < 0 else 0) for v in axes):
                out = np.expand_dims(out, ax)
        return x.with_codes(np.ascontiguousarray(out))

    def _op_Relu(self, node: _Node, env: dict, ins: list[str]) -> QTensor:
        x = self._q(env, ins[0], node)
        z = x.zero_point if x.per_tensor else _along(x.zero_point, x.axis, x.codes.ndim)
        return x.with_codes(np.maximum(x.codes, z).astype(x.codes.dtype))

    def _op_Min(self, node: _Node, env: dict, ins: list[str]) -> np.ndarray:
        """Elementwise minimum of integer codes of one type (a QuantizeLinear's output and a constant): the
        per-channel clip of an equalized ReLU6 as the ``ort-cpu`` export writes it, after the quantizer."""
        vals = [env[n] for n in ins]
        if len(vals) != 2 or any(isinstance(v, QTensor | _Pending) for v in vals) \
                or len({np.asarray(v).dtype for v in vals}) != 1 or np.asarray(vals[0]).dtype.kind not in "iu":
            raise UnsupportedLayerError(
                f"Min '{node.proto.name}': only a Min of integer codes with codes of the same type is supported "
                "(the per-channel clip of target='ort-cpu'); the 'qdq' form keeps it in float between DQ and Q.")
        return np.minimum(np.asarray(vals[0]), np.asarray(vals[1]))

    def _op_MaxPool(self, node: _Node, env: dict, ins: list[str]) -> QTensor:
        a = node.attrs
        x = self._q(env, ins[0], node)
        if len(node.proto.output) > 1 and node.proto.output[1]:
            raise UnsupportedLayerError(f"MaxPool '{node.proto.name}' Indices output is not supported.")
        kernel = list(a["kernel_shape"])
        nd = len(kernel)
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        pads = K.onnx_pads(_s(a.get("auto_pad", "NOTSET")), x.codes.shape[2:], kernel, strides, dil, a.get("pads"))
        if a.get("storage_order", 0):
            raise UnsupportedLayerError("MaxPool storage_order=1 is not supported.")
        return x.with_codes(K.max_pool(x.codes, kernel, strides, pads, dil, bool(a.get("ceil_mode", 0))))

    def _op_Pad(self, node: _Node, env: dict, ins: list[str]) -> QTensor:
        """Constant-mode Pad of a per-tensor quantized tensor: the fill value ``v`` becomes the code
        ``z + v / s``, which must be an exact in-range code (``v = 0`` always is: the zero point). A Pad of
        the integer codes themselves (``Q -> Pad(value = code) -> DQ``) pads with that code."""
        raw = env[ins[0]]
        if isinstance(raw, np.ndarray) and raw.dtype in (np.uint8, np.int8) and len(ins) > 2 and ins[2]:
            pads = self._const(env, ins[1]).astype(np.int64).reshape(-1)
            fill = self._const(env, ins[2])
            if _s(node.attrs.get("mode", "constant")) != "constant" or np.any(pads < 0) or (len(ins) > 3 and ins[3]):
                raise UnsupportedLayerError(f"Pad '{node.proto.name}' of integer codes: only constant mode, non-negative pads.")
            width = [(int(pads[i]), int(pads[i + raw.ndim])) for i in range(raw.ndim)]
            return np.pad(raw, width, constant_values=raw.dtype.type(np.asarray(fill).reshape(-1)[0]))
        x = self._q(env, ins[0], node)
        mode = _s(node.attrs.get("mode", "constant"))
        if mode != "constant" or not x.per_tensor or (len(ins) > 3 and ins[3]):
            raise UnsupportedLayerError(
                f"Pad '{node.proto.name}': only constant mode on a per-tensor quantized tensor, without axes, is supported."
            )
        pads = self._const(env, ins[1]).astype(np.int64).reshape(-1)
        v = self._const(env, ins[2]) if len(ins) > 2 else None
        value = 0.0 if v is None else float(np.asarray(v).reshape(-1)[0])
        code_f = value / float(x.scale) + int(x.zero_point)
        qmin, qmax = ortn.qrange(x.codes.dtype)
        if code_f != round(code_f) or not qmin <= code_f <= qmax:
            raise UnsupportedLayerError(f"Pad '{node.proto.name}': fill value {value} is not on the input's quantization grid.")
        nd = x.codes.ndim
        if np.any(pads < 0):
            raise UnsupportedLayerError(f"Pad '{node.proto.name}': negative pads (cropping) are not supported.")
        width = [(int(pads[i]), int(pads[i + nd])) for i in range(nd)]
        return x.with_codes(np.pad(x.codes, width, constant_values=int(round(code_f))).astype(x.codes.dtype))

    # ------------------------------------------------------------------ compute ops (pending requant)

    def _op_Conv(self, node: _Node, env: dict, ins: list[str]) -> _Pending:
        a = node.attrs
        x, w = self._q(env, ins[0], node), self._q(env, ins[1], node)
        _per_tensor_activation(x, node)
        if not w.per_tensor and w.axis != 0:
            raise UnsupportedLayerError(f"Conv '{node.proto.name}': per-channel weights must use axis 0.")
        kernel = list(w.codes.shape[2:])
        nd = len(kernel)
        strides = list(a.get("strides", [1] * nd))
        dil = list(a.get("dilations", [1] * nd))
        pads = K.onnx_pads(_s(a.get("auto_pad", "NOTSET")), x.codes.shape[2:], kernel, strides, dil, a.get("pads"))
        acc = K.conv_integer(K.centered(x.codes, x.zero_point), K.centered(w.codes, w.zero_point, 0),
                             strides, pads, dil, int(a.get("group", 1)))
        acc = acc + self._bias(env, ins, node, acc.shape[1], channel_axis=1, ndim=acc.ndim)
        return self._linear_pending(node, acc, x, w, channel_axis=1)

    def _op_MatMul(self, node: _Node, env: dict, ins: list[str]) -> _Pending:
        x, w = self._q(env, ins[0], node), self._q(env, ins[1], node)
        _per_tensor_activation(x, node)
        if not w.per_tensor and w.axis != w.codes.ndim - 1:
            raise UnsupportedLayerError(f"MatMul '{node.proto.name}': per-channel B must be per column (last axis).")
        acc = K.matmul_integer(K.centered(x.codes, x.zero_point), K.centered(w.codes, w.zero_point, w.axis))
        return self._linear_pending(node, acc, x, w, channel_axis=acc.ndim - 1)

    def _op_Gemm(self, node: _Node, env: dict, ins: list[str]) -> _Pending:
        a = node.attrs
        x, w = self._q(env, ins[0], node), self._q(env, ins[1], node)
        _per_tensor_activation(x, node)
        alpha = float(a.get("alpha", 1.0))
        if len(ins) > 2 and ins[2] and (float(a.get("beta", 1.0)) != 1.0 or alpha != 1.0):
            # Y = alpha * A B + beta * C: one int32 accumulator cannot hold alpha * acc + bias, and ORT does
            # not fuse this Gemm into QGemm either (it runs it in float)
            raise UnsupportedLayerError(
                f"Gemm '{node.proto.name}' with a bias and alpha != 1 or beta != 1 is not supported; fold alpha "
                "into the weight scale and beta into the bias scale (export with alpha = beta = 1)."
            )
        trans_b = int(a.get("transB", 0))
        if not w.per_tensor and w.axis != (0 if trans_b else 1):
            raise UnsupportedLayerError(f"Gemm '{node.proto.name}': per-channel B must be per output column.")
        xa = K.centered(x.codes, x.zero_point)
        wb = K.centered(w.codes, w.zero_point, w.axis)
        if int(a.get("transA", 0)):
            xa = xa.T
        if trans_b:
            wb = wb.T
        acc = K.matmul_integer(xa, wb)
        acc = acc + self._bias(env, ins, node, acc.shape[1], channel_axis=1, ndim=2)
        return self._linear_pending(node, acc, x, w, channel_axis=1, alpha=alpha)

    def _bias(self, env: dict, ins: list[str], node: _Node, channels: int, channel_axis: int, ndim: int) -> torch.Tensor:
        if len(ins) < 3 or not ins[2]:
            return torch.zeros((), dtype=torch.int64)
        b = self._q(env, ins[2], node)
        if b.codes.dtype != np.int32:
            raise UnsupportedLayerError(
                f"{node.proto.op_type} '{node.proto.name}' bias must be int32 codes (scale s_x*s_w, zero point 0)."
            )
        if np.any(b.zero_point != 0):
            raise UnsupportedLayerError(f"{node.proto.op_type} '{node.proto.name}' bias zero point must be 0.")
        bias = torch.from_numpy(b.codes.astype(np.int64)).reshape(-1)
        if bias.numel() not in (1, channels):
            raise ShapeMismatchError(f"bias of '{node.proto.name}' has {bias.numel()} values for {channels} channels.")
        shape = [1] * ndim
        shape[channel_axis] = -1
        return bias.reshape(shape)

    def _linear_pending(self, node: _Node, acc: torch.Tensor, x: QTensor, w: QTensor, channel_axis: int,
                        alpha: float = 1.0) -> _Pending:
        def requant(s_y: np.float32, z_y: int, dtype, mode: str) -> np.ndarray:
            shape = [1] * acc.ndim
            shape[channel_axis] = -1
            if mode == "float":
                if alpha != 1.0:  # QGemm: f32(alpha * s_a * s_b) / s_y
                    scale = (np.float32(alpha) * np.float32(x.scale) * w.scale) / s_y
                else:
                    scale = ortn.output_scale(x.scale, w.scale, s_y)
                scale = scale.reshape(shape) if scale.size > 1 else scale
                return ortn.requantize_output(acc.numpy(), scale, z_y, dtype)
            m = abs(alpha) * np.float64(x.scale) * w.scale.astype(np.float64) / np.float64(s_y)
            m = torch.from_numpy(np.asarray(m, dtype=np.float64))
            return _fixed(acc, m.reshape(shape) if m.numel() > 1 else m, z_y, dtype, negate=alpha < 0)

        return _Pending(node.proto.op_type, node.proto.name, requant)

    def _op_Add(self, node: _Node, env: dict, ins: list[str]) -> _Pending:
        a, b = self._q(env, ins[0], node), self._q(env, ins[1], node)
        _per_tensor_activation(a, node)
        _per_tensor_activation(b, node)

        def requant(s_y: np.float32, z_y: int, dtype, mode: str) -> np.ndarray:
            if mode == "float":
                return ortn.qlinear_add(a.codes, a.scale, int(a.zero_point), b.codes, b.scale, int(b.zero_point),
                                        s_y, z_y, dtype)
            # TFLite's int8 Add: both inputs to a common scale 2*max(s_a, s_b) with 20 extra bits.
            twice_max = 2.0 * max(float(a.scale), float(b.scale))
            ta = torch.from_numpy(a.codes.astype(np.int64) - int(a.zero_point)) * (1 << 20)
            tb = torch.from_numpy(b.codes.astype(np.int64) - int(b.zero_point)) * (1 << 20)
            ra = multiply_by_quantized_multiplier(ta, quantize_multiplier(float(a.scale) / twice_max))
            rb = multiply_by_quantized_multiplier(tb, quantize_multiplier(float(b.scale) / twice_max))
            total = ra + rb
            m_out = torch.tensor(twice_max / ((1 << 20) * float(s_y)), dtype=torch.float64)
            return _fixed(total, m_out, z_y, dtype)

        return _Pending("Add", node.proto.name, requant)

    def _op_GlobalAveragePool(self, node: _Node, env: dict, ins: list[str]) -> _Pending:
        x = self._q(env, ins[0], node)
        _per_tensor_activation(x, node)
        spatial = tuple(range(2, x.codes.ndim))
        n = int(np.prod(x.codes.shape[2:]))
        acc = torch.from_numpy(x.codes.astype(np.int64).sum(axis=spatial, keepdims=True) - int(x.zero_point) * n)

        def requant(s_y: np.float32, z_y: int, dtype, mode: str) -> np.ndarray:
            if mode == "float":
                return ortn.requantize_output(acc.numpy(), ortn.global_average_pool_scale(x.scale, s_y, n), z_y, dtype)
            m = torch.tensor(np.float64(x.scale) / (np.float64(s_y) * n), dtype=torch.float64)
            return _fixed(acc, m, z_y, dtype)

        return _Pending("GlobalAveragePool", node.proto.name, requant)

    def _op_AveragePool(self, node: _Node, env: dict, ins: list[str]) -> _Pending:
        a = node.attrs
        x = self._q(env, ins[0], node)
        _per_tensor_activation(x, node)
        kernel = list(a["kernel_shape"])
        nd = len(kernel)
        strides = list(a.get("strides", [1] * nd))
        if any(d != 1 for d in a.get("dilations", [1] * nd)):
            raise UnsupportedLayerError(f"AveragePool '{node.proto.name}' with dilations is not supported.")
        pads = K.onnx_pads(_s(a.get("auto_pad", "NOTSET")), x.codes.shape[2:], kernel, strides, [1] * nd, a.get("pads"))
        ceil_mode, include_pad = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))
        counts = K.pool_counts(x.codes.shape[2:], kernel, strides, pads, ceil_mode, include_pad)

        def requant(s_y: np.float32, z_y: int, dtype, mode: str) -> np.ndarray:
            if mode == "float":
                # QLinearAveragePool: float32 sum of s_x * (q - z_x), / count, then rint(y / s_y + z_y).
                sums = K.float32_window_sum(x.dequantize(), kernel, strides, pads, ceil_mode)
                y = sums / counts.astype(np.float32)
                v = (y / s_y + np.float32(z_y)).astype(np.float32)
                qmin, qmax = ortn.qrange(dtype)
                return np.clip(np.rint(v), qmin, qmax).astype(dtype)
            centred = torch.from_numpy(x.codes.astype(np.float64) - int(x.zero_point))
            acc = torch.round(K.sum_pool(centred, kernel, strides, pads, ceil_mode)).to(torch.int64)
            m = torch.from_numpy(np.float64(x.scale) / (np.float64(s_y) * counts.astype(np.float64)))
            return _fixed(acc, m, z_y, dtype)

        return _Pending("AveragePool", node.proto.name, requant)

    def _op_Concat(self, node: _Node, env: dict, ins: list[str]) -> _Pending:
        parts = [self._q(env, n, node) for n in ins]
        for p in parts:
            _per_tensor_activation(p, node)
        axis = int(node.attrs["axis"])

        def requant(s_y: np.float32, z_y: int, dtype, mode: str) -> np.ndarray:
            return np.concatenate([self._requant_qtensor(p, s_y, z_y, dtype, mode) for p in parts], axis=axis)

        return _Pending("Concat", node.proto.name, requant)

    def _op_Clip(self, node: _Node, env: dict, ins: list[str]) -> _Pending:
        x = self._q(env, ins[0], node)
        _per_tensor_activation(x, node)
        lo = self._const(env, ins[1]) if len(ins) > 1 else None
        hi = self._const(env, ins[2]) if len(ins) > 2 else None
        lo = node.attrs.get("min") if lo is None else lo
        hi = node.attrs.get("max") if hi is None else hi

        def requant(s_y: np.float32, z_y: int, dtype, mode: str) -> np.ndarray:
            if mode == "float":  # DQ -> Clip -> Q in float32, as ORT runs an unfused Clip
                v = x.dequantize()
                v = np.clip(v, np.float32(lo) if lo is not None else None, np.float32(hi) if hi is not None else None)
                return ortn.quantize_linear(v, s_y, z_y, dtype)
            c = x.codes.astype(np.int64)
            z, s = int(x.zero_point), np.float64(x.scale)
            qlo = int(np.ceil(np.float64(lo) / s)) + z if lo is not None else None
            qhi = int(np.floor(np.float64(hi) / s)) + z if hi is not None else None
            return self._requant_qtensor(x.with_codes(np.clip(c, qlo, qhi)), s_y, z_y, dtype, mode)

        return _Pending("Clip", node.proto.name, requant)


def _along(v: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis or 0] = -1
    return v.reshape(shape)


def _per_tensor_activation(x: QTensor, node: _Node) -> None:
    if not x.per_tensor:
        raise UnsupportedLayerError(
            f"{node.proto.op_type} '{node.proto.name}': activations must be quantized per tensor "
            "(per-channel scales are supported for weights only)."
        )


def _scale_of(node: _Node, value: np.ndarray) -> np.ndarray:
    """A QuantizeLinear / DequantizeLinear scale as float32, ConfigError unless every entry is finite and > 0
    (a zero scale divides by zero in QuantizeLinear; ORT saturates silently)."""
    scale = np.asarray(value, dtype=np.float32)
    if scale.size == 0 or not bool(np.all(np.isfinite(scale) & (scale > 0))):
        raise ConfigError(
            f"{node.proto.op_type} '{node.proto.name}' has scale {scale.reshape(-1)[:8].tolist()}; quantization "
            "scales must be finite and > 0 - re-export the model from calibrated quantizers."
        )
    return scale


def _fixed(acc: torch.Tensor, m: torch.Tensor, z: int, dtype, negate: bool = False) -> np.ndarray:
    """``clamp(z + round(wrap_int32(acc) * M))`` (``-M`` with ``negate``) with the fixed-point multiplier."""
    qmin, qmax = ortn.qrange(dtype)
    acc32 = acc.to(torch.int64).to(torch.int32).to(torch.int64)
    if negate:  # -(-2^31) saturates, as the float path's -2^31 * M > 0 does
        acc32 = torch.clamp(-acc32, max=2**31 - 1)
    out = multiply_by_quantized_multiplier(acc32, quantize_multiplier(m)) + int(z)
    return torch.clamp(out, qmin, qmax).numpy().astype(dtype)


def _other(mode: str) -> RequantMode:
    return "fixed_point" if mode == "float" else "float"


def compare_requant_modes(
    model: onnx.ModelProto | str | Path, feeds: Mapping[str, np.ndarray], compounded: bool = False
) -> RequantComparison:
    """Count, for every QuantizeLinear output, the codes where ``fixed_point`` and ``float`` requantization
    differ, and the largest difference in steps.

    ``compounded=False`` (default): each operator sees the same (float-mode) inputs, so the figure is the
    per-op rounding gap, at most one step. ``compounded=True``: two separate end-to-end runs, where the
    gaps propagate through the network.
    """
    if compounded:
        _, a = IntegerRuntime(model, "float").run_with_intermediates(feeds)
        _, b = IntegerRuntime(model, "fixed_point").run_with_intermediates(feeds)
    else:
        rt = IntegerRuntime(model, "float")
        rt._shadow = {}
        try:
            _, a = rt.run_with_intermediates(feeds)
            b = {k: rt._shadow.get(k, v) for k, v in a.items()}
        finally:
            rt._shadow = None
    differing, total, worst = {}, {}, {}
    for name in a:
        d = np.abs(a[name].astype(np.int64) - b[name].astype(np.int64))
        differing[name], total[name], worst[name] = int((d > 0).sum()), int(d.size), int(d.max(initial=0))
    return RequantComparison(differing, total, worst)
