"""Fuse the attention core of a traced transformer into ONNX Runtime's ``com.microsoft.MultiHeadAttention``.

``torch.onnx.export`` writes ``F.scaled_dot_product_attention`` (and the equivalent hand-written attention)
as a dozen small nodes per layer, on ``(B, T, D)`` projections ``q``, ``k``, ``v`` with ``N`` heads of
size ``H`` (``D = N * H``)::

    qh = Transpose(Reshape(q, [B, T, N, H]), [0, 2, 1, 3]) * c_q         # (B, N, T, H)
    kh = Transpose(Reshape(k, [B, T, N, H]), [0, 2, 3, 1]) * c_k         # (B, N, H, T)
    vh = Transpose(Reshape(v, [B, T, N, H]), [0, 2, 1, 3])               # (B, N, T, H)
    p  = Softmax(MatMul(qh, kh) + mask, axis=-1)                         # (B, N, T, T)
    p  = Where(IsNaN(p), 0, p)                                           # SDPA's boolean-mask export only
    y  = Reshape(Transpose(MatMul(p, vh), [0, 2, 1, 3]), [B, T, D])      # (B, T, D)

ONNX Runtime's CPU provider runs each of those nodes separately (the transposes copy, the ``Where(IsNaN)``
reads and writes the whole ``(B, N, T, T)`` probability tensor). :func:`fuse_attention` replaces the block by
one ``MultiHeadAttention(q, k, v, attention_bias=mask, num_heads=N, scale=c_q * c_k)`` (ORT contrib
operator, float32 in and out), which computes ``softmax(scale * q_h k_h^T + mask) v_h`` per head and writes
``(B, T, D)`` directly. Nothing is quantized or approximated: the int8 Linear layers around it are untouched.

Exactness: ORT itself folds ``c_q`` and ``c_k`` into one GEMM ``alpha = c_q * c_k`` (its MatMulScaleFusion),
the ``scale`` written here (float32 product). For finite activations the fused node's outputs were
bit-identical to the unfused graph's in ORT 1.32 on x86 (all-MiniLM-L6-v2 fp32 and int8, and the unit tests'
blocks; the tests allow float32 rounding, rtol 1e-5, in case another CPU's kernels sum in another order).
A fully masked row (every ``mask`` entry ``-inf``: a sequence that is all padding) is a NaN row after the
softmax, which SDPA's export zeroes with ``Where(IsNaN)``; MultiHeadAttention returns NaN there, so the fused
form zeroes the same rows on the ``(B, T, D)`` output: ``Where(ReduceMax(mask, -1) > -inf, y, 0)``, the
mask reduction computed once per mask tensor. (Non-finite activations are the one difference: a NaN score in
a row that has an unmasked key is zeroed by the unfused graph's ``Where(IsNaN)`` and stays NaN here.)

The rewrite applies only where every piece is proven: constant reshape targets ``[0|B, 0|T, N|-1, H|-1]``,
scalar constant scales (or none), single-consumer intermediates, and a mask of shape ``(B|1, 1, T, T)``
(by shape inference or by one ORT run on the example inputs). Blocks that do not match (a per-head mask,
an unproven shape) stay as exported. It is applied by ``export_onnx(target="ort-cpu")`` and, as the same
float rewrite, by ``export_onnx_float`` and ``export_onnx_dynamic``, so the float baseline and the peers of a
speed comparison get the same fused attention.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._simplify import _inferred_dims, _shape_values, splice_nodes
from ._simplify import consumers as consumers_of

__all__ = ["MS_DOMAIN", "fuse_attention"]

log = logging.getLogger("lowbit")

MS_DOMAIN = "com.microsoft"
"""ONNX Runtime's contrib operator domain (``MultiHeadAttention`` lives there, version 1)."""


class _Miss(Exception):
    """The block around one Softmax is not the attention pattern: leave it unchanged."""


