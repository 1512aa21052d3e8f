"""QAT and calibration under torch.distributed: 2 CPU processes (gloo, localhost, torch.multiprocessing).

Each rank sees half of every global batch. The quantizer states must be identical on both ranks and
equal to a single process that sees the whole batches: exactly for calibration (min/max all-reduced,
histograms summed), to float rounding after DDP training (DDP's gradient average differs from the
full-batch gradient in the last bits).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lowbit import QuantSpec
from lowbit.calibration import make_observer
from lowbit.distributed.sync import (
    SyncedObserver,
    activation_quantizers,
    assert_quantizers_match,
    quantizer_state,
)
from lowbit.errors import DistributedError, NonFiniteError
from lowbit.nn.bias import int32_bias
from lowbit.nn.quantizer import buffer_flag, quantizers, refresh_flags
from lowbit.qat import convert, freeze_observers, prepare_qat
from lowbit.recipes import W8A8

from .._gloo import run_ranks, shutdown
from .._syncs import checks_off, count_syncs

WORLD = 2
CALIBRATORS = ("minmax", "percentile")
LEARNABLE = ("ste", "lsq")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=g) * (1 + k), torch.randint(0, 3, (8,), generator=g)) for k in range(4)]


def _shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world)[rank]


def _run(rank: int, world: int) -> dict:
    """The whole scenario; ``world == 1`` is the single-process reference on the full batches."""
    data = _data()
    calib = [_shard(x, rank, world) for x, _ in data[:2]]
    out: dict = {}
    for cal in CALIBRATORS:
        qat = prepare_qat(_net(), W8A8(calibrator=cal), calib_data=calib)
        out[f"calib_{cal}"] = quantizer_state(qat)
    for learnable in LEARNABLE:
        # BatchNorm frozen from the start: per-rank batch statistics are not the global ones
        # (use torch.nn.SyncBatchNorm for that); the Conv-BN unit still runs under DDP.
        qat = prepare_qat(_net(), W8A8(), calib_data=calib, learnable=learnable, freeze_bn_after=0,
                          observer_momentum=0.2)
        if world > 1:
            assert all(isinstance(q.observer, SyncedObserver) for _, q in activation_quantizers(qat)) or learnable != "ste"
        model = nn.parallel.DistributedDataParallel(qat) if world > 1 else qat
        opt = torch.optim.SGD(model.parameters(), lr=0.05 if learnable == "ste" else 0.001)
        for x, y in data:
            opt.zero_grad()
            if world == 1 and learnable != "ste":
                # lowbit.ops.fake_quantize_lsq scales the gradient by 1/sqrt(numel(x) * qmax): it depends on
                # the batch size, so the reference accumulates the gradients of the ranks' half batches.
                for xs, ys in zip(x.chunk(WORLD), y.chunk(WORLD)):
                    (F.cross_entropy(model(xs), ys) / WORLD).backward()
            else:
                F.cross_entropy(model(_shard(x, rank, world)), _shard(y, rank, world)).backward()
            opt.step()
        if world > 1:
            assert_quantizers_match(qat)
        out[f"qat_{learnable}"] = quantizer_state(qat)
        out[f"convert_{learnable}"] = convert(qat)(data[0][0]).detach()
    return out


def _worker(rank: int, init_method: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        result = _run(rank, WORLD)
        # a rank whose state was tampered with is caught
        qat = prepare_qat(_net(), W8A8(), calib_data=[torch.randn(4, 1, 8, 8)])
        if rank == 1:
            qat.get_submodule("5").weight_quantizer.scale.mul_(2)
        try:
            assert_quantizers_match(qat)
            result["mismatch_caught"] = False
        except DistributedError:
            result["mismatch_caught"] = True
        # DDP's buffer broadcast writes rank 0's flags into the other ranks without moving their version
        # counters: a flag read must follow the buffer there (buffer_flag does not cache under DDP)
        ddp = nn.parallel.DistributedDataParallel(qat)
        x = torch.randn(4, 1, 8, 8)
        ddp(x)
        q = next(q for _, q in quantizers(qat) if not q.is_weight)
        assert buffer_flag(q, "quant_enabled")
        if rank == 0:
            q.quant_enabled.fill_(False)
        ddp(x)
        result["flag_after_broadcast"] = (bool(q.quant_enabled), buffer_flag(q, "quant_enabled"))
        # the same for a scale read through the Linear's int32-bias cache (observers frozen, so the
        # scale tensor stays and the broadcast writes into it)
        q.quant_enabled.fill_(True)
        freeze_observers(qat)
        fc = qat.get_submodule("5")
        ddp(x)
        cached = fc.int32_bias(fc.bias, 2).codes.clone()
        if rank == 0:
            fc.bias_input_quantizer().scale.mul_(2)
        ddp(x)
        fresh = int32_bias(fc.bias, fc.bias_input_quantizer().scale, fc.weight_quantizer.scale, fc.in_features)
        result["bias_after_broadcast"] = (torch.equal(fc.int32_bias(fc.bias, 2).codes, fresh.codes),
                                          torch.equal(fresh.codes, cached))
        result["syncs"] = _ddp_step_syncs()
        result["observer_edges"] = _synced_observer_edges(rank)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        shutdown()


def _synced_observer_edges(rank: int) -> dict:
    """A synced min/max observer fed per rank: rank 0 an empty batch and rank 1 [-1, 2] (the range is rank
    1's), then both empty (nothing changes), then rank 1 a NaN (every rank raises, rank 0 included)."""
    obs = SyncedObserver(make_observer(QuantSpec("uint8", symmetric=False), "edge"))
    obs.update(torch.empty(0) if rank == 0 else torch.tensor([-1.0, 2.0]))
    first = (obs.min_val.clone(), obs.max_val.clone(), obs.num_batches)
    obs.update(torch.empty(0))
    both_empty = (obs.min_val.clone(), obs.max_val.clone(), obs.num_batches)
    try:
        obs.update(torch.tensor([0.5, 1.0]) if rank == 0 else torch.tensor([float("nan"), 1.0]))
        raised = False
    except NonFiniteError:
        raised = True
    return {"first": first, "both_empty": both_empty, "raised": raised}


def _ddp_step_syncs() -> dict[str, int]:
    """Host syncs of one DDP training step and of one ``refresh_flags`` call (NaN checks off), and the number
    of synced activation observers."""
    qat = prepare_qat(_net(), W8A8(), calib_data=[torch.randn(4, 1, 8, 8)], freeze_bn_after=0)
    ddp = nn.parallel.DistributedDataParallel(qat)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])

    def step():
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()

    step()
    with checks_off():
        return {"step": count_syncs(step), "refresh": count_syncs(lambda: refresh_flags(qat)),
                "observers": sum(1 for _ in activation_quantizers(qat))}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_worker, WORLD)


