"""State on a quantized model's root module that survives ``copy.deepcopy``.

``lowbit.quantize`` and ``lowbit.prepare_qat`` usually return a ``torch.fx.GraphModule``. Its
``__deepcopy__`` rebuilds the module from its graph and keeps only parameters, buffers, submodules and a
few hook tables: plain attributes (the recipe, the decision log, the QAT configuration) and forward
pre-hooks on the root are dropped, so a copied QAT model would silently stop counting steps and
observing. ``GraphModule`` offers two ways to keep them, used here:

* attributes named in ``meta["_user_preserved_attributes"]`` are set again on the copy;
* callables registered with ``_register_deepcopy_hook`` run on the copy (after the attributes are set),
  which is where a root hook is installed again.

Any other root (an eager ``nn.Module``) is deep-copied whole by PyTorch and needs neither.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["set_root_attr", "del_root_attr", "on_deepcopy"]

try:
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY as _KEEP
except ImportError:  # pragma: no cover - older torch: the key torch.fx reads
    _KEEP = "_user_preserved_attributes"


def set_root_attr(model: nn.Module, name: str, value) -> None:
    """``model.__dict__[name] = value`` (a plain attribute, never registered as a submodule, parameter or
    buffer) and, on a ``GraphModule``, kept by ``copy.deepcopy`` (deep-copied with the model)."""
    model.__dict__[name] = value
    if isinstance(model, torch.fx.GraphModule):
        model.meta.setdefault(_KEEP, {})[name] = value


def del_root_attr(model: nn.Module, name: str) -> None:
    """Remove an attribute set by :func:`set_root_attr` (no error when absent)."""
    model.__dict__.pop(name, None)
    if isinstance(model, torch.fx.GraphModule):
        model.meta.get(_KEEP, {}).pop(name, None)


def on_deepcopy(model: nn.Module, hook: Callable[[nn.Module], None]) -> None:
    """Run ``hook(copy)`` on every ``copy.deepcopy`` of ``model`` (a ``GraphModule``; other roots keep their
    hooks when copied, so nothing is registered). ``hook`` must be a module-level function: it is copied
    with the model. Registering the same function twice registers it once."""
    if isinstance(model, torch.fx.GraphModule) and hasattr(model, "_register_deepcopy_hook"):
        if hook not in getattr(model, "_deepcopy_hooks", []):
            model._register_deepcopy_hook(hook)
