"""Issue 4's deployment tolerance on the real models (slow: EfficientNet-Lite0 on ImageNet samples, MiniLM).
The fast, unit-level version (a conv stack built in the test) is test_deploy_parity.py.

Full figures: ``python bench/bench_deploy_parity.py`` (docs/benchmarks.md, "Deployment parity").
"""

import numpy as np
import pytest
import torch

import lowbit
from lowbit import zoo
from lowbit.export import export_onnx, export_onnx_dynamic, run_ort
from lowbit.export.verify import make_session, output_scales
from lowbit.runtime import IntegerRuntime, compare_requant_modes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def effnet(tmp_path_factory):
    try:
        model = zoo.efficientnet_lite0()
        calib = zoo.calibration_batches(zoo.foolbox_images(), batch_size=10)
        data = zoo.imagenet_samples()
    except lowbit.errors.QuantizationError as e:  # missing package or data: say which
        pytest.skip(f"EfficientNet-Lite0 / ImageNet samples unavailable: {e}")
    torch.manual_seed(0)
    q = lowbit.quantize(model, lowbit.recipes.W8A8(), calib, progress=False)
    path = tmp_path_factory.mktemp("real") / "effnet.int8.onnx"
    res = export_onnx(q, calib[0], path)
    idx = np.linspace(0, len(data) - 1, 200).round().astype(int)  # the bench's --quick subset
    x = torch.stack([data[int(i)][0] for i in idx])
    sim, sim_ort, dep = [], [], []
    sess = make_session(path)
    for i in range(0, len(x), 25):
        with torch.no_grad():
            sim.append(q(x[i:i + 25]).numpy())
            with lowbit.nn.ort_arithmetic(q):
                sim_ort.append(q(x[i:i + 25]).numpy())
        dep.append(run_ort(sess, [x[i:i + 25]])[0])
    return res, np.concatenate(sim), np.concatenate(dep), x, np.concatenate(sim_ort)


def test_effnet_int8_kernels_and_top1_agreement(effnet):
    """Issue 4's top-1 goal (>= 99.5 %) holds for the simulation in ORT's arithmetic, the mode export_onnx
    checks parity in (bit-exact: 100 %). The default, backend-neutral simulation differs from ORT at float32
    requantization ties, and which images flip depends on the summation order, i.e. the thread count: on
    these 200 images 0 of 200 at 2 threads, 2 of 200 at 1 thread (0.997 on the bench's 1000 images)."""
    res, sim, dep, _, sim_ort = effnet
    assert res.kernels.int8 == {"QLinearConv": 49, "QGemm": 1} and res.kernels.n_float == 0
    assert (sim.argmax(1) == dep.argmax(1)).mean() >= 0.99
    assert (sim_ort.argmax(1) == dep.argmax(1)).mean() >= 0.995


def test_effnet_logits_within_one_step_default_simulation(effnet):
    """The default simulation (int32 bias, float32 requantization): measured 97.4 % of logits within one step
    on the bench's 1000 images (94.6 % with the float bias it had before); ORT's own unoptimized vs optimized
    run of the same file agree on 97.5 %. Below issue 4's 99 %: the rest are float32 ties (lowbit.nn.requant)."""
    res, sim, dep, _, _ = effnet
    steps = np.abs(sim - dep) / output_scales(res.path)[0]
    assert (steps <= 1.001).mean() >= 0.96
    assert steps.max() <= 6


def test_effnet_logits_within_one_step_target(effnet):
    """Issue 4's tolerance, met by the simulation in ONNX Runtime's arithmetic (lowbit.nn.ort_arithmetic):
    >= 99 % of logits within one output step; measured bit-exact (every logit equal) on all 1000 images of
    the bench, these 200 included."""
    res, _, dep, _, sim_ort = effnet
    steps = np.abs(sim_ort - dep) / output_scales(res.path)[0]
    assert (steps <= 1.001).mean() >= 0.99
    assert steps.max() <= 1.001


def test_effnet_integer_runtime_bit_exact_with_ort(effnet):
    res, _, _, x, _ = effnet
    xs = x[:2].numpy()
    rt = IntegerRuntime(res.path, requant="float")
    out = rt.run({rt.input_names[0]: xs})[rt.output_names[0]]
    np.testing.assert_array_equal(out, run_ort(res.path, [xs])[0])
    cmp = compare_requant_modes(res.path, {rt.input_names[0]: xs})
    assert cmp.worst == 1 and 0 < cmp.n_differing < 0.01 * cmp.n_total


def test_minilm_dynamic_int8_cosine(tmp_path, minilm_stsb):
    model, pairs = minilm_stsb
    sents = list(pairs.sentences1[:32]) + list(pairs.sentences2[:32])
    t = model.tokenizer(sents, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    ids, mask = t["input_ids"], t["attention_mask"]
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    q = lowbit.quantize(model, lowbit.recipes.W8A8Dynamic(), example_inputs=(ids[:4], mask[:4]), progress=False)
    res = export_onnx(q, (ids[:4], mask[:4]), tmp_path / "m.int8.onnx", min_cosine=0.99)
    p_dyn = export_onnx_dynamic(model, (ids[:4], mask[:4]), tmp_path / "m.dyn.onnx")
    # every Linear of the 6 layers: q, k, v packed into one QAttention GEMM; o, ffn in, ffn out
    assert res.kernels.int8 == {"QAttention": 6, "DynamicQuantizeMatMul": 18} and res.kernels.n_float == 0
    for path in (res.path, p_dyn):
        out = run_ort(path, [ids, mask])[0]
        cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.mean() >= 0.99