@pytest.fixture(scope="module")
def single():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(0, 1)
    finally:
        torch.set_num_threads(n)


@pytest.mark.distributed
@pytest.mark.parametrize("cal", CALIBRATORS)
def test_distributed_calibration_equals_single_process(ranks, single, cal):
    key = f"calib_{cal}"
    ref = single[key]
    assert ref and set(ranks[0][key]) == set(ref)
    for r in ranks:
        for k, v in ref.items():
            assert torch.equal(r[key][k], v), k


@pytest.mark.distributed
@pytest.mark.parametrize("learnable", LEARNABLE)
def test_qat_under_ddp_keeps_ranks_identical_and_matches_single_process(ranks, single, learnable):
    key = f"qat_{learnable}"
    a, b, ref = ranks[0][key], ranks[1][key], single[key]
    # The LSQ scale gradient is discontinuous in the weights (it contains round(x/s) - x/s), so the
    # last-bit differences of DDP's gradient average can flip a rounding and move a scale slightly more.
    rtol = 1e-4 if learnable == "ste" else 1e-3
    for k in ref:
        assert torch.equal(a[k], b[k]), k  # bitwise identical across ranks
        assert torch.allclose(a[k], ref[k], rtol=rtol, atol=1e-7), (k, a[k], ref[k])
    # scales moved during training (the comparison is not of untouched calibration values)
    calib = single["calib_minmax"]
    assert any(not torch.allclose(ref[k], calib[k]) for k in ref if k.endswith("output_quantizer.scale"))
    assert torch.equal(ranks[0][f"convert_{learnable}"], ranks[1][f"convert_{learnable}"])
    assert torch.allclose(ranks[0][f"convert_{learnable}"], single[f"convert_{learnable}"], atol=1e-4)


