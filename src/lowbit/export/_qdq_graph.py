"""ONNX graph rewrite: ``lowbit`` placeholder nodes -> standard QuantizeLinear / DequantizeLinear.

The exporter (:mod:`.onnx_qdq`) traces the model with every active :class:`~lowbit.nn.TensorQuantizer`
replaced by one placeholder node in the ``lowbit`` domain that carries the quantizer's index. This pass
turns each placeholder into the QDQ form ONNX Runtime fuses into integer kernels:

* static activation: ``x -> QuantizeLinear(s, z) -> DequantizeLinear(s, z)``;
* dynamic activation (uint8, per tensor): ``x -> DynamicQuantizeLinear -> DequantizeLinear``;
* weight: the codes ``clamp(round(w / s) + z)`` computed by :func:`lowbit.ops.quantize` (so they are the
  very codes the simulation uses) stored as an integer initializer ``-> DequantizeLinear`` (``axis`` for
  per-channel, ``axis`` + ``block_size`` for per-group, ONNX opset 21 blocked quantization);
* bias of Conv / ConvTranspose / Gemm whose input and weight are both dequantized from constant scales:
  ``int32 round(b / (s_x * s_w))`` with scale ``s_x * s_w`` and zero point 0 ``-> DequantizeLinear``
  (the layout ORT's QDQ fusion and every int8 backend expect), computed by
  :func:`lowbit.nn.bias.int32_bias`, the formula the simulation adds too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..errors import ExportError
from ..granularity import PerChannel, PerGroup, PerTensor, PerToken
from ..nn.bias import Int32Bias, int32_bias, rerounded_weight_codes
from ..ops import quantize
from ..spec import QuantSpec
from ._simplify import pad_fills_with_zero

DOMAIN = "lowbit"
log = logging.getLogger("lowbit")

# lowbit format name -> (ONNX element type, lowest opset whose QuantizeLinear/DequantizeLinear take it)
ONNX_TYPES: dict[str, tuple[int, int]] = {
    "int8": (TensorProto.INT8, 13),
    "uint8": (TensorProto.UINT8, 13),
    "int8_narrow": (TensorProto.INT8, 13),
    "int16": (TensorProto.INT16, 21),
    "uint16": (TensorProto.UINT16, 21),
    "int16_narrow": (TensorProto.INT16, 21),
    "int4": (TensorProto.INT4, 21),
    "uint4": (TensorProto.UINT4, 21),
    "int4_narrow": (TensorProto.INT4, 21),
    "fp8_e4m3": (TensorProto.FLOAT8E4M3FN, 19),
    "fp8_e5m2": (TensorProto.FLOAT8E5M2, 19),
}
_NUMPY = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
          TensorProto.UINT16: np.uint16}


@dataclass(frozen=True)
class QEntry:
    """One quantizer as the exporter sees it: ``role`` is ``"activation"``, ``"dynamic"`` or ``"weight"``;
    ``weight`` is the float weight (role ``"weight"`` only)."""

    name: str
    spec: QuantSpec
    scale: torch.Tensor
    zero_point: torch.Tensor
    role: str
    weight: torch.Tensor | None = None


def required_opset(entry: QEntry) -> int:
    """Lowest opset that can express ``entry``; raises :class:`ExportError` naming it when none can."""
    spec = entry.spec
    fmt = spec.format.name
    g = spec.granularity
    if fmt not in ONNX_TYPES:
        raise ExportError(
            f"{entry.name}: format {fmt} has no ONNX QuantizeLinear/DequantizeLinear type (ONNX has int8, uint8, "
            "int16, uint16, int4, uint4, float8 e4m3fn/e5m2); keep this layer float (exclude=) or use one of those."
        )
    if spec.rounding != "nearest":
        raise ExportError(
            f"{entry.name}: rounding {spec.rounding!r} has no ONNX equivalent (QuantizeLinear rounds half to "
            "even); use rounding='nearest' for a deployable model."
        )
    opset = ONNX_TYPES[fmt][1]
    if entry.role == "weight":
        if isinstance(g, PerGroup):
            opset = max(opset, 21)
        elif isinstance(g, PerToken):
            raise ExportError(f"{entry.name}: per-token weight quantization cannot be exported; use per-channel.")
        return opset
    if entry.role == "dynamic":
        if fmt != "uint8" or spec.symmetric or not isinstance(g, PerTensor):
            raise ExportError(
                f"{entry.name}: ONNX DynamicQuantizeLinear is uint8, affine, per tensor; this layer's dynamic input "
                f"spec is {spec}. Use W8A8Dynamic(act_dtype='uint8', granularity='tensor') to export it."
            )
        return opset
    if not isinstance(g, PerTensor):
        raise ExportError(
            f"{entry.name}: activation granularity {g} cannot be exported (the QDQ activations ONNX Runtime "
            "fuses are per tensor); use a per-tensor activation spec."
        )
    if spec.format.name.endswith("_narrow"):
        raise ExportError(f"{entry.name}: a narrow-range activation format cannot be expressed by QuantizeLinear.")
    return opset


def _const(name: str, onnx_type: int, values: np.ndarray) -> onnx.TensorProto:
    if onnx_type in _NUMPY:
        return numpy_helper.from_array(np.asarray(values).astype(_NUMPY[onnx_type]), name)
    if onnx_type == TensorProto.FLOAT:
        return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)
    if onnx_type == TensorProto.INT32:
        return numpy_helper.from_array(np.asarray(values, dtype=np.int32), name)
    arr = np.asarray(values)
    return helper.make_tensor(name, onnx_type, list(arr.shape), arr.flatten().tolist())


def _axis_attrs(spec: QuantSpec, ndim: int) -> dict:
    g = spec.granularity
    if isinstance(g, PerChannel):
        return {"axis": g.axis % ndim}
    if isinstance(g, PerGroup):
        return {"axis": g.axis % ndim, "block_size": g.group_size}
    return {}


def _zero_point(entry: QEntry) -> np.ndarray:
    if entry.spec.format.is_integer and not entry.spec.symmetric:
        return entry.zero_point.detach().cpu().numpy()
    return np.zeros(tuple(entry.scale.shape), dtype=np.float32 if not entry.spec.format.is_integer else np.int64)


def _weight_codes(entry: QEntry) -> np.ndarray:
    w = entry.weight.detach().float().cpu()
    spec = entry.spec
    scale, zp = entry.scale.detach().cpu(), entry.zero_point.detach().cpu()
    if spec.format.is_integer:
        return quantize(w, scale, zp, spec).numpy()
    from ..ops import _blocks  # the format rounds the scaled values itself; ONNX stores the value

    xb, s, _ = _blocks(w, scale, None, spec.granularity)
    return spec.format.round(xb / s).reshape(w.shape).numpy().astype(np.float32)


def materialize(model: onnx.ModelProto, entries: list[QEntry]) -> None:
    """Replace every ``lowbit`` placeholder node in ``model`` (in place) by its QDQ form."""
    graph = model.graph
    new_nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    for node in graph.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        key = next(a.i for a in node.attribute if a.name == "key")
        e = entries[key]
        base = f"lowbit_q{key}"
        out = node.output[0]
        if e.role == "dynamic":
            q, s, z = f"{base}_codes", f"{base}_scale", f"{base}_zero_point"
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [node.input[0]], [q, s, z], name=f"{base}_dq_dyn"))
            new_nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [out], name=f"{base}_dequant"))
            continue
        onnx_type = ONNX_TYPES[e.spec.format.name][0]
        s_name, z_name = f"{base}_scale", f"{base}_zero_point"
        inits.append(_const(s_name, TensorProto.FLOAT, e.scale.detach().float().cpu().numpy()))
        inits.append(_const(z_name, onnx_type, _zero_point(e)))
        if e.role == "weight":
            codes = f"{base}_codes"
            inits.append(_const(codes, onnx_type, _weight_codes(e)))
            attrs = _axis_attrs(e.spec, e.weight.dim())
            new_nodes.append(helper.make_node("DequantizeLinear", [codes, s_name, z_name], [out], name=f"{base}_dequant", **attrs))
        else:
            q = f"{base}_codes"
            new_nodes.append(helper.make_node("QuantizeLinear", [node.input[0], s_name, z_name], [q], name=f"{base}_quant"))
            new_nodes.append(helper.make_node("DequantizeLinear", [q, s_name, z_name], [out], name=f"{base}_dequant"))
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(inits)


def _init_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _int32_bias(inits: dict[str, onnx.TensorProto], dq_w: onnx.NodeProto, bias: np.ndarray, s_x: np.ndarray,
                layer: str) -> Int32Bias | None:
    """The int32 bias of one Conv/Gemm by :func:`lowbit.nn.bias.int32_bias` (the formula the simulation
    uses too), or None (bias stays float, logged). Where a channel with near-zero weights had to get a
    raised weight scale to fit int32 (a dead ReLU6 channel of EfficientNet-Lite0 would otherwise make ORT's
    int32 accumulator wrap around and output 6), its weight codes and scale initializers are rewritten."""
    codes_t, scale_t = inits[dq_w.input[0]], inits[dq_w.input[1]]
    s_w = numpy_helper.to_array(scale_t).astype(np.float32)
    codes = numpy_helper.to_array(codes_t)
    zp = numpy_helper.to_array(inits[dq_w.input[2]]) if len(dq_w.input) > 2 and dq_w.input[2] in inits else None
    axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1) % max(codes.ndim, 1) if s_w.size > 1 else 0
    fan_in = codes.size // max(bias.size, 1)
    res = int32_bias(torch.from_numpy(bias), torch.from_numpy(s_x), torch.from_numpy(s_w), fan_in,
                     None if zp is None else torch.from_numpy(zp.astype(np.int64)), axis)
    if res is None:
        log.warning("lowbit: %s: the bias does not fit int32 at scale s_x*s_w; it stays float (no integer kernel).", layer)
        return None
    if res.raised is not None:
        new_codes = rerounded_weight_codes(torch.from_numpy(np.array(codes)), torch.from_numpy(s_w), res.weight_scale,
                                           res.raised, codes.dtype == np.int8).numpy()
        shape = (-1,) + (1,) * (codes.ndim - 1)
        change = np.abs(new_codes.astype(np.float64) * res.weight_scale.double().numpy().reshape(shape)
                        - codes.astype(np.float64) * s_w.astype(np.float64).reshape(shape)).max()
        log.warning("lowbit: %s: %d output channel(s) with near-zero weights had a bias beyond int32 at scale s_x*s_w; "
                    "their weight scale was raised to fit (max weight change %.3g).", layer, int(res.raised.sum()),
                    float(change))
        codes_t.CopyFrom(numpy_helper.from_array(new_codes, codes_t.name))
        scale_t.CopyFrom(numpy_helper.from_array(res.weight_scale.numpy(), scale_t.name))
    return res


def quantize_biases(model: onnx.ModelProto) -> int:
    """Rewrite the float bias of every Conv / ConvTranspose / Gemm fed by two constant-scale
    DequantizeLinear nodes (int8/uint8 input, per-tensor or per-channel weight) as an int32 initializer
    at scale ``s_x * s_w`` with zero point 0 -> DequantizeLinear. Returns how many were rewritten."""
    graph = model.graph
    inits = _init_map(graph)
    producer = {o: n for n in graph.node for o in n.output}
    added_nodes: list[tuple[int, onnx.NodeProto]] = []
    count = 0
    for idx, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        b_name = node.input[2]
        if b_name not in inits or inits[b_name].data_type != TensorProto.FLOAT:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        if dq_w.input[0] not in inits or dq_x.input[1] not in inits or dq_w.input[1] not in inits:
            continue
        if any(a.name == "block_size" for a in dq_w.attribute):
            continue
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            continue
        x_type = inits[dq_x.input[2]].data_type if len(dq_x.input) > 2 and dq_x.input[2] in inits else None
        w_type = inits[dq_w.input[0]].data_type
        if x_type not in (TensorProto.INT8, TensorProto.UINT8) or w_type not in (TensorProto.INT8, TensorProto.UINT8):
            continue
        s_x = numpy_helper.to_array(inits[dq_x.input[1]]).astype(np.float32)
        if s_x.size != 1:
            continue
        bias = numpy_helper.to_array(inits[b_name]).astype(np.float32)
        res = _int32_bias(inits, dq_w, bias, s_x, node.name or node.output[0])
        if res is None:
            continue
        q, s_b = res.codes.numpy(), res.scale.numpy()
        base = f"{node.name or node.output[0]}_bias".replace("/", "_")
        graph.initializer.extend([
            _const(f"{base}_codes", TensorProto.INT32, q),
            _const(f"{base}_scale", TensorProto.FLOAT, s_b),
            _const(f"{base}_zero_point", TensorProto.INT32, np.zeros(s_b.shape, np.int32)),
        ])
        attrs = {"axis": 0} if s_b.ndim == 1 else {}
        dq = helper.make_node("DequantizeLinear", [f"{base}_codes", f"{base}_scale", f"{base}_zero_point"],
                              [f"{base}_dequant"], name=f"{base}_dequant", **attrs)
        added_nodes.append((idx, dq))
        node.input[2] = f"{base}_dequant"
        count += 1
    for offset, (idx, dq) in enumerate(added_nodes):
        graph.node.insert(idx + offset, dq)
    return count


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    """Drop initializers no node reads (the float weights the placeholders replaced)."""
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def set_opset(model: onnx.ModelProto, opset: int) -> None:
    """Use ``opset`` for the default domain and drop the ``lowbit`` placeholder domain."""
    keep = [o for o in model.opset_import if o.domain not in ("", "ai.onnx", DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", opset), *keep])


def _rename_inputs(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new


def remove_noop_casts(model: onnx.ModelProto) -> int:
    """Drop ``Cast`` nodes whose input already has the target type (the tracer leaves ``x.float()`` of a
    float tensor as a Cast, which would sit between an op and its QuantizeLinear and block ORT's fusion)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    outputs = {o.name for o in model.graph.output}
    drop = []
    for n in model.graph.node:
        if n.op_type != "Cast" or n.output[0] in outputs:
            continue
        to = next(a.i for a in n.attribute if a.name == "to")
        if types.get(n.input[0]) == to:
            drop.append(n)
    for n in drop:
        model.graph.node.remove(n)
        _rename_inputs(model.graph, n.output[0], n.input[0])
    return len(drop)


# ops through which a per-tensor quantized value stays on the same grid (exactly): re-quantizing their
# output with the same scale and zero point changes nothing.
_GRID_PRESERVING = {"MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity"}


def _keeps_grid(node: onnx.NodeProto, graph: onnx.GraphProto) -> bool:
    return node.op_type in _GRID_PRESERVING or pad_fills_with_zero(node, graph)


# op -> the inputs that get their own Q/DQ (None: all of them)
_REQUANT_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Conv": (0,), "ConvTranspose": (0,), "Gemm": (0,), "MatMul": (0, 1), "Add": (0, 1), "Mul": (0, 1),
    "Concat": None, "GlobalAveragePool": (0,), "AveragePool": (0,),
}


