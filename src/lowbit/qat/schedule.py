"""What changes during QAT as training goes on: BatchNorm freezing, observer freezing, weight ranges.

The root module of a prepared model counts its training-mode forwards in the buffer
``lowbit_qat_step`` (so ``state_dict`` and DDP carry it) and applies the :class:`QATConfig` schedule
before each one: after ``freeze_bn_after`` steps the Conv-BN units switch to running statistics, after
``freeze_observers_after`` steps the observers stop. Both can also be called by hand
(:func:`freeze_bn`, :func:`freeze_observers`), e.g. at an epoch boundary.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.layers import QuantLayerMixin
from ..nn.quantizer import buffer_flag, quantizers, refresh_flags, version_counters_trusted
from ..nn.root import del_root_attr, on_deepcopy, set_root_attr
from ..spec import SCALE_EPS
from .config import CONFIG_ATTR, STEP_BUFFER, QATConfig
from .conv_bn import ConvBnMixin

log = logging.getLogger("lowbit.qat")

__all__ = ["freeze_bn", "freeze_observers", "qat_step", "OBSERVE_WEIGHT_ATTR"]

OBSERVE_WEIGHT_ATTR = "lowbit_qat_observe_weight"
_FROZEN = "_lowbit_qat_observers_frozen"
_OBSERVING = "_lowbit_qat_observing"


def freeze_bn(model: nn.Module) -> int:
    """Freeze the BatchNorm statistics of every Conv-BN unit in ``model``: from now on the BatchNorm is
    folded with its running statistics (and they stop updating). Returns how many units changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, ConvBnMixin) and not buffer_flag(m, "bn_frozen"):
            m.bn_frozen.fill_(True)
            n += 1
    if n:
        log.info("lowbit.qat: BatchNorm statistics frozen in %d Conv-BN unit(s)", n)
    return n


def _set_observing(model: nn.Module, on: bool) -> int:
    n = 0
    weights = {id(m.weight_quantizer) for m in model.modules()
               if isinstance(m, QuantLayerMixin) and m.weight_quantizer is not None}
    for _, q in quantizers(model):
        if id(q) in weights or q.learnable or not q.needs_calibration:
            continue
        if bool(q.observer_enabled) != on:
            q.observer_enabled.fill_(on)
            n += 1
    for m in model.modules():
        if OBSERVE_WEIGHT_ATTR in m.__dict__ and m.__dict__[OBSERVE_WEIGHT_ATTR] != on:
            m.__dict__[OBSERVE_WEIGHT_ATTR] = on
            n += 1
    set_root_attr(model, _OBSERVING, on)
    return n


def _qat_root(model: nn.Module, fn: str) -> nn.Module:
    """The prepared model itself (``DistributedDataParallel`` unwrapped); ConfigError for any other module:
    the schedule's state lives on the root that :func:`lowbit.prepare_qat` returned, and a flag set on a
    wrapper or a submodule would be ignored (undone at the next training step)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if CONFIG_ATTR not in model.__dict__:
        raise ConfigError(
            f"{fn} takes the model returned by lowbit.prepare_qat (or the DistributedDataParallel wrapping it), "
            f"got a {type(model).__name__} that is not one (a submodule, or a model not prepared for QAT)."
        )
    return model


def freeze_observers(model: nn.Module) -> int:
    """Stop every observer in ``model`` (the model :func:`lowbit.prepare_qat` returned, or the DDP wrapping
    it) for good: activation scales/zero points and weight ranges keep their current values (quantization
    stays on). Returns how many quantizers or layers changed."""
    model = _qat_root(model, "freeze_observers")
    set_root_attr(model, _FROZEN, True)
    n = _set_observing(model, False)
    if n:
        log.info("lowbit.qat: observers frozen (%d quantizer(s)/layer(s))", n)
    return n


def qat_step(model: nn.Module) -> int:
    """The number of training steps ``model`` (a prepared QAT model, or the DDP wrapping it) has taken."""
    return int(getattr(_qat_root(model, "qat_step"), STEP_BUFFER))


@torch.no_grad()
def clamp_learned_scales(model: nn.Module) -> None:
    """Keep every learnable (LSQ) scale >= float32 eps, in place. The LSQ gradient can push a scale
    through zero; torch.ao's learnable fake-quantizer clamps the same way before each forward."""
    for _, q in quantizers(model):
        if q.learnable:
            q.scale.clamp_(min=SCALE_EPS)


