"""DDP with the NCCL backend on one GPU (world size 1), lowbit's int8 gradient hook, against the same
run with gloo on the CPU; QAT under NCCL DDP; observer all-reduce over NCCL.

World size 1 runs in this process (no spawn): the process group is created and destroyed inside each
test. The hook's stochastic rounding draws from a CUDA generator on the GPU and a CPU generator on the
CPU, so the two runs differ by rounding noise; each is compared to the exact float32 run within the bound
that noise allows (every decoded gradient element lies within one step ``max|g| / 127`` of the true one).
"""

from __future__ import annotations

import contextlib
import copy
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import lowbit
from lowbit import QuantSpec, recipes
from lowbit.calibration import make_observer
from lowbit.distributed import CompressionState, int8_hook

from ._device import DEVICE, ON_GPU, bits_equal, ieee_fp32

pytestmark = pytest.mark.gpu

BACKEND = "nccl" if ON_GPU else "gloo"
STEPS = 4
LR = 0.1


@pytest.fixture(autouse=True)
def _no_tf32():
    with ieee_fp32():
        yield


@contextlib.contextmanager
def _group(backend: str, folder):
    """A one-rank process group in this process, destroyed on exit."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.makedirs(str(folder), exist_ok=True)
    init = "file://" + os.path.join(str(folder), f"rdv-{backend}")
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=init, rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(STEPS)]


def _train(model: nn.Module, dev, hook: bool, folder, backend: str):
    """STEPS plain-SGD steps of DDP(model) on ``dev``; returns (parameters on CPU, per-step max|g| of
    the true gradients, the CompressionState or None)."""
    with _group(backend, folder):
        model = model.to(dev)
        ddp = DDP(model, device_ids=[dev.index or 0] if dev.type == "cuda" else None, bucket_cap_mb=1)
        state = None
        if hook:
            state = CompressionState()
            ddp.register_comm_hook(state, int8_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        for x, t in _data():
            loss = nn.functional.cross_entropy(ddp(x.to(dev)), t.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.cuda.synchronize() if dev.type == "cuda" else None
        params = [p.detach().cpu().clone() for p in model.parameters()]
    return params, state


def _step_bound(model: nn.Module) -> float:
    """Largest possible parameter difference between a hooked run and the exact run after STEPS steps,
    to first order: each step moves a parameter by at most LR * (one int8 step of its bucket's gradient),
    with max|g| bounded by the exact run's gradients measured here (plus 50% headroom for the drift)."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    total = 0.0
    for x, t in _data():
        loss = nn.functional.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        gmax = max(float(p.grad.abs().max()) for p in model.parameters())
        total += LR * gmax / 127
        opt.step()
    return 1.5 * total


def test_nccl_int8_hook_matches_gloo_cpu(tmp_path):
    model = _mlp()
    exact, _ = _train(copy.deepcopy(model), torch.device("cpu"), False, tmp_path / "a", "gloo")
    cpu_hook, st_cpu = _train(copy.deepcopy(model), torch.device("cpu"), True, tmp_path / "b", "gloo")
    dev_hook, st_dev = _train(copy.deepcopy(model), DEVICE, True, tmp_path / "c", BACKEND)
    bound = _step_bound(model)
    for p_exact, p_cpu, p_dev in zip(exact, cpu_hook, dev_hook):
        assert float((p_cpu - p_exact).abs().max()) <= bound
        assert float((p_dev - p_exact).abs().max()) <= bound
        assert float((p_dev - p_cpu).abs().max()) <= 2 * bound
    # the training moved the weights by much more than the hook's noise
    start = [p.detach() for p in model.parameters()]
    assert max(float((e - s).abs().max()) for e, s in zip(exact, start)) > 10 * bound
    # both hooks ran on every bucket of every step and sent int8 (N + 4 bytes per bucket)
    n_params = sum(p.numel() for p in model.parameters())
    for st in (st_cpu, st_dev):
        assert st.steps == STEPS and st.bytes_fp32 == STEPS * 4 * n_params
        assert st.compression_ratio() > 3.9
    assert st_cpu.step_bytes == st_dev.step_bytes


def test_qat_model_under_nccl_ddp(tmp_path):
    """prepare_qat on the device, then DDP: DDP broadcasts every buffer at construction (NCCL takes
    CUDA tensors only), so the QAT step counter, bn_frozen flags and quantizer state must all live on
    the device. One step must give the single-process result."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 10))
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    qat = lowbit.prepare_qat(net.to(DEVICE), recipes.W8A8(), calib_data=[x.to(DEVICE)])
    single = copy.deepcopy(qat)
    with _group(BACKEND, tmp_path):
        ddp = DDP(qat, device_ids=[0] if ON_GPU else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        loss = nn.functional.cross_entropy(ddp(x.to(DEVICE)), t.to(DEVICE))
        loss.backward()
        opt.step()
    opt1 = torch.optim.SGD(single.parameters(), lr=0.05)
    loss1 = nn.functional.cross_entropy(single(x.to(DEVICE)), t.to(DEVICE))
    loss1.backward()
    opt1.step()
    assert bits_equal(loss.detach(), loss1.detach())
    for (n, a), b in zip(qat.named_parameters(), single.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("cal", ["minmax", "kl"])
def test_observer_all_reduce_over_nccl_is_identity_at_world_size_one(cal, tmp_path):
    spec = QuantSpec("int8", symmetric=True, calibrator=cal)
    obs, ref = make_observer(spec), make_observer(spec)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        xb = torch.randn(16, 256, generator=g)
        obs.update(xb.to(DEVICE))
        ref.update(xb)
    with _group(BACKEND, tmp_path):
        obs.all_reduce()
    lo, hi = obs.compute_range()
    lo_r, hi_r = ref.compute_range()
    assert bits_equal(lo, lo_r) and bits_equal(hi, hi_r) and obs.num_batches == 3
