"""Exact rewrites of a QDQ graph into the forms ONNX Runtime's CPU provider runs fastest (``target="ort-cpu"``).

The integer rewrites leave every output value unchanged (integer arithmetic is exact; see each function)
and use standard ONNX operators only; they only matter for which kernels ORT picks (the three below).
:func:`lowbit.export._attention.fuse_attention` writes ORT's contrib ``MultiHeadAttention`` (so a file
exported for ``"ort-cpu"`` needs ONNX Runtime) and is applied to the float export as well
(:func:`optimize_float_for_ort_cpu`), so that a float baseline gets the same attention kernel;
:func:`lowbit.export._qkv.pack_qkv` then packs each fused block's query/key/value projections into one
GEMM (ORT's ``Attention`` for float projections, ``QAttention`` for dynamic int8 ones), again for both.
Measured on the x86 machine of ``docs/benchmarks.md`` (Zen 4, AVX512-VNNI) with ONNX Runtime 1.32:

* :func:`pad_conv_input_channels`: MLAS's fast symmetric-weight convolution (``MlasConvSym``, used by
  QLinearConv when the weights are int8 with zero point 0) needs the input channels to be a multiple of 4;
  a 3-channel RGB stem falls back to im2col + QGEMM, which is slower than ORT's fp32 stem convolution. The
  input codes are padded with their zero point and the weights with zero codes, so the extra channel adds
  ``(z - z) * 0 = 0`` to every accumulator.
* :func:`quantize_before_channel_min`: the per-channel clip that cross-layer equalization makes of a ReLU6
  (``Relu -> Min(U)`` in float before the output QuantizeLinear, which keeps ORT from fusing the Conv) is
  applied to the codes after the quantizer, ``Min(Q(y), Q(U))``: exact, since QuantizeLinear is monotone.
* :func:`dynamic_matmul_to_integer`: ``DynamicQuantizeLinear -> DequantizeLinear -> MatMul <- DQ(weight)``
  becomes ``MatMulInteger -> Cast -> Mul(s_x * s_w)``, the form ORT's own ``quantize_dynamic`` writes. ORT
  fuses it *with the following bias Add* into DynamicQuantizeMatMul / MatMulIntegerToFloat; the QDQ form
  fuses without the bias, leaving one float Add per Linear. A Linear on a 2-D input is traced as a Gemm
  (``x @ W^T + b``), which ORT runs in float after dequantizing both operands (no integer kernel at all):
  it becomes the same form with an explicit ``Add(b)``, so every dynamic Linear runs as an integer kernel
  whatever its input rank. The integer accumulation is exact, so the result is
  ``s_x * s_w * sum((q_x - z_x) * (q_w - z_w))``, the same real number the DQ -> MatMul form rounds in
  float32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._attention import fuse_attention
from ._qkv import pack_qkv
from ._simplify import (
    _NP_QRANGE,
    _q_params,
    drop_value_info,
    position,
    producers,
    quantize_values,
    write_nodes,
)
from ._simplify import consumers as consumers_of

__all__ = ["TARGETS", "optimize_for_ort_cpu", "optimize_float_for_ort_cpu", "pad_conv_input_channels",
           "quantize_before_channel_min",
           "dynamic_matmul_to_integer"]

TARGETS = ("ort-cpu", "qdq")
"""Export targets: ``"ort-cpu"`` applies this module's rewrites; ``"qdq"`` keeps the plain QDQ form
(for runtimes that pattern-match DQ -> op -> Q themselves, e.g. TensorRT, or lowbit's own interpreter)."""

_INT8 = (TensorProto.INT8, TensorProto.UINT8)


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _maps(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]):
    """(initializers, producers, consumers) by name; the node maps of ``nodes``, a plain list of the graph's
    nodes that a rewrite edits and writes back once (:func:`lowbit.export._simplify.write_nodes`)."""
    return {t.name: t for t in graph.initializer}, producers(nodes), consumers_of(nodes)


