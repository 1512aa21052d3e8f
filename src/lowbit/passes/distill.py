"""Distilled calibration data from the BatchNorm statistics of the float model (ZeroQ, Cai et al. 2020).

"ZeroQ: A Novel Zero Shot Quantization Framework" generates synthetic inputs from the float model alone:
start from random normal inputs and optimize them (the weights stay fixed) so that the batch statistics
of every BatchNorm layer's input match the statistics the layer stored during training::

    L(x) = sum_l ||mu_l(x) - running_mean_l||_2 + ||sigma_l(x) - sqrt(running_var_l + eps_l)||_2

with ``mu_l``, ``sigma_l`` the per-channel mean and standard deviation of BatchNorm ``l``'s input over
the batch and spatial positions. The result is a "distilled" batch that no real image went into; the
activation ranges are then calibrated on it exactly as on real data. Unlike the Gaussian BatchNorm
model of :mod:`~lowbit.passes.bn_ranges`, the ranges come from the real network's own nonlinear
propagation (heavy tails, ReLU6 saturation, residual sums), which is what makes them accurate.

When the model input's range is known (``input_range``), the inputs are projected back into it after
every step (projected gradient descent), so the input quantizer never sees values a real input cannot take.

:func:`lowbit.quantize` runs this with ``dfq=DFQ(act_range="distilled", distill=DistillConfig(...))`` and
``calib_data=None``, on the copy of the float model before BatchNorm folding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, NoBatchNormError
from ._graph import BN_TYPES

log = logging.getLogger(__name__)

__all__ = ["DistillConfig", "DistillResult", "bn_statistics_loss", "distill_inputs"]


@dataclass(frozen=True)
class DistillConfig:
    """How :func:`distill_inputs` generates synthetic calibration inputs (ZeroQ).

    Args:
        num_samples: synthetic inputs to generate (ZeroQ uses a batch of 32).
        batch_size: inputs optimized together; the BatchNorm statistics are matched per batch, so a
            batch must be large enough for its statistics to mean something (>= 8 is sensible).
        iters: Adam steps per batch.
        lr: Adam learning rate on the inputs (inputs start at ``N(0, 1)``).
        seed: seed of the initial random inputs (a CPU generator, so the inputs are the same on any device).
        label_weight: weight of an added cross-entropy loss between the model's output and a random target
            class per input (GDFQ, Xu et al. 2020; DeepInversion, Yin et al. 2020); 0 is plain ZeroQ. For
            classifiers (output ``(N, classes)``): it makes the synthetic inputs as confidently
            classified as real ones, so the logits' range is not underestimated.

    >>> DistillConfig(num_samples=16, iters=100).batch_size
    32
    """

    num_samples: int = 32
    batch_size: int = 32
    iters: int = 200
    lr: float = 0.2
    seed: int = 0
    label_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"DistillConfig.{name} must be a positive integer, got {v!r}.")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ConfigError(f"DistillConfig.lr must be > 0 (Adam's step size on the inputs, e.g. 0.2), got {self.lr!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"DistillConfig.seed must be an integer, got {self.seed!r}.")
        if not (isinstance(self.label_weight, int | float) and self.label_weight >= 0):
            raise ConfigError(f"DistillConfig.label_weight must be >= 0 (0: BatchNorm statistics only), got {self.label_weight!r}.")


@dataclass(frozen=True)
class DistillResult:
    """What :func:`distill_inputs` made: ``inputs`` (``(num_samples, *input_shape)``, on the model's
    device, no grad), the BatchNorm-statistics loss per batch at the start and the end (mean over
    batches), the number of BatchNorm layers matched and the wall time in seconds."""

    inputs: torch.Tensor
    initial_loss: float
    final_loss: float
    num_bn: int
    seconds: float


class _BNStatsHook:
    """Forward pre-hooks that add each BatchNorm input's statistics loss to a running sum."""

    def __init__(self, model: nn.Module) -> None:
        self.bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.running_mean is not None]
        self.loss: torch.Tensor | None = None
        self.handles = [bn.register_forward_pre_hook(self._hook) for bn in self.bns]

    def _hook(self, bn: nn.Module, args: tuple) -> None:
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dims)
        std = (x.var(dims, unbiased=False) + bn.eps).sqrt()
        target_std = (bn.running_var + bn.eps).sqrt()
        term = torch.linalg.vector_norm(mean - bn.running_mean) + torch.linalg.vector_norm(std - target_std)
        self.loss = term if self.loss is None else self.loss + term

    def take(self) -> torch.Tensor:
        loss, self.loss = self.loss, None
        if loss is None:
            raise NoBatchNormError("no BatchNorm layer ran in the forward pass, so there are no statistics to match.")
        return loss

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _no_bn_error(model: nn.Module) -> NoBatchNormError:
    return NoBatchNormError(
        f"{type(model).__name__} has no BatchNorm layer with running statistics, so no calibration data can be "
        "distilled from it (ZeroQ matches the BatchNorm statistics). Pass calib_data= (a few real input "
        "batches), or DFQ(act_range='std' | 'mse') for ranges from the BatchNorm statistics (which also need them)."
    )


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ZeroQ's loss of input batch ``x``: over every BatchNorm layer (with running statistics) of
    ``model``, ``||mu - running_mean||_2 + ||sigma - sqrt(running_var + eps)||_2`` of its input's
    per-channel mean and standard deviation over all dims but dim 1 (a scalar tensor, differentiable in ``x``).
    ``model`` should be in eval mode (in train mode its BatchNorm layers update their running statistics).

    >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    >>> float(bn_statistics_loss(m, torch.randn(8, 3, 4, 4)).detach()) > 0
    True
    """
    hook = _BNStatsHook(model)
    try:
        if not hook.bns:
            raise _no_bn_error(model)
        model(x)
        return hook.take()
    finally:
        hook.remove()


def distill_inputs(model: nn.Module, example: torch.Tensor, config: DistillConfig | None = None, *,
                   input_range: tuple[float, float] | None = None, progress: bool = True) -> DistillResult:
    """Generate ``config.num_samples`` synthetic inputs whose BatchNorm statistics in ``model`` match the
    stored running statistics (ZeroQ; module doc). The model's parameters and buffers are not changed
    (only the inputs get gradients); it runs in eval mode and its training flag is restored.

    Args:
        model: float model with its BatchNorm layers (not folded), on any device; the inputs are made
            on the device and in the dtype of its first parameter.
        example: one input tensor; only its shape without the batch dim is used (e.g. ``(1, 3, 224, 224)``).
        config: :class:`DistillConfig` (defaults when None).
        input_range: ``(lo, hi)``: inputs are clamped into it after every step (and at the start).
        progress: a tqdm bar over the steps.

    Returns:
        :class:`DistillResult` with the inputs, ``(num_samples, *example.shape[1:])``.

    Raises:
        NoBatchNormError: ``model`` has no BatchNorm layer with running statistics.

    >>> _ = torch.manual_seed(0); m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> r = distill_inputs(m, torch.zeros(1, 3, 8, 8), DistillConfig(num_samples=8, iters=50), progress=False)
    >>> tuple(r.inputs.shape), r.final_loss < r.initial_loss
    ((8, 3, 8, 8), True)
    """
    from tqdm.auto import tqdm

    config = config or DistillConfig()
    if not torch.is_tensor(example):
        raise ConfigError(f"distillation needs one example input tensor (for the input shape), got {type(example).__name__}.")
    p = next(iter(model.parameters()), None)
    device, dtype = (p.device, p.dtype) if p is not None else (example.device, example.dtype)
    hook = _BNStatsHook(model)
    if not hook.bns:
        hook.remove()
        raise _no_bn_error(model)
    was_training = model.training
    model.eval()
    t0 = time.time()
    gen = torch.Generator().manual_seed(config.seed)
    shape = tuple(example.shape[1:])
    n, bs = config.num_samples, min(config.batch_size, config.num_samples)
    lo, hi = (float(input_range[0]), float(input_range[1])) if input_range is not None else (None, None)
    made, first, last = [], [], []
    bar = tqdm(total=config.iters * ((n + bs - 1) // bs), desc="distilling calibration data", disable=not progress,
               leave=False)
    try:
        for start in range(0, n, bs):
            x = torch.randn((min(bs, n - start), *shape), generator=gen).to(device=device, dtype=dtype)
            if input_range is not None:
                x.clamp_(lo, hi)
            x.requires_grad_(True)
            target = None
            if config.label_weight:
                with torch.no_grad():
                    out0 = model(x)
                    hook.take()
                if not torch.is_tensor(out0) or out0.dim() != 2:
                    raise ConfigError(
                        "DistillConfig.label_weight > 0 needs a classifier whose output is (N, classes) logits; this "
                        f"model returns {type(out0).__name__}{tuple(getattr(out0, 'shape', ()))}. Use label_weight=0.")
                target = torch.randint(out0.shape[1], (len(x),), generator=gen).to(device)
            opt = torch.optim.Adam([x], lr=config.lr)
            # ZeroQ decays the step when the loss plateaus; a cosine schedule gets there with no tuning
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.iters)
            for i in range(config.iters):
                out = model(x)
                loss = hook.take()
                total = loss if target is None else loss + config.label_weight * F.cross_entropy(out, target)
                (grad,) = torch.autograd.grad(total, x)
                if i == 0:
                    first.append(float(loss.detach()))
                opt.zero_grad(set_to_none=True)
                x.grad = grad
                opt.step()
                sched.step()
                if input_range is not None:
                    with torch.no_grad():
                        x.clamp_(lo, hi)
                bar.update(1)
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
            with torch.no_grad():
                model(x)
                last.append(float(hook.take()))
            made.append(x.detach())
    finally:
        bar.close()
        hook.remove()
        model.train(was_training)
    res = DistillResult(torch.cat(made), sum(first) / len(first), sum(last) / len(last), len(hook.bns), time.time() - t0)
    log.info("distill: %d inputs, %d BatchNorm layers, loss %.4g -> %.4g in %.0f s", n, res.num_bn, res.initial_loss,
             res.final_loss, res.seconds)
    return res
