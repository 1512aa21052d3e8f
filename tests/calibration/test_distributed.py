"""all_reduce across 2 gloo processes equals one process on the concatenated data."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit.calibration import make_observer
from lowbit.errors import DistributedError
from lowbit.spec import QuantSpec

from .._gloo import shutdown

SPECS = {
    "minmax": QuantSpec("int8", granularity="channel:1", calibrator="minmax"),
    "hist": QuantSpec("int8", granularity="channel:1", calibrator="percentile"),
    "kl": QuantSpec("int8", calibrator="kl"),
    "ema": QuantSpec("int8", calibrator="moving_average:0.1"),
    "admm": QuantSpec("int4", granularity="channel", calibrator="admm"),
}


def _data(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 3, 5, generator=g) * (1 + 20 * rank)  # rank 1 has a much wider range


def _worker(rank: int, init_method: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        res = {}
        for key, spec in SPECS.items():
            obs = make_observer(spec)
            if key == "admm":
                obs.update(torch.arange(12.0).reshape(3, 4))
            elif not (key == "minmax" and rank == 0):  # rank 0 sees nothing for minmax: neutral values
                for part in torch.chunk(_data(rank), 2):
                    obs.update(part)
            obs.all_reduce()
            res[key] = (obs.num_batches, [t.clone() for t in obs.compute_range()],
                        obs.stats.hist.clone() if hasattr(obs, "stats") else None)
        bad = make_observer(SPECS["admm"])
        bad.update(torch.full((3, 4), float(rank)))
        try:
            bad.all_reduce()
            res["mismatch"] = False
        except DistributedError:
            res["mismatch"] = True
        out[rank] = res
    finally:
        shutdown()


@pytest.mark.distributed
def test_all_reduce_equals_concatenated_single_process():
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # localhost only
    out = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as d:  # file rendezvous: no port to collide with other runs
        mp.spawn(_worker, args=("file://" + os.path.join(d, "rendezvous"), out), nprocs=2, join=True)
    for rank in (0, 1):
        res = out[rank]
        for key in ("hist", "kl"):
            single = make_observer(SPECS[key])
            single.update(torch.cat([_data(0), _data(1)]))
            n, (lo, hi), hist = res[key]
            assert n == 4
            assert torch.equal(hist, single.stats.hist), key
            assert torch.equal(lo, single.compute_range()[0]) and torch.equal(hi, single.compute_range()[1])
        n, (lo, hi), _ = res["minmax"]
        x1 = _data(1)
        assert n == 2 and torch.equal(hi, x1.amax(dim=(0, 2))) and torch.equal(lo, x1.amin(dim=(0, 2)))
        # moving averages: batch-weighted mean of the ranks' averages (equal batch counts: plain mean)
        per_rank = []
        for r in (0, 1):
            o = make_observer(SPECS["ema"])
            for part in torch.chunk(_data(r), 2):
                o.update(part)
            per_rank.append(o.compute_range())
        n, (lo, hi), _ = res["ema"]
        assert torch.allclose(lo, (per_rank[0][0] + per_rank[1][0]) / 2)
        assert torch.allclose(hi, (per_rank[0][1] + per_rank[1][1]) / 2)
        assert res["mismatch"] is True
        single = make_observer(SPECS["admm"])
        single.update(torch.arange(12.0).reshape(3, 4))
        assert torch.equal(res["admm"][1][1], single.compute_range()[1])


def test_all_reduce_without_process_group_raises():
    obs = make_observer(SPECS["minmax"])
    obs.update(torch.randn(2, 3))
    with pytest.raises(DistributedError, match="init_process_group"):
        obs.all_reduce()