def _per_tensor_const(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    return (len(dq.input) > 2 and dq.input[1] in inits and dq.input[2] in inits
            and numpy_helper.to_array(inits[dq.input[1]]).size == 1)


def _paddable_conv(conv: onnx.NodeProto, inits: dict[str, onnx.TensorProto], producer: dict[str, onnx.NodeProto],
                   consumers: dict[str, list[onnx.NodeProto]],
                   outputs: set[str]) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """``(DQ of the input, DQ of the weight)`` of an ungrouped Conv whose input is a per-tensor int8/uint8
    DQ and whose weight is int8 symmetric codes (a constant only this Conv reads); else None."""
    if conv.op_type != "Conv" or _attr(conv, "group", 1) != 1:
        return None
    dqx, dqw = producer.get(conv.input[0]), producer.get(conv.input[1])
    if dqx is None or dqw is None or dqx.op_type != "DequantizeLinear" or dqw.op_type != "DequantizeLinear":
        return None
    if not _per_tensor_const(dqx, inits) or inits[dqx.input[2]].data_type not in _INT8:
        return None
    codes_t = inits.get(dqw.input[0])
    if codes_t is None or codes_t.data_type != TensorProto.INT8 or _attr(dqw, "block_size") is not None:
        return None
    if len(dqw.input) > 2 and dqw.input[2]:
        if dqw.input[2] not in inits or np.any(numpy_helper.to_array(inits[dqw.input[2]]) != 0):
            return None  # ORT's fast path needs symmetric weights
    if len(consumers.get(dqw.output[0], [])) != 1 or len(consumers.get(dqw.input[0], [])) != 1:
        return None  # the weight codes are rewritten in place: they must be this conv's alone
    if dqw.output[0] in outputs or dqw.input[0] in outputs:
        return None
    return dqx, dqw


def pad_conv_input_channels(model: onnx.ModelProto, multiple: int = 4) -> int:
    """Pad the input channels of every ungrouped QDQ Conv with int8 symmetric weights up to a multiple of
    ``multiple``: ``Q -> DQ -> Conv`` becomes ``Q -> Pad(codes, value = z) -> DQ -> Conv`` and the weight
    codes ``(M, C, k...)`` get zero codes up to ``(M, C', k...)``. Exact: a padded input code is the zero
    point (dequantizes to 0) and a padded weight code is 0. The weight's DequantizeLinear output changes
    shape, so its ``value_info`` (the tracer's ``(M, C, k...)``) is dropped. Returns the number of
    convolutions padded."""
    graph = model.graph
    nodes = list(graph.node)
    inits, producer, consumers = _maps(graph, nodes)
    outputs = {o.name for o in graph.output}
    reshaped: set[str] = set()
    count = 0
    for conv in [n for n in nodes if n.op_type == "Conv"]:
        match = _paddable_conv(conv, inits, producer, consumers, outputs)
        if match is None:
            continue
        dqx, dqw = match
        codes_t = inits[dqw.input[0]]
        codes = numpy_helper.to_array(codes_t)
        c = codes.shape[1]
        extra = -c % multiple
        if extra == 0:
            continue
        padded = np.zeros((codes.shape[0], c + extra, *codes.shape[2:]), codes.dtype)
        padded[:, :c] = codes
        codes_t.CopyFrom(numpy_helper.from_array(padded, codes_t.name))
        reshaped.update((dqw.input[0], dqw.output[0]))
        rank = codes.ndim
        base = f"lowbit_cpad{count}"
        pads = np.zeros(2 * rank, np.int64)
        pads[rank + 1] = extra  # end of axis 1 (channels)
        graph.initializer.append(numpy_helper.from_array(pads, f"{base}_pads"))
        pad = helper.make_node("Pad", [dqx.input[0], f"{base}_pads", dqx.input[2]], [f"{base}_codes"],
                               name=f"{base}_pad", mode="constant")
        dq = helper.make_node("DequantizeLinear", [f"{base}_codes", dqx.input[1], dqx.input[2]], [f"{base}_out"],
                              name=f"{base}_dequant")
        conv.input[0] = f"{base}_out"
        at = position(nodes, conv)
        nodes[at:at] = [pad, dq]
        _, producer, consumers = _maps(graph, nodes)
        count += 1
    if count:
        write_nodes(graph, nodes)
        drop_value_info(graph, reshaped)
    return count


def _dynamic_input(dq: onnx.NodeProto | None, producer: dict[str, onnx.NodeProto]) -> bool:
    """``dq`` dequantizes the three outputs of one DynamicQuantizeLinear."""
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
        return False
    dyn = producer.get(dq.input[0])
    return dyn is not None and dyn.op_type == "DynamicQuantizeLinear" and list(dq.input) == list(dyn.output)


def _weight_kn(node: onnx.NodeProto | None, graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto],
               producer: dict[str, onnx.NodeProto], trans_b: bool = False) -> tuple[str, str, str] | None:
    """(codes ``(K, N)``, scale, zero point) of a constant 2-D weight reaching a MatMul as ``DQ`` (per
    tensor, or per column: axis 1) or as ``DQ(W (N, K), axis 0) -> Transpose`` (the traced ``nn.Linear``
    on a 3-D input), or reaching a Gemm with ``trans_b`` as ``DQ(W (N, K), axis 0)`` (``nn.Linear`` on a
    2-D input); None for anything else. A transposed weight gets its codes stored transposed."""
    via_transpose = (not trans_b and node is not None and node.op_type == "Transpose"
                     and list(_attr(node, "perm", [])) == [1, 0])
    transposed = via_transpose or trans_b
    dq = producer.get(node.input[0]) if via_transpose else node
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or len(dq.input) < 3:
        return None
    if dq.input[1] not in inits or dq.input[2] not in inits or _attr(dq, "block_size") is not None:
        return None
    codes_t = inits[dq.input[0]]
    if codes_t.data_type not in _INT8 or len(codes_t.dims) != 2:
        return None
    per_channel = numpy_helper.to_array(inits[dq.input[1]]).size > 1
    if per_channel and _attr(dq, "axis", 1) != (0 if transposed else 1):
        return None
    if not transposed:
        return dq.input[0], dq.input[1], dq.input[2]
    name = f"{dq.input[0]}_kn"
    if name not in inits:
        t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(codes_t).T), name)
        graph.initializer.append(t)
        inits[name] = t
    return name, dq.input[1], dq.input[2]


