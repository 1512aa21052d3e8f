"""Attention fusion (lowbit.export._attention) and q/k/v packing (lowbit.export._qkv) under
target="ort-cpu": the traced SDPA block becomes one com.microsoft.MultiHeadAttention, whose three
projections are then packed with it into one Attention (float) or QAttention (dynamic int8), in the file
and in ONNX Runtime's optimized graph; the outputs are the unfused graph's to float32 rounding, fully
padded sequences included. Op counts, never timings."""

from __future__ import annotations

import collections
import math
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

import lowbit
from lowbit.errors import ConfigError
from lowbit.export import _simplify as sp
from lowbit.export import export_onnx, export_onnx_dynamic, export_onnx_float
from lowbit.export._attention import fuse_attention
from lowbit.export.verify import make_session

D, HEADS, T = 32, 4, 8


class TinyAttention(nn.Module):
    """One self-attention block the way a BERT with SDPA writes it: (B, T) keep-mask -> boolean (B, 1, T, T),
    ``F.scaled_dot_product_attention``, output projection. ``scale`` None: torch computes 1/sqrt(H) from the
    traced shape (a Shape -> Slice -> Sqrt chain in the export); a float: a constant, as transformers passes."""

    def __init__(self, scale: float | None = None, per_head_mask: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.scale, self.per_head_mask = scale, per_head_mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, HEADS, -1).transpose(1, 2)

        m = mask if mask.dtype == torch.bool else _keep(mask, HEADS if self.per_head_mask else 1)
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=m,
                                           scale=self.scale)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


