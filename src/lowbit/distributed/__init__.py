"""Distributed helpers: gradient-compression DDP comm hooks, and calibration statistics across ranks.

Names load on first use (PEP 562) from the submodules ``comm_hooks``, ``stats`` and ``sync`` (each one's
``__all__``), so one list of names per module and no import cost until a name is asked for::

    import lowbit.distributed as ld
    ddp_model.register_comm_hook(ld.CompressionState(), ld.int8_hook)
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("comm_hooks", "stats", "sync")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if not name.startswith("_"):
        for sub in _SUBMODULES:
            module = importlib.import_module(f".{sub}", __name__)
            if name in getattr(module, "__all__", ()):
                return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    names = set(globals())
    for sub in _SUBMODULES:
        names |= set(getattr(importlib.import_module(f".{sub}", __name__), "__all__", ()))
    return sorted(names)
