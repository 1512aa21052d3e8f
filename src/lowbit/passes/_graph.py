"""Finding the layer structures the passes rewrite: producer -> consumer edges between float layers.

Two views of a model, the torch.fx graph when ``symbolic_trace`` succeeds and the execution order of
``nn.Sequential`` containers (nested ones flattened) when it does not. Both give :class:`Link` records:
a producer layer, the elementwise/per-channel modules between it and the next layer, and the consumer
(a layer, or a BatchNorm for :func:`~lowbit.passes.fold_bn.fold_bn`). A link only exists when the
producer's output reaches nothing but the consumer, so rewriting the pair cannot change another branch.
The passes modify the modules of the original model by name; the graph is only read.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Modules that act on each channel separately and commute with a positive per-channel scale
# (f(x / s) = f(x) / s for s > 0): what may sit between two layers that cross-layer equalization pairs.
POSITIVE_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d,
                        nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh",
              F.leaky_relu: "relu", F.dropout: "identity", F.max_pool2d: "pool", F.avg_pool2d: "pool",
              F.adaptive_avg_pool2d: "pool", operator.getitem: "getitem"}
_METHODS = {"relu": "relu", "relu_": "relu", "contiguous": "identity"}


@dataclass(frozen=True)
class DeadEnd:
    """A layer whose output does not lead to a single consumer, with the reason (for the pass logs)."""

    producer: str
    reason: str


@dataclass
class Link:
    """``producer -> between... -> consumer`` where the producer's output feeds only this path.

    ``between`` holds the module names (``"features.2"``) of the modules in between, or
    ``"<fn:relu6>"`` for functional calls; ``kinds`` gives each one's kind: ``"relu"``, ``"relu6"``,
    ``"identity"``, ``"pool"`` or ``"other"``.
    """

    producer: str
    consumer: str
    between: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new)


def call_order(model: nn.Module, names: Sequence[str], args: tuple, kwargs: dict | None = None) -> list[str]:
    """The submodules ``names`` in the order of their first call in one no-grad forward
    ``model(*args, **kwargs)``; those not called are left out."""
    order: list[str] = []
    seen: set[str] = set()

    def hook_for(n: str):
        def hook(mod, inputs):
            if n not in seen:
                seen.add(n)
                order.append(n)
        return hook

    handles = [get_module(model, n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            model(*args, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return order


def module_kind(m: nn.Module) -> str:
    """Kind of an in-between module: relu6 is separate because it does not commute with scaling."""
    from .clip import ChannelClip

    if isinstance(m, (nn.ReLU6, ChannelClip)) or (isinstance(m, nn.Hardtanh) and m.min_val == 0.0):
        return "relu6"
    if isinstance(m, (nn.ReLU, nn.LeakyReLU)):
        return "relu"
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return "identity"
    if isinstance(m, POSITIVE_HOMOGENEOUS):
        return "pool"
    return "other"


ROOT_TYPE = "lowbit_root_type"  # key of GraphModule.meta: the type of the module it was traced from


def trace(model: nn.Module) -> torch.fx.GraphModule | None:
    """``torch.fx.symbolic_trace(model)``, or None (logged) when the model does not trace. The traced
    module's type is kept in ``gm.meta[ROOT_TYPE]``."""
    if isinstance(model, torch.fx.GraphModule):
        return model
    from .clip import ChannelClip

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            # subclasses of Conv/Linear/BatchNorm (e.g. "same"-padding convs) stay single nodes too
            return isinstance(m, (ChannelClip, *LAYER_TYPES, *BN_TYPES)) or super().is_leaf_module(m, qualname)

    try:
        gm = torch.fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # tracing fails in many ways (control flow, proxies in asserts ...)
        log.info("torch.fx could not trace %s (%s: %s); using nn.Sequential order", type(model).__name__,
                 type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    gm.meta[ROOT_TYPE] = type(model)  # the trace's module stack records every module's type but the root's
    return gm


def _fx_links(gm: torch.fx.GraphModule, is_consumer) -> tuple[list[Link], list[DeadEnd]]:
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    links, dead = [], []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(modules[n.target], LAYER_TYPES):
            continue
        if calls[n.target] != 1:
            dead.append(DeadEnd(n.target, f"the module is called {calls[n.target]} times (shared weights)"))
            continue
        between, kinds, cur = [], [], n
        while True:
            if len(cur.users) != 1:
                dead.append(DeadEnd(n.target, f"{cur.name} feeds {len(cur.users)} consumers "
                                    "(a branch or residual connection)" if cur.users else "it feeds the output"))
                break
            nxt = next(iter(cur.users))
            if not nxt.args or nxt.args[0] is not cur:
                dead.append(DeadEnd(n.target, f"{nxt.name} ({nxt.op} {nxt.target}) combines it with other inputs"))
                break
            if nxt.op == "call_module":
                m = modules[nxt.target]
                if is_consumer(m):
                    if calls[nxt.target] == 1:
                        links.append(Link(n.target, nxt.target, between, kinds))
                    else:
                        dead.append(DeadEnd(n.target, f"consumer {nxt.target} is called {calls[nxt.target]} times"))
                    break
                kind = module_kind(m)
                name = nxt.target if kind != "other" else f"{nxt.target} ({type(m).__name__})"
            elif nxt.op == "call_function" and nxt.target in _FUNCTIONS:
                kind = _FUNCTIONS[nxt.target]
                if kind == "hardtanh":
                    lo = nxt.kwargs.get("min_val", nxt.args[1] if len(nxt.args) > 1 else -1.0)
                    kind = "relu6" if lo == 0.0 else "other"
                name = f"<fn:{kind}>"
            elif nxt.op == "call_method" and nxt.target in _METHODS:
                kind, name = _METHODS[nxt.target], f"<method:{nxt.target}>"
            elif nxt.op == "output":
                dead.append(DeadEnd(n.target, "it feeds the model output"))
                break
            else:
                kind, name = "other", f"{nxt.op} {getattr(nxt.target, '__name__', nxt.target)}"
            if kind in ("other", "getitem"):
                dead.append(DeadEnd(n.target, f"it is followed by {name}, which is not a per-channel "
                                    "ReLU/identity/pool operation"))
                break
            between.append(name)
            kinds.append(kind)
            cur = nxt
    return links, dead


def _sequential_runs(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Leaf modules of every outermost nn.Sequential, nested Sequentials flattened, in execution order."""

    def flatten(prefix: str, seq: nn.Sequential) -> list[tuple[str, nn.Module]]:
        out = []
        for child_name, child in seq.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            out += flatten(full, child) if isinstance(child, nn.Sequential) else [(full, child)]
        return out

    runs: list[list[tuple[str, nn.Module]]] = []
    nested: set[str] = set()
    for name, m in model.named_modules():  # pre-order: an outer Sequential comes before its children
        if isinstance(m, nn.Sequential) and name not in nested:
            runs.append(flatten(name, m))
            nested.update(f"{name}.{n}" if name else n for n, c in m.named_modules()
                          if n and isinstance(c, nn.Sequential) and _only_sequentials_above(m, n))
    return runs


def _only_sequentials_above(root: nn.Module, name: str) -> bool:
    """True when every module on the path from ``root`` to ``name`` (exclusive) is an nn.Sequential."""
    parts, cur = name.split("."), root
    for part in parts[:-1]:
        cur = getattr(cur, part)
        if not isinstance(cur, nn.Sequential):
            return False
    return True


def _shared_modules(model: nn.Module) -> set[int]:
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return {k for k, v in counts.items() if v > 1}


def _sequential_links(model: nn.Module, is_consumer) -> tuple[list[Link], list[DeadEnd]]:
    shared = _shared_modules(model)
    links, dead, in_runs = [], [], set()
    for run in _sequential_runs(model):
        for i, (pname, p) in enumerate(run):
            if not isinstance(p, LAYER_TYPES):
                continue
            in_runs.add(pname)
            if id(p) in shared:
                dead.append(DeadEnd(pname, "the module is registered more than once (shared weights)"))
                continue
            between, kinds = [], []
            for cname, c in run[i + 1:]:
                if is_consumer(c):
                    if id(c) not in shared:
                        links.append(Link(pname, cname, between, kinds))
                    else:
                        dead.append(DeadEnd(pname, f"consumer {cname} is registered more than once"))
                    break
                kind = module_kind(c)
                if kind == "other":
                    dead.append(DeadEnd(pname, f"it is followed by {cname} ({type(c).__name__}), which is not "
                                        "a per-channel ReLU/identity/pool module"))
                    break
                between.append(cname)
                kinds.append(kind)
            else:
                dead.append(DeadEnd(pname, "it ends its nn.Sequential (the model did not trace, so what "
                                    "follows is unknown)"))
    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES) and name not in in_runs:
            dead.append(DeadEnd(name, "the model did not trace and the layer is not inside an nn.Sequential"))
    return links, dead


def find_links(model: nn.Module, is_consumer) -> tuple[list[Link], list[DeadEnd], str]:
    """All :class:`Link` s of ``model`` whose consumer satisfies ``is_consumer(module)``, and the layers
    that have none with the reason.

    Returns ``(links, dead_ends, method)``, method ``"fx"`` or ``"sequential"`` (the model did not trace)."""
    gm = trace(model)
    if gm is not None:
        return *_fx_links(gm, is_consumer), "fx"
    return *_sequential_links(model, is_consumer), "sequential"


def out_channel_axis(layer: nn.Module) -> int:
    """Axis of the weight that indexes output channels: 1 for ConvTranspose, 0 otherwise."""
    return 1 if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else 0


def out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def channel_mismatch(producer: nn.Module, consumer: nn.Module) -> str | None:
    """Why channel ``c`` of ``producer``'s output is not channel ``c`` of ``consumer``'s input (None when
    it is), for a producer Conv/ConvTranspose/Linear and a consumer Conv/Linear/BatchNorm of a :class:`Link`.

    A Linear reads its last dim and a conv (and a BatchNorm) dim 1, so a conv straight into a Linear (no
    flatten between) or a Linear into a conv mixes positions with channels even when the counts agree."""
    c = out_channels(producer)
    if isinstance(consumer, BN_TYPES):
        n = consumer.num_features
    else:
        if isinstance(producer, nn.Linear) != isinstance(consumer, nn.Linear):
            return (f"the {type(producer).__name__} output goes into a {type(consumer).__name__} with no flatten "
                    "between, so the second layer does not read the first one's output channels")
        n = in_channels(consumer)
    if n != c:
        return f"the first layer has {c} output channels but the second takes {n} input channels"
    return None


# Elementwise clips after a layer that AdaRound may reconstruct through (errors they clip away do not count).
_CLIP_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_CLIP_FUNCTIONS = (F.relu, torch.relu, F.relu6)
_PASS_MODULES = (nn.Identity, nn.Dropout)  # eval mode: the identity (a folded BatchNorm is an nn.Identity)


def activation_after(gm: torch.fx.GraphModule, name: str):
    """The clipping activation that alone consumes layer ``name``'s output in ``gm``, or None.

    Follows the layer's output through identities (a folded BatchNorm, eval-mode Dropout) while each value
    has exactly one user; returns the module (ReLU, ReLU6, Hardtanh, :class:`ChannelClip`) or function
    (``relu``, ``relu6``) found there. None when the layer is called more than once, its output (or an
    identity of it) is used anywhere else, or what follows is not such a clip: the layer's own output
    then matters as it is."""
    from .clip import ChannelClip

    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        return None
    node = calls[0]
    while len(node.users) == 1:
        node = next(iter(node.users))
        if len(node.all_input_nodes) != 1:
            return None
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, _PASS_MODULES):
                continue
            return m if isinstance(m, (*_CLIP_MODULES, ChannelClip)) else None
        if node.op == "call_function" and node.target in _CLIP_FUNCTIONS and len(node.args) == 1:
            return node.target
        return None
    return None


def unshare_call_sites(model: nn.Module, types: tuple[type, ...]) -> tuple[nn.Module, int]:
    """Give every call site of a module of ``types`` that is called more than once its own copy.

    Needed before a module is rewritten per call site (a ReLU6 reused after several layers becomes a
    different :class:`ChannelClip` after each). Returns ``(model, n_split)``; when something was split
    the model is its torch.fx GraphModule (same forward, traced in the current train/eval mode),
    otherwise ``model`` itself. Models that do not trace are returned unchanged."""
    gm = trace(model)
    if gm is None:
        return model, 0
    calls: dict[str, list[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), types):
            calls.setdefault(n.target, []).append(n)
    split = 0
    for target, nodes in calls.items():
        if len(nodes) < 2:
            continue
        for i, node in enumerate(nodes[1:], start=1):
            new = f"{target}_site{i}"
            gm.add_submodule(new, copy.deepcopy(gm.get_submodule(target)))
            node.target = new
            split += 1
    if not split:
        return model, 0
    gm.recompile()
    return gm, split
