"""Granularity: which block of a tensor one scale (and zero point) covers.

Per-tensor, per-channel and per-group are all "the block a scale covers" (torchao's ``block_size``):
``block_size(shape)`` gives the block extent along every dimension, and every reduction and broadcast in
lowbit goes through :func:`to_blocks`, one code path for all three.

Example, a Linear weight of shape (out=4, in=8):

=========================  ============  ===================
granularity                block_size    scale shape
=========================  ============  ===================
PerTensor()                (4, 8)        ()
PerChannel(axis=0)         (1, 8)        (4,)
PerGroup(4, axis=-1)       (1, 4)        (4, 2)
PerToken()                 (1, 8)        (4, 1)   (per row of activations)
=========================  ============  ===================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError, ShapeMismatchError


def _check_int(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be an integer, got {value!r} ({type(value).__name__}).")


def _norm_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ConfigError(
            f"{what}: axis {axis} does not exist for a tensor with {ndim} dimensions; "
            f"use an axis in [{-ndim}, {ndim - 1}] (0 is the output-channel axis of Conv/Linear weights)."
        )
    return axis % ndim


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor. Scale shape ``()``."""

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return ()

    def __str__(self) -> str:
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per index along ``axis`` (0 = output channels of a Conv/Linear weight). Scale shape ``(C,)``."""

    axis: int = 0

    def __post_init__(self) -> None:
        _check_int(self.axis, "PerChannel: axis")

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ax = _norm_axis(self.axis, len(shape), "PerChannel")
        return tuple(1 if d == ax else s for d, s in enumerate(shape))

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ax = _norm_axis(self.axis, len(shape), "PerChannel")
        return (shape[ax],)

    def __str__(self) -> str:
        return f"per-channel(axis={self.axis})"


@dataclass(frozen=True)
class PerGroup:
    """Groups of ``group_size`` consecutive elements along ``axis``, one scale per group and per index of
    every other dimension (so a Linear weight (out, in) with axis=-1 gets scales of shape (out, in/g)).
    Scale shape: ``shape`` with ``shape[axis]`` replaced by ``shape[axis] // group_size``."""

    group_size: int = 128
    axis: int = -1

    def __post_init__(self) -> None:
        _check_int(self.group_size, "PerGroup: group_size")
        _check_int(self.axis, "PerGroup: axis")
        if self.group_size < 1:
            raise ConfigError(f"PerGroup: group_size must be >= 1, got {self.group_size}.")

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ax = _norm_axis(self.axis, len(shape), "PerGroup")
        if shape[ax] % self.group_size:
            raise ConfigError(
                f"PerGroup: group_size {self.group_size} does not divide dimension {ax} of size {shape[ax]} "
                f"(tensor shape {tuple(shape)}); pick a group size that divides it, e.g. "
                f"{math.gcd(shape[ax], self.group_size)}, or exclude this layer."
            )
        return tuple(self.group_size if d == ax else 1 for d in range(len(shape)))

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        block = self.block_size(shape)
        return tuple(s // b for s, b in zip(shape, block))

    def __str__(self) -> str:
        return f"per-group(g={self.group_size}, axis={self.axis})"


@dataclass(frozen=True)
class PerToken:
    """One scale per row of the last dimension (per token of a (batch, seq, hidden) activation).
    Scale shape: ``shape[:-1] + (1,)``. Used by dynamic activation quantization; the scale is
    recomputed for every batch, so it never needs a fixed shape."""

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(1 for _ in shape[:-1]) + (shape[-1],)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[:-1]) + (1,)

    def __str__(self) -> str:
        return "per-token"


Granularity = PerTensor | PerChannel | PerGroup | PerToken


def to_blocks(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """View ``x`` (shape ``(s0, s1, ...)``) as ``(n0, b0, n1, b1, ...)`` where ``b_i`` is the block extent
    along dim i and ``n_i = s_i // b_i``. Reducing over the odd dimensions gives one value per block."""
    shape = tuple(x.shape)
    block = granularity.block_size(shape)
    inter: list[int] = []
    for s, b in zip(shape, block):
        inter += [s // b, b]
    return x.reshape(inter)


def block_dims(ndim: int) -> tuple[int, ...]:
    """The dimensions of a :func:`to_blocks` view that lie inside a block: (1, 3, 5, ...)."""
    return tuple(range(1, 2 * ndim, 2))


def reduce_blocks(x: torch.Tensor, granularity: Granularity, op: str) -> torch.Tensor:
    """Reduce ``x`` over each block with ``op`` in {"amin", "amax", "sum", "absmax"}.
    Returns a tensor of shape ``granularity.scale_shape(x.shape)``."""
    if x.dim() == 0:
        x = x.reshape(1)
    v = to_blocks(x, granularity)
    dims = block_dims(x.dim())
    if op == "amin":
        r = v.amin(dim=dims)
    elif op == "amax":
        r = v.amax(dim=dims)
    elif op == "absmax":
        r = v.abs().amax(dim=dims)
    elif op == "sum":
        r = v.sum(dim=dims)
    else:
        raise ValueError(f"reduce_blocks: unknown op {op!r}; use 'amin', 'amax', 'absmax' or 'sum'.")
    return r.reshape(granularity.scale_shape(tuple(x.shape)))


def broadcast_param(p: torch.Tensor, x_shape: tuple[int, ...], granularity: Granularity) -> torch.Tensor:
    """Expand a per-block parameter ``p`` (shape ``scale_shape(x_shape)``) to broadcast against the
    :func:`to_blocks` view of a tensor of shape ``x_shape``: result shape ``(n0, 1, n1, 1, ...)``.
    ``p`` may also be those values flattened (0-d or 1-d); a multi-dimensional ``p`` of another shape with the
    same number of elements (a transposed group grid) raises :class:`ShapeMismatchError`."""
    x_shape = tuple(x_shape) or (1,)
    block = granularity.block_size(x_shape)
    n = [s // b for s, b in zip(x_shape, block)]
    expected = math.prod(n)
    if p.numel() != expected:
        raise ShapeMismatchError(
            f"quantization parameter has {p.numel()} elements but {granularity} on a tensor of shape "
            f"{x_shape} needs {expected}; was the quantizer calibrated on a tensor of another shape?"
        )
    if p.dim() > 1 and tuple(p.shape) != tuple(n):
        raise ShapeMismatchError(
            f"quantization parameter has shape {tuple(p.shape)} but {granularity} on a tensor of shape {x_shape} "
            f"needs {tuple(n)} (or those {expected} values flattened); was it computed for a tensor of another "
            "shape, e.g. the transposed weight?"
        )
    inter: list[int] = []
    for k in n:
        inter += [k, 1]
    return p.reshape(inter)


def parse_granularity(text: str) -> Granularity:
    """Parse "tensor", "channel", "channel:1", "group:128", "group:32:-1", "token"."""
    parts = text.strip().lower().split(":")
    kind = parts[0].replace("per-", "").replace("per_", "")
    try:
        if kind == "tensor":
            return PerTensor()
        if kind == "channel":
            return PerChannel(int(parts[1]) if len(parts) > 1 else 0)
        if kind == "group":
            return PerGroup(int(parts[1]), int(parts[2]) if len(parts) > 2 else -1)
        if kind == "token":
            return PerToken()
    except (IndexError, ValueError) as e:
        raise ConfigError(f"cannot parse granularity {text!r}: {e}") from None
    raise ConfigError(
        f"unknown granularity {text!r}; use 'tensor', 'channel[:axis]', 'group:SIZE[:axis]' or 'token'."
    )
