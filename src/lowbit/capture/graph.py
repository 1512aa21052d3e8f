"""Graph-mode capture with torch.fx: swap layers, fuse activations, quantize joins, place edge quantizers.

Where the activation quantizers go (what ONNX Runtime's QDQ format expects, so ``DQ -> op -> Q`` fuses
into QLinearConv / QLinearMatMul / QLinearAdd / QLinearAveragePool):

* each quantized op (Conv/Linear unit, matmul, add, mul, cat, average pooling) quantizes its output,
  after the fused activation (Conv-BN-ReLU is one unit: BN is folded first, the ReLU is fused);
* each input of a quantized op that is not already on a grid gets one quantizer, placed right after the
  producer and shared by every consumer of that tensor (model inputs, LayerNorm/Softmax/GELU outputs);
* ops that keep values on the grid (max pooling, ReLU, reshape/view/permute/flatten, getitem ...)
  pass the quantization through, with no new quantizer.

Joins (add/mul/cat) are quantized when at least one input is already quantized (residual joins);
matmul always. A join input that holds mask-like values (``|x| >= 1e4``, e.g. an attention mask of
``finfo.min``) keeps the join float, logged with that reason.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizationError, UnsupportedLayerError
from ..nn.layers import QUANT_LAYERS, QuantAdd, QuantCat, QuantJoin, QuantMatMul, QuantMul
from ..nn.quantizer import TensorQuantizer
from ..passes.clip import ChannelClip
from ..recipes import LayerSpec
from ..spec import QuantSpec
from .links import link_input_quantizers
from .log import Decision, DecisionLog
from .plan import Planner, Resolved

__all__ = ["trace", "quantize_graph", "MASK_ABSMAX"]

MASK_ABSMAX = 1e4
"""A join input whose magnitude reaches this (attention masks of -1e4 or ``finfo.min``) is not quantized."""

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardtanh, nn.Sigmoid, nn.LeakyReLU, nn.Tanh,
                ChannelClip)  # ChannelClip: a ReLU6 after cross-layer equalization (per-channel clip points)


def _gelu(node: fx.Node) -> nn.Module:
    return nn.GELU(approximate=node.kwargs.get("approximate", "none"))


_ACT_FUNCS: dict[Callable, Callable[[fx.Node], nn.Module]] = {
    F.relu: lambda n: nn.ReLU(),
    torch.relu: lambda n: nn.ReLU(),
    F.relu6: lambda n: nn.ReLU6(),
    F.gelu: _gelu,
    F.silu: lambda n: nn.SiLU(),
    F.hardswish: lambda n: nn.Hardswish(),
    torch.sigmoid: lambda n: nn.Sigmoid(),
    F.sigmoid: lambda n: nn.Sigmoid(),
    torch.tanh: lambda n: nn.Tanh(),
}
_ACT_METHODS: dict[str, Callable[[fx.Node], nn.Module]] = {
    "relu": lambda n: nn.ReLU(),
    "relu_": lambda n: nn.ReLU(),
    "sigmoid": lambda n: nn.Sigmoid(),
    "tanh": lambda n: nn.Tanh(),
}

_JOIN_FUNCS: dict[Callable, str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    torch.cat: "cat", torch.concat: "cat",
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
}
_JOIN_METHODS: dict[str, str] = {"add": "add", "add_": "add", "mul": "mul", "mul_": "mul", "matmul": "matmul", "bmm": "matmul"}
_JOIN_CLASSES: dict[str, type[QuantJoin]] = {"add": QuantAdd, "mul": QuantMul, "cat": QuantCat, "matmul": QuantMatMul}

_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity,
                 nn.Dropout, nn.ReLU, nn.Unflatten, nn.ZeroPad2d, nn.ZeroPad1d)
_PASS_FUNCS = {torch.flatten, F.max_pool1d, F.max_pool2d, F.adaptive_max_pool2d, torch.reshape, torch.transpose,
               torch.permute, operator.getitem, torch.squeeze, torch.unsqueeze, F.relu, torch.relu, F.dropout,
               torch.chunk, torch.split}
_PASS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                 "expand", "chunk", "split", "relu", "relu_", "view_as", "reshape_as"}
_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_POOL_FUNCS = {F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # ChannelClip (an equalized ReLU6) stays one node so it fuses into the layer before it
        return isinstance(m, ChannelClip) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with the quantizable layer types kept as leaf modules."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


@dataclass
class _ValueInfo:
    is_float: bool = False
    absmax: float = 0.0


@dataclass
class _Probe:
    """Per-node facts from one example run: float tensor or not, largest magnitude."""

    info: dict[str, _ValueInfo] = field(default_factory=dict)

    def is_float(self, node) -> bool:
        if not isinstance(node, fx.Node):
            return False
        i = self.info.get(node.name)
        return i is not None and i.is_float

    def absmax(self, node) -> float:
        i = self.info.get(node.name) if isinstance(node, fx.Node) else None
        return 0.0 if i is None else i.absmax


def _probe(gm: fx.GraphModule, args: tuple, kwargs: dict) -> _Probe:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    full = list(args)
    for n in placeholders[len(args):]:
        if n.target in kwargs:
            full.append(kwargs[n.target])
        elif n.args:
            full.append(n.args[0])
        else:
            full.append(None)
    probe = _Probe()

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if torch.is_tensor(out):
                fl = out.is_floating_point()
                amax = float(out.detach().abs().max()) if fl and out.numel() else 0.0
                probe.info[n.name] = _ValueInfo(fl, amax)
            return out

    with torch.no_grad():
        _Rec(gm).run(*full)
    return probe


def _target_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def _act_for(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module equivalent of activation node ``node``, or None when it is not a fusable activation."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return copy.deepcopy(m) if isinstance(m, _ACT_MODULES) else None
    if node.op == "call_function" and node.target in _ACT_FUNCS:
        return _ACT_FUNCS[node.target](node)
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target](node)
    return None


def _join_kind(node: fx.Node) -> str | None:
    if node.op == "call_function":
        return _JOIN_FUNCS.get(node.target)
    if node.op == "call_method":
        return _JOIN_METHODS.get(node.target)
    return None


def _in_place(node: fx.Node) -> bool:
    """``x.add_(y)``, ``x += y`` ...: the op writes its result into its first argument."""
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return node.op == "call_function" and node.target in (operator.iadd, operator.imul)


def _is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCS
    if node.op == "call_method":
        return node.target in _PASS_METHODS
    return False


def _is_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _POOL_MODULES)
    return node.op == "call_function" and node.target in _POOL_FUNCS


def _spec_text(s: QuantSpec | None) -> str | None:
    return None if s is None else str(s)


def _free_name(gm: fx.GraphModule, base: str) -> str:
    base = base.replace(".", "_")
    name, k = base, 1
    while hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name


class _GraphQuantizer:
    def __init__(self, gm: fx.GraphModule, planner: Planner, log: DecisionLog, probe: _Probe | None,
                 edge_spec: QuantSpec | None) -> None:
        self.gm, self.planner, self.log, self.probe, self.edge_spec = gm, planner, log, probe, edge_spec
        self.quantized: set[fx.Node] = set()  # values that lie on a quantization grid
        self.edge_of: dict[fx.Node, fx.Node] = {}  # producer -> its edge-quantizer node
        self.swapped: dict[str, QuantSpec | None] = {}  # layers swapped so far -> their static activation spec

    # ---------------------------------------------------------------- edges
    def _float_tensor(self, node) -> bool:
        if not isinstance(node, fx.Node):
            return False
        return True if self.probe is None else self.probe.is_float(node)

    def ensure_quantized(self, node: fx.Node, spec: QuantSpec) -> fx.Node:
        """Put one shared quantizer after ``node`` (unless its value is already on a grid); every use of
        ``node`` then reads the quantized value. Returns the node that carries the quantized value."""
        if node in self.quantized:
            return node
        if node in self.edge_of:
            return self.edge_of[node]
        anchor = node
        if node.op == "placeholder":  # keep every placeholder ahead of the first computation
            anchor = [n for n in self.gm.graph.nodes if n.op == "placeholder"][-1]
        return self._insert_quantizer(node, spec, f"{node.name}_quant", f"{node.name}.output", anchor)

    def add_output_quantizer(self, node: fx.Node, spec: QuantSpec, name: str) -> fx.Node:
        return self._insert_quantizer(node, spec, f"{name}_output_quant", f"{name}.output", node)

    def _insert_quantizer(self, node: fx.Node, spec: QuantSpec, module_name: str, tensor_name: str,
                          anchor: fx.Node) -> fx.Node:
        """A TensorQuantizer node after ``anchor`` that every other user of ``node`` now reads."""
        qname = _free_name(self.gm, module_name)
        self.gm.add_submodule(qname, TensorQuantizer(spec, name=tensor_name))
        with self.gm.graph.inserting_after(anchor):
            qn = self.gm.graph.call_module(qname, (node,))
        node.replace_all_uses_with(qn, delete_user_cb=lambda u: u is not qn)
        self.quantized.add(qn)
        self.edge_of[node] = qn
        if self.probe is not None and node.name in self.probe.info:
            self.probe.info[qn.name] = self.probe.info[node.name]
        return qn

    # ---------------------------------------------------------------- fusion
    def _fusable_act(self, node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        if len(users) != 1:
            return None
        act = _act_for(self.gm, users[0])
        return users[0] if act is not None else None

    def _fuse(self, node: fx.Node) -> tuple[nn.Module | None, fx.Node | None]:
        act_node = self._fusable_act(node)
        if act_node is None:
            return None, None
        act = _act_for(self.gm, act_node)
        act_node.replace_all_uses_with(node)
        self.gm.graph.erase_node(act_node)
        return act, act_node

    # ---------------------------------------------------------------- per node
    def run(self, call_counts: dict[str, int]) -> None:
        for node in list(self.gm.graph.nodes):
            if node.graph is not self.gm.graph or node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op == "call_module":
                mod = self.gm.get_submodule(node.target)
                if type(mod) in QUANT_LAYERS:
                    self._layer(node, mod, call_counts.get(node.target, 1))
                    continue
                if str(node.target) in self.swapped:  # a later call of a layer swapped at its first call
                    self._layer_call(node, self.swapped[str(node.target)])
                    continue
                if isinstance(mod, QuantJoin | TensorQuantizer) or hasattr(mod, "weight_quantizer"):
                    continue
            kind = _join_kind(node)
            if kind is not None:
                self._join(node, kind)
            elif _is_pool(self.gm, node):
                self._pool(node)
            elif _is_passthrough(self.gm, node):
                first = next((a for a in node.args if isinstance(a, fx.Node)), None)
                if first is not None and first in self.quantized and self._float_tensor(node):
                    self.quantized.add(node)
            elif node.op == "call_module":
                self._other_module(node)

    def _layer(self, node: fx.Node, mod: nn.Module, n_calls: int) -> None:
        name = str(node.target)
        res: Resolved = self.planner.resolve(name, module=mod)
        spec: LayerSpec = res.spec
        kind = type(mod).__name__
        if spec.is_float:
            self.log.add(Decision(name, kind, False, res.source if res.explicit else f"{res.source} does not quantize {kind}",
                                  by_user=True))
            return
        act = spec.activation
        static_act = act if (act is not None and not act.dynamic) else None
        dyn_act = act if (act is not None and act.dynamic) else None
        fused, fused_node = (None, None)
        if static_act is not None and n_calls == 1 and not isinstance(mod, nn.Embedding):
            fused, fused_node = self._fuse(node)
        try:
            qmod = QUANT_LAYERS[type(mod)].from_float(
                mod, spec.weight, input_spec=dyn_act, output_spec=static_act, activation=fused, name=name
            )
        except UnsupportedLayerError as e:
            if fused_node is not None:  # put the activation back as its own node
                self._unfuse(node, fused)
            if res.explicit:
                raise
            self.log.add(Decision(name, kind, False, str(e)))
            return
        _set_module(self.gm, name, qmod)
        self.swapped[name] = static_act
        self._layer_call(node, static_act)
        reason = (f"fused {type(fused).__name__}" if fused is not None else "") + (
            f"; {res.source}" if res.source not in (type(self.planner.recipe).__name__,) else "")
        self.log.add(Decision(name, kind, True, reason.strip("; "), _spec_text(spec.weight), _spec_text(act)))

    def _layer_call(self, node: fx.Node, static_act: QuantSpec | None) -> None:
        """One call of a swapped layer (every call of a shared one): its float input gets the edge quantizer
        an int8 backend needs, and its output (quantized by the layer) lies on a grid."""
        if static_act is None:
            return
        if node.args and isinstance(node.args[0], fx.Node) and self._float_tensor(node.args[0]):
            self.ensure_quantized(node.args[0], static_act)
        self.quantized.add(node)

    def _unfuse(self, node: fx.Node, act: nn.Module) -> None:
        name = _free_name(self.gm, f"{node.name}_act")
        self.gm.add_submodule(name, act)
        with self.gm.graph.inserting_after(node):
            an = self.gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(an, delete_user_cb=lambda u: u is not an)

    def _join(self, node: fx.Node, kind: str) -> None:
        if kind == "cat":
            seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
            inputs = list(seq)
        else:
            inputs = list(node.args[:2])
        tensor_inputs = [a for a in inputs if self._float_tensor(a)]
        if not tensor_inputs:
            return
        name = node.name
        res = self.planner.resolve(name, join=kind)
        spec = res.spec.activation
        if spec is None or spec.dynamic:
            if self.edge_spec is not None:
                self.log.add(Decision(name, kind, False, f"{res.source}: no activation spec for this op", by_user=res.explicit))
            return
        if kind != "matmul" and not res.explicit and not any(a in self.quantized for a in tensor_inputs):
            return  # not a residual join of quantized tensors: stays a float op (not logged: nothing asked)
        if self.probe is not None:
            big = [a for a in tensor_inputs if self.probe.absmax(a) >= MASK_ABSMAX]
            if big:
                self.log.add(Decision(name, kind, False, f"input {big[0].name} holds mask-like values (|x| up to "
                                      f"{self.probe.absmax(big[0]):.3g}); quantizing it would erase the other input"))
                return
        for a in tensor_inputs:
            self.ensure_quantized(a, spec)
        # refresh the arguments (ensure_quantized rewired the uses)
        if kind == "cat":
            seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
            args = (list(seq),)
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            qjoin = QuantCat([None] * len(args[0]), output_spec=None, name=name, dim=dim)
            call_args, call_kwargs = args, {}
        else:
            qjoin = _JOIN_CLASSES[kind]([None, None], output_spec=None, name=name)
            call_args = tuple(node.args[:2])
            call_kwargs = {k: v for k, v in node.kwargs.items() if k == "alpha"} if kind == "add" else {}
        fused, _ = self._fuse(node) if kind in ("add", "mul") else (None, None)
        qjoin.activation = fused
        qjoin.output_quantizer = TensorQuantizer(spec, name=f"{name}.output")
        mod_name = _free_name(self.gm, f"{name}_q")
        self.gm.add_submodule(mod_name, qjoin)
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(mod_name, call_args, call_kwargs)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        if _in_place(node) and call_args and isinstance(call_args[0], fx.Node):
            self._redirect_later_uses(call_args[0], new)
        self.quantized.add(new)
        if self.probe is not None and node.name in self.probe.info:
            self.probe.info[new.name] = self.probe.info[node.name]
        reason = f"fused {type(fused).__name__}" if fused is not None else ""
        self.log.add(Decision(name, kind, True, reason, None, str(spec)))

    def _redirect_later_uses(self, target: fx.Node, new: fx.Node) -> None:
        """``target.add_(y)`` / ``target += y`` wrote the result into ``target``; the quantized join returns a
        new tensor instead, so every use of ``target`` after the join reads the join's output."""
        after, seen = [], False
        for n in self.gm.graph.nodes:
            if seen and target in n.all_input_nodes:
                after.append(n)
            seen = seen or n is new
        for n in after:
            n.replace_input_with(target, new)

    def _pool(self, node: fx.Node) -> None:
        spec = self.edge_spec
        first = node.args[0] if node.args else None
        if spec is None or not isinstance(first, fx.Node) or not self._float_tensor(first):
            return
        if first not in self.quantized:  # pooling a float tensor: quantize the pooled output only when needed
            return
        name = str(node.target) if node.op == "call_module" else node.name
        self.add_output_quantizer(node, spec, name.replace(".", "_"))
        self.log.add(Decision(name, "avg_pool", True, "output requantized (QLinearAveragePool)", None, str(spec)))

    def _other_module(self, node: fx.Node) -> None:
        mod = self.gm.get_submodule(node.target)
        if isinstance(mod, _NORM_MODULES) or not any(True for _ in mod.parameters(recurse=True)):
            return
        res = self.planner.resolve(str(node.target))
        if res.explicit:
            self.log.add(Decision(str(node.target), type(mod).__name__, False, res.source, by_user=True))
            return
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            reason = "BatchNorm not folded (no Conv/Linear directly before it); runs in float"
        else:
            reason = f"{type(mod).__name__} has no quantized counterpart (leaf module); runs in float"
        self.log.add(Decision(str(node.target), type(mod).__name__, False, reason))


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


