"""Read a quantized model back: every quantizer's spec, scale and zero point (:func:`quant_table`),
and the per-layer SQNR of quantized vs float outputs (:func:`layer_sqnr`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.layers import QuantJoin, QuantLayerMixin
from ..nn.quantizer import TensorQuantizer, quantizers
from ..spec import QuantSpec
from .data import iter_calls

__all__ = ["deployed_size_bytes", "weight_bytes", "quantized_weight_layers", "QuantRecord", "quant_table", "format_quant_table", "quantization_disabled", "LayerSQNR", "layer_sqnr",
           "format_sqnr_table"]


@dataclass(frozen=True)
class QuantRecord:
    """One quantized tensor: ``module`` path of its TensorQuantizer, the tensor's ``name``, ``role``
    ("weight", "input", "output", "edge"), ``spec``, ``scale`` (float32) and ``zero_point`` (int32) in
    the granularity's scale shape (empty tensors for dynamic quantizers: measured per batch)."""

    module: str
    name: str
    role: str
    spec: QuantSpec
    scale: torch.Tensor
    zero_point: torch.Tensor
    calibrated: bool


def _role(module_path: str) -> str:
    last = module_path.rsplit(".", 1)[-1]
    if last == "weight_quantizer":
        return "weight"
    if last == "input_quantizer" or module_path.split(".")[-2:-1] == ["input_quantizers"]:
        return "input"
    if last == "output_quantizer":
        return "output"
    return "edge"


def quant_table(model: nn.Module) -> list[QuantRecord]:
    """Every :class:`~lowbit.nn.TensorQuantizer` in ``model`` with its spec, scale and zero point.

    >>> from lowbit.nn import QuantLinear
    >>> q = QuantLinear.from_float(nn.Linear(2, 2), QuantSpec("int8", granularity="channel"), name="fc")
    >>> [(r.name, r.role, tuple(r.scale.shape)) for r in quant_table(q)]
    [('fc.weight', 'weight', (2,))]
    """
    out = []
    for path, q in quantizers(model):
        dyn = q.spec.dynamic
        out.append(QuantRecord(
            module=path, name=q.name, role=_role(path) if path else "edge", spec=q.spec,
            scale=torch.empty(0) if dyn else q.scale.detach().clone(),
            zero_point=torch.empty(0, dtype=torch.int32) if dyn else q.zero_point.detach().clone(),
            calibrated=q.is_calibrated,
        ))
    return out


def format_quant_table(model: nn.Module) -> str:
    """:func:`quant_table` as plain text (scales summarised as min..max when there are several)."""
    lines = [f"{'tensor':40s} {'role':7s} {'spec':48s} scale / zero point"]
    for r in quant_table(model):
        if r.spec.dynamic:
            qp = "dynamic (per batch)"
        elif r.scale.numel() == 1:
            qp = f"{float(r.scale):.6g} / {int(r.zero_point)}"
        else:
            qp = f"[{float(r.scale.min()):.4g}..{float(r.scale.max()):.4g}] x{r.scale.numel()}"
        lines.append(f"{r.name:40s} {r.role:7s} {str(r.spec):48s} {qp}")
    return "\n".join(lines)


def _passthrough(x, *args, **kwargs):
    return x


@contextlib.contextmanager
def quantization_disabled(model: nn.Module, keep: str | None = None) -> Iterator[nn.Module]:
    """Inside the block every TensorQuantizer of ``model`` (static and dynamic) returns its input
    unchanged: ``model`` computes the float (BN-folded) function. Restored on exit.

    ``keep``: a module path whose own quantizers (``keep.*``: weight, input, output) stay on, so the
    model computes the float function with that one layer quantized."""
    prefix = None if keep is None else keep + "."
    qs = [q for path, q in quantizers(model) if prefix is None or not path.startswith(prefix)]
    flags = [q.quant_enabled.clone() for q in qs]
    for q in qs:
        q.forward = _passthrough  # instance attribute shadows the class method; nn.Module.__call__ uses it
        q.quant_enabled.fill_(False)  # also off for the layers that read it: no int32 bias without quantized inputs
    try:
        yield model
    finally:
        for q, f in zip(qs, flags, strict=True):
            del q.forward
            q.quant_enabled.copy_(f)


@dataclass(frozen=True)
class LayerSQNR:
    """SQNR in dB of one quantized layer's output (quantized model vs the same model with every
    quantizer off), accumulated over all batches: ``10 log10(sum y^2 / sum (y - y_q)^2)``."""

    name: str
    kind: str
    sqnr_db: float
    numel: int


def _reportable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin | QuantJoin)]


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, tuple | list):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        for o in out.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple())
    return None


