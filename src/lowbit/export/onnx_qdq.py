"""ONNX QDQ export of a lowbit quantized-simulation model, checked in ONNX Runtime.

``export_onnx(qmodel, example_inputs, "model.int8.onnx")`` writes the standard QDQ format: a
QuantizeLinear/DequantizeLinear pair on every quantized activation (from each ``TensorQuantizer``), integer
weight initializers -> DequantizeLinear (per-channel ``axis``; per-group ``block_size`` at opset 21) and,
where both operands come from constant scales, the bias as int32 at scale ``s_x * s_w`` (zero point 0).
ONNX Runtime's CPU provider fuses ``DQ -> Conv/Gemm/MatMul -> Q`` into QLinearConv / QGemm /
QLinearMatMul. Route: trace with ``torch.onnx.export(dynamo=False)`` while every active quantizer is a
placeholder node (its forward still computes the simulated value), then :mod:`._qdq_graph` turns the
placeholders into Q/DQ nodes with the quantizers' exact scales, zero points and codes.

With ``target="ort-cpu"`` (default) the QDQ graph then gets the exact rewrites of :mod:`._ort_cpu` that make
ONNX Runtime's CPU provider choose its fast integer kernels; ``target="qdq"`` keeps the plain form.

The opset is the lowest that expresses every format: 13 for int8/uint8 (per-channel DQ), 19 for fp8,
21 for int4/uint4/int16/uint16 and per-group weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from ..errors import ConfigError, EmptyCalibrationError, ExportError, ParityError, QuantizationError
from ..nn.layers import QuantLayerMixin
from ..nn.quantizer import TensorQuantizer
from . import _ort_cpu
from . import _qdq_graph as qg
from . import _simplify as sp
from ._io import check_output_path, write_replacing
from .verify import KernelCount, ParityReport, count_kernels, verify_export

log = logging.getLogger("lowbit")

__all__ = ["ExportResult", "export_onnx", "export_onnx_float", "export_onnx_dynamic", "as_input_tuple"]

_TORCH_MAX_OPSET = 20  # the TorchScript exporter's newest opset; 21 only widens Q/DQ types, so it is bumped after


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and what ONNX Runtime made of it.

    Attributes:
        path: the written file.
        opset: the ONNX opset of the default domain.
        kernels: integer / float compute kernels in ORT's optimized graph (:class:`KernelCount`).
        parity: simulated vs ORT comparison on the example inputs (None when ``verify=False``).
        biases_int32: how many biases were stored as int32 initializers.
    """

    path: Path
    opset: int
    kernels: KernelCount | None
    parity: ParityReport | None
    biases_int32: int = 0