@pytest.mark.distributed
def test_mismatched_ranks_are_reported(ranks):
    assert all(r["mismatch_caught"] for r in ranks)


@pytest.mark.distributed
def test_flag_reads_follow_ddp_buffer_broadcast(ranks):
    assert [r["flag_after_broadcast"] for r in ranks] == [(False, False)] * len(ranks)
    # (the int32 bias from the cache equals a fresh one, and rank 0's doubled scale reached every rank)
    assert [r["bias_after_broadcast"] for r in ranks] == [(True, False)] * len(ranks)


@pytest.mark.distributed
def test_synced_observer_empty_batches_and_nan_on_one_rank(ranks):
    for r in ranks:
        e = r["observer_edges"]
        assert [float(e["first"][0]), float(e["first"][1]), e["first"][2]] == [-1.0, 2.0, 1]
        assert [float(e["both_empty"][0]), float(e["both_empty"][1]), e["both_empty"][2]] == [-1.0, 2.0, 1]
        assert e["raised"]


@pytest.mark.distributed
def test_ddp_step_reads_the_flags_in_one_sync(ranks):
    """With the NaN checks off, a DDP QAT step syncs the host for the schedule's step counter (1), the
    Linear's int32-bias range check (2: its cache is off under DDP), one read of every flag after DDP's
    buffer broadcast (prepare_qat's forward pre-hook) and one per synced activation observer (after its
    all_reduce: NaN on any rank, all batches empty); not once per flag read, nor three times per observer."""
    for r in ranks:
        s = r["syncs"]
        assert s["refresh"] == 1, s
        assert s["step"] == 1 + 2 + 1 + s["observers"], s


@pytest.mark.distributed
def test_schedule_functions_reach_through_ddp(tmp_path):
    """``freeze_observers(ddp)`` / ``qat_step(ddp)`` act on the prepared model inside: the freeze holds
    through eval forwards and later training steps (a flag left on the wrapper was undone by the next
    eval -> train switch). One gloo rank in this process."""
    from lowbit.qat import freeze_observers, qat_step

    from .._gloo import use_loopback

    use_loopback()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        qat = prepare_qat(net, W8A8(), calib_data=[torch.randn(8, 4)])
        ddp = nn.parallel.DistributedDataParallel(qat)
        ddp(torch.randn(8, 4))
        assert qat_step(ddp) == qat_step(qat) == 1
        assert freeze_observers(ddp) > 0
        q, layer = qat.get_submodule("0").output_quantizer, qat.get_submodule("0")
        s, ws = q.scale.clone(), layer.weight_quantizer.scale.clone()
        with torch.no_grad():
            layer.weight.mul_(2.0)
        for train in (True, False, True):
            ddp.train(train)
            ddp(torch.randn(8, 4) * 10)  # far outside the calibrated range
            assert not bool(q.observer_enabled)
            assert torch.equal(q.scale, s) and torch.equal(layer.weight_quantizer.scale, ws)
        assert qat_step(ddp) == 3
    finally:
        dist.destroy_process_group()
