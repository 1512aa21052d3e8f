"""``lowbit.prepare_qat``: a float or PTQ-quantized model -> a model to fine-tune with fake quantization."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

from torch import nn

from ..calibration import MovingAverageMinMax, make_observer
from ..errors import ConfigError
from ..nn.layers import QuantLayerMixin
from ..nn.quantizer import TensorQuantizer, quantizers
from ..ops import quantization_bounds
from ..passes._graph import get_module
from ..passes.fold_bn import fold_bn
from ..recipes import Recipe
from .config import QATConfig
from .conv_bn import fuse_bn
from .schedule import install

log = logging.getLogger("lowbit.qat")

__all__ = ["prepare_qat", "is_qat_model"]


def is_qat_model(model: nn.Module) -> bool:
    """True for a model returned by :func:`prepare_qat` (and not yet converted)."""
    from .config import CONFIG_ATTR

    return CONFIG_ATTR in model.__dict__


def _note(model: nn.Module, text: str) -> None:
    log.info("lowbit.qat: %s", text)
    dlog = getattr(model, "lowbit_decisions", None)
    if dlog is not None:
        dlog.note(text)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(get_module(root, parent) if parent else root, attr, new)


def _quantize_keeping_bn(model: nn.Module, recipe: Recipe, calib_data, example_inputs, quantize_kwargs) -> nn.Module:
    """``lowbit.quantize`` (BatchNorm folded with running statistics, calibrated), then every quantized
    Conv/Linear that had a BatchNorm folded into it becomes a Conv-BN unit holding the original weight,
    bias and BatchNorm."""
    from ..api import quantize

    folded, pairs = fold_bn(copy.deepcopy(model).eval(), inplace=True)
    qmodel = quantize(folded, recipe, calib_data, example_inputs, inplace=True, **quantize_kwargs)
    by_name = {getattr(m, "lowbit_name", None): path for path, m in qmodel.named_modules() if isinstance(m, QuantLayerMixin)}
    for layer_name, bn_name in pairs:
        path = by_name.get(layer_name)
        qlayer = get_module(qmodel, path) if path is not None else None
        fused = None
        if qlayer is not None and qlayer.weight_quantizer is not None:
            fused = fuse_bn(qlayer, get_module(model, layer_name), get_module(model, bn_name))
        if fused is None:
            _note(qmodel, f"{bn_name} folded into {layer_name} for good at prepare time ("
                  f"{'the layer is not quantized' if qlayer is None or qlayer.weight_quantizer is None else type(qlayer).__name__ + ' has no Conv-BN unit'}); "
                  "its statistics will not train")
            continue
        _set_module(qmodel, path, fused)
        _note(qmodel, f"{bn_name} kept as a training-time fold in {layer_name} ({type(fused).__name__})")
    return qmodel


def _seed_ema(q: TensorQuantizer, momentum: float) -> None:
    """Switch an activation quantizer's observer to a moving average of min/max starting from the range
    the calibration chose (so QAT starts from the PTQ scales)."""
    spec = q.spec.replace(calibrator=MovingAverageMinMax(c=momentum))
    obs = make_observer(spec, q.name)
    if q.chosen_range is not None:
        lo, hi = q.chosen_range
    else:  # qparams set directly or loaded: the interval they represent
        lo, hi = quantization_bounds(q.scale.detach(), q.zero_point.detach(), q.spec.format)
    # on the quantizer's device (a histogram calibrator keeps its range on the CPU)
    dev = q.scale.device
    obs.min_val, obs.max_val = lo.detach().float().to(dev).clone(), hi.detach().float().to(dev).clone()
    obs.num_batches = 1
    q.spec = spec
    q.observer = obs


def _setup_quantizers(qmodel: nn.Module, cfg: QATConfig) -> None:
    weight_q = {id(m.weight_quantizer) for m in qmodel.modules()
                if isinstance(m, QuantLayerMixin) and m.weight_quantizer is not None}
    for _, q in quantizers(qmodel):
        if not q.needs_calibration:  # dynamic or plain casts: nothing is learned or observed
            continue
        is_weight = id(q) in weight_q
        if cfg.learnable != "ste" and q.spec.format.is_integer:
            if not q.learnable:
                q.enable_lsq(learn_offset=cfg.learnable == "lsq+" and not is_weight and not q.spec.symmetric)
            q.set_mode(False, True)
            continue
        if cfg.learnable != "ste":
            _note(qmodel, f"{q.name}: {q.spec.format.name} is not an integer format, so LSQ cannot learn its "
                  "scale; it uses the straight-through estimator with observed ranges")
        if is_weight:
            q.set_mode(False, True)  # the layer's pre-hook recalibrates it from the current weight
        else:
            _seed_ema(q, cfg.observer_momentum)
            q.set_mode(True, True)


def prepare_qat(
    model: nn.Module,
    recipe: Recipe | None = None,
    calib_data: Iterable | None = None,
    example_inputs: Any = None,
    *,
    learnable: str = "ste",
    freeze_bn_after: int | None = None,
    freeze_observers_after: int | None = None,
    observer_momentum: float = 0.01,
    sync: bool | None = None,
    **quantize_kwargs: Any,
) -> nn.Module:
    """A copy of ``model`` ready for quantization-aware training with any ordinary training loop; turn
    it into the deployable model with :func:`lowbit.convert`.

    * A float model is quantized with ``recipe`` as :func:`lowbit.quantize` does (same capture, same
      decision log, calibrated on ``calib_data``), except that every BatchNorm that follows a quantized
      Conv/Linear is kept as a training-time fold (:mod:`lowbit.qat.conv_bn`): ``fq(W t)`` with
      ``t = gamma / sqrt(running_var + eps)``, batch statistics until ``freeze_bn_after`` steps, running
      statistics after.
    * A model returned by :func:`lowbit.quantize` (PTQ) is taken as it is (its BatchNorms are already
      folded; its calibrated scales are the starting point); ``recipe`` may be None.

    Gradients (``learnable``): ``"ste"`` (default) clipped straight-through estimator; the weight scales
    follow ``min/max`` of the current weight at every step and the activation scales a moving average
    ``m <- m + c (batch_min - m)`` (``c = observer_momentum``) that starts at the calibrated range, until
    ``freeze_observers_after`` steps. ``"lsq"``: every integer scale is an ``nn.Parameter`` with the LSQ
    gradient (Esser et al. 2020); ``"lsq+"``: plus a learnable offset on affine activations (Bhalgat et
    al. 2020). A step is one training-mode forward of the returned module.

    Under ``torch.distributed`` (``sync`` None: automatic when a group with more than one rank exists):
    after calibration on each rank's shard the observers are all-reduced, and during training every
    activation observer reduces each batch's min/max across ranks, so all ranks hold identical scales
    equal to a single process that sees the concatenated batches. Prepare on every rank *before*
    wrapping in ``DistributedDataParallel``.

    Args:
        model: float ``nn.Module``, or a model returned by :func:`lowbit.quantize`.
        recipe: a :mod:`lowbit.recipes` preset (needed for a float model).
        calib_data: calibration batches for static recipes (float model); default: ``[example_inputs]``.
        example_inputs: one input batch.
        learnable, freeze_bn_after, freeze_observers_after, observer_momentum, sync: see
            :class:`~lowbit.qat.QATConfig`.
        **quantize_kwargs: passed to :func:`lowbit.quantize` (``exclude``, ``overrides``, ``num_batches``...).

    Returns:
        The QAT model, in training mode (``model`` is not modified).

    >>> import lowbit, torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> qat = lowbit.prepare_qat(net, lowbit.recipes.W8A8(), calib_data=[torch.randn(16, 4)], progress=False)
    >>> loss = qat(torch.randn(16, 4)).square().mean(); loss.backward()
    >>> bool(net[0].weight.grad is None and qat is not net)
    True
    """
    from ..distributed import sync as dsync

    cfg = QATConfig(learnable, freeze_bn_after, freeze_observers_after, observer_momentum, sync)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prepare_qat takes an nn.Module, got {type(model).__name__}.")
    if is_qat_model(model):
        raise ConfigError("this model was already prepared for QAT; train it, or lowbit.convert it first.")
    do_sync = dsync.is_distributed() if cfg.sync is None else cfg.sync
    already = any(True for _ in quantizers(model))
    if already:
        if quantize_kwargs or calib_data is not None:
            raise ConfigError(
                "the model is already quantized (it holds TensorQuantizers), so calib_data/quantize options do "
                "not apply; pass the float model to prepare_qat to quantize it again, or drop them."
            )
        qmodel = copy.deepcopy(model)
        if freeze_bn_after is not None and not any(True for m in qmodel.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            _note(qmodel, "freeze_bn_after has no effect: the PTQ model's BatchNorms were folded by lowbit.quantize "
                  "(pass the float model to prepare_qat to train BatchNorm as a training-time fold)")
        if do_sync:
            dsync.assert_quantizers_match(qmodel)
    else:
        if recipe is None:
            raise ConfigError("prepare_qat needs a recipe for a float model, e.g. lowbit.recipes.W8A8().")
        if calib_data is None and example_inputs is not None:
            calib_data = [example_inputs]
        quantize_kwargs.setdefault("progress", False)
        qmodel = _quantize_keeping_bn(model, recipe, calib_data, example_inputs, quantize_kwargs)
        if do_sync:
            dsync.all_reduce_quantizers(qmodel)
    _setup_quantizers(qmodel, cfg)
    if do_sync:
        dsync.sync_observers(qmodel)
    install(qmodel, cfg)
    qmodel.train()
    _note(qmodel, f"prepared for QAT: {cfg}")
    return qmodel


