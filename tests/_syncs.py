"""Count the host syncs of a piece of code on the CPU, and switch lowbit's NaN/Inf checks off.

On CUDA every ``bool(tensor)`` / ``.item()`` / ``.tolist()`` waits for the GPU. The first two dispatch
``aten::_local_scalar_dense`` (or ``is_nonzero`` / ``equal``) on any device, so a
:class:`TorchDispatchMode` that counts those ops on the CPU counts the syncs a CUDA run would make;
``tolist()`` reads a CPU tensor's memory without dispatching anything, so it is counted by a patch, one
sync per call (on CUDA: one device-to-host copy).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal")


class _CountSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNC_OPS:
            self.n += 1
        return func(*args, **(kwargs or {}))


def count_syncs(fn) -> int:
    """Host syncs during one ``fn()``."""
    tolist = torch.Tensor.tolist

    def counted(self, *args, **kwargs):
        c.n += 1
        return tolist(self, *args, **kwargs)

    with _CountSyncs() as c, mock.patch.object(torch.Tensor, "tolist", counted):
        fn()
    return c.n


def checks_off() -> contextlib.ExitStack:
    """A context in which lowbit's ``check_finite`` (one sync per checked tensor) does nothing."""
    stack = contextlib.ExitStack()
    for mod in ("lowbit.spec", "lowbit.nn.quantizer", "lowbit.calibration.base"):
        stack.enter_context(mock.patch(f"{mod}.check_finite", lambda *a, **k: None))
    return stack
