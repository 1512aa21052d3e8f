"""What is in a model before quantizing it: per-layer parameters, FLOPs/MACs, weight ranges and sizes.

FLOPs are counted by PyTorch itself (:class:`torch.utils.flop_counter.FlopCounterMode`) while the model
runs on ``example_inputs``, so they follow the real shapes, strides and groups. That counter registers
matrix products, convolutions and attention only (elementwise ops, norms and pooling count 0), the same
convention as thop/ptflops' "MACs": ``MACs = FLOPs / 2``. torchvision ResNet-50 at 1x3x224x224 gives
4.09 GMACs and 25.6 M parameters.

The weight statistics flag layers where one per-tensor scale cannot serve every output channel:
``channel_range_ratio = max_c absmax(W[c]) / min_c absmax(W[c])`` (Nagel et al. 2019, "Data-Free
Quantization", Fig. 2: depthwise convolutions of MobileNetV2 reach ratios in the hundreds).

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> s = inspect_model(m, torch.randn(2, 4))
>>> s.layers[0].name, s.layers[0].params, s.layers[0].macs
('0', 15, 24)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError

__all__ = ["LayerSummary", "ModelSummary", "inspect_model", "format_summary", "bytes_at_bits"]

# bits per value of the storage formats the summary prices
SIZE_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}


def bytes_at_bits(numel: int, bits: int) -> int:
    """Storage bytes of ``numel`` values packed at ``bits`` each: ``ceil(numel * bits / 8)``.
    Scales and zero points are not included (one float per channel or group: small next to the weights)."""
    return (numel * bits + 7) // 8


@dataclass(frozen=True)
class LayerSummary:
    """One leaf module (a module with no children) that has parameters or performs counted FLOPs.

    Attributes:
        name: fully qualified module name (``"layer1.0.conv1"``), as in ``model.named_modules()``.
        type: the module's class name (``"Conv2d"``).
        params: number of parameters owned directly by the module (weight + bias ...).
        flops: FLOPs of every call of this module on ``example_inputs`` (FlopCounterMode).
        macs: ``flops // 2``.
        weight_shape: shape of ``weight`` (``()`` when the module has none).
        weight_min, weight_max, weight_absmax: over the whole weight (``nan`` without a weight).
        channel_range_ratio: ``max_c absmax(W[c]) / min_c absmax(W[c])`` over output channels
            (axis 0) for weights with 2+ dims, ``inf`` when a channel is all zero, ``nan`` otherwise.
        bytes: parameter storage at fp32 / fp16 / int8 / int4 (:func:`bytes_at_bits`).
        groups: the module's ``groups`` (convolutions), else 1.
    """

    name: str
    type: str
    params: int
    flops: int
    macs: int
    weight_shape: tuple[int, ...]
    weight_min: float
    weight_max: float
    weight_absmax: float
    channel_range_ratio: float
    bytes: Mapping[str, int]
    groups: int = 1

    @property
    def is_depthwise(self) -> bool:
        """Conv weight with one input channel per group and groups > 1 (depthwise convolution; a
        convolution over a single input channel, e.g. a grayscale stem, is not)."""
        return (self.type.startswith("Conv") and self.groups > 1 and len(self.weight_shape) >= 3
                and self.weight_shape[1] == 1)


@dataclass(frozen=True)
class ModelSummary:
    """The whole model: its layers (in ``named_modules`` order) and totals.

    ``total_params`` counts every distinct parameter of the model once (shared weights once);
    ``total_flops`` is everything FlopCounterMode saw in one forward, including ops outside leaf layers
    (e.g. ``torch.matmul`` in a module's own ``forward``).
    """

    model: str
    input_shapes: tuple[tuple[int, ...], ...]
    layers: tuple[LayerSummary, ...]
    total_params: int
    total_flops: int
    bytes: Mapping[str, int]

    @property
    def total_macs(self) -> int:
        return self.total_flops // 2

    def layer(self, name: str) -> LayerSummary:
        """The summary of the layer called ``name``; KeyError naming close matches otherwise."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        close = [la.name for la in self.layers if name in la.name][:5]
        raise KeyError(f"no layer {name!r} in the summary of {self.model}; similar: {close}")

    def __str__(self) -> str:
        return format_summary(self)


def _weight_stats(w: torch.Tensor | None) -> tuple[tuple[int, ...], float, float, float, float]:
    nan = math.nan
    if w is None or w.numel() == 0 or not w.is_floating_point():
        return (), nan, nan, nan, nan
    if w.is_meta:  # shapes only: no values to take statistics of
        return tuple(w.shape), nan, nan, nan, nan
    wd = w.detach().float()
    shape = tuple(wd.shape)
    wmin, wmax = float(wd.min()), float(wd.max())
    absmax = max(abs(wmin), abs(wmax))
    ratio = nan
    if wd.dim() >= 2:
        per_ch = wd.reshape(wd.shape[0], -1).abs().amax(dim=1)
        lo, hi = float(per_ch.min()), float(per_ch.max())
        ratio = math.inf if lo == 0.0 and hi > 0.0 else (1.0 if hi == 0.0 else hi / lo)
    return shape, wmin, wmax, absmax, ratio


def _as_args(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ConfigError(
        f"example_inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}."
    )


def _shapes(args: tuple, kwargs: dict) -> tuple[tuple[int, ...], ...]:
    vals = list(args) + list(kwargs.values())
    return tuple(tuple(v.shape) for v in vals if isinstance(v, torch.Tensor))


def inspect_model(model: torch.nn.Module, example_inputs: Any) -> ModelSummary:
    """Run ``model`` once on ``example_inputs`` under FlopCounterMode and summarise every leaf layer.

    The model runs in eval mode under ``torch.no_grad()`` (so BatchNorm statistics are not updated);
    the train/eval flag of every submodule is restored afterwards. The model is not otherwise changed.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor, a tuple/list of positional tensors, or a dict of keyword tensors,
            on the model's device, at the shape the FLOPs should be counted for (batch size included:
            FLOPs scale with it).

    A model built under ``with torch.device("meta"):`` with meta inputs is counted without allocating
    or computing anything (seconds for any size); its weight statistics are then ``nan``.

    Returns:
        :class:`ModelSummary`; ``str(summary)`` is a text table (:func:`format_summary`).
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"inspect_model needs a torch.nn.Module, got {type(model).__name__}.")
    args, kwargs = _as_args(example_inputs)
    modes = {m: m.training for m in model.modules()}
    counter = FlopCounterMode(display=False, depth=None)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(*args, **kwargs)
    finally:
        for m, training in modes.items():
            m.training = training
    counts = counter.get_flop_counts()
    # FlopCounterMode names modules "<RootClass>.<qualified name>" (torch.utils.module_tracker)
    root = type(model).__name__

    def flops_of(name: str) -> int:  # the module's own call, its children's included
        return int(sum(counts.get(f"{root}.{name}" if name else root, {}).values()))

    layers: list[LayerSummary] = []
    for name, mod in model.named_modules():
        children = [f"{name}.{c}" if name else c for c, _ in mod.named_children()]
        own = list(mod.parameters(recurse=False))
        # a row per leaf, and per module that holds weights of its own next to children (a conv subclass
        # with a padding child, EfficientNet's Conv2dStaticSamePadding): its FLOPs less its children's
        if children and not own:
            continue
        # a model that is itself one layer (nn.Linear) is its own only leaf, named "" and counted as root
        flops = flops_of(name) - sum(flops_of(c) for c in children)
        n_params = sum(p.numel() for p in own)
        if n_params == 0 and flops == 0:
            continue
        w, groups = getattr(mod, "weight", None), getattr(mod, "groups", 1)
        shape, wmin, wmax, absmax, ratio = _weight_stats(w if isinstance(w, torch.Tensor) else None)
        layers.append(
            LayerSummary(
                name=name,
                type=type(mod).__name__,
                params=n_params,
                flops=flops,
                macs=flops // 2,
                weight_shape=shape,
                weight_min=wmin,
                weight_max=wmax,
                weight_absmax=absmax,
                channel_range_ratio=ratio,
                bytes={k: bytes_at_bits(n_params, b) for k, b in SIZE_BITS.items()},
                groups=groups if isinstance(groups, int) else 1,
            )
        )
    total_params = sum(p.numel() for p in model.parameters())
    return ModelSummary(
        model=root,
        input_shapes=_shapes(args, kwargs),
        layers=tuple(layers),
        total_params=total_params,
        total_flops=int(counter.get_total_flops()),
        bytes={k: bytes_at_bits(total_params, b) for k, b in SIZE_BITS.items()},
    )


def _si(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _num(x: float) -> str:
    return "-" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.3g}")


def format_summary(summary: ModelSummary, max_rows: int | None = None) -> str:
    """A fixed-width text table: one row per layer (name, type, params, MACs, weight range, channel
    range ratio, int8 bytes) and a totals line. ``max_rows`` keeps the layers with the most MACs."""
    rows = list(summary.layers)
    hidden = 0
    if max_rows is not None and len(rows) > max_rows:
        keep = set(id(r) for r in sorted(rows, key=lambda r: -r.macs)[:max_rows])
        hidden = len(rows) - max_rows
        rows = [r for r in rows if id(r) in keep]
    header = ("layer", "type", "params", "MACs", "w min", "w max", "ch ratio", "int8")
    table = [header] + [
        (r.name, r.type, _si(r.params), _si(r.macs), _num(r.weight_min), _num(r.weight_max),
         _num(r.channel_range_ratio), _si(r.bytes["int8"], "B"))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {2, 3, 4, 5, 6, 7}

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [fmt(table[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in table[1:]]
    if hidden:
        lines.append(f"... {hidden} more layers with fewer MACs not shown")
    sizes = ", ".join(f"{k} {_si(v, 'B')}" for k, v in summary.bytes.items())
    lines.append(
        f"{summary.model} on {list(summary.input_shapes)}: {_si(summary.total_params)} params, "
        f"{_si(summary.total_macs, 'MACs')} ({_si(summary.total_flops, 'FLOPs')}); weights {sizes}"
    )
    return "\n".join(lines)
