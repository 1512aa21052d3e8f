"""Which float-model passes :func:`lowbit.quantize` runs before capture, in which order, for a recipe.

Order (each step optional, every decision in the returned :class:`~lowbit.passes.log.PassLog`)::

    fold_bn -> equalize (CLE) -> absorb_high_bias (HBA) -> correct_bias -> adaround

* :class:`DFQ` (Nagel et al. 2019) is data-free: CLE and HBA use only the weights and the BatchNorm
  statistics; bias correction is ``"analytic"`` (BatchNorm statistics, no data) or ``"empirical"``
  (needs calibration data). Static activation ranges come from calibration data when there is some;
  with ``calib_data=None`` :func:`lowbit.quantize` derives them from the BatchNorm statistics instead
  (:mod:`~lowbit.passes.bn_ranges`: ``mean +- act_num_std * std`` clipped by the activation, the model
  input's range from ``DFQ.input_range``), or (``act_range="distilled"``) calibrates them on synthetic
  inputs distilled from the BatchNorm statistics (:mod:`~lowbit.passes.distill`, ZeroQ), so W8A8 needs
  no data at all.
* AdaRound (Nagel et al. 2020) needs calibration data. It learns each layer's rounding on the grid that
  the recipe gives that layer; the scale and zero point it used are returned so that the quantized
  model's weight quantizer reproduces the rounded weight exactly (:func:`apply_weight_qparams`).
  Bias correction is not combined with AdaRound (AdaRound already minimizes the output error, bias
  included, and corrects nothing once the weights lie on the grid): it is skipped and logged.

Every layer gets the weight spec the recipe gives it (``exclude``, ``overrides`` and
``keep_first_last_8bit`` included), adapted to the layer as the quantized layer will adapt it, so the
passes correct exactly the quantization the model will get.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..spec import QuantSpec
from ._graph import CONV_TYPES, call_order, get_module
from .adaround import AdaRoundConfig, adaround
from .bias_correction import correct_bias
from .cle import ReLU6Mode, equalize
from .distill import DistillConfig, distill_inputs
from .fold_bn import BNStats, fold_bn, output_stats
from .high_bias_absorption import absorb_high_bias
from .log import PassLog

log = logging.getLogger(__name__)

__all__ = ["DFQ", "PassPlan", "plan_passes", "weight_specs", "run_passes", "apply_weight_qparams", "layer_bn_stats",
           "distilled_calibration"]

_TYPES = (*CONV_TYPES, nn.Linear)


@dataclass(frozen=True)
class DFQ:
    """Data-free quantization steps (Nagel et al. 2019), run after BatchNorm folding.

    Args:
        cle: cross-layer equalization (:func:`~lowbit.passes.equalize`).
        high_bias_absorption: move biases the next ReLU would not clip into the next layer (needs CLE's
            rescaled BatchNorm statistics; 3-sigma rule, ``num_std``).
        bias_correction: ``"analytic"`` (from BatchNorm statistics, no data), ``"empirical"`` (mean
            weight-quantization error on the calibration data) or None.
        relu6: how CLE treats ReLU6: ``"channel_clip"`` (exact), ``"to_relu"`` (the paper's choice for
            MobileNetV2, changes the float function) or ``"skip"``.
        num_std: HBA's cut ``c = max(0, mean - num_std * std)``.
        act_num_std: data-free activation ranges (used when :func:`lowbit.quantize` gets no
            ``calib_data``): ``mean +- act_num_std * std`` of the BatchNorm statistics, clipped by the
            activation (:func:`~lowbit.passes.bn_ranges.bn_activation_ranges`).
        act_range: how the data-free ranges are chosen (used only when ``calib_data`` is None):
            ``"std"`` (the paper's ``mean +- act_num_std * std`` of the modelled per-channel
            distributions, united over channels), ``"mse"`` (lowbit's MSE estimator on their quantiles;
            see :mod:`~lowbit.passes.bn_ranges`) or ``"distilled"``: calibrate the recipe's activation
            quantizers (its own range estimator) on synthetic inputs distilled from the float model's
            BatchNorm statistics before folding (ZeroQ, Cai et al. 2020; :mod:`~lowbit.passes.distill`).
            Much closer to real-data ranges than the Gaussian model on depthwise networks (see
            docs/benchmarks.md), at the cost of ``distill.iters`` forward+backward passes; needs BatchNorm
            layers (else :class:`~lowbit.errors.NoBatchNormError`).
        distill: :class:`~lowbit.passes.distill.DistillConfig` for ``act_range="distilled"`` (None: its
            defaults, 32 samples x 200 Adam steps, plain ZeroQ); the inputs are clamped into ``input_range``
            when it is given. For a classifier add ``label_weight`` (a cross-entropy to random classes,
            GDFQ): plain ZeroQ inputs give logits less confident than real images', whose min/max range
            then clips the top logits (EfficientNet-Lite0 W8A8: ``DistillConfig(iters=50, label_weight=50)``
            lost 0.8 / 1.4 / 1.0 pt with seeds 0 / 1 / 2, no more than 64 real calibration images (1.4 pt
            on the same images), where plain ZeroQ with 200 steps lost 5.2 pt; docs/benchmarks.md).
        input_range: ``(lo, hi)`` of the model input for the data-free ranges, e.g. ``(-1.0, 1.0)`` for
            images scaled by ``(x / 255 - 0.5) / 0.5``; needed when the input is quantized.

    >>> DFQ(bias_correction=None, input_range=(-1.0, 1.0)).input_range
    (-1.0, 1.0)
    >>> DFQ(act_range="distilled", distill=DistillConfig(num_samples=16, iters=200)).distill.iters
    200
    """

    cle: bool = True
    high_bias_absorption: bool = True
    bias_correction: Literal["analytic", "empirical"] | None = "analytic"
    relu6: ReLU6Mode = "channel_clip"
    num_std: float = 3.0
    act_num_std: float = 6.0
    act_range: Literal["std", "mse", "distilled"] = "std"
    input_range: tuple[float, float] | None = None
    distill: DistillConfig | None = None

    def __post_init__(self) -> None:
        if self.bias_correction not in ("analytic", "empirical", None):
            raise ConfigError(f"DFQ.bias_correction must be 'analytic', 'empirical' or None, got {self.bias_correction!r}.")
        if self.relu6 not in ("channel_clip", "to_relu", "skip"):
            raise ConfigError(f"DFQ.relu6 must be 'channel_clip', 'to_relu' or 'skip', got {self.relu6!r}.")
        if self.num_std <= 0 or self.act_num_std <= 0:
            raise ConfigError(f"DFQ.num_std and act_num_std must be > 0, got {self.num_std}, {self.act_num_std}.")
        if self.act_range not in ("std", "mse", "distilled"):
            raise ConfigError(f"DFQ.act_range must be 'std', 'mse' or 'distilled', got {self.act_range!r}.")
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            raise ConfigError(f"DFQ.distill takes a DistillConfig(...), got {type(self.distill).__name__}.")
        if self.distill is not None and self.act_range != "distilled":
            raise ConfigError(f"DFQ.distill is only used with act_range='distilled' (got act_range={self.act_range!r}); "
                              "set act_range='distilled' or drop distill=.")
        if self.act_range == "distilled" and self.distill is None:
            object.__setattr__(self, "distill", DistillConfig())
        if self.input_range is not None and (len(self.input_range) != 2 or not self.input_range[0] < self.input_range[1]):
            raise ConfigError(f"DFQ.input_range must be (lo, hi) with lo < hi, got {self.input_range!r}.")


@dataclass(frozen=True)
class PassPlan:
    """What :func:`run_passes` will do: ``dfq`` and ``adaround`` settings (None: step off)."""

    dfq: DFQ | None = None
    adaround: AdaRoundConfig | None = None

    @property
    def active(self) -> bool:
        return self.dfq is not None or self.adaround is not None

    @property
    def needs_data(self) -> bool:
        """True when a step reads calibration data (AdaRound, empirical bias correction)."""
        return self.adaround is not None or (self.dfq is not None and self.dfq.bias_correction == "empirical")


def plan_passes(dfq: DFQ | bool | None = False, adaround: AdaRoundConfig | bool | None = False) -> PassPlan:
    """Normalize the ``dfq=`` / ``adaround=`` options of :func:`lowbit.quantize`: ``True`` means the
    defaults (``DFQ()``, ``AdaRoundConfig()``), ``False``/None off, a config object itself."""
    def norm(value, cls, what):
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        raise ConfigError(f"{what}= takes True/False or a {cls.__name__}(...), got {type(value).__name__}.")

    return PassPlan(norm(dfq, DFQ, "dfq"), norm(adaround, AdaRoundConfig, "adaround"))


def _execution_order(model: nn.Module, example: tuple[tuple, dict] | None) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, _TYPES)]
    if example is None:
        return names
    order = call_order(model, names, *example)
    return order + [n for n in names if n not in order]


def weight_specs(model: nn.Module, recipe, example: tuple[tuple, dict] | None = None) -> dict[str, QuantSpec]:
    """``{layer name: weight spec}`` for every Conv1d/2d/3d and Linear layer that ``recipe`` gives an
    integer, scaled weight format, as the quantized layer will use it (``exclude``, ``overrides``,
    ``keep_first_last_8bit``; per-channel axis and group axis adapted to the layer). ``example``
    ``(args, kwargs)`` gives the execution order for the first/last rule (else registration order)."""
    from ..capture.plan import Planner
    from ..nn.layers import weight_spec_for

    class _Lenient(Planner):
        def _check_keys(self) -> None:  # the capture checks the keys against the full graph
            pass

    order = _execution_order(model, example)
    planner = _Lenient(recipe, [n for n, _ in model.named_modules()], order)
    specs: dict[str, QuantSpec] = {}
    for name in order:
        module = get_module(model, name)
        w = planner.resolve(name, module=module).spec.weight
        if w is None or not w.format.is_integer or not w.scaled:
            continue
        try:
            specs[name] = weight_spec_for(module, w, name)
        except Exception as e:  # the capture will log (or raise for) the same layer
            log.info("passes: %s left to the capture: %s", name, e)
    return specs


def run_passes(model: nn.Module, recipe, plan: PassPlan, data: Iterable | None = None, *,
               example: tuple[tuple, dict] | None = None,
               progress: bool = True) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]], PassLog]:
    """Run the float-model passes of ``plan`` on ``model`` (modified in place; may return a torch.fx
    GraphModule when CLE splits a shared ReLU6).

    Args:
        model: float model in eval mode.
        recipe: the :class:`~lowbit.recipes.Recipe` the model will be quantized with (per-layer weight specs).
        plan: from :func:`plan_passes`.
        data: a list of single-tensor input batches (AdaRound, empirical bias correction); may be None
            when ``plan.needs_data`` is False.
        example: ``(args, kwargs)`` of one input, for the execution order of the layers.

    Returns:
        ``(model, qparams, log)``: ``qparams`` maps each AdaRounded layer to the ``(scale, zero_point)``
        its rounded weight lies on (pass it to :func:`apply_weight_qparams` after capture).
    """
    from ..errors import EmptyCalibrationError

    plog = PassLog()
    if plan.needs_data and not data:
        what = "AdaRound" if plan.adaround is not None else "empirical bias correction"
        raise EmptyCalibrationError(
            f"{what} needs calibration data: pass calib_data= (an iterable of input batches), or use "
            "dfq=DFQ(bias_correction='analytic') for the data-free passes only."
        )
    model, pairs = fold_bn(model, inplace=True)
    for layer, bn in pairs:
        plog.add("fold_bn", (layer, bn), True, "folded")
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    d = plan.dfq
    if d is not None and d.cle:
        model, p = equalize(model, relu6=d.relu6, inplace=True)
        plog += p
    if d is not None and d.high_bias_absorption:
        if not d.cle:
            plog.add("hba", (), False, "high-bias absorption follows equalization; turned off because cle=False")
        else:
            model, p = absorb_high_bias(model, num_std=d.num_std, inplace=True)
            plog += p
    specs = weight_specs(model, recipe, example)
    if d is not None and d.bias_correction is not None:
        if plan.adaround is not None:
            plog.add("bias_correction", (), False, "skipped: AdaRound runs afterwards and learns each layer's "
                     "rounding against its float output (a corrected bias would change AdaRound's target)")
        else:
            src = data if d.bias_correction == "empirical" else None
            model, p = correct_bias(model, specs, src, inplace=True)
            plog += p
    if plan.adaround is not None:
        cfg = plan.adaround
        if cfg.act_spec is None:
            act = recipe.edge_spec()
            if act is not None and act.scaled:
                cfg = dataclasses.replace(cfg, act_spec=act.replace(granularity="tensor"))
        model, results, p = adaround(model, data, specs, cfg, inplace=True, progress=progress)
        plog += p
        qparams = {n: (r.scale, r.zero_point) for n, r in results.items()}
    log.info("passes: %d applied, %d skipped", len(plog.applied), len(plog.skipped))
    return model, qparams, plog


def distilled_calibration(model: nn.Module, dfq: DFQ, example: tuple[tuple, dict], *,
                          progress: bool = True) -> tuple[list[torch.Tensor], str]:
    """Calibration batches for ``dfq.act_range == "distilled"``: inputs distilled from ``model``'s
    BatchNorm statistics (:func:`~lowbit.passes.distill.distill_inputs`, ZeroQ) with ``dfq.distill``, split
    into batches of ``dfq.distill.batch_size``, plus a one-line summary for the decision log. Call it on
    the float model before BatchNorm folding; ``model`` is not changed.

    Raises:
        NoBatchNormError: the model has no BatchNorm layer with running statistics.
        ConfigError: the model takes more than one input tensor (distillation makes one).
    """
    args, kwargs = example
    if len(args) != 1 or kwargs or not torch.is_tensor(args[0]):
        raise ConfigError(
            "act_range='distilled' makes synthetic inputs for a model that takes one input tensor; this model's "
            "example input is not a single tensor. Pass calib_data= (real batches) instead."
        )
    cfg = dfq.distill or DistillConfig()
    res = distill_inputs(model, args[0], cfg, input_range=dfq.input_range, progress=progress)
    how = "ZeroQ" + (f" + label loss x{cfg.label_weight:g}" if cfg.label_weight else "")
    note = (f"activation ranges calibrated on {len(res.inputs)} inputs distilled from {res.num_bn} BatchNorm layers "
            f"({how}; {cfg.iters} steps, BatchNorm loss {res.initial_loss:.4g} -> {res.final_loss:.4g}, "
            f"{res.seconds:.0f} s)")
    return list(res.inputs.split(min(cfg.batch_size, cfg.num_samples))), note


def layer_bn_stats(model: nn.Module) -> dict[str, BNStats]:
    """``{layer name: BNStats}`` of every layer that :func:`fold_bn` recorded statistics on (kept up to
    date by CLE and HBA): what :func:`~lowbit.passes.bn_ranges.bn_activation_ranges` reads after capture."""
    return {n: st for n, m in model.named_modules() if (st := output_stats(m)) is not None}


def apply_weight_qparams(qmodel: nn.Module, qparams: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """Give each quantized layer named in ``qparams`` exactly that ``(scale, zero_point)`` on its weight
    quantizer (``set_qparams``), so re-quantizing an AdaRounded weight returns it unchanged.

    Returns the names that could not take them (no such layer, float weight, or a different scale
    shape), so the caller can log them."""
    missing = []
    for name, (scale, zp) in qparams.items():
        try:
            layer = qmodel.get_submodule(name)
        except AttributeError:
            missing.append(name)
            continue
        wq = getattr(layer, "weight_quantizer", None)
        if wq is None or tuple(wq.scale.shape) != tuple(scale.shape):
            missing.append(name)
            continue
        wq.set_qparams(scale, zp)
    return missing