def requantize_compute_inputs(model: onnx.ModelProto) -> int:
    """Give every Conv / Gemm / MatMul / Add / Concat / pooling input that reaches a per-tensor DequantizeLinear only through
    grid-preserving ops (MaxPool, Flatten, Reshape, zero Pad ...) its own ``QuantizeLinear -> DequantizeLinear``
    with the same scale and zero point. Exact (the values are already on that grid), and it makes the
    op's input a DQ, which ORT's QDQ fusion and the int32 bias rewrite need. Returns the count."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    count = 0
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type in _REQUANT_INPUTS:
            for k in _REQUANT_INPUTS[node.op_type] or range(len(node.input)):
                if k >= len(node.input) or not node.input[k]:
                    continue
                src = producer.get(node.input[k])
                if src is None or not _keeps_grid(src, graph):
                    continue
                cur = src
                while cur is not None and _keeps_grid(cur, graph):
                    cur = producer.get(cur.input[0])
                if cur is None or cur.op_type != "DequantizeLinear" or any(a.name == "axis" for a in cur.attribute):
                    continue
                if not all(i in inits for i in cur.input[1:]):
                    continue
                base = f"lowbit_rq{count}"
                s, z = cur.input[1], cur.input[2] if len(cur.input) > 2 else ""
                new_nodes.append(helper.make_node("QuantizeLinear", [node.input[k], s, z], [f"{base}_codes"], name=f"{base}_quant"))
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_codes", s, z], [f"{base}_out"], name=f"{base}_dequant"))
                node.input[k] = f"{base}_out"
                count += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return count


def resolve_identity_initializers(model: onnx.ModelProto) -> None:
    """Replace ``Identity(initializer)`` outputs (the tracer's deduplicated equal parameters) by copies of the
    initializer, so each Conv/Gemm owns its bias."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    for n in list(graph.node):
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            graph.initializer.append(t)
            graph.node.remove(n)
