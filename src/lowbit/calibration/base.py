"""The observer protocol: streaming statistics of one tensor, turned into a range on demand.

Statistics are kept apart from the range choice (AIMET's encoding analyzers): an observer ``update``s
with one batch at a time and never keeps the batch (memory is independent of the number of batches),
``merge``s with another observer of the same kind (batches seen elsewhere, another rank), and
``compute_range`` applies its calibrator to what it has seen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError, EmptyCalibrationError, ShapeMismatchError, check_finite
from ..granularity import reduce_blocks

if TYPE_CHECKING:
    from ..spec import QuantSpec


class Observer:
    """Base class. Subclasses implement :meth:`_update`, :meth:`_merge`, :meth:`_range` and
    :meth:`_state_tensors` (the tensors summed/min/max-ed across ranks by :meth:`all_reduce`).

    Args:
        spec: gives the format (qmin/qmax), symmetric, granularity and calibrator.
        name: the tensor's name, used in error messages.
    """

    def __init__(self, spec: QuantSpec, name: str = "tensor") -> None:
        self.spec = spec
        self.name = name
        self.num_batches = 0

    def update(self, x: torch.Tensor) -> None:
        """Add one batch (any shape the granularity accepts). Raises NonFiniteError on NaN/Inf."""
        x = x.detach()
        check_finite(x, f"{self.name} (batch {self.num_batches})")
        if x.numel() == 0:
            return
        self._update(x.float())
        self.num_batches += 1

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(min_val, max_val)`` in the granularity's scale shape. Raises EmptyCalibrationError."""
        if self.num_batches == 0:
            raise EmptyCalibrationError(
                f"{self.name}: no data was observed, so no range can be computed; pass calibration data "
                "that reaches this tensor (check num_batches and that the data is not empty)."
            )
        return self._range()

    def merge(self, other: Observer) -> None:
        """Fold in the statistics of another observer of the same kind (e.g. other batches).
        Raises ConfigError for another kind, ShapeMismatchError for statistics of another shape."""
        if type(other) is not type(self):
            raise ConfigError(
                f"{self.name}: cannot merge a {type(other).__name__} into a {type(self).__name__}; only observers "
                "made from the same spec (same calibrator) can be merged."
            )
        if other.num_batches == 0:
            return
        if self.num_batches == 0:
            self._copy_from(other)
        else:
            self._merge(other)
        self.num_batches += other.num_batches

    def all_reduce(self, group=None) -> None:
        """Merge the statistics of every rank of ``group`` in place (torch.distributed), so every rank
        ends with the statistics of the union of all shards."""
        from ..distributed.stats import all_reduce_observer

        all_reduce_observer(self, group)

    # subclass hooks -------------------------------------------------------------------------------
    def _update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _merge(self, other: Observer) -> None:
        raise NotImplementedError

    def _copy_from(self, other: Observer) -> None:
        self.__dict__.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in other.__dict__.items()
                              if k not in ("spec", "name", "num_batches")})

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec}, batches={self.num_batches})"


class MinMaxObserver(Observer):
    """Running elementwise minimum and maximum per block: ``min_val = min over batches of min(X)``."""

    def __init__(self, spec: QuantSpec, name: str = "tensor") -> None:
        super().__init__(spec, name)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        mn = reduce_blocks(x, self.spec.granularity, "amin")
        mx = reduce_blocks(x, self.spec.granularity, "amax")
        if self.min_val is None:
            self.min_val, self.max_val = mn, mx
        else:
            self._check_shape(tuple(mn.shape), f"a batch of shape {tuple(x.shape)}")
            self._combine(mn, mx)

    def _check_shape(self, shape: tuple[int, ...], what: str) -> None:
        """ShapeMismatchError unless ``shape`` is the scale shape of the batches seen so far."""
        if shape != tuple(self.min_val.shape):
            raise ShapeMismatchError(
                f"{self.name}: {what} gives scales of shape {shape}, but earlier batches gave "
                f"{tuple(self.min_val.shape)}; per-channel observers need the same channel count every batch."
            )

    def _combine(self, mn: torch.Tensor, mx: torch.Tensor) -> None:
        """Fold one batch's per-block min/max into the running state (first batch excluded)."""
        self.min_val = torch.minimum(self.min_val, mn)
        self.max_val = torch.maximum(self.max_val, mx)

    def _merge(self, other: MinMaxObserver) -> None:
        self._check_shape(tuple(other.min_val.shape), "the merged observer")
        self.min_val = torch.minimum(self.min_val, other.min_val)
        self.max_val = torch.maximum(self.max_val, other.max_val)

    def _state_tensors(self) -> list[tuple[str, str]]:
        return [("min_val", "min"), ("max_val", "max")]

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val.clone(), self.max_val.clone()
