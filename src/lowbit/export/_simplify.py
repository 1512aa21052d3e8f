"""Exact ONNX graph simplifications that let QDQ fusion (ONNX Runtime) and the integer runtime see the
``DequantizeLinear -> op -> QuantizeLinear`` pattern in real models.

The TorchScript tracer leaves shape arithmetic in the graph (``nn.ZeroPad2d`` becomes a ``Pad`` whose pads
come from ``ConstantOfShape -> Concat -> Slice -> Transpose -> Reshape``; ``x.view(x.size(0), -1)`` becomes
``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``), and activation functions such as ReLU6 sit between
a convolution and its QuantizeLinear. Every pass here leaves the model's outputs bit-identical:

* :func:`fold_constants`: nodes whose inputs are all constants are evaluated once (ONNX reference
  evaluator) and replaced by initializers; Q/DQ nodes are kept (they carry the quantization).
* :func:`batch_reshape_to_constant`: ``Reshape(t, Concat(Unsqueeze(Gather(Shape(u), 0)), rest))`` becomes
  ``Reshape(t, [0, *rest])`` when shape inference proves ``t`` and ``u`` have the same dimension 0.
* :func:`quantize_before_pad`: ``Pad(x, value 0) -> QuantizeLinear`` becomes ``QuantizeLinear -> DQ -> Pad``
  (``Q(0) = z`` exactly, so padding the codes with the zero point is the same thing).
* :func:`drop_clamp_before_quantize`: ``Clip(lo, hi) -> QuantizeLinear`` (or ``Relu``, ``Clip(0, +inf)``)
  loses the Clip when the quantizer already saturates there (``Q(lo) = qmin`` and ``Q(hi) = qmax``, Q is
  monotone): the ReLU6 and ReLU cases.
* :func:`clamp_to_max_min_before_wide_quantize`: ``Relu`` / ``Clip -> QuantizeLinear`` whose zero point is
  not int8/uint8 (int16, int4, fp8 ...) becomes ``Max`` / ``Min(Max)`` (the same values): ONNX Runtime drops
  such a Relu as if the zero point were the type's minimum, and fails to load such a Clip.
* :func:`fold_static_shapes`: the shape arithmetic a traced transformer repeats in every layer
  (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``) is evaluated from the shapes ONNX shape inference
  proves; only values that do not depend on a symbolic (dynamic) dimension become constants, and a Reshape
  target whose only unknown entries are the input's own symbolic dimensions gets 0 there ("copy").
* :func:`remove_dead_nodes`: nodes none of whose outputs reach a graph output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

_KEEP = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_NP_QRANGE = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127)}


def consumers(graph: onnx.GraphProto | list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    """``{tensor name: nodes that read it}`` of a graph or a node list (a node reading a tensor twice is
    listed twice)."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node if isinstance(graph, onnx.GraphProto) else graph:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def producers(nodes: list[onnx.NodeProto]) -> dict[str, onnx.NodeProto]:
    """``{tensor name: the node that writes it}`` of a node list."""
    return {o: n for n in nodes for o in n.output}


def position(nodes: list[onnx.NodeProto], node: onnx.NodeProto) -> int:
    """Index of ``node`` itself (the same Python object) in ``nodes``. ``list.index`` compares protobuf
    messages by value, so it would find an equal copy or fail on a renamed node."""
    return next(i for i, n in enumerate(nodes) if n is node)


def write_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Make ``nodes`` the graph's node list. The repeated field stores *copies*: every node object taken
    from the graph before (in ``nodes``, a producer or consumer map) is detached afterwards, and editing
    it no longer changes the graph. So a rewrite edits a plain list of the graph's nodes and writes it once,
    at the end."""
    del graph.node[:]
    graph.node.extend(nodes)


def drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the ``value_info`` of the tensors ``names`` (a rewrite changed their shape: ONNX Runtime would
    warn "Error merging shape info" on loading and shape inference in strict mode would fail; the runtime
    infers the right shape without it)."""
    keep = [v for v in graph.value_info if v.name not in names]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)


