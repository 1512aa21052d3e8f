"""Module-swap capture, the fallback when the model does not trace (data-dependent control flow,
Hugging Face models, custom ``forward`` logic).

Every Conv/Linear/Embedding whose exact type has a quantized counterpart is replaced in place; without
a graph, each layer quantizes its own *input* (``input_quantizer``) instead of the producer's output,
and functional ops (matmul, add, cat) cannot be seen, so they stay float. Both limits are written to
the decision log.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedLayerError
from ..nn.layers import QUANT_LAYERS, QuantLayerMixin
from ..nn.quantizer import TensorQuantizer
from .log import Decision, DecisionLog
from .plan import Planner

__all__ = ["quantize_modules", "weighted_order"]

_UNSUPPORTED = (nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d)


def weighted_order(model: nn.Module) -> list[str]:
    """Weighted layer names in registration order (the best guess of execution order without a graph)."""
    return [n for n, m in model.named_modules() if type(m) in QUANT_LAYERS]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def quantize_modules(model: nn.Module, planner: Planner, log: DecisionLog) -> nn.Module:
    """Swap every quantizable layer of ``model`` in place; return ``model``."""
    edge = planner.recipe.edge_spec()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLayerMixin | TensorQuantizer):
            continue
        kind = type(mod).__name__
        if isinstance(mod, _UNSUPPORTED) or isinstance(mod, nn.modules.batchnorm._BatchNorm):
            excluded = planner.resolve(name)
            if excluded.explicit:
                log.add(Decision(name, kind, False, excluded.source, by_user=True))
            elif isinstance(mod, _UNSUPPORTED):
                log.add(Decision(name, kind, False, f"{kind} has no quantized counterpart in lowbit; runs in float"))
            else:
                log.add(Decision(name, kind, False, "BatchNorm not folded (no Conv/Linear found directly before it "
                                                    "in an nn.Sequential); runs in float"))
            continue
        if type(mod) not in QUANT_LAYERS:
            base = next((b for b in QUANT_LAYERS if isinstance(mod, b)), None)
            if base is not None and type(mod).forward is not base.forward:  # e.g. a "same"-padding Conv2d
                res = planner.resolve(name)
                log.add(Decision(name, kind, False, res.source if res.explicit else (
                    f"{kind} subclasses {base.__name__} with its own forward, which module swap cannot keep; runs "
                    "in float (a model torch.fx can trace gets it quantized)"), by_user=res.explicit))
            continue
        res = planner.resolve(name, module=mod)
        spec = res.spec
        if spec.is_float:
            log.add(Decision(name, kind, False, res.source if res.explicit else f"{res.source} does not quantize {kind}",
                             by_user=True))
            continue
        act = spec.activation
        if isinstance(mod, nn.Embedding):
            act = None
        try:
            qmod = QUANT_LAYERS[type(mod)].from_float(mod, spec.weight, input_spec=act, name=name)
        except UnsupportedLayerError as e:
            if res.explicit:
                raise
            log.add(Decision(name, kind, False, str(e)))
            continue
        _set_module(model, name, qmod)
        where = "input (module swap)" if act is not None else ""
        log.add(Decision(name, kind, True, where, None if spec.weight is None else str(spec.weight),
                         None if act is None else str(act)))
    if edge is not None:
        log.note("module swap: activations are quantized at each layer's input; add/matmul/cat joins are "
                 "not visible without a graph and stay float")
    return model
