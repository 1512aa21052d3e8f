"""CUDA against CPU, model level: ``lowbit.quantize`` of a small CNN, QAT steps, AdaRound,
``convert(backend="torch")`` (int8 ``torch._int_mm`` and packed weight-only) with its memory, and
``lowbit.save`` / ``lowbit.load`` of a CUDA model. The same model and data run on the CPU as the reference.

Float32 convolutions and matmuls run without TF32 (``ieee_fp32``); what remains between the devices is
summation order (about 1e-6 relative), which can move an activation across a rounding boundary, so
model outputs are compared by SQNR and in quantization steps, qparams to float32 tolerance.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

import lowbit
from lowbit import recipes
from lowbit.distributed.sync import quantizer_state
from lowbit.nn.int8 import Int8Linear, PackedWeightLinear, module_nbytes
from lowbit.ops import quantize as quantize_codes
from lowbit.report import sqnr_db

from ._device import DEVICE, ON_GPU, assert_ulp_close, bits_equal, ieee_fp32

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    with ieee_fp32():
        yield


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    m = SmallCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding matters
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
        m.bn1.weight.uniform_(0.5, 1.5)
        m.bn1.bias.uniform_(-0.3, 0.3)
    return m.eval()


def _images(n: int, seed: int = 1, batch: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n)]


def _on(data: list[torch.Tensor], dev) -> list[torch.Tensor]:
    return [x.to(dev) for x in data]


def _all_on_device(model: nn.Module) -> bool:
    return all(t.device.type == DEVICE.type for t in [*model.parameters(), *model.buffers()])


def _assert_states_close(st_cpu: dict, st_dev: dict, rtol: float) -> None:
    assert st_cpu.keys() == st_dev.keys() and st_cpu
    for k in st_cpu:
        if k.endswith(".zero_point"):
            # an activation range a float-rounding apart can move the zero point by one code at most
            assert float((st_cpu[k] - st_dev[k]).abs().max()) <= 1, k
        else:
            torch.testing.assert_close(st_dev[k], st_cpu[k], rtol=rtol, atol=0.0, msg=k)


@pytest.mark.parametrize("calibrator", ["minmax", "percentile"])
def test_quantize_cnn_same_scales_and_outputs(calibrator):
    model = _cnn()
    calib, test = _images(4), _images(2, seed=9)
    recipe = recipes.W8A8(calibrator=calibrator)
    q_cpu = lowbit.quantize(model, recipe, calib, progress=False)
    q_dev = lowbit.quantize(copy.deepcopy(model).to(DEVICE), recipe, _on(calib, DEVICE), progress=False)
    assert _all_on_device(q_dev), "every quantizer buffer must follow the model to the device"
    st_cpu, st_dev = quantizer_state(q_cpu), quantizer_state(q_dev)
    # weight scales: max|w| / 127 per channel of the BatchNorm-folded weights; folding (w * gamma / sqrt(var
    # + eps)) rounds differently under CUDA's fused multiply-add (seen on an H100), so a few ulp
    weight_keys = [k for k in st_cpu if ".weight_quantizer." in k]
    assert len(weight_keys) == 6
    for k in weight_keys:
        if k.endswith(".scale"):
            assert_ulp_close(st_dev[k], st_cpu[k])
        else:
            assert torch.equal(st_cpu[k], st_dev[k].cpu()), k
    # activation ranges come from activations computed in another summation order
    _assert_states_close(st_cpu, st_dev, rtol=1e-4)
    with torch.no_grad():
        for x in test:
            y_cpu, y_dev = q_cpu(x), q_dev(x.to(DEVICE))
            y_float = model(x)
            assert sqnr_db(y_cpu, y_dev) > 40.0  # devices agree far better than quantization error
            assert abs(sqnr_db(y_float, y_dev) - sqnr_db(y_float, y_cpu)) < 0.5


def _qat_run(model: nn.Module, dev, learnable: str, steps: int = 3):
    """``model`` prepared for QAT on ``dev`` and trained ``steps`` SGD steps: ``(qat model, losses)``."""
    calib = _on(_images(2), dev)
    train = _on(_images(steps, seed=3), dev)
    g = torch.Generator().manual_seed(4)
    targets = [torch.randint(0, 10, (8,), generator=g).to(dev) for _ in range(steps)]
    qat = lowbit.prepare_qat(model.to(dev), recipes.W8A8(), calib_data=calib, learnable=learnable)
    opt = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, t in zip(train, targets):
        loss = nn.functional.cross_entropy(qat(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return qat, losses


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("learnable", ["ste", "lsq"])
def test_qat_step_matches_cpu_from_the_same_state(learnable):
    """One QAT step (forward, backward, SGD) from bit-identical states on both devices. Only summation
    order differs (about 1e-6 relative), so the loss, every gradient and the updated parameters and
    quantizer states agree closely. A few activations on a rounding tie can take the other code, so
    gradients are compared as whole tensors (relative L2), not element by element.

    Longer runs are chaotic, not comparable: with LSQ a weight exactly on the clip boundary (min/max
    initialisation puts each channel's largest weight there) switches its scale-gradient term between
    ~0 and Q_p on a one-ulp difference; on the CPU alone, a 1e-6 relative perturbation of the weights
    moved conv1's learned scales by 20 % after one step at lr 0.05 (3 steps: up to 2x on conv2)."""
    torch.manual_seed(0)
    calib = _images(2)
    qat_cpu = lowbit.prepare_qat(_cnn(1).train(), recipes.W8A8(), calib_data=calib, learnable=learnable)
    qat_dev = copy.deepcopy(qat_cpu).to(DEVICE)
    assert _all_on_device(qat_dev), "QAT buffers (step counter, bn_frozen, quantizers) must follow .to(device)"
    x = _images(1, seed=3)[0]
    t = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(4))
    grads = {}
    for tag, qat, dev in (("cpu", qat_cpu, "cpu"), ("dev", qat_dev, DEVICE)):
        opt = torch.optim.SGD(qat.parameters(), lr=0.05)
        loss = nn.functional.cross_entropy(qat(x.to(dev)), t.to(dev))
        opt.zero_grad()
        loss.backward()
        grads[tag] = ({n: p.grad.detach().clone() for n, p in qat.named_parameters() if p.grad is not None},
                      float(loss.detach()))
        opt.step()
    (g_cpu, loss_cpu), (g_dev, loss_dev) = grads["cpu"], grads["dev"]
    assert loss_dev == pytest.approx(loss_cpu, rel=1e-5)
    assert g_cpu.keys() == g_dev.keys() and len(g_cpu) >= 6  # weights, biases, BN affine (+ LSQ scales)
    if learnable == "lsq":
        assert any(n.endswith("weight_quantizer.scale") for n in g_cpu), "LSQ must train the weight scales"
    # a conv bias followed by training-mode BatchNorm has a gradient of exactly 0 in exact arithmetic
    # (the batch mean absorbs it): both devices give float noise (~1e-9) there, compared absolutely
    largest = max(float(g.norm()) for g in g_cpu.values())
    for n in g_cpu:
        if float(g_cpu[n].norm()) <= 1e-6 * largest:
            assert float(g_dev[n].norm()) <= 1e-6 * largest, f"gradient of {n} should vanish on the device too"
            continue
        assert _rel_err(g_dev[n], g_cpu[n]) <= 1e-3, f"gradient of {n}: {_rel_err(g_dev[n], g_cpu[n]):.2e}"
    p_cpu = dict(qat_cpu.named_parameters())
    for n, p in qat_dev.named_parameters():
        assert _rel_err(p, p_cpu[n]) <= 1e-5, f"{n} after the step: {_rel_err(p, p_cpu[n]):.2e}"
    st_cpu, st_dev = quantizer_state(qat_cpu), quantizer_state(qat_dev)
    _assert_states_close(st_cpu, st_dev, rtol=1e-4)
    steps = (int(qat_dev.lowbit_qat_step), int(qat_cpu.lowbit_qat_step))
    assert steps == (1, 1), steps