def splice_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto], insert_before: dict[int, list[onnx.NodeProto]],
                 drop: set[int]) -> None:
    """Rewrite the graph's node list from ``nodes`` (the graph's nodes, the same Python objects the ``id()``
    keys were taken from: keep them referenced): ``insert_before[id(n)]`` goes in just before ``n``, and
    ``n`` itself is left out when ``id(n)`` is in ``drop``. Order is otherwise kept (topological if the
    inserted nodes only read tensors that exist at ``n``)."""
    out: list[onnx.NodeProto] = []
    for n in nodes:
        out += insert_before.get(id(n), [])
        if id(n) not in drop:
            out.append(n)
    write_nodes(model.graph, out)


def remove_orphan_value_info(model: onnx.ModelProto) -> int:
    """Drop the ``value_info`` of tensors no node writes any more (removed or renamed by a rewrite).
    Returns the count."""
    graph = model.graph
    produced = {o for n in graph.node for o in n.output}
    orphans = {v.name for v in graph.value_info if v.name not in produced}
    drop_value_info(graph, orphans)
    return len(orphans)


def fold_constants(model: onnx.ModelProto, max_elements: int = 1 << 16) -> int:
    """Evaluate every node whose inputs are all constant (initializers or ``Constant`` outputs) and store
    its outputs as initializers; Q/DQ nodes and results above ``max_elements`` values are left as they are.
    Returns the number of nodes folded."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep_nodes, new_inits, folded = [], [], 0
    for node in graph.node:
        ins = [i for i in node.input if i]
        foldable = (node.domain in ("", "ai.onnx") and node.op_type not in _KEEP
                    and all(i in known for i in ins) and not any(o in outputs for o in node.output))
        if foldable:
            try:
                values = ReferenceEvaluator(node).run(None, {i: known[i] for i in ins})
            except Exception:  # an op the reference evaluator lacks: leave it for the runtime
                values = None
            if values is not None and all(np.asarray(v).size <= max_elements for v in values):
                for name, v in zip(node.output, values):
                    known[name] = np.asarray(v)
                    new_inits.append(numpy_helper.from_array(np.asarray(v), name))
                folded += 1
                continue
        keep_nodes.append(node)
    del graph.node[:]
    graph.node.extend(keep_nodes)
    graph.initializer.extend(new_inits)
    return folded


def _dim0(vi: dict[str, onnx.ValueInfoProto], name: str) -> tuple[str, object] | None:
    v = vi.get(name)
    if v is None or not v.type.tensor_type.HasField("shape") or not v.type.tensor_type.shape.dim:
        return None
    d = v.type.tensor_type.shape.dim[0]
    if d.HasField("dim_param") and d.dim_param:
        return ("param", d.dim_param)
    if d.HasField("dim_value"):
        return ("value", d.dim_value)
    return None


def batch_reshape_to_constant(model: onnx.ModelProto) -> int:
    """Replace the traced ``x.view(x.size(0), ...)`` shape computation by the constant ``[0, ...]``
    (ONNX Reshape copies a 0 from the input) where shape inference shows the reshaped tensor has the
    same dimension 0 as the tensor whose ``Shape`` was taken. Returns the number of Reshapes rewritten."""
    graph = model.graph
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]  # the tracer's value_info names its own symbolic dims per tensor
    inferred = onnx.shape_inference.infer_shapes(bare).graph
    vi = {v.name: v for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    count = 0
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in inits:
            continue
        cat = producer.get(node.input[1])
        if cat is None or cat.op_type != "Concat" or len(cat.input) < 2:
            continue
        uns = producer.get(cat.input[0])
        gat = producer.get(uns.input[0]) if uns is not None and uns.op_type == "Unsqueeze" else None
        shp = producer.get(gat.input[0]) if gat is not None and gat.op_type == "Gather" else None
        if shp is None or shp.op_type != "Shape" or gat.input[1] not in inits:
            continue
        if int(numpy_helper.to_array(inits[gat.input[1]]).reshape(())) != 0:
            continue
        rest = [numpy_helper.to_array(inits[i]).reshape(-1) for i in cat.input[1:] if i in inits]
        if len(rest) != len(cat.input) - 1:
            continue
        a, b = _dim0(vi, node.input[0]), _dim0(vi, shp.input[0])
        if a is None or a != b:
            continue
        name = f"{node.name or node.output[0]}_shape".replace("/", "_")
        graph.initializer.append(numpy_helper.from_array(np.concatenate([[0], *rest]).astype(np.int64), name))
        node.input[1] = name
        count += 1
    return count


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes none of whose outputs is (transitively) used by a graph output. Returns the count."""
    graph = model.graph
    live = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(i for i in node.input if i)
    removed = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    return removed