def _as_matmul(node: onnx.NodeProto) -> tuple[bool, str] | None:
    """``(B transposed, bias name or "")`` of a node computing exactly ``A @ op(B) [+ C]``: a MatMul, or a
    Gemm with ``alpha = 1``, ``transA = 0`` and ``beta = 1`` (or no C), which is how the tracer writes
    ``nn.Linear`` on a 2-D input (``transB = 1``, ``C`` = the bias); None for anything else."""
    if node.op_type == "MatMul":
        return False, ""
    if node.op_type != "Gemm" or _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
        return None
    bias = node.input[2] if len(node.input) > 2 else ""
    if bias and _attr(node, "beta", 1.0) != 1.0:
        return None
    return bool(_attr(node, "transB", 0)), bias


def _matmul_integer_nodes(base: str, a: onnx.NodeProto, w: tuple[str, str, str], bias: str,
                          out: str) -> list[onnx.NodeProto]:
    """``out = Cast(MatMulInteger(q_x, q_w, z_x, z_w)) * (s_x * s_w) [+ bias]`` for the DynamicQuantizeLinear
    ``a`` (outputs q_x, s_x, z_x) and the weight ``w`` = (codes ``(K, N)``, s_w, z_w). The bias is the Add's
    second input, where ORT's MatMulIntegerToFloat fusion looks for it."""
    codes, s_w, z_w = w
    y = f"{base}_y" if bias else out
    nodes = [
        helper.make_node("Mul", [a.input[1], s_w], [f"{base}_scale"], name=f"{base}_scales_mul"),
        helper.make_node("MatMulInteger", [a.input[0], codes, a.input[2], z_w], [f"{base}_acc"], name=f"{base}_matmul"),
        helper.make_node("Cast", [f"{base}_acc"], [f"{base}_acc_f"], name=f"{base}_cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{base}_acc_f", f"{base}_scale"], [y], name=f"{base}_rescale"),
    ]
    if bias:
        nodes.append(helper.make_node("Add", [y, bias], [out], name=f"{base}_bias_add"))
    return nodes


def dynamic_matmul_to_integer(model: onnx.ModelProto) -> int:
    """Rewrite ``DQ(DynamicQuantizeLinear(x)) @ DQ(W)`` as ``Cast(MatMulInteger(q_x, q_w, z_x, z_w)) *
    (s_x * s_w)`` (module docstring); a Gemm (``nn.Linear`` on a 2-D input ``(B, K)``: ``x @ W^T + b``)
    gets the same form followed by ``Add(b)``. Only where the int32 accumulator cannot overflow
    (``K * 255 * 128 < 2**31``). Returns the number of MatMuls / Gemms rewritten; the DequantizeLinear nodes
    left without consumers are removed by the caller's dead-node pass."""
    graph = model.graph
    nodes = list(graph.node)
    inits, producer, _ = _maps(graph, nodes)
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in nodes:
        form = _as_matmul(node)
        a = producer.get(node.input[0]) if form is not None else None
        w = (_weight_kn(producer.get(node.input[1]), graph, inits, producer, trans_b=form[0])
             if _dynamic_input(a, producer) else None)
        if w is None or inits[w[0]].dims[0] * 255 * 128 >= 2**31:
            new_nodes.append(node)
            continue
        new_nodes += _matmul_integer_nodes(f"lowbit_mmi{count}", a, w, form[1], node.output[0])
        count += 1
    if count:
        write_nodes(graph, new_nodes)
    return count


