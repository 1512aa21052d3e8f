"""Link each quantized layer of a captured graph to the quantizer that produces its input.

The layer needs the input scale ``s_x`` to add the int32 bias the ONNX export stores
(:meth:`lowbit.nn.QuantLayerMixin.deployed_bias`). The export finds ``s_x`` on the DequantizeLinear
feeding the Conv/Gemm, directly or through ops that keep values on the grid (``requantize_compute_inputs``:
MaxPool, Flatten, Reshape, Squeeze, Unsqueeze, Transpose, Identity, zero Pad); the walk here crosses
exactly the FX counterparts of those ops, so where the export keeps the bias float (the input comes
through anything else) the layer finds no quantizer and keeps it float too.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn.layers import QuantAdd, QuantLayerMixin, link_input_quantizer
from ..nn.quantizer import TensorQuantizer

__all__ = ["link_input_quantizers"]

# ONNX MaxPool / Flatten / Reshape / Squeeze / Unsqueeze / Transpose / Identity / Pad(0) in FX form
_GRID_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.ZeroPad1d, nn.ZeroPad2d)
_GRID_FUNCS = {torch.flatten, F.max_pool1d, F.max_pool2d, torch.reshape, torch.transpose, torch.permute,
               torch.squeeze, torch.unsqueeze, F.dropout}
_GRID_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                 "view_as", "reshape_as"}


def _keeps_grid(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, _GRID_MODULES) and not getattr(m, "return_indices", False)
    if node.op == "call_function":
        return node.target in _GRID_FUNCS
    return node.op == "call_method" and node.target in _GRID_METHODS


def _producer_quantizer(gm: fx.GraphModule, node) -> TensorQuantizer | None:
    seen = 0
    while isinstance(node, fx.Node) and seen < 64:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, TensorQuantizer):
                return m
            q = getattr(m, "output_quantizer", None)
            if isinstance(q, TensorQuantizer):
                return q
        if not _keeps_grid(gm, node) or not node.args:
            return None
        node, seen = node.args[0], seen + 1
    return None


def link_input_quantizers(gm: fx.GraphModule) -> int:
    """For every quantized layer of ``gm``, record the quantizer producing its input
    (:func:`lowbit.nn.layers.link_input_quantizer`; None where there is none, or where a layer called
    several times sees differently quantized inputs), and for every quantized Add the quantizers of its two
    inputs (ONNX Runtime's QLinearAdd arithmetic, :func:`lowbit.nn.ort_arithmetic`). Returns how many
    were linked."""
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    linked = 0
    for name, nodes in calls.items():
        m = gm.get_submodule(name)
        if isinstance(m, QuantAdd) and len(nodes) == 1:  # QLinearAdd needs both input scales
            qs = [_producer_quantizer(gm, a) for a in nodes[0].args[:2]]
            link_input_quantizer(m, qs)
            linked += all(q is not None for q in qs)
            continue
        if not isinstance(m, QuantLayerMixin):
            continue
        qs = {id(q): q for q in (_producer_quantizer(gm, n.args[0] if n.args else None) for n in nodes)}
        q = next(iter(qs.values())) if len(qs) == 1 else None  # a layer called on differently scaled inputs: float
        link_input_quantizer(m, q)
        linked += q is not None
    return linked
