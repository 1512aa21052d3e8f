"""Identical quantizer state on every rank of a ``torch.distributed`` group.

Two situations, one rule (every rank ends with the statistics of all ranks' data together):

* calibration on shards: each rank runs :func:`lowbit.quantize` / :func:`lowbit.calibrate` on its
  own shard, then :func:`all_reduce_quantizers` merges every activation observer (min/max all-reduced,
  histograms summed, :func:`~lowbit.distributed.stats.all_reduce_observer`) and recomputes the qparams:
  the result equals single-process calibration on the concatenated data;
* QAT under DDP: :func:`sync_observers` makes every activation observer reduce each *batch's* statistics
  across ranks before it updates (one ``all_reduce`` per quantizer and step for min/max and moving
  averages), so the scales equal those of a single process that sees the concatenated global batch.

Weights are identical on every rank (DDP), so weight quantizers need no communication. Learnable (LSQ)
scales are ``nn.Parameter``: DDP averages their gradients like any other parameter.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..calibration import MinMaxObserver, MovingAverageMinMaxObserver, Observer, make_observer
from ..errors import DistributedError, NonFiniteError
from ..granularity import reduce_blocks
from ..nn.layers import QuantLayerMixin
from ..nn.quantizer import TensorQuantizer, quantizers
from .stats import all_reduce_observer

__all__ = [
    "SyncedObserver",
    "activation_quantizers",
    "all_reduce_quantizers",
    "sync_observers",
    "quantizer_state",
    "assert_quantizers_match",
    "is_distributed",
]


def is_distributed(group=None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _require(group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "no torch.distributed process group is initialised; call torch.distributed.init_process_group(...) "
            "(torchrun sets the environment for it) before synchronising quantizers."
        )


def _device(group) -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None


def activation_quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """Every static (calibrated) quantizer of ``model`` that is not a layer's weight quantizer, in
    module order (the same order on every rank)."""
    weights = {id(m.weight_quantizer) for m in model.modules()
               if isinstance(m, QuantLayerMixin) and m.weight_quantizer is not None}
    for name, q in quantizers(model):
        if q.needs_calibration and id(q) not in weights:
            yield name, q


class SyncedObserver:
    """Wraps an observer so that every :meth:`update` first reduces the batch's statistics across the
    ranks of ``group`` (a collective: every rank must call it, in the same order). ``MinMax`` and
    ``MovingAverageMinMax`` observers exchange one tensor ``[nonfinite, nonempty, -min, max]`` (``all_reduce``
    MAX);
    other observers reduce a one-batch observer with :func:`all_reduce_observer` and merge it in.
    Everything else is read from the wrapped observer (``inner``)."""

    def __init__(self, inner: Observer, group=None) -> None:
        self.inner = inner
        self.group = group

    def __getattr__(self, name: str):
        if name in ("inner", "group"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def num_batches(self) -> int:
        return self.inner.num_batches

    @num_batches.setter
    def num_batches(self, value: int) -> None:
        self.inner.num_batches = value

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.compute_range()

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if type(self.inner) in (MinMaxObserver, MovingAverageMinMaxObserver):
            self._update_minmax(x)
        else:
            self._update_generic(x)

    def _update_minmax(self, x: torch.Tensor) -> None:
        """One ``all_reduce`` (MAX) of ``[non-finite flag, non-empty flag, -min, max]`` and one host read of
        the two flags after it (to raise on NaN/Inf on any rank, or to skip a step where every rank's batch
        was empty), whatever the number of elements."""
        inner = self.inner
        g = inner.spec.granularity
        shape = tuple(inner.min_val.shape) if inner.min_val is not None else tuple(g.scale_shape(tuple(x.shape)))
        if x.numel() == 0:
            flags = torch.zeros(2, dtype=torch.float32, device=x.device)
            mn = torch.full(shape, float("inf"), device=x.device)
            mx = torch.full(shape, float("-inf"), device=x.device)
        else:
            # no host read before the collective: every rank must take part in it, then all raise together
            flags = torch.stack([(~torch.isfinite(x).all()).float(), torch.ones((), device=x.device)])
            mn = torch.nan_to_num(reduce_blocks(x, g, "amin"), nan=0.0, posinf=0.0, neginf=0.0)
            mx = torch.nan_to_num(reduce_blocks(x, g, "amax"), nan=0.0, posinf=0.0, neginf=0.0)
        buf = torch.cat([flags, (-mn).reshape(-1), mx.reshape(-1)])
        home, dev = buf.device, _device(self.group)
        if dev is not None:
            buf = buf.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        buf = buf.to(home)
        bad, nonempty = buf[:2].tolist()  # the one host read
        if bad > 0:
            raise NonFiniteError(f"{inner.name}: a batch on some rank contains NaN or Inf; quantization ranges "
                                 "need finite data (check the inputs or the loss scale).")
        if not nonempty:
            return  # every rank's batch was empty
        k = mn.numel()
        gmn, gmx = (-buf[2:2 + k]).reshape(shape), buf[2 + k:].reshape(shape)
        if inner.min_val is None:
            inner.min_val, inner.max_val = gmn, gmx
        elif isinstance(inner, MovingAverageMinMaxObserver):  # same increment form as its _update
            inner.min_val = inner.min_val + inner.c * (gmn - inner.min_val)
            inner.max_val = inner.max_val + inner.c * (gmx - inner.max_val)
        else:
            inner.min_val = torch.minimum(inner.min_val, gmn)
            inner.max_val = torch.maximum(inner.max_val, gmx)
        inner.num_batches += 1

    def _update_generic(self, x: torch.Tensor) -> None:
        batch = make_observer(self.inner.spec, self.inner.name)
        batch.update(x)
        all_reduce_observer(batch, self.group)
        batch.num_batches = 1 if batch.num_batches else 0
        self.inner.merge(batch)

    def __repr__(self) -> str:
        return f"Synced{self.inner!r}"


def sync_observers(model: nn.Module, group=None) -> int:
    """Wrap every activation observer of ``model`` in a :class:`SyncedObserver` (idempotent). Returns
    how many were wrapped. Call on every rank, before wrapping the model in DDP."""
    _require(group)
    n = 0
    for _, q in activation_quantizers(model):
        if not isinstance(q.observer, SyncedObserver):
            q.observer = SyncedObserver(q.observer, group)
            n += 1
    return n


@torch.no_grad()
def all_reduce_quantizers(model: nn.Module, group=None) -> int:
    """Merge every activation observer of ``model`` across the ranks of ``group`` and recompute its
    scale and zero point from the merged statistics. Call on every rank after calibrating on the rank's
    shard (``lowbit.quantize(model, recipe, shard)``); the qparams then equal those of a single process
    calibrated on all shards (exactly, for min/max and histogram statistics). Returns the count.

    Raises:
        DistributedError: no process group, or ranks hold different models.
    """
    _require(group)
    n = 0
    for _, q in activation_quantizers(model):
        obs = q.observer.inner if isinstance(q.observer, SyncedObserver) else q.observer
        all_reduce_observer(obs, group)
        if obs.num_batches:
            q.compute_qparams()
            n += 1
    return n


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer's ``scale``, ``zero_point`` (and LSQ+ offset) as CPU float64 tensors, by
    ``"<quantizer name>.scale"`` etc. (for comparing ranks or runs)."""
    out: dict[str, torch.Tensor] = {}
    for name, q in quantizers(model):
        out[f"{name}.scale"] = q.scale.detach().double().cpu().clone()
        out[f"{name}.zero_point"] = q.zero_point.detach().double().cpu().clone()
        if q.lsq_offset is not None:
            out[f"{name}.offset"] = q.lsq_offset.detach().double().cpu().clone()
    return out


def assert_quantizers_match(model: nn.Module, group=None) -> None:
    """Raise :class:`DistributedError` naming the first quantizer whose state differs between ranks
    (bitwise). Collective."""
    _require(group)
    mine = quantizer_state(model)
    world = dist.get_world_size(group)
    states: list = [None] * world
    dist.all_gather_object(states, mine, group=group)
    ref = states[0]
    for rank, st in enumerate(states[1:], start=1):
        if st.keys() != ref.keys():
            raise DistributedError(f"rank {rank} holds other quantizers than rank 0: "
                                   f"{sorted(set(st) ^ set(ref))[:5]}; every rank must prepare the same model.")
        for k, v in st.items():
            if v.shape != ref[k].shape or not torch.equal(v, ref[k]):
                raise DistributedError(
                    f"quantizer state {k} differs between rank 0 and rank {rank}; calibrate with "
                    "lowbit.distributed.all_reduce_quantizers(model) after each rank's calibration, and keep "
                    "observers synchronised (lowbit.prepare_qat(..., sync=True))."
                )
