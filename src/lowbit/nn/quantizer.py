"""``TensorQuantizer``: the nn.Module that quantizes one tensor (a weight or an activation edge).

State lives in buffers (``scale``, ``zero_point``, ``observer_enabled``, ``quant_enabled``), so
``state_dict``, ``.to(device)`` and DDP's buffer broadcast carry it. Life cycle::

    observe (statistics, output = input)  ->  compute_qparams()  ->  quantize (fake-quant, STE)

or both at once (QAT's observer phase). ``lowbit.calibrating(model)`` scopes the observe phase for every
quantizer in a model. With ``spec.dynamic`` the range is measured on every batch instead. With
``enable_lsq()`` the scale (and with LSQ+ an offset) becomes a learnable ``nn.Parameter``.

Device: a quantizer is built on the CPU. The first time it sees (forward, calibration, ``set_qparams``)
a tensor that lives on another device (a CUDA model), it moves its buffers there, once, as ``torch.ao``'s ``prepare`` moves
observers to their module's device; so ``lowbit.quantize`` of a CUDA model returns a model whose
quantizers are on CUDA too (DDP's NCCL buffer broadcast needs that). :func:`place_quantizers` does the
same for a whole model explicitly (used by ``lowbit.load``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..calibration import Observer, make_observer
from ..errors import ConfigError, EmptyCalibrationError, check_finite
from ..granularity import reduce_blocks
from ..ops import _GradScale, fake_quantize, fake_quantize_lsq
from ..spec import SCALE_EPS, QuantSpec, compute_qparams

__all__ = ["TensorQuantizer", "calibrating", "quantizers", "place_quantizers", "buffer_flag", "refresh_flags",
           "version_counters_trusted", "DYNAMIC_QPARAMS_ATTR"]

DYNAMIC_QPARAMS_ATTR = "_lowbit_dynamic_qparams"
"""Instance attribute where a dynamic quantizer keeps the ``(scale, zero_point)`` of the last batch it
quantized (not a buffer: it is per batch, not state); :mod:`lowbit.nn.requant` reads it to recover the codes."""

_FLAGS: dict[int, tuple[weakref.ref, int, bool, bool]] = {}
"""``id(tensor) -> (weak reference, version, value, refreshed)`` for :func:`buffer_flag`. Kept outside the
modules, so ``copy.deepcopy`` and pickling never copy an entry onto another tensor; an entry leaves with its
tensor. ``refreshed``: the tensor is one of the flags :func:`refresh_flags` reads after every DDP buffer
broadcast, so its entry may be trusted under ``torch.distributed`` too."""


def version_counters_trusted() -> bool:
    """Whether an unchanged version counter means an unchanged tensor, which the caches keyed on them
    (:func:`buffer_flag`, the quantized layers' weight and int32-bias caches) rely on. False under
    ``torch.distributed`` with more than one rank: DDP's buffer broadcast writes rank 0's buffers into the
    other ranks in place without moving their version counters (seen with gloo)."""
    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _remember(t: torch.Tensor, version: int, value: bool, refreshed: bool, hit) -> None:
    key = id(t)
    ref = hit[0] if hit is not None and hit[0]() is t else weakref.ref(t, lambda _, key=key: _FLAGS.pop(key, None))
    _FLAGS[key] = (ref, version, value, refreshed)


def buffer_flag(module: nn.Module, name: str) -> bool:
    """``bool(module.<name>)`` for a 0-d flag buffer, without a device-to-host sync on every call.

    ``bool()`` of a CUDA tensor waits for the GPU; read on every forward of every quantizer, the flags
    were most of the host syncs of a CUDA step (271 per PTQ ResNet-18 forward). The value is cached per
    tensor object and its version counter: every in-place tensor op (``fill_``, ``copy_``,
    ``load_state_dict``) bumps the version, and ``.to(device)``, a reassignment or a deep copy makes a new
    tensor, so a changed flag is read again. Inference tensors (made under
    ``torch.inference_mode``) have no version counter: those are read every time.

    Under ``torch.distributed`` with more than one rank, DDP's buffer broadcast writes rank 0's values
    into the other ranks' buffers without moving their version counters (measured with gloo), so there
    only the flags that :func:`refresh_flags` re-reads after every broadcast are cached (a model from
    :func:`lowbit.prepare_qat` calls it in its forward pre-hook); other flags are read every time. Writes
    through ``.data`` are not seen either; set flags with ``set_mode`` / ``fill_`` / ``load_state_dict``.
    """
    t = module._buffers[name]
    try:
        version = t._version
    except RuntimeError:  # an inference tensor
        return bool(t)
    hit = _FLAGS.get(id(t))
    same = hit is not None and hit[0]() is t
    refreshed = same and hit[3]
    if not (refreshed or version_counters_trusted()):
        return bool(t)
    if same and hit[1] == version:
        return hit[2]
    value = bool(t)  # a write since the last read (on this rank: after any broadcast, so still the truth)
    _remember(t, version, value, refreshed, hit)
    return value


def refresh_flags(model: nn.Module) -> int:
    """Read every 0-d bool buffer of ``model`` (the quantizers' ``quant_enabled`` / ``observer_enabled`` /
    ``initialized``, the Conv-BN units' ``bn_frozen``) in one device-to-host transfer and cache the values
    for :func:`buffer_flag`, marked as safe to trust under ``torch.distributed``. Called after DDP's buffer
    broadcast (the QAT model's forward pre-hook calls it when more than one rank runs: DDP broadcasts the
    buffers in its own forward, before it calls the module it wraps), it turns one host sync per flag read
    into one per forward. Returns the number of flags read."""
    flags = [b for m in model.modules() for b in m._buffers.values()
             if b is not None and b.dim() == 0 and b.dtype == torch.bool]
    if not flags:
        return 0
    values = torch.stack(flags).tolist()  # the one sync
    for t, value in zip(flags, values):
        try:
            version = t._version
        except RuntimeError:  # an inference tensor: buffer_flag reads it every time anyway
            continue
        _remember(t, version, value, True, _FLAGS.get(id(t)))
    return len(flags)


class TensorQuantizer(nn.Module):
    """Quantize-dequantize one tensor according to ``spec``.

    Args:
        spec: how to quantize (format, symmetric, granularity, rounding, calibrator, dynamic).
        name: the tensor's name (module path + role), used in logs, errors and reports.
        is_weight: a weight quantizer (the whole tensor is one sample) rather than an activation
            quantizer (dimension 0 is the batch). Only the LSQ gradient scale depends on it.

    Forward: ``x`` of any shape the granularity accepts -> same shape and dtype; the clipped STE
    gradient (or the LSQ gradients when learnable).

    >>> q = TensorQuantizer(QuantSpec("int8"), name="demo")
    >>> with q.observing():
    ...     _ = q(torch.tensor([-1.0, 0.5, 2.54]))
    >>> round(float(q(torch.tensor([0.334]))), 4), round(float(q.scale), 4)
    (0.34, 0.02)
    """

    def __init__(self, spec: QuantSpec, name: str = "tensor", is_weight: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self.is_weight = is_weight
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("observer_enabled", torch.tensor(False))
        self.register_buffer("quant_enabled", torch.tensor(True))  # uncalibrated + on -> clear error, never silent float
        self.register_buffer("initialized", torch.tensor(not self.needs_calibration))
        self.observer: Observer = make_observer(spec, name)
        self.learnable = False
        self.lsq_offset: nn.Parameter | None = None
        self.chosen_range: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---------------------------------------------------------------- properties
    @property
    def needs_calibration(self) -> bool:
        """True when a range must be observed before quantizing (static, scaled specs)."""
        return self.spec.scaled and not self.spec.dynamic

    @property
    def is_calibrated(self) -> bool:
        return buffer_flag(self, "initialized")

    # ---------------------------------------------------------------- modes
    def set_mode(self, observe: bool, quantize: bool) -> TensorQuantizer:
        """Switch observation and quantization on or off (both on = QAT observer phase)."""
        self.observer_enabled.fill_(observe)
        self.quant_enabled.fill_(quantize)
        return self

    @contextlib.contextmanager
    def observing(self, quantize: bool = False) -> Iterator[TensorQuantizer]:
        """Observe inside the block; compute the qparams and switch to quantizing on exit."""
        self.set_mode(True, quantize)
        try:
            yield self
        finally:
            self.set_mode(False, True)
        self.compute_qparams()

    # ---------------------------------------------------------------- device
    def follow(self, device: torch.device) -> None:
        """Move this quantizer to ``device`` if it still sits on the CPU and ``device`` is not the CPU
        (module docstring). A quantizer already on an accelerator is never moved back."""
        if device.type != "cpu" and self.scale.device.type == "cpu":
            self.to(device)

    # ---------------------------------------------------------------- calibration
    def reset_observer(self) -> None:
        self.observer = make_observer(self.spec, self.name)

    def compute_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Range from the observer -> ``scale`` / ``zero_point`` buffers. Returns them."""
        if not self.needs_calibration:
            return self.scale, self.zero_point
        lo, hi = self.observer.compute_range()
        scale, zp = compute_qparams(self.spec, lo, hi)
        self.chosen_range = (lo, hi)
        self._set_qparams(scale, zp)
        return self.scale, self.zero_point

    def calibrate_now(self, x: torch.Tensor) -> None:
        """Observe exactly ``x`` (e.g. a weight) and set the qparams from it, forgetting earlier batches."""
        self.follow(x.device)
        self.reset_observer()
        self.observer.update(x)
        self.compute_qparams()
        if not buffer_flag(self, "quant_enabled"):  # a write bumps the version: the cached flag is read again
            self.quant_enabled.fill_(True)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Set the quantization parameters directly (e.g. from a checkpoint or another tool)."""
        zp = torch.zeros_like(scale, dtype=torch.int32) if zero_point is None else zero_point
        self.follow(scale.device)
        self._set_qparams(scale, zp)

    def _set_qparams(self, scale: torch.Tensor, zp: torch.Tensor) -> None:
        device = self.scale.device
        if self.learnable:
            with torch.no_grad():
                self.scale.copy_(scale.to(device))
        else:
            self.scale = scale.detach().to(device, torch.float32).clone()
        self.zero_point = zp.detach().to(device, torch.int32).clone()
        if not self.is_calibrated:  # written once: a write on every QAT step would cost a read (sync) each
            self.initialized.fill_(True)

    # ---------------------------------------------------------------- LSQ
    def enable_lsq(self, learn_offset: bool = False) -> TensorQuantizer:
        """Make the scale learnable with the LSQ gradient (Esser et al. 2020); ``learn_offset`` adds the
        LSQ+ learnable offset (Bhalgat et al. 2020), initialised from the zero point. Needs qparams."""
        if not self.is_calibrated:
            raise EmptyCalibrationError(f"{self.name}: calibrate before enabling LSQ (the scale is initialised from the range).")
        if not self.spec.format.is_integer:
            raise ConfigError(f"{self.name}: LSQ needs an integer format, got {self.spec.format.name}.")
        scale = self.scale.detach().clone()
        offset = (-self.zero_point.float() * scale).detach().clone()
        del self.scale
        self.scale = nn.Parameter(scale)
        self.learnable = True
        if learn_offset:
            self.lsq_offset = nn.Parameter(offset)
        return self

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.follow(x.device)
        quantizing = buffer_flag(self, "quant_enabled")
        if self.spec.dynamic:  # switched off (quant_enabled False): float, as for a static quantizer
            return self._forward_dynamic(x) if quantizing else x
        observing = buffer_flag(self, "observer_enabled")
        if observing:
            self.observer.update(x)
        if not quantizing:
            return x
        if self.needs_calibration and not self.is_calibrated:
            if observing:  # QAT observer phase: quantize with the running range
                self.compute_qparams()
            else:
                raise EmptyCalibrationError(
                    f"{self.name}: quantization is on but no range was calibrated; run calibration data "
                    "through the model inside `with lowbit.calibrating(model):` first."
                )
        elif observing and self.needs_calibration:
            self.compute_qparams()
        if self.learnable:
            with torch.no_grad():  # an optimizer step can push a learned scale to or below 0 (as torch's
                self.scale.clamp_(min=SCALE_EPS)  # learnable fake quant does, keep it >= eps)
            g = self._lsq_grad_scale(x)
            offset = self.lsq_offset
            if offset is None and not self.spec.symmetric:
                # LSQ on an affine grid: the zero point stays fixed, the offset -z * s moves with the scale,
                # so a value clipped at qmin / qmax gives the scale (qmin - z) / (qmax - z), as torch's
                # _fake_quantize_learnable_per_tensor_affine does, times the same gradient scale g
                offset = -self.zero_point.float() * _GradScale.apply(self.scale, g)
            return fake_quantize_lsq(x, self.scale, offset, self.spec, grad_scale=g)
        return fake_quantize(x, self.scale, self.zero_point, self.spec)

    def _lsq_grad_scale(self, x: torch.Tensor) -> float:
        """LSQ's ``g = 1 / sqrt(N * qmax)``, N = elements per scale of one sample: all of a weight, one
        batch element of an activation, so the scale's gradient does not depend on the batch size
        (and DDP ranks with half batches get the single-process gradient)."""
        n = x.numel() if self.is_weight or x.dim() < 2 else x[0].numel()
        n_per_scale = max(1, n // max(1, self.scale.numel()))
        return 1.0 / (n_per_scale * max(1.0, float(self.spec.format.max_value))) ** 0.5

    def _forward_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        check_finite(x.detach(), self.name)
        g = self.spec.granularity
        lo = reduce_blocks(x.detach().float(), g, "amin")
        hi = reduce_blocks(x.detach().float(), g, "amax")
        scale, zp = compute_qparams(self.spec, lo, hi)
        self.__dict__[DYNAMIC_QPARAMS_ATTR] = (scale, zp)  # this batch's, for lowbit.nn.ort_arithmetic
        return fake_quantize(x, scale, zp, self.spec)

    def extra_repr(self) -> str:
        if not self.is_calibrated:
            state = "uncalibrated"
        elif self.scale.numel() == 1:
            state = f"scale={float(self.scale.detach()):.6g}, zero_point={int(self.zero_point)}"
        else:
            s = self.scale.detach()
            state = f"scale=[{float(s.min()):.4g}..{float(s.max()):.4g}] x{s.numel()}"
        return f"{self.name}: {self.spec}, {state}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # scale/zero_point shapes are only known after calibration: adopt the checkpoint's shapes.
        for key in ("scale", "zero_point"):
            t = state_dict.get(prefix + key)
            if t is not None and getattr(self, key).shape != t.shape:
                cur = getattr(self, key)  # keep the quantizer's device, not the checkpoint's (CPU)
                fresh = torch.empty(t.shape, dtype=cur.dtype, device=cur.device)
                if isinstance(cur, nn.Parameter):
                    cur.data = fresh
                else:
                    setattr(self, key, fresh)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """Every TensorQuantizer in ``model`` with its qualified name."""
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            yield name, m


def place_quantizers(model: nn.Module) -> int:
    """Move every :class:`TensorQuantizer` of ``model`` that sits on the CPU to the device of the model's
    parameters, when they all live on one non-CPU device. Returns how many were moved (0 for a CPU
    model or one spread over several devices)."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        return 0
    (device,) = devices
    moved = 0
    for _, q in quantizers(model):
        if device.type != "cpu" and q.scale.device.type == "cpu":
            q.follow(device)
            moved += 1
    return moved


@contextlib.contextmanager
def calibrating(model: nn.Module, quantize: bool = False) -> Iterator[nn.Module]:
    """Scope the calibration phase of every activation quantizer in ``model``::

        with lowbit.calibrating(qmodel):
            for x in data:
                qmodel(x)

    Inside: static quantizers observe (and pass data through unchanged unless ``quantize``).
    On exit: every observer's range becomes scale/zero point and quantization is switched on.
    A quantizer that saw no data raises :class:`~lowbit.EmptyCalibrationError` naming it.
    """
    targets = [q for _, q in quantizers(model) if q.needs_calibration and not q.is_calibrated]
    for q in targets:
        q.reset_observer()
        q.set_mode(True, quantize)
    ok = False
    try:
        yield model
        ok = True
    finally:
        for q in targets:
            q.set_mode(False, True)
    if ok:
        empty = [q.name for q in targets if q.observer.num_batches == 0]
        if empty:
            raise EmptyCalibrationError(
                f"{len(empty)} quantizer(s) saw no calibration data: {', '.join(empty[:8])}"
                f"{' ...' if len(empty) > 8 else ''}. Pass at least one batch that reaches them "
                "(is the data iterable empty, or does the model skip these layers?)."
            )
        for q in targets:
            q.compute_qparams()
