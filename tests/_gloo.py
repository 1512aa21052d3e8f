"""Run a test worker on several gloo processes on this machine and collect what each rank saved.

Ranks meet through a file in a temporary folder (``init_method="file://..."``), not a TCP port, so
test runs that overlap on one machine cannot steal each other's rendezvous, and gloo is pinned to the
loopback interface (``GLOO_SOCKET_IFNAME=lo``) instead of whatever address the host name resolves to.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def use_loopback() -> None:
    """Pin gloo to the loopback interface for this process and the ranks it spawns."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def run_ranks(worker, world: int) -> list:
    """``mp.spawn(worker, args=(init_method, folder), nprocs=world)``; each rank calls
    ``dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)`` and
    ``torch.save``s its result to ``folder/rank{rank}.pt``. Returns the results in rank order."""
    use_loopback()
    with tempfile.TemporaryDirectory() as d:
        init_method = "file://" + os.path.join(d, "rendezvous")
        mp.spawn(worker, args=(init_method, d), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]


def shutdown() -> None:
    """Leave the process group together: wait (at most 60 s) until every rank is done, then destroy it.
    A rank that tore gloo down while its peer was still finishing aborted with a C++ terminate."""
    try:
        if dist.is_initialized():
            dist.monitored_barrier(timeout=timedelta(seconds=60))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