def _keep(mask: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """(B, T) 0/1 key mask -> boolean (B, heads, T, T), True where a key is attended."""
    b, t = mask.shape
    return mask[:, None, None, :].bool().expand(b, heads, t, t)


class TinyEncoder(nn.Module):
    """Two attention blocks with residual adds and a GELU MLP: what W8A8Dynamic quantizes in a BERT (which
    also builds the boolean mask once for all its layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.att = nn.ModuleList(TinyAttention(scale=1 / math.sqrt(D // HEADS)) for _ in range(2))
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x, mask):
        keep = _keep(mask)
        for a in self.att:
            x = x + a(x, keep)
        return x + self.mlp(x)


def _inputs(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, D, generator=g)
    mask = torch.ones(b, T, dtype=torch.int64)
    mask[0, T - 3:] = 0  # partial padding
    if b > 1:
        mask[1] = 0  # a sequence that is all padding: SDPA's export zeroes its attention rows
    if b > 2:
        mask[2, :1] = 0
    return x, mask


def _run(path, x, mask) -> np.ndarray:
    sess = make_session(path, threads=1)
    return sess.run(None, {"input_0": x.numpy(), "input_1": mask.numpy()})[0]


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _optimized_ops(path, tmp_path) -> collections.Counter:
    opt = os.path.join(tmp_path, f"{os.path.basename(str(path))}.opt.onnx")
    make_session(path, optimized_path=opt)
    return collections.Counter(n.op_type for n in onnx.load(opt).graph.node)


def _assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert not np.isnan(a).any() and not np.isnan(b).any()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_float_export_fuses_sdpa_into_one_node_with_the_same_outputs(scale, tmp_path):
    torch.manual_seed(0)
    m = TinyAttention(scale).eval()
    fused = export_onnx_float(m, _inputs(2), tmp_path / "f.onnx")
    plain = export_onnx_float(m, _inputs(2), tmp_path / "p.onnx", target="qdq")
    ops, ops_plain = _ops(fused), _ops(plain)
    assert ops["Attention"] == 1 and ops["MultiHeadAttention"] == 0 and ops_plain["Attention"] == 0
    for gone in ("Softmax", "IsNaN", "Transpose"):
        assert ops[gone] == 0 and ops_plain[gone] >= 1, gone
    assert ops["MatMul"] == 1 and ops_plain["MatMul"] == 6  # q/k/v packed into the Attention node, o stays
    att = next(n for n in onnx.load(str(fused)).graph.node if n.op_type == "Attention")
    attrs = {a.name: helper.get_attribute_value(a) for a in att.attribute}
    assert attrs["num_heads"] == HEADS
    expected = np.float32(np.sqrt(np.float32(scale))) ** 2 if scale else np.float32(1 / math.sqrt(D // HEADS))
    assert attrs["scale"] == pytest.approx(float(expected), rel=1e-6)
    w = numpy_helper.to_array(next(t for t in onnx.load(str(fused)).graph.initializer if t.name == att.input[1]))
    np.testing.assert_array_equal(w, torch.cat([m.q.weight, m.k.weight, m.v.weight]).T.detach().numpy())
    # ORT keeps it: one Attention, no softmax or transposes around it
    opt = _optimized_ops(fused, tmp_path)
    assert opt["Attention"] == 1 and opt["Softmax"] == 0 and opt["Transpose"] == 0
    for b in (1, 2, 5):  # the dynamic batch, a fully padded sequence from b=2 on
        x, mask = _inputs(b, seed=b)
        _assert_same(_run(fused, x, mask), _run(plain, x, mask))
        with torch.no_grad():
            ref = m(x, mask).numpy()
        np.testing.assert_allclose(_run(fused, x, mask), ref, rtol=1e-4, atol=1e-5)


def _without_row_fix(model: onnx.ModelProto, path) -> str:
    """``model`` with its attention node writing the row fix's output directly, saved at ``path``."""
    fix = next(n for n in model.graph.node if n.name.endswith("zero_masked_rows"))
    att = next(n for n in model.graph.node if n.output[0] == fix.input[1 if fix.op_type == "Where" else 0])
    att.output[0] = fix.output[0]
    model.graph.node.remove(fix)
    onnx.save(model, str(path))
    return str(path)


def test_fully_padded_sequence_needs_the_row_fix(tmp_path):
    """SDPA's export returns zeros for a sequence whose keys are all masked. ORT's MultiHeadAttention with the
    additive -inf mask returns NaN there, so the fusion zeroes those rows with ``Where(row_valid, y, 0)``;
    the packed ``Attention`` takes the 0/1 key mask (finite: a uniform average), so the fix becomes a
    multiply by the row flag. Either way the fix is what restores the zeros."""
    torch.manual_seed(0)
    m = TinyAttention().eval()
    fused = export_onnx_float(m, _inputs(2), tmp_path / "f.onnx")
    plain = export_onnx_float(m, _inputs(2), tmp_path / "p.onnx", target="qdq")
    x, mask = _inputs(3, seed=7)
    good = _run(fused, x, mask)
    _assert_same(good, _run(plain, x, mask))
    # the all-padding sequence: zero attention, so the output projection's bias alone
    np.testing.assert_allclose(good[1], np.broadcast_to(m.o.bias.detach().numpy(), good[1].shape), atol=1e-7)
    g = onnx.load(str(fused))
    assert collections.Counter(n.op_type for n in g.graph.node if n.name.endswith("zero_masked_rows")) == {"Mul": 1}
    broken = _run(_without_row_fix(g, tmp_path / "nofix.onnx"), x, mask)
    assert np.isfinite(broken).all() and np.abs(broken[1] - good[1]).max() > 1e-2
    np.testing.assert_array_equal(broken[[0, 2]], good[[0, 2]])
    # the MultiHeadAttention form (before the packing): NaN without its Where
    mha = onnx.load(str(plain))
    assert fuse_attention(mha, {"input_0": x.numpy(), "input_1": mask.numpy()}) == 1
    assert any(n.op_type == "Where" and n.name.endswith("zero_masked_rows") for n in mha.graph.node)
    onnx.save(mha, str(tmp_path / "mha.onnx"))
    _assert_same(_run(tmp_path / "mha.onnx", x, mask), good)
    broken = _run(_without_row_fix(mha, tmp_path / "mha_nofix.onnx"), x, mask)
    assert np.isnan(broken[1]).all()
    np.testing.assert_array_equal(broken[[0, 2]], good[[0, 2]])


def test_per_head_mask_is_left_unfused(tmp_path):
    """A (B, N, T, T) mask has rows that differ per head: the row fix on (B, T, D) cannot express that, so
    the block stays as exported (and still runs)."""
    torch.manual_seed(0)
    m = TinyAttention(per_head_mask=True).eval()
    path = export_onnx_float(m, _inputs(2), tmp_path / "f.onnx")
    ops = _ops(path)
    assert ops["MultiHeadAttention"] == 0 and ops["Softmax"] == 1
    x, mask = _inputs(2, seed=3)
    with torch.no_grad():
        np.testing.assert_allclose(_run(path, x, mask), m(x, mask).numpy(), rtol=1e-4, atol=1e-5)


def test_unproven_mask_shape_without_example_inputs_is_not_fused(tmp_path):
    """Shape inference cannot follow the traced mask's Expand; without example inputs to run, nothing is
    fused, with them the same graph is."""
    torch.manual_seed(0)
    m = TinyAttention().eval()
    plain = onnx.load(str(export_onnx_float(m, _inputs(2), tmp_path / "p.onnx", target="qdq")))
    a, b = onnx.ModelProto(), onnx.ModelProto()
    a.CopyFrom(plain)
    b.CopyFrom(plain)
    assert fuse_attention(a) == 0
    x, mask = _inputs(2)
    assert fuse_attention(b, {"input_0": x.numpy(), "input_1": mask.numpy()}) == 1


def test_float_export_rejects_unknown_target(tmp_path):
    with pytest.raises(ConfigError, match="target"):
        export_onnx_float(TinyAttention().eval(), _inputs(2), tmp_path / "f.onnx", target="tensorrt")


@pytest.fixture(scope="module")
def encoder_exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("attn")
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    q = lowbit.quantize(model, lowbit.recipes.W8A8Dynamic(), example_inputs=_inputs(2), progress=False)
    ort_cpu = export_onnx(q, _inputs(2), d / "q.ort.onnx")
    qdq = export_onnx(q, _inputs(2), d / "q.qdq.onnx", target="qdq")
    return ort_cpu, qdq


def test_w8a8dynamic_export_packs_attention_into_qattention(encoder_exports, tmp_path):
    ort_cpu, qdq = encoder_exports
    ops = _ops(ort_cpu.path)
    assert ops["QAttention"] == 2 and ops["MultiHeadAttention"] == 0 and _ops(qdq.path)["QAttention"] == 0
    assert ops["DynamicQuantizeLinear"] == 6  # one per QAttention input, o and the two MLP Linears
    qa = [n for n in onnx.load(str(ort_cpu.path)).graph.node if n.op_type == "QAttention"]
    assert qa[0].input[5] and len({n.input[5] for n in qa}) == 1, "one raw key mask for every block"
    assert ops["Expand"] == _ops(qdq.path)["Expand"] + 1  # made once: one Cast/Squeeze/Expand in all
    fixes = collections.Counter(n.op_type for n in onnx.load(str(ort_cpu.path)).graph.node
                                if n.name.endswith("zero_masked_rows"))
    assert fixes == {"Mul": 2}  # QAttention's fully masked rows are finite: the row fix is a multiply
    opt = _optimized_ops(ort_cpu.path, tmp_path)
    assert opt["QAttention"] == 2 and opt["Softmax"] == 0 and opt["IsNaN"] == 0
    # every Linear still an int8 kernel with its bias inside: q/k/v in one QAttention GEMM per block
    assert ort_cpu.kernels.int8 == {"QAttention": 2, "DynamicQuantizeMatMul": 4} and ort_cpu.kernels.n_float == 0
    assert qdq.kernels.n_int8 == 10 and qdq.kernels.n_float == 4  # 2 score + 2 context MatMuls
    assert opt["Add"] <= _optimized_ops(qdq.path, tmp_path)["Add"]
    assert all(st.fraction_equal == 1.0 for st in ort_cpu.parity.stages), [str(st) for st in ort_cpu.parity.stages]
    for b in (1, 3):  # b = 3: a fully padded sequence (QAttention's uniform row, zeroed by the row fix)
        x, mask = _inputs(b, seed=10 + b)
        _assert_same(_run(ort_cpu.path, x, mask), _run(qdq.path, x, mask))


def test_qattention_weights_are_the_three_projections(encoder_exports):
    """The packed int8 weight is [W_q | W_k | W_v] in (D_in, 3 D) layout, the scales and zero points per
    column in the same order, and the raw key mask's filter value stands for SDPA's -inf."""
    ort_cpu, qdq = encoder_exports
    g = onnx.load(str(ort_cpu.path)).graph
    plain = onnx.load(str(qdq.path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    plain_inits = {t.name: numpy_helper.to_array(t) for t in plain.initializer}
    qa = [n for n in g.node if n.op_type == "QAttention"][0]
    w = inits[qa.input[1]]
    assert w.shape == (D, 3 * D) and w.dtype == np.int8
    # the plain QDQ file keeps each projection's weight codes (output channels first) in q, k, v order
    w_plain = [v for k, v in plain_inits.items() if v.dtype == np.int8 and v.shape == (D, D)][:3]
    np.testing.assert_array_equal(w, np.concatenate([c.T for c in w_plain], axis=1))
    assert inits[qa.input[4]].shape == (3 * D,) and not inits[qa.input[7]].any()
    attrs = {a.name: helper.get_attribute_value(a) for a in qa.attribute}
    assert attrs["num_heads"] == HEADS and attrs["mask_filter_value"] == np.finfo(np.float32).min


class AdditiveMaskAttention(nn.Module):
    """Attention whose mask is a float input added to the scores: QAttention cannot take it (only a 0/1 key
    mask), Attention can."""

    def __init__(self) -> None:
        super().__init__()
        self.att = TinyAttention()

    def forward(self, x, bias):
        a = self.att
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, HEADS, -1).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(a.q(x)), split(a.k(x)), split(a.v(x)), attn_mask=bias)
        return a.o(y.transpose(1, 2).reshape(b, t, d))


def test_additive_mask_keeps_multiheadattention_for_int8_and_packs_float(tmp_path):
    torch.manual_seed(0)
    model = AdditiveMaskAttention().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, D, generator=g)
    bias = torch.randn(2, 1, T, T, generator=g)
    q = lowbit.quantize(model, lowbit.recipes.W8A8Dynamic(), example_inputs=(x, bias), progress=False)
    res = export_onnx(q, (x, bias), tmp_path / "q.onnx")
    ops = _ops(res.path)
    assert ops["MultiHeadAttention"] == 1 and ops["QAttention"] == 0 and ops["MatMulInteger"] == 4
    assert all(st.fraction_equal == 1.0 for st in res.parity.stages)
    f = export_onnx_float(model, (x, bias), tmp_path / "f.onnx")
    plain = export_onnx_float(model, (x, bias), tmp_path / "p.onnx", target="qdq")
    assert _ops(f)["Attention"] == 1
    feeds = {"input_0": x.numpy(), "input_1": bias.numpy()}
    got, ref = (make_session(p, threads=1).run(None, feeds)[0] for p in (f, plain))
    _assert_same(got, ref)


