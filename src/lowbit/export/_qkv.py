"""Pack the query/key/value projections of a fused attention block into ONNX Runtime's ``Attention`` or
``QAttention`` (``com.microsoft``): one GEMM of width ``3 D`` instead of three of width ``D``.

After :func:`lowbit.export._attention.fuse_attention` a self-attention block reads::

    q = x @ W_q + b_q;  k = x @ W_k + b_k;  v = x @ W_v + b_v        # x: (B, T, D_in), W_*: (D_in, D)
    y = MultiHeadAttention(q, k, v, attention_bias=mask, num_heads=N, scale=c)

:func:`pack_qkv` rewrites it, when every piece is proven, as

* float projections: ``y = Attention(x, [W_q | W_k | W_v], [b_q | b_k | b_v], ...)``;
* dynamic int8 projections (``DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul(s_x * s_w) -> Add
  bias``, lowbit's export and ORT's ``quantize_dynamic`` both write this):
  ``y = QAttention(x_codes, [Wq_q | Wq_k | Wq_v], [b_q | b_k | b_v], s_x, [s_w...], raw_mask, zp_x, [zp_w...])``:
  the integer GEMM ``(x_codes - zp_x) (W_codes - zp_w)`` with int32 accumulation, scaled by ``s_x s_w``
  per column plus the bias, then the same float attention.

The mask: when it is ``Where(keep, 0, m)`` with a constant ``m <= -1e4`` (SDPA's boolean mask exports as
``m = -inf``), both take it as a 0/1 key mask: ``keep`` as int32, squeezed to ``(B, T, T)``, made once for
all layers, with ``mask_filter_value = m`` (the lowest float32 for ``-inf``; ``exp`` of either is exactly 0
for finite scores). A fully masked row is then a uniform average, finite, not NaN, so the row fix of
``fuse_attention`` after the block, ``Where(row_valid, y, 0)``, becomes ``y * float(row_valid)``: the same
values (a zero may come out as ``-0.0``), and ORT's broadcasting ``Where`` cost ~0.8 ms per layer at batch 32
where the multiply costs ~0.1 ms. (Only for non-finite activations in an all-padding sequence would the
two differ: NaN there instead of 0.) ``QAttention`` takes no additive mask, so an int8 block whose mask has
another form keeps its MultiHeadAttention (nothing else changes); a float block passes such a mask as
``Attention``'s additive ``attention_bias`` and keeps its ``Where`` row fix.

Why: at a sequence of 128 the three ``(128 x 384) x (384 x 384)`` GEMMs of all-MiniLM-L6-v2 each run at
well under the efficiency of one ``384 x 1152`` GEMM, and the int8 ones most of all (docs/benchmarks.md,
"MiniLM"). The float baseline gets the same packing so that a speed ratio still measures the integer
kernels. Exactness: float ``Attention`` agreed with the unpacked graph to float32 rounding (relative 1e-7
in ORT 1.32); ``QAttention``'s GEMM is the same integer product and the same per-column scale and bias, so
its outputs differ from the unpacked ones by float32 rounding in the attention only - which the next
dynamic quantizer can turn into a one-step code difference, as any last-bit difference can
(:func:`lowbit.export.verify_export` checks stage by stage).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._attention import MS_DOMAIN, _Matcher, _Miss
from ._simplify import splice_nodes

__all__ = ["pack_qkv"]

_MASK_MIN = -1e4
"""The masked value a 0/1 key mask may replace: ``exp(s - 1e4 - max)`` underflows to 0 for real scores."""


def _split_const(g: _Matcher, node: onnx.NodeProto) -> tuple[str, np.ndarray]:
    """``node`` has two inputs, one an initializer: (the other input, the constant)."""
    for a, b in (node.input, node.input[::-1]):
        if b in g.inits and a not in g.inits:
            return a, g.const(b)
    raise _Miss(f"{node.name}: no constant operand")


def _projection(g: _Matcher, name: str) -> dict:
    """``name = Add(y, b)`` with ``y`` a float ``MatMul(x, W)`` or the dynamic int8 chain of the module
    docstring; the nodes that only serve it, and its weights."""
    add = g.node(name, "Add")
    g.only_use(name)
    y, b = _split_const(g, add)
    if b.ndim != 1 or b.dtype != np.float32:
        raise _Miss("bias")
    g.only_use(y)
    p = g.maybe(y, "MatMul")
    if p is not None:
        w = g.const(p.input[1]) if p.input[1] in g.inits else None
        if w is None or w.ndim != 2 or w.dtype != np.float32 or w.shape[1] != b.shape[0]:
            raise _Miss("float weight")
        return {"kind": "float", "x": p.input[0], "w": w, "b": b, "nodes": [add, p]}
    rescale = g.node(y, "Mul")
    acc_f, scale = None, None
    for a, c in (rescale.input, rescale.input[::-1]):
        pa, pc = g.producer.get(a), g.producer.get(c)
        if pa is not None and pa.op_type == "Cast" and pc is not None and pc.op_type == "Mul":
            acc_f, scale = a, c
    if acc_f is None:
        raise _Miss("not acc * scale")
    cast = g.node(acc_f, "Cast")
    g.only_use(acc_f)
    if next((a.i for a in cast.attribute if a.name == "to"), None) != TensorProto.FLOAT:
        raise _Miss("cast")
    mmi = g.node(cast.input[0], "MatMulInteger")
    g.only_use(cast.input[0])
    scale_mul = g.node(scale, "Mul")
    g.only_use(scale)
    x_scale, w_scale = _split_const(g, scale_mul)
    codes, w_name = mmi.input[0], mmi.input[1]
    x_zp = mmi.input[2] if len(mmi.input) > 2 else ""
    w = g.const(w_name)
    w_zp = g.const(mmi.input[3]) if len(mmi.input) > 3 and mmi.input[3] else np.zeros((), w.dtype)
    dql = g.producer.get(codes)
    if (dql is None or dql.op_type != "DynamicQuantizeLinear" or list(dql.output[:3]) != [codes, x_scale, x_zp]
            or w.dtype != np.int8 or w.ndim != 2 or w.shape[1] != b.shape[0] or w_zp.dtype != np.int8
            or w_zp.size not in (1, w.shape[1]) or w_scale.dtype != np.float32 or w_scale.size not in (1, w.shape[1])):
        raise _Miss("dynamic int8 projection")
    n = w.shape[1]
    return {"kind": "int8", "x": dql.input[0], "dql": dql, "w": w, "b": b,
            "w_scale": np.broadcast_to(w_scale.reshape(-1), (n,)), "w_zp": np.broadcast_to(w_zp.reshape(-1), (n,)),
            "nodes": [add, rescale, cast, mmi, scale_mul]}


def _key_mask(g: _Matcher, mask: str) -> tuple[str, float] | None:
    """``mask = Where(keep, 0, m)`` with ``m <= -1e4`` a scalar constant (SDPA's boolean mask exports so,
    ``m = -inf``): (``keep``, the ``mask_filter_value`` for Attention / QAttention). None when there is no
    mask or it has another form."""
    where = g.maybe(mask, "Where") if mask else None
    if where is None:
        return None
    a, b = (g.const(t) if t in g.inits else None for t in where.input[1:3])
    if a is None or b is None or a.size != 1 or b.size != 1:
        return None
    if float(a.reshape(())) != 0 or not float(b.reshape(())) <= _MASK_MIN:
        return None
    return where.input[0], max(float(b.reshape(())), float(np.finfo(np.float32).min))


def _row_fix(g: _Matcher, out: str) -> onnx.NodeProto | None:
    """The row fix of :func:`lowbit.export._attention.fuse_attention` on ``out`` (``Where(row_valid, out, 0)``,
    the only reader of ``out``), if there is one."""
    readers = g.consumers.get(out, [])
    if len(readers) != 1 or out in g.outputs:
        return None
    w = readers[0]
    if w.op_type != "Where" or w.domain not in ("", "ai.onnx") or w.input[1] != out or w.input[2] not in g.inits:
        return None
    zero = g.const(w.input[2])
    return w if zero.size == 1 and zero.reshape(()).tobytes() == np.float32(0).tobytes() else None


def pack_qkv(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite every proven self-attention block (module docstring), in place. Returns
    ``{"attention_float": n, "attention_int8": n}``, the blocks packed into ``Attention`` / ``QAttention``.
    Run :func:`lowbit.export._simplify.remove_dead_nodes` after it (the replaced projections' producers of
    ``x`` codes may become unused)."""
    g = _Matcher(model)  # holds every node: the wrappers (and their id()s) below stay the same objects
    all_nodes = list(model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    replace: dict[int, list[onnx.NodeProto]] = {}  # by id(): the matched nodes stay referenced until the end
    drop: set[int] = set()
    keep_alive: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    raw_masks: dict[str, str] = {}  # boolean keep mask -> int32 (B, T, T) key mask, made once for all layers
    row_flags: set[str] = set()  # row-fix flags already cast to float
    counts = {"attention_float": 0, "attention_int8": 0}
    for i, mha in enumerate(n for n in all_nodes if n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN):
        ins = list(mha.input) + [""] * (6 - len(mha.input))
        if len(set(ins[:3])) != 3 or "" in ins[:3] or any(ins[3:5]) or len(mha.input) > 6:
            continue
        try:
            parts = [_projection(g, t) for t in ins[:3]]
            kinds = {p["kind"] for p in parts}
            if len(kinds) != 1 or len({p["x"] for p in parts}) != 1:
                raise _Miss("projections of different inputs")
            mask_key = _key_mask(g, ins[5])
            if kinds == {"int8"} and ins[5] and mask_key is None:
                raise _Miss("QAttention takes no additive mask")
        except _Miss:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
        base = f"lowbit_qkv{i}"
        w = np.concatenate([p["w"] for p in parts], axis=1)
        b = np.concatenate([p["b"] for p in parts])
        inits += [numpy_helper.from_array(w, f"{base}_w"), numpy_helper.from_array(b, f"{base}_b")]
        new: list[onnx.NodeProto] = []
        raw = ""
        if mask_key is not None:
            keep, attrs["mask_filter_value"] = mask_key
            if keep not in raw_masks:  # each layer has its own Where(keep, 0, -inf), on the same keep
                raw_masks[keep] = f"{base}_key_mask"
                new += _raw_mask_nodes(keep, parts[0]["x"], raw_masks[keep], opset, inits, first=len(raw_masks) == 1)
            raw = raw_masks[keep]
            fix = _row_fix(g, mha.output[0])
            if fix is not None:  # finite rows now: a multiply by the 0/1 row flag zeroes them (much faster)
                valid = fix.input[0]
                cast = [] if valid in row_flags else [helper.make_node(
                    "Cast", [valid], [f"{valid}_float"], name=f"{valid}_float", to=TensorProto.FLOAT)]
                row_flags.add(valid)
                replace[id(fix)] = cast + [helper.make_node("Mul", [fix.input[1], f"{valid}_float"],
                                                            list(fix.output), name=fix.name)]
                keep_alive.append(fix)
        if kinds == {"float"}:
            new.append(helper.make_node("Attention", [parts[0]["x"], f"{base}_w", f"{base}_b", raw, "",
                                                      "" if raw else ins[5]],
                                        list(mha.output), name=base, domain=MS_DOMAIN, **attrs))
            counts["attention_float"] += 1
        else:
            dql = parts[0]["dql"]
            inits += [numpy_helper.from_array(np.concatenate([p["w_scale"] for p in parts]), f"{base}_w_scale"),
                      numpy_helper.from_array(np.concatenate([p["w_zp"] for p in parts]), f"{base}_w_zp")]
            new.append(helper.make_node(
                "QAttention", [dql.output[0], f"{base}_w", f"{base}_b", dql.output[1], f"{base}_w_scale", raw,
                               dql.output[2], f"{base}_w_zp"],
                list(mha.output), name=base, domain=MS_DOMAIN, **attrs))
            counts["attention_int8"] += 1
        replace[id(mha)] = new
        keep_alive += [mha, *(n for p in parts for n in p["nodes"])]
        drop.update(id(n) for n in keep_alive)
    if not replace:
        return counts
    splice_nodes(model, all_nodes, replace, drop)
    model.graph.initializer.extend(inits)
    return counts


def _raw_mask_nodes(keep: str, like: str, out: str, opset: int, inits: list, first: bool) -> list:
    """int32 ``(B, T, T)`` key mask from the boolean ``(B|1, 1, T, T)`` ``keep``: 1 where a key is kept;
    expanded to the batch of ``like`` (the block's ``(B, T, D)`` input) when the mask is shared by the batch.
    Made once per ``keep`` and used by every layer whose mask derives from it (the batch of the first
    such layer's input: an encoder's layers share it; QAttention rejects a mask of another batch)."""
    if first:
        inits += [numpy_helper.from_array(np.array([1], np.int64), "lowbit_qkv_axis1"),
                  numpy_helper.from_array(np.array([0], np.int64), "lowbit_qkv_zero"),
                  numpy_helper.from_array(np.array([1, 1], np.int64), "lowbit_qkv_ones")]
    return [
        helper.make_node("Cast", [keep], [f"{out}_i32"], name=f"{out}_cast", to=TensorProto.INT32),
        (helper.make_node("Squeeze", [f"{out}_i32", "lowbit_qkv_axis1"], [f"{out}_3d"], name=f"{out}_squeeze")
         if opset >= 13 else
         helper.make_node("Squeeze", [f"{out}_i32"], [f"{out}_3d"], name=f"{out}_squeeze", axes=[1])),
        helper.make_node("Shape", [like], [f"{out}_shape"], name=f"{out}_shape"),
        helper.make_node("Slice", [f"{out}_shape", "lowbit_qkv_zero", "lowbit_qkv_axis1"], [f"{out}_batch"],
                         name=f"{out}_batch"),
        helper.make_node("Concat", [f"{out}_batch", "lowbit_qkv_ones"], [f"{out}_target"], name=f"{out}_target",
                         axis=0),
        helper.make_node("Expand", [f"{out}_3d", f"{out}_target"], [out], name=f"{out}_expand"),
    ]