_FUNC_LAYERS = {torch.conv1d: (nn.Conv1d, 1), F.conv1d: (nn.Conv1d, 1), torch.conv2d: (nn.Conv2d, 2),
                F.conv2d: (nn.Conv2d, 2), F.linear: (nn.Linear, 0), torch._C._nn.linear: (nn.Linear, 0)}


def modularize_functional_layers(gm: fx.GraphModule) -> list[str]:
    """Turn ``F.conv2d(x, self.weight, self.bias, ...)`` / ``F.linear`` calls on a module's own
    parameters (Conv2d subclasses with a custom ``forward``, e.g. TF "same" padding) into calls of a
    plain ``nn.Conv2d`` / ``nn.Linear`` that shares the parameters and takes the owner's name, so they
    can be folded, fused and swapped like any layer. Returns the names converted."""
    done = []
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _FUNC_LAYERS or node.kwargs:
            continue
        cls, nd = _FUNC_LAYERS[node.target]
        w = node.args[1] if len(node.args) > 1 else None
        b = node.args[2] if len(node.args) > 2 else None
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target).endswith(".weight") and len(w.users) == 1):
            continue
        owner_name = str(w.target)[: -len(".weight")]
        owner = gm.get_submodule(owner_name)
        if owner_name in targets or not isinstance(owner, nn.Module):
            continue
        if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr" and str(b.target) == owner_name + ".bias"):
            continue
        weight = owner.weight
        bias = getattr(owner, "bias", None) if b is not None else None
        if cls is nn.Linear:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            stride, padding, dilation, groups = (list(node.args[3:7]) + [1, 0, 1, 1][len(node.args[3:7]):])
            new = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=bias is not None)
        new.weight = weight
        if bias is not None:
            new.bias = bias
        for child_name, child in owner.named_children():
            new.add_module(child_name, child)  # e.g. the owner's static_padding, still called by the graph
        _set_module(gm, owner_name, new)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(owner_name, (node.args[0],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for attr in (w, b):
            if isinstance(attr, fx.Node) and not attr.users:
                gm.graph.erase_node(attr)
        targets.add(owner_name)
        done.append(owner_name)
    gm.recompile()
    return done


def _drop_identities(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity) and node.args:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def weighted_order(gm: fx.GraphModule) -> list[str]:
    """Names of the weighted layers (Conv/Linear/Embedding...) in graph (execution) order."""
    out: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in QUANT_LAYERS and node.target not in out:
            out.append(str(node.target))
    return out


def join_names(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if _join_kind(n) is not None]


def quantize_graph(gm: fx.GraphModule, planner: Planner, log: DecisionLog, example: tuple[tuple, dict] | None) -> fx.GraphModule:
    """Rewrite traced ``gm`` in place into the quantized-simulation graph (see the module docstring).

    ``example``: ``(args, kwargs)`` of one input batch, run once to learn which values are float
    tensors and their magnitude (needed when the recipe places static activation quantizers)."""
    _drop_identities(gm)
    gm.recompile()
    edge = planner.recipe.edge_spec()
    probe = None
    if edge is not None:
        if example is None:
            raise QuantizationError("static activation quantization needs one example batch to place quantizers")
        probe = _probe(gm, *example)
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    _GraphQuantizer(gm, planner, log, probe, edge).run(counts)
    link_input_quantizers(gm)  # each layer's input scale, for the int32 bias the export stores
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
