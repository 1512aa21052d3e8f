"""The QAT configuration that :func:`lowbit.prepare_qat` attaches to the model it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

Learnable = Literal["ste", "lsq", "lsq+"]
LEARNABLE: tuple[str, ...] = ("ste", "lsq", "lsq+")

CONFIG_ATTR = "lowbit_qat"
STEP_BUFFER = "lowbit_qat_step"


@dataclass(frozen=True)
class QATConfig:
    """How a model is trained with fake quantization.

    Args:
        learnable: ``"ste"``: scales follow the data (weights: min/max of the current weight at every
            step; activations: moving average of the batch min/max), gradients pass the rounding
            straight through (clipped STE); ``"lsq"``: scales are ``nn.Parameter`` trained with the LSQ
            gradient (Esser et al. 2020), zero points fixed; ``"lsq+"``: LSQ plus a learnable offset for
            affine activations (Bhalgat et al. 2020).
        freeze_bn_after: training steps (training-mode forwards of the root module) after which the
            BatchNorm statistics of every Conv-BN unit are frozen: from then on the BatchNorm is folded
            with its running statistics, exactly as after :func:`lowbit.convert`. None: never (call
            :func:`lowbit.qat.freeze_bn` yourself, e.g. at an epoch boundary).
        freeze_observers_after: training steps after which observers stop updating the scales and zero
            points (STE only; with LSQ no observer runs). None: never.
        observer_momentum: the constant ``c`` of the activation moving average
            ``m <- m + c (batch_min - m)`` during STE training (torch.ao's default 0.01).
        sync: all-reduce every activation observer's batch statistics across ``torch.distributed`` ranks
            (so every rank keeps identical scales under DDP). None: on when a process group with more
            than one rank is initialised when :func:`lowbit.prepare_qat` runs.
    """

    learnable: Learnable = "ste"
    freeze_bn_after: int | None = None
    freeze_observers_after: int | None = None
    observer_momentum: float = 0.01
    sync: bool | None = None

    def __post_init__(self) -> None:
        if self.learnable not in LEARNABLE:
            raise ConfigError(f"learnable must be one of {LEARNABLE}, got {self.learnable!r}.")
        for name in ("freeze_bn_after", "freeze_observers_after"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(
                    f"{name} must be None or a number of training steps >= 0, got {v!r}; to freeze after "
                    f"epoch E pass E * len(train_loader)."
                )
        if self.freeze_observers_after is not None and self.learnable != "ste":
            raise ConfigError(
                f"freeze_observers_after has no effect with learnable={self.learnable!r}: LSQ learns the scales "
                "and runs no observer. Drop freeze_observers_after, or use learnable='ste'."
            )
        m = self.observer_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < m <= 1.0:
            raise ConfigError(f"observer_momentum must be in (0, 1], got {m!r}; 0.01 is usual.")
