"""The blocks of a torch.fx GraphModule, for BRECQ block reconstruction.

A GraphModule (what cross-layer equalization returns when it splits a shared ReLU6) calls its layers
directly: the modules that grouped them (an MBConv block, a ResNet BasicBlock) are no longer called, and
their containers are plain ``nn.Module`` objects. The trace remembers them anyway: torch.fx's tracer
stores in ``node.meta["nn_module_stack"]`` the ``(path, type)`` of every module whose ``forward`` was
running when the node was created.

:func:`graph_blocks` applies :func:`~lowbit.passes.brecq.find_blocks`' rule to that record: a block is a
module that was called, is neither a container (``nn.Sequential``) nor a Conv/Linear layer, holds a layer
to round, and whose parent was a container: recorded as an ``nn.Sequential``, or never called itself (an
``nn.ModuleList`` / ``nn.ModuleDict``), or is the root and the GraphModule was traced from a container by
lowbit (the module stack does not record the root's type; lowbit's trace keeps it in ``gm.meta``).
Blocks do not nest. :func:`fold_blocks` then gives a view of the GraphModule in which each block's nodes are one
``call_module`` of a GraphModule of its own, registered at the block's name, so each block is called
once with one tensor, as block reconstruction needs. The view shares every layer with the original
(rounding a layer of the view rounds the original's) and computes the same function with the same
operations in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ._graph import ROOT_TYPE, set_module

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _stack(node: torch.fx.Node) -> list[tuple[str, type]]:
    """``(path, type)`` of the modules the node was traced inside, outermost first (torch >= 2.1 stores
    that pair per entry; a bare type is read with the entry's key as its path)."""
    return [v if isinstance(v, tuple) else (k, v) for k, v in node.meta.get("nn_module_stack", {}).items()]


def _paths(node: torch.fx.Node) -> list[str]:
    return [path for path, _ in _stack(node)]


def graph_blocks(gm: torch.fx.GraphModule, layers: Iterable[str], layer_types: tuple[type, ...]) -> list[str]:
    """The blocks of ``gm`` that hold one of ``layers``, in the order the graph first enters them."""
    layers = list(layers)
    root = gm.meta.get(ROOT_TYPE, torch.fx.GraphModule)
    kinds: dict[str, type] = {}
    for node in gm.graph.nodes:
        for path, kind in _stack(node):
            kinds.setdefault(path, kind)
    out: list[str] = []
    for path, kind in kinds.items():
        if not path or issubclass(kind, _CONTAINERS) or issubclass(kind, layer_types):
            continue
        if not any(n.startswith(path + ".") for n in layers):
            continue
        if any(path.startswith(b + ".") for b in out):
            continue  # inside a block
        parent = path.rpartition(".")[0]
        if (parent in kinds and issubclass(kinds[parent], _CONTAINERS)) or (parent and parent not in kinds) \
                or (not parent and issubclass(root, _CONTAINERS)):
            out.append(path)
    return out


def _fold_one(g: torch.fx.Graph, gm: torch.fx.GraphModule, block: str) -> torch.fx.GraphModule | str:
    """Replace ``block``'s nodes in ``g`` by one ``call_module(block)``; returns the block's own
    GraphModule, or why it cannot be folded (``g`` is then unchanged)."""
    nodes = list(g.nodes)
    members = [n for n in nodes if block in _paths(n)]
    if not members:
        return "no node of the graph was traced inside it"
    first = nodes.index(members[0])
    if nodes[first:first + len(members)] != members:
        return "its nodes are not contiguous in the graph"
    inside = set(members)
    inputs = list(dict.fromkeys(a for n in members for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return f"it takes {len(inputs)} and returns {len(outputs)} values of the graph (one and one needed)"
    prefix = block + "."
    sub = torch.fx.Graph()
    env = {inputs[0]: sub.placeholder("x")}
    for n in members:
        if n.op in ("call_module", "get_attr") and not n.target.startswith(prefix):
            return f"it uses {n.target!r}, which lies outside it"
        new = sub.node_copy(n, lambda a: env[a])
        if n.op in ("call_module", "get_attr"):
            new.target = n.target[len(prefix):]
        env[n] = new
    sub.output(env[outputs[0]])
    with g.inserting_after(members[-1]):
        call = g.call_module(block, (inputs[0],))
    outputs[0].replace_all_uses_with(call, delete_user_cb=lambda u: u not in inside)
    for n in reversed(members):
        g.erase_node(n)
    return torch.fx.GraphModule(gm.get_submodule(block), sub, class_name=type(gm).__name__ + "Block")


def fold_blocks(gm: torch.fx.GraphModule, blocks: Iterable[str]) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """A view of ``gm`` with each of ``blocks`` folded into one call; returns ``(view, {block: why not
    folded})``. ``gm`` itself is not changed; the view shares its layers."""
    g = torch.fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    folded: dict[str, torch.fx.GraphModule] = {}
    skipped: dict[str, str] = {}
    for b in blocks:
        got = _fold_one(g, gm, b)
        if isinstance(got, str):
            skipped[b] = got
        else:
            folded[b] = got
    view = torch.fx.GraphModule(gm, g, class_name=type(gm).__name__)
    for b, sub in folded.items():
        set_module(view, b, sub)
    return view, skipped
