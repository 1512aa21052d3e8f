"""Distributed helpers: gradient-compression DDP comm hooks, and calibration statistics across ranks.

Names load on first use (PEP 562), so ``import lowbit`` never imports ``torch.distributed`` machinery and a
missing or broken optional submodule only fails when one of its names is asked for::

    import lowbit.distributed as ld
    ddp_model.register_comm_hook(ld.CompressionState(), ld.int8_hook)
"""

from __future__ import annotations

import importlib
from typing import Any

_COMM_HOOKS = (
    "CompressionConfig",
    "CompressionState",
    "int8_hook",
    "int4_hook",
    "sign_hook",
    "stochastic_quantize",
    "encode_int",
    "decode_int",
    "encode_sign",
    "decode_sign",
    "pack_nibbles",
    "unpack_nibbles",
    "pack_bits",
    "unpack_bits",
    "payload_bytes",
)
# Submodules searched, in order, for names not listed above (stats.py is written separately).
_OTHER_SUBMODULES = ("stats", "sync")


def __getattr__(name: str) -> Any:
    if name in _COMM_HOOKS:
        return getattr(importlib.import_module(".comm_hooks", __name__), name)
    if name in ("comm_hooks", *_OTHER_SUBMODULES):
        return importlib.import_module(f".{name}", __name__)
    if not name.startswith("_"):
        for sub in _OTHER_SUBMODULES:
            try:
                module = importlib.import_module(f".{sub}", __name__)
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{sub}":
                    raise
                continue
            exported = getattr(module, "__all__", None)
            if (name in exported) if exported is not None else hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_COMM_HOOKS))