def as_input_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` (a tensor or a tuple/list of tensors) as a tuple of tensors."""
    if torch.is_tensor(example_inputs):
        return (example_inputs,)
    if isinstance(example_inputs, tuple | list) and all(torch.is_tensor(t) for t in example_inputs):
        return tuple(example_inputs)
    raise ConfigError(
        f"example_inputs must be a tensor or a tuple of tensors (positional inputs), got {type(example_inputs).__name__}."
    )


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, tuple | list):
        return [t for o in out for t in _flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_outputs(o)]
    raise ExportError(f"the model returned a {type(out).__name__}; ONNX export needs tensors (or tuples/dicts of them).")


# ------------------------------------------------------------------------------ placeholders
class _Placeholder(torch.autograd.Function):
    """Identity-in-value (returns the simulated output) that exports as one ``lowbit::Q`` node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sim: torch.Tensor, key: int) -> torch.Tensor:  # noqa: ARG004
        return sim.clone()

    @staticmethod
    def symbolic(g, x, sim, key: int):  # noqa: ARG004
        out = g.op(f"{qg.DOMAIN}::Q", x, key_i=key)
        out.setType(x.type())
        return out


def _entries(model: nn.Module) -> list[tuple[TensorQuantizer, qg.QEntry]]:
    weight_of: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, QuantLayerMixin) and m.weight_quantizer is not None:
            weight_of[id(m.weight_quantizer)] = m.weight
    out, uncalibrated = [], []
    for _, q in ((n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer)):
        if not bool(q.quant_enabled):
            continue
        if q.needs_calibration and not q.is_calibrated:
            uncalibrated.append(q.name)
            continue
        if q.lsq_offset is not None:
            raise ExportError(
                f"{q.name}: the LSQ+ learnable offset is not an integer zero point; export after "
                "converting it (zero_point = round(-offset / scale)) or train with learn_offset=False."
            )
        role = "weight" if id(q) in weight_of else ("dynamic" if q.spec.dynamic else "activation")
        out.append((q, qg.QEntry(q.name, q.spec, q.scale.detach(), q.zero_point.detach(), role, weight_of.get(id(q)))))
    if uncalibrated:
        raise EmptyCalibrationError(
            f"{len(uncalibrated)} quantizer(s) were never calibrated: {', '.join(uncalibrated[:8])}; run "
            "calibration data through the model (lowbit.calibrate / lowbit.quantize) before exporting."
        )
    return out


@contextlib.contextmanager
def _placeholder_mode(model: nn.Module, pairs: list[tuple[TensorQuantizer, qg.QEntry]]) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, QuantLayerMixin) and m.weight_quantizer is not None]
    patched = []
    try:
        for key, (q, _) in enumerate(pairs):
            def fwd(x, _q=q, _key=key):
                state = torch._C._get_tracing_state()  # the simulated value is computed, not traced
                torch._C._set_tracing_state(None)
                try:
                    sim = type(_q).forward(_q, x)
                finally:
                    torch._C._set_tracing_state(state)
                return _Placeholder.apply(x, sim, _key)

            q.forward = fwd
            patched.append((q, "forward"))
        for m in layers:  # bypass the inference weight cache: the tracer must see the weight quantizer run
            m.quantized_weight = (lambda _m=m: _m.weight_quantizer(_m.weight))
            patched.append((m, "quantized_weight"))
        yield
    finally:
        for obj, attr in patched:
            obj.__dict__.pop(attr, None)


def _clear_weight_caches(model: nn.Module) -> None:
    for m in model.modules():
        m.__dict__.pop("_lowbit_wcache", None)


@contextlib.contextmanager
def _no_ir_dump():
    """Keep the TorchScript exporter from printing its whole IR graph (C++ output) when an export attempt fails.

    Its ``setup_onnx_logging`` tests the *function* ``_jit_is_onnx_log_enabled`` for truth (torch 2.14),
    so the ONNX log is switched on for every export, and a failed attempt then logs the full graph
    ("Torch IR graph at exception", thousands of lines for a transformer) - also for the lower opsets that
    :func:`export_onnx` tries first and retries past. The error itself still reaches the caller."""
    log_fn = getattr(torch._C, "_jit_onnx_log", None)
    if log_fn is None:
        yield
        return

    def quiet(*args):
        if not (args and str(args[0]).startswith("Torch IR graph at exception")):
            log_fn(*args)

    torch._C._jit_onnx_log = quiet
    try:
        yield
    finally:
        torch._C._jit_onnx_log = log_fn


def _check_input_dtypes(inputs: tuple[torch.Tensor, ...]) -> None:
    """Refuse floating example inputs other than float32: the exported graph's scales, QuantizeLinear inputs
    and parity check are float32 (integer inputs, e.g. token ids, are fine)."""
    for i, t in enumerate(inputs):
        if t.is_floating_point() and t.dtype != torch.float32:
            raise ConfigError(
                f"example input {i} is {t.dtype}; the ONNX export is float32: pass float32 inputs (x.float()) "
                "to a float32 model (model.float())."
            )


def _torch_export(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: str, opset: int,
                  dynamic_batch: bool, custom: bool) -> None:
    try:
        n_out = len(_flat_outputs(model(*inputs)))
    except QuantizationError:
        raise
    except Exception as e:  # a wrong shape, dtype or device of the example inputs
        raise ConfigError(
            f"the model cannot run on example_inputs ({type(e).__name__}: {str(e)[:300]}); pass inputs of the "
            "shapes, dtypes and device the model takes."
        ) from e
    in_names = [f"input_{i}" for i in range(len(inputs))]
    out_names = [f"output_{i}" for i in range(n_out)]
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    try:
        with warnings.catch_warnings(), _no_ir_dump():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is the one with symbolic()
            torch.onnx.export(
                model, inputs, path, dynamo=False, opset_version=opset, input_names=in_names,
                output_names=out_names, dynamic_axes=axes, do_constant_folding=True,
                custom_opsets={qg.DOMAIN: 1} if custom else None,
            )
    except Exception as e:  # the tracer's own errors: say what to do rather than a deep stack
        raise ExportError(
            f"torch.onnx.export could not trace the model: {type(e).__name__}: {str(e)[:400]}. The exporter needs "
            "a traceable forward (no data-dependent Python control flow on tensor values)."
        ) from e


def _simplify(model: onnx.ModelProto) -> None:
    """Fold the tracer's shape arithmetic (static padding, ``view(x.size(0), -1)``, a transformer's per-layer
    ``Shape -> Gather -> Concat -> Reshape``) into constants; dimension 0 stays dynamic."""
    sp.constants_to_initializers(model)
    sp.fold_constants(model)
    sp.fold_static_shapes(model)
    sp.batch_reshape_to_constant(model)
    sp.remove_dead_nodes(model)


def _feeds(inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """The example inputs under the names :func:`_torch_export` gives them."""
    return {f"input_{i}": t.detach().cpu().numpy() for i, t in enumerate(inputs)}


def _save(model: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:  # a bug of ours, not the user's: keep the details
        raise ExportError(f"the exported graph failed the ONNX checker: {e}") from e
    write_replacing(path, lambda tmp: onnx.save(model, str(tmp)))


def _write_qdq(qmodel: nn.Module, inputs: tuple[torch.Tensor, ...], out_path: Path, opset: int | None,
               dynamic_batch: bool, target: str) -> tuple[list[tuple[TensorQuantizer, qg.QEntry]], int, int]:
    """The export proper of :func:`export_onnx` (``qmodel`` in eval mode): writes ``out_path``; returns
    (quantizers with their entries, the opset, the number of int32 biases)."""
    pairs = _entries(qmodel)
    entries = [e for _, e in pairs]
    need = max([13, *(qg.required_opset(e) for e in entries)])
    if opset is not None and opset < need:
        raise ConfigError(f"opset {opset} cannot express this model's formats; it needs opset >= {need}.")
    tries = [opset] if opset is not None else sorted({need, max(need, 17), max(need, _TORCH_MAX_OPSET)})
    for e in entries:
        if e.role == "activation" and e.spec.format.name == "int8":
            log.info("lowbit: %s uses int8 activations; uint8 (U8S8) runs faster in ORT on x86.", e.name)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        for i, opset in enumerate(tries):  # the lowest opset first; newer ones when an operator needs them
            try:
                with _placeholder_mode(qmodel, pairs):
                    _clear_weight_caches(qmodel)
                    _torch_export(qmodel, inputs, raw, min(opset, _TORCH_MAX_OPSET), dynamic_batch, custom=True)
                break
            except ExportError as e:
                if i + 1 == len(tries) or "UnsupportedOperatorError" not in str(e):
                    raise
                log.info("lowbit: opset %d cannot express an operator of the model; trying %d", opset, tries[i + 1])
            finally:
                _clear_weight_caches(qmodel)
        model = onnx.load(raw)
    qg.materialize(model, entries)
    _simplify(model)
    qg.resolve_identity_initializers(model)
    qg.remove_noop_casts(model)
    sp.quantize_before_pad(model)  # first: moving a Pad can put a Relu / Clip right before a QuantizeLinear
    sp.drop_clamp_before_quantize(model)
    sp.clamp_to_max_min_before_wide_quantize(model)
    qg.requantize_compute_inputs(model)
    n_bias = qg.quantize_biases(model)
    if target == "ort-cpu":
        log.info("lowbit: ONNX Runtime CPU rewrites: %s", _ort_cpu.optimize_for_ort_cpu(model, _feeds(inputs)))
        sp.remove_dead_nodes(model)
    qg.remove_unused_initializers(model)
    sp.remove_orphan_value_info(model)
    qg.set_opset(model, opset)
    _save(model, out_path)
    log.info("lowbit: wrote %s (opset %d, %d quantizers, %d int32 biases)", out_path, opset, len(entries), n_bias)
    return pairs, opset, n_bias


@torch.no_grad()
def export_onnx(
    qmodel: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    opset: int | None = None,
    verify: bool = True,
    dynamic_batch: bool = True,
    min_fraction: float = 0.99,
    min_cosine: float = 0.999,
    target: str = "ort-cpu",
) -> ExportResult:
    """Write ``qmodel`` as a QDQ ONNX model, run it in ONNX Runtime and check it against the simulation.

    Args:
        qmodel: a lowbit quantized-simulation model (``lowbit.quantize`` output or hand-built layers).
        example_inputs: a tensor or tuple of tensors, the model's positional inputs (float32).
        path: output ``.onnx`` file; its directory must exist.
        overwrite: replace an existing file.
        opset: ONNX opset; default the lowest that expresses every format (13 int8/uint8, 19 fp8,
            21 int4/uint4/int16/per-group), raised to 17 or 20 when the model has an operator the lower
            opset lacks (``scaled_dot_product_attention`` needs 14). A lower explicit opset than the
            formats need is a ConfigError.
        verify: load in ORT (CPU provider), compare outputs in output quantization steps and count the
            integer kernels in ORT's optimized graph.
        dynamic_batch: make dimension 0 of inputs and outputs symbolic.
        min_fraction: the parity tolerance: at least this fraction of outputs within one output step (0:
            report the parity in the result, never raise).
        min_cosine: for outputs without a quantization scale (float), the alternative tolerance: every
            row's cosine similarity to the simulation at least this (see :func:`verify_parity`).
        target: ``"ort-cpu"`` (default) also applies the exact rewrites of :mod:`._ort_cpu` that make ONNX
            Runtime's CPU provider pick its fast integer kernels (stem convolutions padded to 4 input
            channels; dynamic Linear layers as ``MatMulInteger`` so ORT fuses the bias) and fuses each
            transformer attention block into ORT's contrib ``MultiHeadAttention`` (float32, the same math;
            :mod:`._attention`); ``"qdq"`` writes
            the plain QDQ form (for runtimes that match DQ -> op -> Q themselves, e.g. TensorRT, and for
            :class:`lowbit.runtime.IntegerRuntime`). Outputs are identical either way (the attention
            fusion: bit-identical on the x86 machine of docs/benchmarks.md, tested to float32 rounding).

    Returns:
        :class:`ExportResult`.

    Raises:
        ExportError: a quantizer ONNX cannot express (named), an untraceable model, a missing directory.
        FileExistsRefusedError: ``path`` exists and ``overwrite`` is False.
        EmptyCalibrationError: an uncalibrated quantizer.
        ParityError: ORT disagrees with the simulation beyond the tolerance (see :func:`verify_parity`); the
            written file stays at ``path`` (the message says so) for inspection.
    """
    if target not in _ort_cpu.TARGETS:
        raise ConfigError(f"target must be one of {', '.join(map(repr, _ort_cpu.TARGETS))}, got {target!r}.")
    if not 0.0 <= min_fraction <= 1.0 or not -1.0 <= min_cosine <= 1.0:
        raise ConfigError(f"min_fraction must be in [0, 1] and min_cosine in [-1, 1], got {min_fraction} and "
                          f"{min_cosine}; they are the share of outputs within one step and a cosine similarity "
                          "(min_fraction=0: report the parity, never raise).")
    out_path = check_output_path(path, overwrite)
    inputs = as_input_tuple(example_inputs)
    _check_input_dtypes(inputs)
    was_training = qmodel.training
    qmodel.eval()
    try:
        pairs, opset, n_bias = _write_qdq(qmodel, inputs, out_path, opset, dynamic_batch, target)
    finally:
        qmodel.train(was_training)
    if not verify:
        return ExportResult(out_path, opset, None, None, n_bias)
    kernels = count_kernels(out_path)
    # in ORT's arithmetic (lowbit.nn.ort_arithmetic); dynamic quantizers stage by stage (verify_export)
    try:
        parity = verify_export(qmodel, inputs, out_path, quantizers=[q for q, _ in pairs],
                               min_fraction=min_fraction, min_cosine=min_cosine)
    except ParityError as e:
        raise ParityError(f"{e} The file is left at {out_path} for inspection; it does not compute what the "
                          "simulation computes: do not deploy it.") from e
    return ExportResult(out_path, opset, kernels, parity, n_bias)


@torch.no_grad()
def export_onnx_float(
    model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, overwrite: bool = False,
    opset: int = 17, dynamic_batch: bool = True, target: str = "ort-cpu",
) -> Path:
    """Write the float model as ONNX (the baseline the int8 export is compared with), with the same exact
    shape simplifications as :func:`export_onnx` and, for ``target="ort-cpu"`` (default), the same
    attention fusion (ORT's ``MultiHeadAttention``, :mod:`._attention`), so a speed comparison measures the
    integer kernels, not a difference in graph clean-up. ``target="qdq"`` keeps standard ONNX operators
    only. Returns the path."""
    if target not in _ort_cpu.TARGETS:
        raise ConfigError(f"target must be one of {', '.join(map(repr, _ort_cpu.TARGETS))}, got {target!r}.")
    out_path = check_output_path(path, overwrite)
    inputs = as_input_tuple(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "raw.onnx")
            _torch_export(model, inputs, raw, opset, dynamic_batch, custom=False)
            graph = onnx.load(raw)
    finally:
        model.train(was_training)
    _simplify(graph)
    if target == "ort-cpu":
        log.info("lowbit: ONNX Runtime CPU rewrites (float): %s", _ort_cpu.optimize_float_for_ort_cpu(graph, _feeds(inputs)))
        sp.remove_dead_nodes(graph)
    qg.remove_unused_initializers(graph)
    sp.remove_orphan_value_info(graph)
    _save(graph, out_path)
    return out_path


def export_onnx_dynamic(
    model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, overwrite: bool = False,
    per_channel: bool = True, op_types: tuple[str, ...] = ("MatMul", "Gemm"), target: str = "ort-cpu",
) -> Path:
    """Write a dynamically quantized ONNX model for Linear-heavy models (transformers): the float export
    passed through ONNX Runtime's ``quantize_dynamic`` (int8 weights, uint8 activations quantized per
    batch by DynamicQuantizeLinear, MatMulInteger). Only MatMul/Gemm by default: dynamic ConvInteger
    is slower than float convolutions in ORT. With ``target="ort-cpu"`` (default) the attention blocks are
    then fused as in :func:`export_onnx_float` (after ``quantize_dynamic``, whose shape inference cannot
    type contrib operators). Returns the path."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if target not in _ort_cpu.TARGETS:
        raise ConfigError(f"target must be one of {', '.join(map(repr, _ort_cpu.TARGETS))}, got {target!r}.")
    out_path = check_output_path(path, overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "float.onnx"
        export_onnx_float(model, example_inputs, raw, target="qdq")
        dst = Path(tmp) / "dyn.onnx"
        quantize_dynamic(str(raw), str(dst), op_types_to_quantize=list(op_types), per_channel=per_channel,
                         weight_type=QuantType.QInt8)
        if target == "ort-cpu":
            graph = onnx.load(str(dst))
            feeds = _feeds(as_input_tuple(example_inputs))
            log.info("lowbit: ONNX Runtime CPU rewrites (dynamic): %s", _ort_cpu.optimize_float_for_ort_cpu(graph, feeds))
            sp.remove_dead_nodes(graph)
            qg.remove_unused_initializers(graph)
            _save(graph, dst)
        os.replace(dst, out_path)
    return out_path