@torch.no_grad()
def layer_sqnr(
    float_model: nn.Module | None,
    qmodel: nn.Module,
    data: Iterable,
    *,
    num_batches: int | None = None,
    progress: bool = False,
) -> list[LayerSQNR]:
    """Per-layer SQNR of every quantized layer and join of ``qmodel`` (forward hooks).

    The float reference of a layer is its output when the whole model runs with quantization off
    (:func:`quantization_disabled`): the float, BN-folded model, so fused units (Conv-BN-ReLU) compare
    like with like. With ``float_model`` given, a final row ``"<model output>"`` compares
    ``float_model``'s output with ``qmodel``'s.

    Args:
        data: an iterable of batches as for calibration (tensors, tuples, dicts).
        num_batches: cap on the batches used.

    Returns:
        One :class:`LayerSQNR` per layer, in module order (``inf`` when the outputs are identical).
    """
    layers = _reportable(qmodel)
    sig = {n: 0.0 for n, _ in layers}
    noise = {n: 0.0 for n, _ in layers}
    count = {n: 0 for n, _ in layers}
    ref: dict[str, list[torch.Tensor]] = {}
    mode = {"float": True}
    out_sig, out_noise = 0.0, 0.0

    def hook_for(name):
        def hook(_m, _inp, out):
            y = _first_tensor(out)
            if y is None:
                return
            y = y.detach().double()
            if mode["float"]:
                ref.setdefault(name, []).append(y)
            else:
                r = ref[name].pop(0)
                sig[name] += float((r * r).sum())
                noise[name] += float(((r - y) ** 2).sum())
                count[name] += y.numel()
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in layers]
    was_training = qmodel.training
    qmodel.eval()
    try:
        for args, kwargs in iter_calls(data, qmodel, num_batches, progress, desc="layer SQNR"):
            ref.clear()
            mode["float"] = True
            with quantization_disabled(qmodel):
                qmodel(*args, **kwargs)
            mode["float"] = False
            yq = _first_tensor(qmodel(*args, **kwargs))
            if float_model is not None:
                yf = _first_tensor(float_model(*args, **kwargs))
                out_sig += float((yf.double() ** 2).sum())
                out_noise += float(((yf.double() - yq.double()) ** 2).sum())
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)

    def db(s: float, n: float) -> float:
        if n == 0.0:
            return math.inf
        if s == 0.0:
            return -math.inf
        return 10.0 * math.log10(s / n)

    rows = [LayerSQNR(n, type(m).__name__, db(sig[n], noise[n]), count[n]) for n, m in layers]
    if float_model is not None:
        rows.append(LayerSQNR("<model output>", type(qmodel).__name__, db(out_sig, out_noise), 0))
    return rows


def format_sqnr_table(rows: list[LayerSQNR]) -> str:
    """The :func:`layer_sqnr` rows as plain text."""
    lines = [f"{'layer':40s} {'kind':22s} {'SQNR dB':>8s}"]
    lines += [f"{r.name:40s} {r.kind:22s} {r.sqnr_db:8.2f}" for r in rows]
    return "\n".join(lines)



def weight_bytes(weight: torch.Tensor, wq) -> int:
    """Stored bytes of one quantized ``weight`` under weight quantizer ``wq``:
    ``ceil(numel * bits / 8)`` + 4 bytes per float32 scale + ``ceil(bits / 8)`` per zero point (affine
    formats only); unscaled casts (fp16/bf16) have no scales."""
    bits = wq.spec.format.bits
    n_scales = max(1, wq.scale.numel()) if wq.spec.scaled else 0
    total = (weight.numel() * bits + 7) // 8 + 4 * n_scales
    if not wq.spec.symmetric:
        total += n_scales * ((bits + 7) // 8)
    return total


def quantized_weight_layers(qmodel: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every module with a weight tensor and an enabled ``TensorQuantizer`` for it
    (``module.weight``, ``module.weight_quantizer`` with ``quant_enabled``), in ``named_modules`` order."""
    for n, m in qmodel.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(wq, TensorQuantizer) and bool(wq.quant_enabled) and torch.is_tensor(getattr(m, "weight", None)):
            yield n, m


def deployed_size_bytes(qmodel: nn.Module) -> int:
    """Bytes a deployment of ``qmodel`` stores: each quantized weight by :func:`weight_bytes`; each
    enabled static activation quantizer's float32 scale (+ a ``ceil(bits / 8)``-byte zero point for
    affine); every other parameter and buffer (biases, norms, float layers, weights whose quantizer is
    switched off) at its own dtype size, each tensor counted once. The quantizers' state flags (and the
    scales of switched-off quantizers) are not counted."""
    seen: set[int] = set()
    weight_quantizers: set[int] = set()
    total = 0
    for _, m in quantized_weight_layers(qmodel):
        total += weight_bytes(m.weight, m.weight_quantizer)
        seen.add(id(m.weight))
        weight_quantizers.add(id(m.weight_quantizer))
    for m in qmodel.modules():
        if not isinstance(m, TensorQuantizer):
            continue
        if id(m) not in weight_quantizers and bool(m.quant_enabled) and m.spec.scaled and not m.spec.dynamic:
            zp_bytes = 0 if m.spec.symmetric else (m.spec.format.bits + 7) // 8
            total += (4 + zp_bytes) * m.scale.numel()
        seen.update(id(t) for t in list(m.buffers(recurse=False)) + list(m.parameters(recurse=False)))
    for t in list(qmodel.parameters()) + list(qmodel.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