@pytest.mark.parametrize("learnable", ["ste", "lsq"])
def test_qat_runs_on_device_and_converts_exactly(learnable):
    """Three QAT steps prepared and trained on the device: every buffer stays there, the step counter
    counts, the losses follow the CPU's run (the trajectories themselves diverge, see above), and the
    deployable model that ``convert`` builds on the device computes what the device QAT model computes in
    eval mode (the same float32 operations, int32 bias included)."""
    model = _cnn(1).train()
    qat_cpu, loss_cpu = _qat_run(copy.deepcopy(model), "cpu", learnable)
    qat_dev, loss_dev = _qat_run(copy.deepcopy(model), DEVICE, learnable)
    assert _all_on_device(qat_dev), "QAT buffers (step counter, bn_frozen, quantizers) must be on the device"
    assert int(qat_dev.lowbit_qat_step) == int(qat_cpu.lowbit_qat_step) == 3
    torch.testing.assert_close(torch.tensor(loss_dev), torch.tensor(loss_cpu), rtol=1e-3, atol=1e-4)
    deploy = lowbit.convert(qat_dev)
    assert _all_on_device(deploy)
    x = _images(1, seed=11)[0].to(DEVICE)
    with torch.no_grad():
        y_qat = qat_dev.eval()(x)
        y_deploy = deploy(x)
    torch.testing.assert_close(y_deploy, y_qat, rtol=1e-5, atol=1e-5)


class MLPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_adaround_on_device_learns_a_valid_rounding():
    """Depends on AdaRound being device-agnostic (``src/lowbit/passes/adaround.py``). Adam on another
    device follows a slightly different float path, so the learned rounding is compared by its
    properties (every weight rounded down or up from W / s; most decisions equal to the CPU's; no worse
    than nearest rounding) rather than bit for bit."""
    torch.manual_seed(5)
    model = MLPNet().eval()
    g = torch.Generator().manual_seed(6)
    calib = [torch.randn(64, 32, generator=g) @ torch.randn(32, 32, generator=g) * 0.3 for _ in range(2)]
    recipe = recipes.WeightOnly(bits=4, symmetric=True)
    cfg = lowbit.AdaRoundConfig(iters=300, lr=1e-2, batch_size=32, reg_weight=0.1)
    q_cpu = lowbit.quantize(model, recipe, calib, adaround=cfg, progress=False)
    q_dev = lowbit.quantize(copy.deepcopy(model).to(DEVICE), recipe, _on(calib, DEVICE), adaround=cfg, progress=False)
    assert _all_on_device(q_dev)
    q_near = lowbit.quantize(model, recipe, calib, progress=False)
    x = torch.cat(calib)
    with torch.no_grad():
        ref = model(x)
        err_near = float(((q_near(x) - ref) ** 2).mean())
        err_cpu = float(((q_cpu(x) - ref) ** 2).mean())
        err_dev = float(((q_dev(x.to(DEVICE)).cpu() - ref) ** 2).mean())
    # AdaRound is never worse than nearest per layer on its data; end to end allow a little slack
    assert err_dev <= 1.05 * err_near and err_dev <= 1.2 * err_cpu
    mods_cpu = dict(q_cpu.named_modules())
    n_layers = 0
    for name, m in q_dev.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is None:
            continue
        n_layers += 1
        w_float = model.get_submodule(m.lowbit_name).weight
        codes_dev = quantize_codes(m.weight.detach(), wq.scale, wq.zero_point, wq.spec).cpu().float()
        ref_q = mods_cpu[name].weight_quantizer
        codes_cpu = quantize_codes(mods_cpu[name].weight.detach(), ref_q.scale, ref_q.zero_point, ref_q.spec).float()
        v = (w_float.detach() / wq.scale.cpu()[:, None]).float()
        assert bool(((codes_dev == v.floor()) | (codes_dev == v.ceil()) | (codes_dev == wq.spec.qmin)
                     | (codes_dev == wq.spec.qmax)).all()), name
        agree = float((codes_dev == codes_cpu).float().mean())
        assert agree >= 0.9, f"{name}: only {agree:.1%} of rounding decisions equal the CPU's"
    assert n_layers == 2


def _linear_stack(k: int = 256, n: int = 512) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.Linear(n, k)).eval()


@pytest.mark.parametrize("rows", [4, 40])  # 4 <= 16: padded to 17 rows for torch._int_mm on CUDA
def test_convert_int8_linear_bit_exact_and_int8_storage(rows):
    """int8 x int8 -> int32 accumulation is exact on both devices; the requantization ``acc * s_x * s_w + b``
    is float32 and CUDA fuses its multiply-add (seen on an H100: equal to 4 digits, not in every bit), and a
    last-bit difference after layer 1 can move one of layer 2's per-token codes at a tie. So: far closer
    than quantization noise (80 dB vs ~35 dB). The weights are stored as int8 on the device."""
    model = _linear_stack()
    g = torch.Generator().manual_seed(8)
    recipe = recipes.W8A8Dynamic(act_dtype="int8", granularity="token")
    q = lowbit.quantize(model, recipe, progress=False)
    conv_cpu = lowbit.convert(q, backend="torch")
    conv_dev = lowbit.convert(copy.deepcopy(q).to(DEVICE), backend="torch")
    int8_layers = [m for m in conv_dev.modules() if isinstance(m, Int8Linear)]
    assert len(int8_layers) == 2
    for m in int8_layers:
        assert m.weight_int8.dtype == torch.int8 and m.weight_int8.device.type == DEVICE.type
    x = torch.randn(rows, 256, generator=g)
    with torch.no_grad():
        y_cpu, y_dev = conv_cpu(x), conv_dev(x.to(DEVICE))
        assert sqnr_db(y_cpu, y_dev) > 80.0
        y_sim = q(x)
    assert sqnr_db(y_sim, y_cpu) > 30.0  # the integer model computes what the simulation does
    nbytes_float, nbytes_int8 = module_nbytes(model), module_nbytes(conv_dev)
    weights = 256 * 512 * 2
    assert nbytes_int8 <= weights + 4 * (2 * 512 + 2 * 256) + 64  # int8 weights + float32 scales and biases
    assert nbytes_float >= 4 * weights
    if ON_GPU:
        # a torch.fx GraphModule is a reference cycle (its graph points back to it), so the float copies
        # made on the way are freed by the cycle collector, not on the last reference: collect first
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        extra = lowbit.convert(copy.deepcopy(q).to(DEVICE), backend="torch")
        gc.collect()
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
        del extra
        # the float copy made on the way is freed; what stays is the int8 model (allocator rounds to 512 B)
        assert grown <= nbytes_int8 + 512 * 16, f"{grown} bytes allocated for a {nbytes_int8}-byte model"