class _Matcher:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.graph = g
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers = consumers_of(g)
        self.outputs = {o.name for o in g.output}
        self._dims: dict | None = None
        self._values: dict | None = None
        self.model = model

    def dims(self, name: str):
        if self._dims is None:
            self._dims = _inferred_dims(self.model)
        return self._dims.get(name)

    def shape_values(self) -> dict:
        if self._values is None:
            self.dims("")
            self._values = _shape_values(self.model, self._dims)
        return self._values

    def maybe(self, name: str, op: str) -> onnx.NodeProto | None:
        """The standard-domain ``op`` node that makes ``name``, or None."""
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None

    def node(self, name: str, op: str) -> onnx.NodeProto:
        """:meth:`maybe`, raising :class:`_Miss` instead of returning None."""
        n = self.maybe(name, op)
        if n is None:
            raise _Miss(f"{name} is not made by {op}")
        return n

    def only_use(self, name: str, n_uses: int = 1) -> None:
        if name in self.outputs or len(self.consumers.get(name, [])) != n_uses:
            raise _Miss(f"{name} has other consumers")

    def const(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise _Miss(f"{name} is not an initializer")
        return numpy_helper.to_array(self.inits[name])

    def perm(self, n: onnx.NodeProto) -> list[int]:
        return [int(p) for a in n.attribute if a.name == "perm" for p in a.ints]

    def heads(self, t: str, perm: list[int]) -> tuple[str, int, int, list[onnx.NodeProto]]:
        """``t = Transpose(Reshape(x, [0|B, 0|T, N|-1, H|-1]), perm)`` with ``x`` of shape ``(B, T, N * H)``:
        (x, N, H, the two nodes). The first two reshape entries must keep ``B`` and ``T`` (0 = copy)."""
        tr = self.node(t, "Transpose")
        if self.perm(tr) != perm:
            raise _Miss(f"{t}: transpose perm")
        rs = self.node(tr.input[0], "Reshape")
        self.only_use(tr.input[0])
        shape = self.const(rs.input[1])
        x_dims = self.dims(rs.input[0])
        allowzero = any(a.name == "allowzero" and a.i for a in rs.attribute)
        if allowzero or shape.shape != (4,) or x_dims is None or len(x_dims) != 3 or not isinstance(x_dims[2], int):
            raise _Miss(f"{t}: reshape target")
        s0, s1, n, h = (int(v) for v in shape)
        d = x_dims[2]
        if n == -1 and h > 0 and d % h == 0:
            n = d // h
        elif h == -1 and n > 0 and d % n == 0:
            h = d // n
        if n <= 0 or h <= 0 or n * h != d or s0 not in (0, x_dims[0]) or s1 not in (0, x_dims[1]):
            raise _Miss(f"{t}: reshape is not (B, T, D) -> (B, T, N, H)")
        return rs.input[0], n, h, [rs, tr]

    def scaled(self, t: str) -> tuple[str, np.float32, list[onnx.NodeProto]]:
        """``t = x * c`` (c a scalar float32 constant) or ``t = x``: (x, c, [Mul] or [])."""
        n = self.producer.get(t)
        if n is not None and n.op_type == "Mul":
            for a, b in (n.input, n.input[::-1]):
                if b in self.inits and self.const(b).size == 1 and self.inits[b].data_type == TensorProto.FLOAT:
                    self.only_use(t)
                    return a, np.float32(self.const(b).reshape(())), [n]
        return t, np.float32(1.0), []


def _is_btd(m: _Matcher, reshape: onnx.NodeProto, q_dims: list, d: int) -> bool:
    """The final ``Reshape`` of the ``(B, T, N, H)`` context gives ``(B, T, D)``: shape inference says so, or
    its target evaluates (symbolically) to ``[B|0, T|0, -1|D]`` with ``B, T`` the dimensions of ``q``."""
    out = m.dims(reshape.output[0])
    if out is not None and out == [*q_dims[:2], d]:
        return True
    t = m.shape_values().get(reshape.input[1])
    if t is None and reshape.input[1] in m.inits:
        t = (m.const(reshape.input[1]).tolist(), False, 0)
    if t is None or len(t[0]) != 3:
        return False
    b, s, last = t[0]
    return b in (0, q_dims[0]) and s in (0, q_dims[1]) and last in (-1, d) and (b, s) != (0, -1)


def _mask_ok(dims: list | None, batch, t_q, t_k) -> bool:
    """``(B|1, 1, T_q, T_k)``: a mask MultiHeadAttention takes as ``attention_bias`` and whose rows are shared
    by every head (the fully-masked-row fix reduces it to ``(B|1, T_q, 1)``)."""
    return dims is not None and len(dims) == 4 and dims[0] in (1, batch) and list(dims[1:]) == [1, t_q, t_k]


def _match(m: _Matcher, sm: onnx.NodeProto) -> dict:
    """The attention block around Softmax ``sm`` (module docstring) or :class:`_Miss`."""
    axis = next((a.i for a in sm.attribute if a.name == "axis"), -1)
    if axis not in (-1, 3):
        raise _Miss("softmax axis")
    nodes = [sm]
    scores, mask = sm.input[0], None
    add = m.maybe(scores, "Add")
    if add is not None:
        m.only_use(scores)
        for a, b in (add.input, add.input[::-1]):
            mm = m.producer.get(a)
            if mm is not None and mm.op_type == "MatMul":
                scores, mask = a, b
                break
        else:
            raise _Miss("softmax input is an Add without a MatMul")
        nodes.append(add)
    mm1 = m.node(scores, "MatMul")
    m.only_use(scores)
    nodes.append(mm1)
    qt, c_q, mul_q = m.scaled(mm1.input[0])
    kt, c_k, mul_k = m.scaled(mm1.input[1])
    m.only_use(qt)
    m.only_use(kt)
    q, n, h, qn = m.heads(qt, [0, 2, 1, 3])
    k, n_k, h_k, kn = m.heads(kt, [0, 2, 3, 1])
    nodes += mul_q + mul_k + qn + kn
    # after the softmax: optional Where(IsNaN(p), 0, p), then MatMul(p, v_h)
    probs = sm.output[0]
    users = m.consumers.get(probs, [])
    nan_fix = None
    if sorted(u.op_type for u in users) == ["IsNaN", "Where"] and probs not in m.outputs:
        isnan = next(u for u in users if u.op_type == "IsNaN")
        where = next(u for u in users if u.op_type == "Where")
        m.only_use(isnan.output[0])
        if list(where.input) != [isnan.output[0], where.input[1], probs] or np.any(m.const(where.input[1]) != 0):
            raise _Miss("softmax NaN guard")
        nan_fix = [isnan, where]
        nodes += nan_fix
        probs = where.output[0]
    m.only_use(probs)
    mm2 = m.consumers[probs][0]
    if mm2.op_type != "MatMul" or mm2.domain not in ("", "ai.onnx") or mm2.input[0] != probs:
        raise _Miss("probabilities do not feed a MatMul")
    m.only_use(mm2.input[1])
    v, n_v, h_v, vn = m.heads(mm2.input[1], [0, 2, 1, 3])
    if (n, h) != (n_k, h_k) or (n, h) != (n_v, h_v):
        raise _Miss("q, k, v head shapes differ")
    nodes += [mm2, *vn]
    # context back to (B, T, D): [Reshape (B, N, T, H) no-op] -> Transpose [0, 2, 1, 3] -> Reshape (B, T, D)
    t = mm2.output[0]
    m.only_use(t)
    nxt = m.consumers[t][0]
    if nxt.op_type == "Reshape":  # SDPA's export reshapes the (B, N, T, H) context to the same shape
        shape = [int(v) for v in m.const(nxt.input[1]).reshape(-1)]
        t_q = (m.dims(q) or [None, None])[1]
        if shape not in ([0, -1, t_q, h], [0, n, -1, h], [0, n, t_q, h], [-1, n, t_q, h]):
            raise _Miss("context reshape")
        nodes.append(nxt)
        t = nxt.output[0]
        m.only_use(t)
        nxt = m.consumers[t][0]
    if nxt.op_type != "Transpose" or m.perm(nxt) != [0, 2, 1, 3]:
        raise _Miss("context transpose")
    nodes.append(nxt)
    m.only_use(nxt.output[0])
    last = m.consumers[nxt.output[0]][0]
    q_dims = m.dims(q)
    if last.op_type != "Reshape" or q_dims is None or not _is_btd(m, last, q_dims, n * h):
        raise _Miss("context reshape to (B, T, D)")
    nodes.append(last)
    if mask is None and nan_fix is not None:
        raise _Miss("NaN guard without a mask")
    t_k = (m.dims(k) or [None, None])[1]
    return {"q": q, "k": k, "v": v, "mask": mask, "heads": n, "scale": float(np.float32(c_q * c_k)),
            "t": (q_dims[0], q_dims[1], t_k), "nan_fix": nan_fix is not None, "out": last.output[0],
            "nodes": nodes, "at": last}


def _run_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, tuple]:
    """Shapes of the tensors ``names`` when ONNX Runtime (CPU, no graph optimization) runs ``model`` on ``feeds``."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3  # the probe still has the initializers the export removes later
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return {n: tuple(v.shape) for n, v in zip(names, sess.run(names, feeds))}


def fuse_attention(model: onnx.ModelProto, example_feeds: dict[str, np.ndarray] | None = None) -> int:
    """Replace every matched attention block by ``com.microsoft.MultiHeadAttention`` (module docstring), in
    place; adds the ``com.microsoft`` opset import when something was fused. Returns the number of blocks.

    A mask's shape must be proven ``(B|1, 1, T, T)``: by shape inference, or else by one ONNX Runtime run
    of the unfused graph on ``example_feeds`` (``{input name: array}``; the attention blocks whose mask
    shape stays unproven are left as they are). The sequence length is static in a traced export, so only
    ``B`` can differ from the example; ``MultiHeadAttention`` checks the mask shape again at run time.

    Example:
        >>> n = fuse_attention(onnx_model)  # doctest: +SKIP
        >>> # all-MiniLM-L6-v2: n == 6
    """
    m = _Matcher(model)
    found = []
    for sm in list(model.graph.node):
        if sm.op_type != "Softmax" or sm.domain not in ("", "ai.onnx"):
            continue
        try:
            found.append(_match(m, sm))
        except _Miss:
            continue
    unproven = [f for f in found if f["mask"] is not None and not _mask_ok(m.dims(f["mask"]), *f["t"])]
    if unproven and example_feeds is not None:
        names = sorted({t for f in unproven for t in (f["mask"], f["q"], f["k"])})
        try:
            shape = _run_shapes(model, example_feeds, names)
            unproven = [f for f in unproven if not _mask_ok(
                list(shape[f["mask"]]), shape[f["q"]][0], shape[f["q"]][1], shape[f["k"]][1])]
        except Exception as e:  # the probe is an optimization; the export's own ORT check reports real faults
            log.info("lowbit: attention fusion: mask shapes not proven (%s: %s)", type(e).__name__, str(e)[:200])
    found = [f for f in found if f not in unproven]
    if not found:
        return 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    drop = {id(n) for f in found for n in f["nodes"]}
    valid: dict[str, str] = {}  # mask -> bool (B|1, T, 1): the row has an unmasked key
    extra_inits: list[onnx.TensorProto] = []
    replace: dict[int, list[onnx.NodeProto]] = {}
    for i, f in enumerate(found):
        base = f"lowbit_mha{i}"
        new: list[onnx.NodeProto] = []
        attn_out = f"{base}_out" if f["nan_fix"] else f["out"]
        new.append(helper.make_node(
            "MultiHeadAttention", [f["q"], f["k"], f["v"], "", "", f["mask"] or ""], [attn_out], name=base,
            domain=MS_DOMAIN, num_heads=f["heads"], scale=f["scale"]))
        if f["nan_fix"]:
            if f["mask"] not in valid:
                v = f"lowbit_mha_rowvalid{len(valid)}"
                if not extra_inits:
                    extra_inits += [numpy_helper.from_array(np.array([-1], np.int64), "lowbit_mha_axes_last"),
                                    numpy_helper.from_array(np.array([1], np.int64), "lowbit_mha_axes_heads"),
                                    numpy_helper.from_array(np.array(-np.inf, np.float32), "lowbit_mha_neg_inf"),
                                    numpy_helper.from_array(np.array(0, np.float32), "lowbit_mha_zero")]
                reduce = (helper.make_node("ReduceMax", [f["mask"], "lowbit_mha_axes_last"], [f"{v}_max"],
                                           name=f"{v}_max", keepdims=1) if opset >= 18 else  # axes an input from 18
                          helper.make_node("ReduceMax", [f["mask"]], [f"{v}_max"], name=f"{v}_max", keepdims=1,
                                           axes=[-1]))
                new += [
                    reduce,
                    helper.make_node("Greater", [f"{v}_max", "lowbit_mha_neg_inf"], [f"{v}_4d"], name=f"{v}_greater"),
                    helper.make_node("Squeeze", [f"{v}_4d", "lowbit_mha_axes_heads"], [v], name=f"{v}_squeeze"),
                ]
                valid[f["mask"]] = v
            new.append(helper.make_node("Where", [valid[f["mask"]], attn_out, "lowbit_mha_zero"], [f["out"]],
                                        name=f"{base}_zero_masked_rows"))
        replace[id(f["at"])] = new  # where the block ends: q, k, v and the mask exist
    splice_nodes(model, list(model.graph.node), replace, drop)
    model.graph.initializer.extend(extra_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(found)