def quantize_before_channel_min(model: onnx.ModelProto) -> int:
    """``Q(Min([Relu](y), U))`` -> ``Min(Q(y), Q(U))`` for a constant per-channel bound ``U`` and a per-tensor
    QuantizeLinear ``Q`` (returns the count).

    Cross-layer equalization turns a ReLU6 into a per-channel clip ``min(relu(y), 6 / s_c)``
    (:class:`lowbit.passes.clip.ChannelClip`), exported as ``Relu -> Min(U)`` between the Conv and its
    output QuantizeLinear; ORT cannot fuse ``DQ -> Conv -> Relu -> Min -> Q`` into QLinearConv, so every
    equalized convolution ran in float (18 of EfficientNet-Lite0's 50 convs stayed int8). ``Q`` is monotone,
    so ``Q(min(a, U)) == min(Q(a), Q(U))`` for every value: the rewrite quantizes first and clips the codes
    (a uint8/int8 ``Min`` with ``Q(U)`` computed as QuantizeLinear does; no ``Min`` at all when every
    ``Q(U)`` is the top code), and the ``Relu`` goes when ``Q``'s zero point is its minimum code
    (``Q(relu(y)) == Q(y)``). Exact; ``Conv -> Q`` then fuses."""
    graph = model.graph
    nodes = list(graph.node)
    inits, producer, cons = _maps(graph, nodes)
    outputs = {o.name for o in graph.output}
    count = 0
    for mn in [n for n in nodes if n.op_type == "Min"]:
        if len(mn.input) != 2 or mn.output[0] in outputs:
            continue
        users = cons.get(mn.output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        q = users[0]
        params = _q_params(q, inits)
        a, u_name = (mn.input[0], mn.input[1]) if mn.input[1] in inits else (mn.input[1], mn.input[0])
        if params is None or u_name not in inits or a in inits:
            continue
        s, z, t = params
        qmin, qmax = _NP_QRANGE[t]
        u = numpy_helper.to_array(inits[u_name])
        if u.dtype != np.float32 or max(u.shape, default=1) != u.size:  # one bound per channel, one axis
            continue
        relu = producer.get(a)
        if relu is not None and relu.op_type == "Relu" and z == qmin and len(cons.get(a, [])) == 1 and a not in outputs:
            a = relu.input[0]  # Q(relu(y)) == Q(y): every negative value saturates to the zero point
            nodes.pop(position(nodes, relu))
        codes = quantize_values(u, s, z, qmin, qmax).astype(np.uint8 if t == TensorProto.UINT8 else np.int8)
        q_out = q.output[0]
        q.input[0] = a
        count += 1
        nodes.pop(position(nodes, mn))
        if not (codes.astype(np.int64) == qmax).all():  # some channel's bound below the quantizer's top code
            bound = f"{mn.name or mn.output[0]}_code_bound"
            graph.initializer.append(numpy_helper.from_array(codes, bound))
            q.output[0] = f"{q_out}_unclipped"
            mn.input[0], mn.input[1] = q.output[0], bound
            mn.output[0] = q_out
            nodes.insert(position(nodes, q) + 1, mn)  # after Q now: keep the node list topological
        _, producer, cons = _maps(graph, nodes)
    if count:
        write_nodes(graph, nodes)
    return count


def optimize_for_ort_cpu(model: onnx.ModelProto, example_feeds: dict[str, np.ndarray] | None = None) -> dict[str, int]:
    """Apply every rewrite of this module and the attention fusion (in place); returns how many nodes or
    blocks each one rewrote. ``example_feeds`` (``{input name: array}``) lets the attention fusion prove a
    mask's shape by one ORT run where shape inference cannot (:func:`fuse_attention`)."""
    return {"channel_clips_after_quantize": quantize_before_channel_min(model),
            "conv_input_channels_padded": pad_conv_input_channels(model),
            "dynamic_matmuls_to_integer": dynamic_matmul_to_integer(model),
            "attention_fused": fuse_attention(model, example_feeds), **pack_qkv(model)}


def optimize_float_for_ort_cpu(model: onnx.ModelProto, example_feeds: dict[str, np.ndarray] | None = None) -> dict[str, int]:
    """The rewrites that also apply to a float graph (the attention fusion and the q/k/v packing), for the float
    baseline (and ORT's ``quantize_dynamic`` peer, whose int8 projections get ``QAttention``)."""
    return {"attention_fused": fuse_attention(model, example_feeds), **pack_qkv(model)}