def _pad_is_zero_constant(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A constant-mode Pad whose fill value is 0 and whose pads are an initializer."""
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    if mode not in (b"constant", "constant") or len(node.input) < 2 or node.input[1] not in inits:
        return False
    if len(node.input) > 3 and node.input[3]:  # axes
        return False
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in inits:
            return False
        return float(numpy_helper.to_array(inits[node.input[2]]).reshape(-1)[0]) == 0.0
    return True


def pad_fills_with_zero(node: onnx.NodeProto, graph: onnx.GraphProto) -> bool:
    """True for a ``Pad`` that keeps every value on a per-tensor quantization grid (constant mode, value 0)."""
    return node.op_type == "Pad" and _pad_is_zero_constant(node, {t.name: t for t in graph.initializer})


def _pad_quantize_dequantize(pad: onnx.NodeProto, producer: dict[str, onnx.NodeProto],
                              cons: dict[str, list[onnx.NodeProto]], inits: dict[str, onnx.TensorProto],
                              outputs: set[str]) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """``(Q, DQ)`` when ``pad`` is a zero Pad of a float tensor (not a DequantizeLinear output) read only by
    a constant-parameter QuantizeLinear, whose only reader is a DequantizeLinear; else None."""
    if pad.op_type != "Pad" or pad.output[0] in outputs or not _pad_is_zero_constant(pad, inits):
        return None
    src = producer.get(pad.input[0])
    if src is not None and src.op_type == "DequantizeLinear":
        return None
    users = cons.get(pad.output[0], [])
    if len(users) != 1 or users[0].op_type != "QuantizeLinear":
        return None
    q = users[0]
    dqs = cons.get(q.output[0], [])
    if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear" or not all(i in inits for i in q.input[1:]):
        return None
    return q, dqs[0]


def quantize_before_pad(model: onnx.ModelProto) -> int:
    """``x -> Pad(0) -> QuantizeLinear -> DQ`` (float x) becomes ``x -> QuantizeLinear -> DQ -> Pad``: the
    padded border is ``0 = DQ(z)`` either way, so the values are identical and the Pad moves onto the
    quantized side (ORT then pads codes; the integer runtime can execute it). The codes now have the
    unpadded shape, so their ``value_info`` is dropped. Returns the count."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    nodes = list(graph.node)
    producer, cons = producers(nodes), consumers(nodes)
    reshaped: set[str] = set()
    for pad in [n for n in nodes if n.op_type == "Pad"]:
        match = _pad_quantize_dequantize(pad, producer, cons, inits, outputs)
        if match is None:
            continue
        q, dq = match
        # new order: x -> Q -> DQ -> Pad; the Pad now writes the DQ's old output name
        x, dq_out = pad.input[0], dq.output[0]
        q.input[0] = x
        dq.output[0] = f"{dq_out}_prepad"
        pad.input[0] = dq.output[0]
        pad.output[0] = dq_out
        reshaped.add(q.output[0])
        nodes.pop(position(nodes, pad))
        nodes.insert(position(nodes, dq) + 1, pad)
        producer, cons = producers(nodes), consumers(nodes)  # the names moved between nodes
    if reshaped:
        write_nodes(graph, nodes)
        drop_value_info(graph, reshaped)
    return len(reshaped)


def _q_params(q: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.float32, int, int] | None:
    if len(q.input) < 3 or q.input[1] not in inits or q.input[2] not in inits:
        return None
    s, zp = numpy_helper.to_array(inits[q.input[1]]), inits[q.input[2]]
    if s.size != 1 or zp.data_type not in _NP_QRANGE:
        return None
    return np.float32(s.reshape(())), int(numpy_helper.to_array(zp).reshape(())), zp.data_type


def quantize_values(v: np.ndarray, s: np.float32, z: int, qmin: int, qmax: int) -> np.ndarray:
    """ONNX QuantizeLinear of float32 values with a per-tensor scale (float32 division, round half to
    even, saturate), as int64."""
    return np.clip(np.rint(np.asarray(v, np.float32) / np.float32(s)) + z, qmin, qmax).astype(np.int64)


def _quantize_scalar(v: float, s: np.float32, z: int, qmin: int, qmax: int) -> int:
    """ONNX QuantizeLinear of one float32 value (round half to even, saturate)."""
    return int(quantize_values(np.float32(v), s, z, qmin, qmax))


def drop_clamp_before_quantize(model: onnx.ModelProto) -> int:
    """Remove ``Clip(lo, hi)`` or ``Relu`` (``Clip(0, +inf)``) whose only consumer is a per-tensor
    QuantizeLinear that already maps ``lo`` to its minimum code and ``hi`` to its maximum code. Since
    QuantizeLinear is monotone, every value below ``lo`` (above ``hi``) then gives the same code as ``lo``
    (``hi``): ``Q(clamp(x)) == Q(x)`` for all x. ReLU6 under a quantizer whose range is [0, <= 6], and ReLU
    under one whose zero point is the minimum code (uint8 0, int8 -128), are the common cases; ORT does the
    same fusion, and the integer runtime needs ``op -> Q`` adjacency. Returns the count."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    cons = consumers(nodes)
    outputs = {o.name for o in graph.output}
    drop: set[int] = set()
    for n in nodes:
        if n.op_type not in ("Clip", "Relu") or n.output[0] in outputs:
            continue
        users = cons.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        params = _q_params(users[0], inits)
        if params is None:
            continue
        s, z, t = params
        qmin, qmax = _NP_QRANGE[t]
        bounds = [0.0, None] if n.op_type == "Relu" else _clip_bounds(n, inits)
        if bounds is None:
            continue
        lo, hi = bounds
        if lo is not None and _quantize_scalar(lo, s, z, qmin, qmax) != qmin:
            continue
        if hi is not None and _quantize_scalar(hi, s, z, qmin, qmax) != qmax:
            continue
        users[0].input[0] = n.input[0]
        drop.add(id(n))
    if drop:
        write_nodes(graph, [n for n in nodes if id(n) not in drop])
    return len(drop)


def clamp_to_max_min_before_wide_quantize(model: onnx.ModelProto) -> int:
    """Rewrite each ``Relu`` / ``Clip`` whose only consumer is a QuantizeLinear with a zero point of a type
    other than int8 / uint8 (int16, int4, fp8 ...) as ``Max(x, 0)`` / ``Min(Max(x, lo), hi)`` (equal for
    every non-NaN float32 x). ONNX Runtime 1.32 (CPU, ORT_ENABLE_EXTENDED and above) mishandles both:
    ``ReluQuantTransformer`` removes the Relu unless the zero point is an int8 other than -128 or a uint8
    other than 0, so also before an int16 / int4 / fp8 quantizer with zero point 0, whose negative codes then
    pass (an fp8 ReLU layer: hundreds of output steps off); ``ClipQuantFusion`` throws "Unexpected data type
    for QuantizeLinear input y_zero_point" for int4 and fp8, so the file does not load. Returns the count."""
    graph = model.graph
    cons = consumers(graph)
    outputs = {o.name for o in graph.output}
    zp_types = {t.name: t.data_type for t in graph.initializer}
    zero = "lowbit_relu_zero"
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for n in graph.node:
        users = cons.get(n.output[0], []) if n.op_type in ("Relu", "Clip") else []
        if (len(users) != 1 or users[0].op_type != "QuantizeLinear" or len(users[0].input) < 3
                or n.domain not in ("", "ai.onnx") or n.output[0] in outputs
                or zp_types.get(users[0].input[2], TensorProto.UINT8) in _NP_QRANGE):
            new_nodes.append(n)
            continue
        bounds = [zero, ""] if n.op_type == "Relu" else [n.input[k] if len(n.input) > k else "" for k in (1, 2)]
        cur = n.input[0]
        for k, (op, b) in enumerate(zip(("Max", "Min"), bounds)):
            if not b:
                continue
            last = not (k == 0 and bounds[1])
            out = n.output[0] if last else f"{n.output[0]}_lowbit_max"
            new_nodes.append(onnx.helper.make_node(op, [cur, b], [out], name=f"{n.name or n.output[0]}_{op.lower()}"))
            cur = out
        if cur == n.input[0]:  # Clip without bounds: identity
            new_nodes.append(onnx.helper.make_node("Identity", [cur], [n.output[0]], name=n.name))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        if zero not in zp_types:
            graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), zero))
    return count


