"""All-reduce of calibration statistics across the ranks of a ``torch.distributed`` group.

Every observer lists its state as ``(attribute, op)`` pairs in ``_state_tensors()``, reduced in order:

* ``"sum"`` / ``"min"`` / ``"max"``: elementwise, so histograms and min/max become those of the union
  of the ranks' data (a histogram first reduces its ``"max"`` exponent and coarsens to it, so the counts
  it then sums are on the same bins: exact);
* ``"mean"``: the average weighted by each rank's batch count (moving averages);
* ``"same"``: the ranks must hold the same tensor (weights); checked, not changed.

Ranks that saw no data take part with neutral values (0 for sums, +-inf for min/max).
An observer may read/write its state through ``_get_state`` / ``_set_state`` and create an empty state
of the right shape through ``_empty_state(meta)`` with ``meta`` from a rank that has data (``_meta()``).
"""

from __future__ import annotations

import torch

from ..errors import DistributedError

__all__ = ["all_reduce_observer"]


def _neutral(op: str, shape, dtype) -> torch.Tensor:
    if op in ("sum", "mean"):
        return torch.zeros(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.full(shape, float("inf") if op == "min" else float("-inf"), dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.full(shape, info.max if op == "min" else info.min, dtype=dtype)


def _get(observer, attr: str) -> torch.Tensor:
    getter = getattr(observer, "_get_state", None)
    return getter(attr) if getter is not None else getattr(observer, attr)


def _set(observer, attr: str, value: torch.Tensor) -> None:
    setter = getattr(observer, "_set_state", None)
    if setter is not None:
        setter(attr, value)
    else:
        setattr(observer, attr, value)


def all_reduce_observer(observer, group=None) -> None:
    """Replace ``observer``'s statistics, on every rank of ``group``, by those of all ranks together.

    Collective: every rank of the group must call it, in the same order for the same tensors. Works
    with the gloo (CPU) and nccl backends; tensors travel on the device ``torch.distributed`` expects.

    Raises:
        DistributedError: no initialised process group, ranks hold different observer kinds or shapes,
            or a ``"same"`` tensor (ADMM weights) differs between ranks.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "all_reduce needs an initialised torch.distributed process group; call "
            "torch.distributed.init_process_group(...) first, or use merge() within one process."
        )
    plan = observer._state_tensors()
    local = observer.num_batches > 0
    meta = {
        "kind": type(observer).__name__,
        "num_batches": observer.num_batches,
        "state": {a: (tuple(_get(observer, a).shape), _get(observer, a).dtype) for a, _ in plan} if local else None,
        "extra": observer._meta() if local and hasattr(observer, "_meta") else None,
    }
    world = dist.get_world_size(group)
    metas: list = [None] * world
    dist.all_gather_object(metas, meta, group=group)
    kinds = {m["kind"] for m in metas}
    if len(kinds) > 1:
        raise DistributedError(f"ranks hold different observer kinds {sorted(kinds)}; every rank must "
                               "calibrate the same model with the same spec.")
    with_data = [m for m in metas if m["state"] is not None]
    if not with_data:
        return
    ref = with_data[0]
    if any(m["state"] != ref["state"] or m["extra"] != ref["extra"] for m in with_data):
        raise DistributedError(
            f"{observer.name}: ranks observed tensors whose statistics have different shapes "
            f"({[m['state'] for m in with_data]}); per-channel observers need the same channel count on every rank."
        )
    total = sum(m["num_batches"] for m in metas)
    if not local and hasattr(observer, "_empty_state"):
        observer._empty_state(ref["extra"])
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None

    for attr, op in plan:
        shape, dtype = ref["state"][attr]
        t = _get(observer, attr).clone() if local else _neutral(op, shape, dtype)
        if op == "mean":
            t = t.double() * observer.num_batches if local else t.double()
        home = t.device
        if backend_device is not None:
            t = t.to(backend_device)
        if op == "same":
            lo, hi = t.clone(), t.clone()
            if not local:
                lo, hi = _neutral("min", shape, dtype), _neutral("max", shape, dtype)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
            if not torch.equal(lo, hi):
                raise DistributedError(f"{observer.name}: ranks hold different values for {attr!r}; weights must "
                                       "be identical on every rank (broadcast them from rank 0 first).")
            t = hi
        else:
            red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                   "max": dist.ReduceOp.MAX}[op]
            dist.all_reduce(t, op=red, group=group)
        t = t.to(home)
        if op == "mean":
            t = (t / total).to(dtype)
        _set(observer, attr, t)
    observer.num_batches = total
