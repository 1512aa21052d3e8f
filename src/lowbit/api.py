"""``lowbit.quantize``: float model + recipe (+ calibration data) -> quantized-simulation model.

Data flows one way: copy -> fold BatchNorm -> capture (torch.fx graph, or module swap when the model
does not trace) -> calibrate -> return. Every layer's fate is in the decision log
(``lowbit.decision_log(qmodel)``); every quantized tensor's spec, scale and zero point in
``lowbit.quant_table(qmodel)``.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .capture.data import as_call, iter_calls, positional_arity
from .capture.graph import join_names, modularize_functional_layers, quantize_graph, trace
from .capture.graph import weighted_order as graph_order
from .capture.log import DecisionLog
from .capture.plan import Planner
from .capture.readback import quantization_disabled
from .capture.swap import quantize_modules
from .capture.swap import weighted_order as module_order
from .errors import ConfigError, EmptyCalibrationError, QuantizationError, UnsupportedLayerError
from .nn.quantizer import calibrating, quantizers
from .nn.root import set_root_attr
from .passes.adaround import AdaRoundConfig
from .passes.bn_ranges import bn_activation_ranges
from .passes.fold_bn import fold_bn
from .passes.pipeline import (
    DFQ,
    PassPlan,
    apply_weight_qparams,
    distilled_calibration,
    layer_bn_stats,
    plan_passes,
    run_passes,
)
from .recipes import Recipe, with_options

log = logging.getLogger("lowbit")

__all__ = ["quantize", "decision_log", "calibrate"]

_LOG_ATTR = "lowbit_decisions"


def decision_log(qmodel: nn.Module) -> DecisionLog:
    """The :class:`~lowbit.capture.log.DecisionLog` that :func:`quantize` attached to ``qmodel``."""
    d = getattr(qmodel, _LOG_ATTR, None)
    if d is None:
        raise ConfigError("this model was not produced by lowbit.quantize, so it has no decision log; pass the "
                          "model that lowbit.quantize returned.")
    return d


def _example_call(example_inputs: Any, model: nn.Module) -> tuple[tuple, dict]:
    if isinstance(example_inputs, tuple | list) and not isinstance(example_inputs, torch.Tensor):
        return tuple(example_inputs), {}
    return as_call(example_inputs, positional_arity(model))


def _peek(calib_data: Iterable, model: nn.Module) -> tuple[tuple[tuple, dict], Iterable]:
    """The first batch as ``(args, kwargs)`` and an iterable that still yields every batch."""
    if torch.is_tensor(calib_data):
        calib_data = [calib_data]
    it = iter(calib_data)
    try:
        first = next(it)
    except StopIteration:
        raise EmptyCalibrationError(
            "the calibration data yielded no batches; pass a non-empty iterable of input batches "
            "(is the DataLoader's dataset empty?)."
        ) from None
    if it is calib_data:  # a one-shot iterator: put the first batch back in front
        calib_data = itertools.chain([first], it)
    return as_call(first, positional_arity(model), 0), calib_data


@torch.no_grad()
def calibrate(qmodel: nn.Module, calib_data: Iterable, *, num_batches: int | None = None, progress: bool = True) -> int:
    """Run ``calib_data`` through ``qmodel`` inside ``lowbit.calibrating(qmodel)``; returns the batch count.
    Batches: tensors, tuples/lists (positional arguments) or dicts (keyword arguments)."""
    n = 0
    with calibrating(qmodel):
        for args, kwargs in iter_calls(calib_data, qmodel, num_batches, progress):
            qmodel(*args, **kwargs)
            n += 1
    return n


def _fold(model: nn.Module, dlog: DecisionLog) -> nn.Module:
    model, pairs = fold_bn(model, inplace=True)
    for layer, bn in pairs:
        dlog.note(f"folded BatchNorm {bn} into {layer}")
    return model


def _swap(work: nn.Module, recipe: Recipe, dlog: DecisionLog, reason: str) -> nn.Module:
    dlog.path, dlog.path_reason = "module_swap", reason
    log.warning("lowbit: %s; falling back to module swapping (each layer quantizes its input; add/matmul "
                "joins stay float).", reason)
    work = _fold(work, dlog)
    planner = Planner(recipe, [n for n, _ in work.named_modules()], module_order(work))
    return quantize_modules(work, planner, dlog)


def _capture(work: nn.Module, recipe: Recipe, dlog: DecisionLog, example) -> nn.Module:
    """Graph path when ``work`` traces, else module swap; BatchNorm folded on either path."""
    try:
        gm = trace(work)
    except Exception as e:  # any tracing failure: control flow on tensors, unsupported Python ...
        return _swap(work, recipe, dlog, f"torch.fx could not trace the model: {type(e).__name__}: {str(e)[:200]}")
    names = [n for n, _ in work.named_modules()]
    snapshot = (list(dlog.decisions), list(dlog.notes))
    try:
        converted = modularize_functional_layers(gm)
        if converted:
            dlog.note(f"{len(converted)} functional conv/linear call(s) on module weights made into layers")
        gm = _fold(gm, dlog)
        planner = Planner(recipe, names + join_names(gm), graph_order(gm))
        qgm = quantize_graph(gm, planner, dlog, example)
        if example is not None:
            with quantization_disabled(qgm):
                qgm(*example[0], **example[1])
        dlog.path, dlog.path_reason = "graph", "torch.fx symbolic_trace"
        return qgm
    except QuantizationError:
        raise
    except Exception as e:  # the rewritten graph failed: fall back rather than hand back a broken model
        dlog.decisions[:], dlog.notes[:] = snapshot
        return _swap(work, recipe, dlog, f"graph rewrite failed: {type(e).__name__}: {str(e)[:200]}")


def _passes(work: nn.Module, recipe: Recipe, plan: PassPlan, calib_data, example, num_batches, dlog: DecisionLog,
            progress: bool):
    """Run the DFQ / AdaRound passes; the data they read is materialized (a one-shot iterator would
    otherwise be empty by the time the activations are calibrated)."""
    xs = None
    if calib_data is not None and plan.needs_data:
        calls = list(iter_calls(calib_data, work, num_batches, progress=False))
        if any(len(a) != 1 or k for a, k in calls):
            raise ConfigError(
                "AdaRound and empirical bias correction feed each batch to the model as one input tensor; "
                "this calibration data has batches with several arguments. Pass batches of one tensor "
                "(or (input, target) pairs for a one-argument forward)."
            )
        xs = [a[0] for a, _ in calls]
        calib_data = xs
    work, weight_qparams, plog = run_passes(work, recipe, plan, xs, example=example, progress=progress)
    dlog.note(f"passes before capture: {plog.summary()} (qmodel.lowbit_passes has every record)")
    return work, weight_qparams, plog, calib_data, example


def quantize(
    model: nn.Module,
    recipe: Recipe | Any = None,
    calib_data: Iterable | None = None,
    example_inputs: Any = None,
    *,
    num_batches: int | None = None,
    exclude: tuple[str, ...] | list[str] | str = (),
    overrides: Mapping | None = None,
    strict: bool = False,
    progress: bool = True,
    inplace: bool = False,
    dfq: DFQ | bool = False,
    adaround: AdaRoundConfig | bool = False,
):
    """Quantize ``model`` with ``recipe``; return an ordinary ``nn.Module`` that simulates the quantized
    model (quantize-dequantize in float).

    Steps: copy (unless ``inplace``), eval mode, fold every BatchNorm into the Conv/Linear before it,
    capture with ``torch.fx`` (activation quantizers on the edges where an int8 backend puts Q/DQ,
    Conv-BN-ReLU as one unit, residual add/cat/mul and attention matmul quantized) or, when the model
    does not trace, swap modules (each layer quantizes its input); then calibrate the static
    activation quantizers on ``calib_data`` inside ``lowbit.calibrating``.

    Args:
        model: the float model.
        recipe: a :mod:`lowbit.recipes` preset (``W8A8()``, ``W8A8Dynamic()``, ``W4A16()`` ...).
        calib_data: DataLoader or any iterable of batches (tensor, tuple/list = positional args cut to
            ``forward``'s arity, dict = keyword args). Needed by static recipes only.
        example_inputs: one input (tensor, tuple of args or dict of kwargs) used to place the quantizers;
            defaults to the first calibration batch.
        num_batches: calibrate on at most this many batches.
        exclude: names / regexes kept float (added to the recipe's).
        overrides: ``{name | regex | type: QuantSpec | LayerSpec | Recipe | None}`` (merged over the recipe's).
        strict: raise :class:`~lowbit.errors.UnsupportedLayerError` if any layer or op is skipped for a
            reason the user did not ask for.
        progress: tqdm bar while calibrating.
        inplace: modify ``model`` instead of a copy.
        dfq: data-free quantization passes before capture (Nagel et al. 2019): ``True`` or
            :class:`~lowbit.passes.pipeline.DFQ` (cross-layer equalization, high-bias absorption, bias
            correction analytic/empirical). With ``calib_data=None`` and a static recipe the activation
            ranges come from the BatchNorm statistics too (``DFQ(act_num_std=, input_range=)``,
            :func:`~lowbit.passes.bn_ranges.bn_activation_ranges`), or with ``DFQ(act_range="distilled")``
            they are calibrated on inputs distilled from the BatchNorm statistics before folding (ZeroQ,
            :mod:`~lowbit.passes.distill`): the whole flow is data-free.
        adaround: learned weight rounding (Nagel et al. 2020), ``True`` or
            :class:`~lowbit.passes.AdaRoundConfig`; needs ``calib_data``. Each layer's rounding is
            learned on the grid the recipe gives it, and that grid's scale/zero point is set on the weight
            quantizer, so the quantized weight equals the AdaRounded weight exactly. ``act_spec=None``
            in the config means the recipe's static activation spec (per tensor) quantizes each
            layer's input during reconstruction. Order: fold BN -> CLE -> HBA -> bias correction
            (skipped when AdaRound is on) -> AdaRound -> capture -> calibrate. The passes' log is
            ``qmodel.lowbit_passes``.

    Returns:
        The quantized model (a ``torch.fx.GraphModule`` on the graph path, ``model``'s own class on the
        module-swap path), in eval mode, with ``lowbit.decision_log(qmodel)`` and
        ``lowbit.quant_table(qmodel)`` available.

    Raises:
        ConfigError: unknown exclude/override names (with close matches), bad recipe values.
        EmptyCalibrationError: a static recipe without data, or data that yields no batch.
        NonFiniteError: a calibration batch with NaN/Inf (names the batch).
        UnsupportedLayerError: an explicitly requested spec a layer cannot take; any skip with ``strict``.

    The tensor-level functions are :func:`lowbit.ops.quantize` / :func:`lowbit.ops.fake_quantize`.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"quantize() takes an nn.Module, got {type(model).__name__}; to quantize a tensor use "
            "lowbit.ops.quantize(x, scale, zero_point, spec) or lowbit.fake_quantize."
        )
    recipe = with_options(recipe, exclude=exclude, overrides=overrides)
    edge = recipe.edge_spec()
    plan = plan_passes(dfq, adaround)

    example = None
    if example_inputs is not None:
        example = _example_call(example_inputs, model)
    data_free = edge is not None and calib_data is None and plan.dfq is not None  # data-free activation ranges
    distilled = data_free and plan.dfq.act_range == "distilled"  # ... calibrated on distilled inputs (ZeroQ)
    bn_ranges = data_free and not distilled
    if edge is not None and not data_free:
        if calib_data is None:
            raise EmptyCalibrationError(
                f"{type(recipe).__name__} quantizes activations statically, so it needs calibration data: pass "
                "calib_data= (a DataLoader or any iterable of input batches), use W8A8Dynamic / a weight-only "
                "recipe, or dfq=DFQ(input_range=(lo, hi)) for ranges from the BatchNorm statistics."
            )
        first, calib_data = _peek(calib_data, model)
        example = example or first
    if data_free and example is None:
        raise EmptyCalibrationError(
            "data-free activation ranges (dfq= without calib_data) still need one input to place the quantizers: "
            "pass example_inputs= (its values are not used for any range, e.g. torch.zeros(1, 3, 224, 224))."
        )

    was_training = model.training
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    dlog = DecisionLog()

    weight_qparams, plog = {}, None
    if distilled:  # before BatchNorm folding: the distillation matches the BatchNorm statistics
        calib_data, note = distilled_calibration(work, plan.dfq, example, progress=progress)
        dlog.note(note)
    if plan.active:
        work, weight_qparams, plog, calib_data, example = _passes(work, recipe, plan, calib_data, example,
                                                                  num_batches, dlog, progress)
    stats = layer_bn_stats(work) if bn_ranges else None
    qmodel = _capture(work, recipe, dlog, example)
    if stats is not None:
        rlog = bn_activation_ranges(qmodel, stats, num_std=plan.dfq.act_num_std, input_range=plan.dfq.input_range,
                                    estimator=plan.dfq.act_range)
        plog += rlog
        dlog.note(f"{len(rlog)} activation range(s) from BatchNorm statistics (no calibration data)")
    if weight_qparams:
        for name in apply_weight_qparams(qmodel, weight_qparams):
            dlog.note(f"AdaRound qparams of {name} could not be set on its weight quantizer (re-quantized by min/max)")
    log.info("lowbit: capture path %s (%s): %d quantized, %d skipped", dlog.path, dlog.path_reason,
             len(dlog.quantized), len(dlog.skipped))
    if strict and dlog.unexpected_skips:
        raise UnsupportedLayerError(
            f"strict=True and {len(dlog.unexpected_skips)} layer(s)/op(s) were not quantized:\n"
            + "\n".join(f"  {d}" for d in dlog.unexpected_skips)
            + "\nExclude them explicitly (exclude=...) or pick a recipe they can take."
        )
    if not any(True for _ in quantizers(qmodel)):
        log.warning("lowbit: no layer was quantized by %s; the model is unchanged.", type(recipe).__name__)

    if any(q.needs_calibration and not q.is_calibrated for _, q in quantizers(qmodel)):
        n = calibrate(qmodel, calib_data, num_batches=num_batches, progress=progress)
        dlog.note(f"calibrated on {n} batch(es)")
    elif calib_data is not None:
        dlog.note(f"{type(recipe).__name__} needs no calibration; calib_data was not used")

    set_root_attr(qmodel, _LOG_ATTR, dlog)
    set_root_attr(qmodel, "lowbit_recipe", recipe)
    if plog is not None:
        set_root_attr(qmodel, "lowbit_passes", plog)
    if was_training and inplace:
        log.info("lowbit: the quantized model is in eval mode (BatchNorm folded).")
    return qmodel