def _root_pre_hook(module: nn.Module, args) -> None:  # noqa: ARG001
    cfg: QATConfig | None = module.__dict__.get(CONFIG_ATTR)
    if cfg is None:
        return
    if not version_counters_trusted():  # under DDP: after its buffer broadcast, every flag in one host read
        refresh_flags(module)
    if cfg.learnable != "ste":
        clamp_learned_scales(module)
    if not module.training:
        # Eval forwards never observe, so the QAT model in eval mode computes what convert() will.
        if module.__dict__.get(_OBSERVING, True):
            _set_observing(module, False)
        return
    step = int(getattr(module, STEP_BUFFER))
    if cfg.freeze_bn_after is not None and step >= cfg.freeze_bn_after:
        freeze_bn(module)
    if cfg.freeze_observers_after is not None and step >= cfg.freeze_observers_after and not module.__dict__.get(_FROZEN):
        freeze_observers(module)
    if not module.__dict__.get(_FROZEN) and not module.__dict__.get(_OBSERVING, False):
        _set_observing(module, True)
    getattr(module, STEP_BUFFER).add_(1)


def _weight_pre_hook(module: nn.Module, args) -> None:  # noqa: ARG001
    # Jacob et al. 2018: the weight range is the min/max of the current weight at every training step.
    if module.training and module.__dict__.get(OBSERVE_WEIGHT_ATTR) and isinstance(module, QuantLayerMixin):
        module.calibrate_weight()


def install(model: nn.Module, cfg: QATConfig) -> None:
    """Attach ``cfg``, the step buffer and the hooks to a prepared model."""
    set_root_attr(model, CONFIG_ATTR, cfg)
    if STEP_BUFFER not in model._buffers:
        # on the model's device: DDP broadcasts buffers, and NCCL only takes CUDA tensors
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        model.register_buffer(STEP_BUFFER, torch.zeros((), dtype=torch.int64, device=device))
    # Plain module-level functions (no closures): the hooks survive copy.deepcopy and pickling; a
    # GraphModule root drops its own forward hooks when deep-copied, so the copy installs it again.
    model.register_forward_pre_hook(_root_pre_hook)
    on_deepcopy(model, _reinstall_root_hook)
    for m in model.modules():
        wq = getattr(m, "weight_quantizer", None) if isinstance(m, QuantLayerMixin) else None
        if wq is not None and wq.needs_calibration and not wq.learnable:
            m.__dict__[OBSERVE_WEIGHT_ATTR] = True
            m.register_forward_pre_hook(_weight_pre_hook)
    set_root_attr(model, _OBSERVING, True)


def _reinstall_root_hook(copied: nn.Module) -> None:
    """After ``copy.deepcopy`` of a prepared GraphModule (its attributes are back, its root hooks are not)."""
    if CONFIG_ATTR in copied.__dict__ and _root_pre_hook not in copied._forward_pre_hooks.values():
        copied.register_forward_pre_hook(_root_pre_hook)


def uninstall(model: nn.Module) -> None:
    """Remove what :func:`install` attached (hooks, buffer, config, flags), in place."""
    for m in model.modules():
        hooks = m._forward_pre_hooks
        for k in [k for k, h in hooks.items() if h in (_root_pre_hook, _weight_pre_hook)]:
            del hooks[k]
        m.__dict__.pop(OBSERVE_WEIGHT_ATTR, None)
    for name in (_FROZEN, _OBSERVING, CONFIG_ATTR):
        del_root_attr(model, name)
    model._buffers.pop(STEP_BUFFER, None)