def _clip_bounds(n: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[float | None] | None:
    """``[lo, hi]`` of a Clip (None where unbounded), from its inputs (opset >= 11) or attributes (< 11);
    None when a bound is computed at run time."""
    bounds: list[float | None] = []
    for k, attr in ((1, "min"), (2, "max")):
        if len(n.input) > k and n.input[k]:
            if n.input[k] not in inits:
                return None
            bounds.append(float(numpy_helper.to_array(inits[n.input[k]]).reshape(())))
        else:
            bounds.append(next((a.f for a in n.attribute if a.name == attr), None))
    return bounds


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn ``Constant`` nodes with a tensor ``value`` into initializers (so passes see one kind of constant)."""
    graph = model.graph
    keep, count = [], 0
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1 \
                and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            graph.initializer.append(t)
            count += 1
            continue
        keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)
    return count


__all__ = [
    "fold_constants", "fold_static_shapes", "batch_reshape_to_constant", "remove_dead_nodes", "quantize_before_pad",
    "drop_clamp_before_quantize", "constants_to_initializers", "pad_fills_with_zero", "consumers", "producers",
    "position", "write_nodes", "drop_value_info", "remove_orphan_value_info",
]


# ----------------------------------------------------------------------------------- static shapes
_Sym = str  # a symbolic dimension (an ONNX dim_param); ints are static
_SHAPE_INT = {TensorProto.INT64: np.int64, TensorProto.INT32: np.int32}


def _inferred_dims(model: onnx.ModelProto) -> dict[str, list[int | _Sym] | None]:
    bare = onnx.ModelProto()
    _copy_without_weights(model, bare)  # without value_info: the tracer's names its own symbolic dims
    g = onnx.shape_inference.infer_shapes(bare).graph
    out: dict[str, list[int | _Sym] | None] = {}
    for v in [*g.value_info, *g.input, *g.output]:
        t = v.type.tensor_type
        if not t.HasField("shape"):
            out[v.name] = None
            continue
        dims: list[int | _Sym] | None = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims = None
                break
        out[v.name] = dims
    return out


def _copy_without_weights(model: onnx.ModelProto, bare: onnx.ModelProto, keep: int = 64) -> None:
    """``bare`` = ``model`` with every initializer above ``keep`` elements declared as a graph input of the
    same type and shape instead (shape inference needs only their shapes; copying weights is slow)."""
    graph = model.graph
    bare.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import))
    bare.graph.name = graph.name
    bare.graph.node.extend(graph.node)
    bare.graph.input.extend(graph.input)
    bare.graph.output.extend(graph.output)
    for t in graph.initializer:
        if int(np.prod(t.dims)) <= keep:
            bare.graph.initializer.append(t)
        else:
            bare.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _shape_values(model: onnx.ModelProto, dims: dict) -> dict[str, tuple[list, bool, int]]:
    """Integer tensors computed from shapes: name -> (elements (int or symbol), is_scalar, ONNX dtype)."""
    graph = model.graph
    val: dict[str, tuple[list, bool, int]] = {}
    for t in graph.initializer:
        if t.data_type in _SHAPE_INT and len(t.dims) <= 1:
            a = numpy_helper.to_array(t)
            if a.size <= 16:
                val[t.name] = ([int(v) for v in a.reshape(-1)], a.ndim == 0, t.data_type)
    for n in graph.node:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        ins = [val.get(i) for i in n.input]
        res = None
        if n.op_type == "Shape" and dims.get(n.input[0]) is not None:
            d = dims[n.input[0]]
            res = (list(d[a.get("start", 0): a.get("end", len(d))]), False, TensorProto.INT64)
        elif n.op_type == "Gather" and ins[0] is not None and ins[1] is not None and a.get("axis", 0) == 0 \
                and not ins[0][1]:
            elems, size = ins[0][0], len(ins[0][0])
            if all(isinstance(i, int) and -size <= i < size for i in ins[1][0]):
                res = ([elems[i] for i in ins[1][0]], ins[1][1], ins[0][2])
        elif n.op_type == "Unsqueeze" and ins[0] is not None and ins[0][1]:
            axes = a.get("axes", ins[1][0] if len(ins) > 1 and ins[1] is not None else None)
            if axes is not None and list(axes) in ([0], [-1]):
                res = (ins[0][0], False, ins[0][2])
        elif n.op_type == "Squeeze" and ins[0] is not None and not ins[0][1] and len(ins[0][0]) == 1:
            res = (ins[0][0], True, ins[0][2])
        elif n.op_type == "Concat" and a.get("axis") == 0 and ins and all(v is not None and not v[1] for v in ins):
            res = ([e for v in ins for e in v[0]], False, ins[0][2])
        elif n.op_type == "Cast" and ins[0] is not None and a.get("to") in _SHAPE_INT:
            res = (ins[0][0], ins[0][1], a["to"])
        elif n.op_type == "Slice" and ins[0] is not None and not ins[0][1] and len(ins) >= 3 \
                and all(v is not None for v in ins[1:]) and all(len(v[0]) == 1 for v in ins[1:]) \
                and (len(ins) < 4 or ins[3][0][0] in (0, -1)):  # 1-D: the only axis is 0
            start, end = ins[1][0][0], ins[2][0][0]
            step = ins[4][0][0] if len(ins) > 4 else 1
            if all(isinstance(v, int) for v in (start, end, step)) and step > 0:
                res = (ins[0][0][slice(start, end, step)], False, ins[0][2])  # Python clamps as ONNX Slice does
        if res is not None:
            val[n.output[0]] = res
    return val


def fold_static_shapes(model: onnx.ModelProto) -> int:
    """Replace shape arithmetic whose result shape inference proves static by initializers, and the shape
    input of a ``Reshape`` whose unknown entries are exactly its data input's symbolic dimensions (at the
    same positions) by a constant with 0 there (ONNX Reshape copies the input dimension for a 0). Values
    that depend on a dynamic dimension are left to the runtime, so the graph keeps its dynamic batch.
    Repeats until nothing changes; returns the number of tensors made constant."""
    total = 0
    for _ in range(8):
        graph = model.graph
        dims = _inferred_dims(model)
        val = _shape_values(model, dims)
        inits = {t.name for t in graph.initializer}
        outputs = {o.name for o in graph.output}
        new_inits: dict[str, np.ndarray] = {}
        for n in graph.node:
            if n.op_type in ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Slice") and len(n.output) == 1:
                v = val.get(n.output[0])
                if v is not None and n.output[0] not in outputs and all(isinstance(e, int) for e in v[0]):
                    arr = np.asarray(v[0], dtype=_SHAPE_INT[v[2]])
                    new_inits[n.output[0]] = arr.reshape(()) if v[1] else arr
            elif n.op_type == "Reshape" and n.input[1] not in inits and n.input[1] in val \
                    and not any(x.name == "allowzero" and x.i for x in n.attribute):
                target, data = val[n.input[1]][0], dims.get(n.input[0])
                if data is None or any(isinstance(e, int) and e == 0 for e in target):
                    continue
                if all(isinstance(e, int) or (i < len(data) and data[i] == e) for i, e in enumerate(target)):
                    name = base = f"{n.name or n.output[0]}_static_shape".replace("/", "_")
                    while name in inits or name in new_inits:  # never point at an unrelated initializer
                        name = f"{base}_{len(new_inits)}_{len(inits)}"
                        base = name
                    new_inits[name] = np.asarray([e if isinstance(e, int) else 0 for e in target], np.int64)
                    n.input[1] = name
        fresh = {k: v for k, v in new_inits.items() if k not in inits}
        if not fresh:
            break
        keep = [n for n in graph.node if not (len(n.output) == 1 and n.output[0] in fresh)]
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in fresh.items())
        total += len(fresh)
        fold_constants(model)
        remove_dead_nodes(model)
    return total
