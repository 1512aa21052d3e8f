"""Run a test worker on several gloo processes on localhost and collect what each rank saved."""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int) -> list:
    """``mp.spawn(worker, args=(port, folder), nprocs=world)``; each rank ``r`` must
    ``torch.save`` its result to ``folder/rank{r}.pt``. Returns the results in rank order."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(free_port(), d), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
