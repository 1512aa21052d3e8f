"""Calibration data: any iterable of tensors, tuples/lists (positional arguments) or dicts (keyword
arguments), streamed one batch at a time with a tqdm bar, checked for emptiness and NaN/Inf."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, EmptyCalibrationError, NonFiniteError

__all__ = ["as_call", "iter_calls", "positional_arity"]


def positional_arity(model: nn.Module) -> int | None:
    """How many positional arguments ``model.forward`` takes (None: any number, ``*args``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    n = 0
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


def as_call(batch: Any, arity: int | None, index: int = 0) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for one batch. A tensor is one positional argument; a tuple/list is spread
    as positional arguments, cut to the ``arity`` of ``forward`` (so ``(images, labels)`` batches
    from a DataLoader feed only the images); a dict (e.g. a tokenizer's output) becomes keyword
    arguments."""
    if torch.is_tensor(batch):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, tuple | list):
        args = tuple(batch)
        if arity is not None and len(args) > arity:
            args = args[:arity]
        return args, {}
    raise ConfigError(
        f"calibration batch {index} is a {type(batch).__name__}; yield tensors, tuples/lists of tensors "
        "(positional arguments) or dicts (keyword arguments)."
    )


def _check(value: Any, index: int, where: str) -> None:
    if torch.is_tensor(value):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            n_nan = int(torch.isnan(value).sum())
            n_inf = int(torch.isinf(value).sum())
            raise NonFiniteError(
                f"calibration batch {index} ({where}) contains {n_nan} NaN and {n_inf} Inf values; "
                "ranges need finite data. Fix the preprocessing or drop that batch."
            )
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check(v, index, f"{where}[{k!r}]")
    elif isinstance(value, tuple | list):
        for i, v in enumerate(value):
            _check(v, index, f"{where}[{i}]")


def iter_calls(
    data: Iterable,
    model: nn.Module,
    num_batches: int | None = None,
    progress: bool = True,
    desc: str = "calibrating",
) -> Iterator[tuple[tuple, dict]]:
    """Yield ``(args, kwargs)`` for ``model`` from ``data``, at most ``num_batches``.

    Raises:
        EmptyCalibrationError: ``data`` yields nothing (or ``num_batches`` is 0).
        NonFiniteError: a batch holds NaN/Inf (the message names the batch index).
        ConfigError: ``data`` is not iterable or ``num_batches`` is negative.
    """
    if data is None:
        raise EmptyCalibrationError(
            "this recipe has static activation quantizers, so it needs calibration data: pass calib_data= "
            "(a DataLoader or any iterable of input batches), or use a dynamic / weight-only recipe."
        )
    if torch.is_tensor(data):
        data = [data]
    if num_batches is not None and num_batches < 0:
        raise ConfigError(f"num_batches must be >= 0, got {num_batches}.")
    try:
        it = iter(data)
    except TypeError:
        raise ConfigError(f"calib_data must be iterable (a DataLoader, list, generator ...), got {type(data).__name__}.") from None
    if num_batches is not None:
        it = itertools.islice(it, num_batches)
    total = num_batches
    if total is None and hasattr(data, "__len__"):
        try:
            total = len(data)
        except TypeError:
            total = None
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=total, desc=desc, unit="batch", leave=False)
    arity = positional_arity(model)
    n = 0
    for i, batch in enumerate(it):
        args, kwargs = as_call(batch, arity, i)
        _check(args, i, "args")
        _check(kwargs, i, "kwargs")
        n += 1
        yield args, kwargs
    if n == 0:
        raise EmptyCalibrationError(
            "the calibration data yielded no batches"
            + (" (num_batches=0)" if num_batches == 0 else "")
            + "; pass a non-empty iterable of input batches (is the DataLoader's dataset empty?)."
        )