def test_slice_of_a_static_shape_is_folded():
    """``x.shape[-1:]`` of a tensor whose last dimension is static (SDPA's default scale 1/sqrt(H) is traced
    as Shape -> Slice -> Cast -> Sqrt) becomes a constant; a slice that keeps the dynamic batch does not."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4, 6])
    r = helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [1])
    z = helper.make_tensor_value_info("z", onnx.TensorProto.INT64, [2])
    inits = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in
             (("m1", -1), ("big", 2**63 - 1), ("zero", 0), ("two", 2))]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "m1", "big"], ["h"]),
             helper.make_node("Cast", ["h"], ["hf"], to=onnx.TensorProto.FLOAT), helper.make_node("Sqrt", ["hf"], ["r"]),
             helper.make_node("Slice", ["s", "zero", "two"], ["z"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [r, z], inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=9)  # ORT 1.30 reads IR <= 11
    sp.fold_static_shapes(model)
    slices = [n for n in model.graph.node if n.op_type == "Slice"]
    assert [n.output[0] for n in slices] == ["z"]  # [batch, 4] stays computed
    feeds = {"x": np.zeros((3, 4, 6), np.float32)}
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(got[0], [np.sqrt(6)], rtol=1e-7)
    np.testing.assert_array_equal(got[1], [3, 4])


def test_quantize_dynamic_peer_gets_the_same_fusion(tmp_path):
    """ORT's quantize_dynamic cannot type contrib operators, so export_onnx_dynamic fuses after it: the peer
    of the speed table gets the same fused attention with packed int8 projections (QAttention) and the same
    outputs as without the fusion."""
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    fused = export_onnx_dynamic(model, _inputs(2), tmp_path / "d.onnx")
    plain = export_onnx_dynamic(model, _inputs(2), tmp_path / "p.onnx", target="qdq")
    assert _ops(fused)["QAttention"] == 2 and _ops(plain)["MultiHeadAttention"] == 0
    assert _ops(fused)["MatMulInteger"] == 4 and _ops(plain)["MatMulInteger"] == 10
    x, mask = _inputs(3, seed=21)
    _assert_same(_run(fused, x, mask), _run(plain, x, mask))
