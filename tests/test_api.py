"""lowbit.quantize end to end: every recipe on small models, real architectures, bad inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import QuantSpec
from lowbit.errors import ConfigError, EmptyCalibrationError, NonFiniteError, UnsupportedLayerError
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.recipes import (
    BF16,
    FP8,
    FP16,
    W4A16,
    W8A8,
    W8A16,
    BinaryWeights,
    Custom,
    PowerOfTwoWeights,
    TernaryWeights,
    W8A8Dynamic,
    WeightOnly,
)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 8 * 8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.act(self.bn(self.conv(x)))
        h = torch.cat([F.silu(self.dw(h)), h], 1)[:, :8]
        h = F.max_pool2d(self.up(h), 2)
        return self.head(F.gelu(self.fc(h.flatten(1))))


def _data(n=3, shape=(2, 3, 8, 8)):
    return [torch.randn(*shape) for _ in range(n)]


def _sqnr(ref, out):
    ref, out = ref.detach(), out.detach()
    return 10 * math.log10(float((ref ** 2).sum()) / max(float(((ref - out) ** 2).sum()), 1e-30))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    m = Small().eval()
    with torch.no_grad():
        m.bn.running_var.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("recipe, floor_db", [
    (W8A8(), 25), (W8A8(calibrator="moving_average"), 20), (W8A8(calibrator="kl"), 15),
    (W8A8(calibrator="percentile"), 15), (W8A8(calibrator="mse"), 15), (W8A8(per_channel=False), 20),
    (W8A8(act_dtype="int8", symmetric_act=True), 20), (W8A16(), 35), (FP8(), 20), (FP16(), 50), (BF16(), 30),
    (W8A8Dynamic(), 35), (W8A8Dynamic(granularity="token"), 35), (WeightOnly(bits=8), 35),
    (W4A16(group_size=8), 10), (BinaryWeights(), -10), (TernaryWeights(), -10), (PowerOfTwoWeights(), 0),
    (Custom(weight=QuantSpec("int6", granularity="channel"), activation=QuantSpec("uint8", symmetric=False)), 20),
])
def test_every_recipe_runs_and_stays_close(small, recipe, floor_db):
    torch.manual_seed(1)
    data = _data()
    q = lowbit.quantize(small, recipe, data, progress=False)
    log = lowbit.decision_log(q)
    assert log.path == "graph"
    x = torch.randn(2, 3, 8, 8)
    out, ref = q(x), small(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _sqnr(ref, out) > floor_db
    table = lowbit.quant_table(q)
    assert table and all(r.calibrated for r in table)
    assert any(d.quantized for d in log.decisions)


def test_w8a8_weights_equal_torch_per_channel_fake_quant(small):
    q = lowbit.quantize(small, W8A8(), _data(), progress=False)
    w = small.head.weight.detach()
    s = w.abs().amax(1) / 127
    exp = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(10, dtype=torch.int32), 0, -128, 127)
    torch.testing.assert_close(q.head.quantized_weight(), exp, rtol=0, atol=0)
    # unit Conv-BN-ReLU6: one quantizer after ReLU6, none between
    assert isinstance(q.conv.activation, nn.ReLU6) and q.conv.output_quantizer is not None
    assert isinstance(q.fc.activation, nn.GELU)


def test_w4a16_group_weights_and_skip_log(small):
    q = lowbit.quantize(small, W4A16(group_size=8), progress=False)
    log = lowbit.decision_log(q)
    # the stem conv has 3 input channels: group 8 cannot apply -> skipped with the reason, not silently
    stem = log.get("conv")
    assert not stem.quantized and "does not divide" in stem.reason
    w = small.head.weight.detach().reshape(-1, 8)
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    s = (hi - lo) / 15
    z = torch.clamp(torch.round(-lo / s), 0, 15).to(torch.int32)
    exp = torch.fake_quantize_per_channel_affine(w, s, z, 0, 0, 15).reshape(10, 32)
    torch.testing.assert_close(q.head.quantized_weight(), exp, rtol=0, atol=1e-6)
    assert not any(r.role != "weight" for r in lowbit.quant_table(q))  # weight-only
    with pytest.raises(UnsupportedLayerError):
        lowbit.quantize(small, W4A16(group_size=8), strict=True, progress=False)
    # keep_first_last_8bit gives the stem int8 per-channel weights instead
    q2 = lowbit.quantize(small, W4A16(group_size=8, keep_first_last_8bit=True), progress=False)
    assert q2.conv.weight_quantizer.spec.format.name == "int8"
    assert q2.head.weight_quantizer.spec.format.name == "int8"


def test_explicit_impossible_format_is_an_error(small):
    with pytest.raises(UnsupportedLayerError, match="group size 16 does not divide the 3 input channels"):
        lowbit.quantize(small, W8A8(), _data(), overrides={"conv": QuantSpec("int4", granularity="group:16")},
                        progress=False)


def test_unknown_override_name(small):
    with pytest.raises(ConfigError, match="Did you mean: 'head'"):
        lowbit.quantize(small, W8A8(), _data(), overrides={"haed": None}, progress=False)


def test_exclude_and_override_apply(small):
    q = lowbit.quantize(small, W8A8(), _data(), exclude=("head",), overrides={"fc": QuantSpec("int4", granularity="channel")},
                        progress=False)
    assert type(q.head) is nn.Linear
    assert q.fc.weight_quantizer.spec.format.name == "int4"
    assert lowbit.decision_log(q).get("head").by_user


def test_calibration_data_forms_and_num_batches(small):
    xs = _data(4)
    n_seen = []
    # (image, label) tuples from a DataLoader: labels dropped (forward takes one argument)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs), torch.zeros(8, dtype=torch.long)),
                                         batch_size=2)
    q = lowbit.quantize(small, W8A8(), loader, num_batches=2, progress=False)
    n_seen.append(q.get_submodule("x_quant").observer.num_batches)
    # a generator (one-shot): the first batch is peeked and put back
    q2 = lowbit.quantize(small, W8A8(), (x for x in xs), progress=False)
    n_seen.append(q2.get_submodule("x_quant").observer.num_batches)
    assert n_seen == [2, 4]
    lo = min(float(x.min()) for x in xs)
    assert math.isclose(-float(q2.get_submodule("x_quant").zero_point) * float(q2.get_submodule("x_quant").scale), lo,
                        rel_tol=0.02)


class KwModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, input_ids, scale=None):
        h = self.fc(self.emb(input_ids))
        return h if scale is None else h * scale


def test_dict_batches_and_embedding():
    torch.manual_seed(2)
    m = KwModel().eval()
    data = [{"input_ids": torch.randint(0, 20, (2, 5))} for _ in range(2)]
    q = lowbit.quantize(m, W8A8(), data, progress=False)
    assert isinstance(q.emb, QuantEmbedding) and q.emb.output_quantizer is None
    assert isinstance(q.fc, QuantLinear)
    assert torch.isfinite(q(**data[0])).all()


def test_empty_and_nan_calibration(small):
    with pytest.raises(EmptyCalibrationError, match="no batches"):
        lowbit.quantize(small, W8A8(), [], progress=False)
    with pytest.raises(EmptyCalibrationError, match="needs calibration data"):
        lowbit.quantize(small, W8A8(), None, progress=False)
    bad = _data(3)
    bad[2][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="calibration batch 2"):
        lowbit.quantize(small, W8A8(), bad, progress=False)


def test_dynamic_needs_no_data_and_layer_sqnr(small):
    q = lowbit.quantize(small, W8A8Dynamic(), progress=False)
    assert q.fc.input_quantizer.spec.dynamic and q.conv.__class__ is nn.Conv2d
    rows = lowbit.layer_sqnr(small, q, _data(2))
    by = {r.name: r for r in rows}
    assert set(by) == {"fc", "head", "<model output>"}
    assert all(30 < r.sqnr_db < 80 for r in rows)
    assert "fc" in lowbit.format_sqnr_table(rows)


def test_deepcopy_keeps_recipe_decisions_and_passes(small):
    """``quantize`` returns a torch.fx GraphModule, whose ``__deepcopy__`` keeps only parameters, buffers and
    submodules unless told otherwise: the recipe, decision log and pass log must survive a copy (convert
    and the checkpoint writer read them from copies)."""
    q = lowbit.quantize(small, W8A8(), _data(2), dfq=lowbit.DFQ(), progress=False)
    assert isinstance(q, torch.fx.GraphModule)
    twin = copy.deepcopy(q)
    assert twin.lowbit_recipe == q.lowbit_recipe == W8A8()
    assert str(twin.lowbit_decisions) == str(q.lowbit_decisions) and twin.lowbit_decisions is not q.lowbit_decisions
    assert twin.lowbit_passes.summary() == q.lowbit_passes.summary()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(twin(x), q(x))


def test_layer_sqnr_is_inf_when_nothing_changes():
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(16.0).reshape(4, 4) - 8)  # small integers: exact in fp16
    q = lowbit.quantize(nn.Sequential(lin), FP16(activations=False), progress=False)
    rows = lowbit.layer_sqnr(None, q, [torch.ones(1, 4)])
    assert rows[0].sqnr_db == math.inf


def test_quantize_rejects_a_tensor_with_a_pointer_to_ops():
    with pytest.raises(lowbit.QuantizationError, match="nn.Module"):
        lowbit.quantize(torch.tensor([0.26, -2.0]), W8A8(), [torch.zeros(1)])


def test_resnet18_and_mobilenet_v2():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    for ctor in (tv.models.resnet18, tv.models.mobilenet_v2):
        m = ctor(num_classes=10).train()
        with torch.no_grad():  # BN statistics from data, so activations keep a sane scale (random init collapses)
            for _ in range(3):
                m(torch.randn(4, 3, 64, 64))
        m.eval()
        data = _data(2, (1, 3, 64, 64))
        q = lowbit.quantize(m, W8A8(), data, progress=False)
        log = lowbit.decision_log(q)
        assert log.path == "graph" and not log.unexpected_skips, str(log)
        assert not any(isinstance(x, nn.BatchNorm2d) for x in q.modules())
        x = torch.randn(1, 3, 64, 64)
        assert _sqnr(m(x), q(x)) > 15


def test_tiny_bert_module_swap():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    m = transformers.BertModel(cfg).eval()
    batch = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    for recipe in (W8A8Dynamic(), W8A8()):
        q = lowbit.quantize(m, recipe, [batch], progress=False)
        log = lowbit.decision_log(q)
        assert log.path in ("graph", "module_swap")
        assert isinstance(q.encoder.layer[0].attention.self.query, QuantLinear)
        ref = m(**batch).last_hidden_state
        out = q(**batch).last_hidden_state
        cos = F.cosine_similarity(ref.flatten(1), out.flatten(1)).min()
        assert float(cos) > 0.99


def test_subpackages_and_errors_reachable_after_a_plain_import():
    """In a fresh interpreter, ``import lowbit`` alone gives ``lowbit.distributed``, ``lowbit.runtime``, ... and
    every error class the docs name at the top level (``lowbit.ParityError``)."""
    import subprocess
    import sys

    code = (
        "import lowbit, lowbit.errors as E\n"
        "assert 'lowbit.distributed' not in __import__('sys').modules\n"
        "assert lowbit.distributed.int8_hook.__module__ == 'lowbit.distributed.comm_hooks'\n"
        "assert lowbit.runtime.IntegerRuntime.__name__ == 'IntegerRuntime'\n"
        "assert lowbit.zoo.foolbox_images and lowbit.workflows.run_quantize\n"
        "errs = [n for n in dir(E) if isinstance(getattr(E, n), type) and issubclass(getattr(E, n), E.QuantizationError)]\n"
        "assert all(getattr(lowbit, n) is getattr(E, n) and n in lowbit.__all__ for n in errs), errs\n"
        "try:\n    lowbit.no_such_thing\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