def test_convert_int_mm_fallback_shapes_match_cpu():
    """K or N not multiples of 8: CUDA cannot run torch._int_mm, the layer multiplies the int8 codes in
    float64 instead (exact); only the float32 requantization can differ, in the last bits."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(60, 30)).eval()
    q = lowbit.quantize(model, recipes.W8A8Dynamic(act_dtype="int8", granularity="token"), progress=False)
    conv_cpu = lowbit.convert(q)
    conv_dev = lowbit.convert(copy.deepcopy(q).to(DEVICE))
    x = torch.randn(33, 60) * 3
    with torch.no_grad():
        assert_ulp_close(conv_dev(x.to(DEVICE)), conv_cpu(x))


@pytest.mark.parametrize("bits,group", [(4, 64), (8, None)])
def test_convert_weight_only_packed_matches_cpu(bits, group):
    model = _linear_stack()
    q = lowbit.quantize(model, recipes.WeightOnly(bits=bits, group_size=group), progress=False)
    conv_cpu = lowbit.convert(q, activations="none")
    conv_dev = lowbit.convert(copy.deepcopy(q).to(DEVICE), activations="none")
    packed = [m for m in conv_dev.modules() if isinstance(m, PackedWeightLinear)]
    assert len(packed) == 2
    for m_dev, m_cpu in zip(packed, [m for m in conv_cpu.modules() if isinstance(m, PackedWeightLinear)]):
        assert m_dev.weight_codes.dtype == torch.uint8 and m_dev.weight_codes.device.type == DEVICE.type
        assert m_dev.packed4 == (bits == 4)
        assert bits_equal(m_dev.dequantized_weight(), m_cpu.dequantized_weight())
    x = torch.randn(16, 256)
    with torch.no_grad():
        torch.testing.assert_close(conv_dev(x.to(DEVICE)).cpu(), conv_cpu(x), rtol=1e-5, atol=1e-5)


def test_save_and_load_cuda_model(tmp_path):
    model = _cnn(2)
    calib = _on(_images(3), DEVICE)
    q_dev = lowbit.quantize(copy.deepcopy(model).to(DEVICE), recipes.W8A8(), calib, progress=False)
    path = lowbit.save(q_dev, tmp_path / "cnn.safetensors", example_inputs=calib[0])
    x = _images(1, seed=12)[0]
    with torch.no_grad():
        y_ref = q_dev(x.to(DEVICE))
    # 1. rebuilt from the float model on the device (example input from the stored shapes)
    loaded = lowbit.load(path, copy.deepcopy(model).to(DEVICE))
    assert _all_on_device(loaded)
    assert quantizer_state(loaded).keys() == quantizer_state(q_dev).keys()
    for k, v in quantizer_state(q_dev).items():
        assert torch.equal(quantizer_state(loaded)[k], v), k
    with torch.no_grad():
        assert bits_equal(loaded(x.to(DEVICE)), y_ref)
    # 2. the same file into a CPU float model: same qparams, outputs equal up to summation order
    loaded_cpu = lowbit.load(path, copy.deepcopy(model))
    for k, v in quantizer_state(q_dev).items():
        assert torch.equal(quantizer_state(loaded_cpu)[k], v), k
    with torch.no_grad():
        assert sqnr_db(y_ref, loaded_cpu(x)) > 40.0


def test_ptq_forward_on_device_makes_no_host_sync():
    """A quantized model's eval forward never waits for the GPU (a sync per quantizer flag read made a
    ResNet-18 W8A8 forward 271 syncs; tests/nn/test_host_syncs.py counts the same on the CPU)."""
    data = _on(_images(2), DEVICE)
    q = lowbit.quantize(_cnn().to(DEVICE), recipes.W8A8(), data, data[0], progress=False).eval()
    with torch.no_grad():
        ref = q(data[0])
        if ON_GPU:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any sync raises
        try:
            out = q(data[0])
        finally:
            if ON_GPU:
                torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, ref)
