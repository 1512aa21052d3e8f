"""The flows behind the ``lowbit`` command line, usable from Python too.

Each flow takes plain values (strings for MODEL and DATA, see :mod:`lowbit.loading`), composes
:func:`lowbit.quantize`, the passes, the exporters and the report, and returns a frozen result::

    from lowbit.workflows import run_quantize
    summary = run_quantize("torchvision:resnet18", calib="images/", out_dir="out")
    print(summary.table())

Figures: *size* is the bytes the weights take at the precision they are stored in (fp32 for float
tensors; ``ceil(numel * bits / 8)`` plus one fp32 scale and, for affine formats, one zero point per
block for quantized weights); *latency* is the median of ``iters`` timed runs after ``warmup``
runs, in milliseconds per batch, with ``torch.get_num_threads()`` threads for both PyTorch and ONNX
Runtime.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import recipes as R
from .errors import (
    ConfigError,
    DataNotFoundError,
    EmptyCalibrationError,
    ExportError,
    FileExistsRefusedError,
    ParityError,
    QuantizationError,
    ShapeMismatchError,
    check_finite,
)
from .loading import LoadedData, LoadedModel, load_data, load_model
from .report.data import ResultRow

log = logging.getLogger("lowbit.workflows")

__all__ = [
    "RECIPE_NAMES", "make_recipe", "prepare_out_dir", "quantized_size_bytes", "float_size_bytes", "time_ms",
    "Summary", "run_quantize", "EvalSummary", "run_eval", "BenchRow", "run_bench", "run_inspect", "run_explain",
    "DemoResult", "run_demo", "format_rows",
]

RECIPE_NAMES: dict[str, str] = {
    "w8a8": "int8 per-channel weights, uint8 per-tensor static activations (calibrated)",
    "w8a8-dynamic": "int8 per-channel weights, activations quantized per batch (Linear layers only)",
    "w8a16": "int8 per-channel weights, int16 activations",
    "w4a8": "uint4 per-channel weights with a zero point (first/last layer int8), uint8 static activations; "
            "add --adaround",
    "w4a16": "weight-only int4, groups of 128 input channels (affine)",
    "w4-g32": "weight-only int4, groups of 32 input channels (affine)",
    "w4": "weight-only int4 per output channel (affine), first/last layer int8",
    "fp8": "fp8 e4m3 weights (per channel) and activations (per tensor)",
    "fp16": "fp16 casts of weights and activations",
    "bf16": "bf16 casts of weights and activations",
}


def make_recipe(name: str, calibrator: str = "minmax") -> R.Recipe:
    """The preset called ``name`` (a key of :data:`RECIPE_NAMES`); ``calibrator`` sets the activation range
    method of static recipes (``"minmax"``, ``"kl"``, ``"percentile"``, ``"mse"``, ``"moving_average"``).

    >>> make_recipe("w8a8", "kl").activation_spec().calibrator.name
    'kl'
    """
    from .calibration.config import as_calibrator

    as_calibrator(calibrator)  # validates the name
    key = name.strip().lower()
    table: dict[str, Callable[[], R.Recipe]] = {
        "w8a8": lambda: R.W8A8(calibrator=calibrator),
        "w8a8-dynamic": lambda: R.W8A8Dynamic(),
        "w8a16": lambda: R.W8A16(calibrator=calibrator),
        "w4a8": lambda: R.W4A8(calibrator=calibrator),
        "w4a16": lambda: R.W4A16(),
        "w4-g32": lambda: R.WeightOnly(bits=4, group_size=32),
        "w4": lambda: R.WeightOnly(bits=4, keep_first_last_8bit=True),
        "fp8": lambda: R.FP8(calibrator=calibrator),
        "fp16": lambda: R.FP16(),
        "bf16": lambda: R.BF16(),
    }
    if key not in table:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPE_NAMES)}.")
    return table[key]()


def _check_out_dir(path: str | Path, overwrite: bool) -> Path:
    """The checks of :func:`prepare_out_dir`, changing nothing on disk."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"output path {p} is a file; pass a folder name for --out.")
    parent = next((q for q in p.absolute().parents if q.exists()), None)
    if not p.exists() and parent is not None and not parent.is_dir():
        raise ConfigError(f"cannot create the output folder {p}: {parent} is a file; pass another --out folder.")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise FileExistsRefusedError(
            f"output folder {p} already exists and is not empty; pass --overwrite to replace its contents "
            "or choose another --out folder."
        )
    return p


def prepare_out_dir(path: str | Path, overwrite: bool) -> Path:
    """Create ``path`` (parents too). An existing non-empty folder is refused unless ``overwrite``, in
    which case its contents are removed first. Raises :class:`FileExistsRefusedError` / ConfigError."""
    p = _check_out_dir(path, overwrite)
    try:
        if p.is_dir():
            for child in p.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot prepare the output folder {p} ({e.strerror or e}); pass a folder you can write "
                          "to as --out.") from None
    return p


# ------------------------------------------------------------------------------------------- figures
def float_size_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer of ``model`` at its own dtype."""
    from .zoo.metrics import model_size_bytes

    return model_size_bytes(model)


def quantized_size_bytes(qmodel: nn.Module) -> int:
    """Deployed bytes of a :func:`lowbit.quantize` model (:func:`lowbit.capture.readback.deployed_size_bytes`)."""
    from .capture.readback import deployed_size_bytes

    return deployed_size_bytes(qmodel)


def time_ms(fn: Callable[[], Any], warmup: int = 2, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _torch_latency(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    with torch.no_grad():
        return time_ms(lambda: model(x), iters=iters)


def _ort_latency(path: Path, x: torch.Tensor, iters: int) -> float:
    from .export.verify import make_session

    sess = make_session(path, threads=torch.get_num_threads())
    name = sess.get_inputs()[0].name
    arr = x.numpy()
    return time_ms(lambda: sess.run(None, {name: arr}), iters=iters)


def _bytes(n: int) -> str:
    for div, unit in ((1e6, "MB"), (1e3, "kB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def format_rows(rows: Sequence[ResultRow], title: str = "") -> str:
    """A text table, one line per variant: each metric, size (MB, ratio to float) and latency (ms)."""
    variants: list[str] = []
    metrics: list[str] = []
    for r in rows:
        variants += [r.variant] if r.variant not in variants else []
        metrics += [r.metric] if r.metric not in metrics else []
    val = {(r.variant, r.metric): r for r in rows}
    size = {r.variant: r.size_bytes for r in rows if r.size_bytes is not None}
    lat = {r.variant: r.latency_ms for r in rows if r.latency_ms is not None}
    ref_size = size.get(variants[0]) if variants else None
    header = ["variant", *metrics, "size", "latency"]
    table = [header]
    for v in variants:
        cells = [v]
        for m in metrics:
            r = val.get((v, m))
            cells.append("-" if r is None or r.value is None or math.isnan(r.value) else f"{r.value:.4f}")
        s = size.get(v)
        cells.append("-" if s is None else _bytes(s) + (f" ({ref_size / s:.1f}x)" if ref_size and v != variants[0] else ""))
        la = lat.get(v)
        cells.append("-" if la is None else f"{la:.1f} ms")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [title] if title else []
    for i, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- data
def _resolve_data(loaded: LoadedModel, data: str | None, what: str) -> LoadedData:
    spec = data or loaded.default_data
    if spec is None:
        raise ConfigError(f"{loaded.name} has no built-in data: pass {what} DATA (an image folder, a .npy/.npz file, "
                          "or imagenet-samples / foolbox-imagenet / fashion-mnist).")
    return load_data(spec, loaded.preprocess)


def _batches(ds: LoadedData, batch_size: int, num_batches: int | None, labels: bool = False) -> list:
    """The first ``num_batches`` batches of ``ds``: input tensors, or ``(x, y)`` with ``labels``. Raises
    :class:`ModelFileError` for a file that cannot be read (an image that does not decode),
    :class:`NonFiniteError` for NaN/Inf inputs, :class:`EmptyCalibrationError` for no samples."""
    from .zoo.data import loader

    out = []
    for b in loader(ds.dataset, batch_size=batch_size):  # an unreadable image: ModelFileError from the data set
        check_finite(b[0], f"the inputs of batch {len(out)} of {ds.name}")
        out.append((b[0], b[1]) if labels and len(b) > 1 else b[0])
        if num_batches is not None and len(out) >= num_batches:
            break
    if not out:
        raise EmptyCalibrationError(f"the data {ds.name} holds no samples; give at least one.")
    return out


def _inputs(batch) -> torch.Tensor:
    """The input tensor of a :func:`_batches` entry (``x``, or ``(x, y)`` with labels)."""
    return batch[0] if isinstance(batch, tuple) else batch


def _check_fit(model: nn.Module, name: str, batches: list, data_name: str) -> None:
    """Run ``model`` on the first batch: a ShapeMismatchError that says what to fix when the data does not fit
    the model (shape, dtype, a .pt2 exported for a fixed batch size), and a ConfigError for labels that are
    not class indices of the model's output (then top-1 would silently be 0)."""
    x = _inputs(batches[0])
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        hint = (" A .pt2 program takes only the batch size it was exported with unless exported with "
                "dynamic_shapes: re-export it, or pass --batch-size." if name.endswith(".pt2") else "")
        raise ShapeMismatchError(
            f"{name} fails on the first batch of {data_name} (inputs {x.dtype} of shape {tuple(x.shape)}): "
            f"{type(e).__name__}: {str(e)[:300]}. DATA must hold the model's preprocessed inputs, float32 and "
            f"shaped (N, *input shape).{hint}"
        ) from None
    ys = [b[1] for b in batches if isinstance(b, tuple)]
    if not ys or not torch.is_tensor(out) or out.dim() != 2:
        return
    y = torch.cat([torch.as_tensor(v).reshape(-1) for v in ys])
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= out.shape[1]:
        raise ConfigError(
            f"the labels of {data_name} run from {lo} to {hi}, but {name} outputs {out.shape[1]} classes (0.."
            f"{out.shape[1] - 1}); give labels that are the model's class indices (an image folder's classes are "
            "its sorted subfolders), or data without labels."
        )


def _metric_rows(variant: str, res, size: int | None, latency: float | None) -> list[ResultRow]:
    rows = []
    if res.top1 is not None:
        rows.append(ResultRow(variant, "top1", res.top1, size, latency))
    if res.agreement is not None:
        rows.append(ResultRow(variant, "agreement", res.agreement, size, latency))
    rows.append(ResultRow(variant, "cosine", res.cosine, size, latency))
    return rows


def _float_rows(res, size: int, latency: float | None) -> list[ResultRow]:
    rows = []
    if res.float_top1 is not None:
        rows.append(ResultRow("float", "top1", res.float_top1, size, latency))
    if res.agreement is not None:
        rows.append(ResultRow("float", "agreement", 1.0, size, latency))
    rows.append(ResultRow("float", "cosine", 1.0, size, latency))
    return rows


# ------------------------------------------------------------------------------------------- quantize
@dataclass(frozen=True)
class Summary:
    """What ``lowbit quantize`` did. ``files`` maps a role (``"onnx"``, ``"checkpoint"``, ``"spec"``,
    ``"report"``, ``"summary"``) to the written path; ``results`` the measured rows; ``warnings`` anything
    the user should read (an export that failed, a parity problem, a mixed-precision budget not met);
    ``calibrator`` what set the activation ranges (``"kl"``, ``"data-free (bn ranges)"``); ``extra``'s
    ``latency_basis`` / ``metrics_basis`` say how the figures were measured (printed under the table)."""

    model: str
    recipe: str
    calibrator: str
    out_dir: str
    files: dict[str, str]
    results: tuple[ResultRow, ...]
    quantized: int
    skipped: tuple[tuple[str, str], ...]
    passes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "recipe": self.recipe, "calibrator": self.calibrator, "out_dir": self.out_dir,
                "files": dict(self.files), "results": [r.to_dict() for r in self.results],
                "quantized_layers": self.quantized, "skipped": [list(s) for s in self.skipped],
                "passes": list(self.passes), "warnings": list(self.warnings), "seconds": round(self.seconds, 2),
                **self.extra}

    def table(self) -> str:
        """The results table, titled ``MODEL - RECIPE (CALIBRATOR)`` (``MODEL - RECIPE data-free (...)``), then
        the latency and metrics basis."""
        basis = [self.extra[k] for k in ("latency_basis", "metrics_basis") if self.extra.get(k)]
        cal = self.calibrator if self.calibrator.startswith("data-free") else f"({self.calibrator})"
        return "\n".join([format_rows(self.results, f"{self.model} - {self.recipe} {cal}"), *basis])


def _save_checkpoint(qmodel: nn.Module, out: Path, meta: dict[str, Any], example: torch.Tensor) -> tuple[Path, Path]:
    """``model.safetensors`` via :func:`lowbit.save` (loadable with :func:`lowbit.load`) and a readable
    ``quant_spec.json`` table of every quantized tensor."""
    from .capture.readback import quant_table
    from .export import save

    ckpt = save(qmodel, out / "model.safetensors", overwrite=True, example_inputs=example)
    table = [{"tensor": r.name, "module": r.module, "role": r.role, "spec": str(r.spec),
              "format": r.spec.format.name, "symmetric": r.spec.symmetric, "granularity": str(r.spec.granularity),
              "scale_shape": list(r.scale.shape)} for r in quant_table(qmodel)]
    spec_path = out / "quant_spec.json"
    spec_path.write_text(json.dumps({**meta, "tensors": table}, indent=1))
    return ckpt, spec_path


def _check_data_free(mode: str, input_range, adaround: bool, mixed: bool) -> None:
    if mode not in ("bn", "distilled"):
        raise ConfigError(f"data_free must be 'bn' or 'distilled', got {mode!r}.")
    if input_range is None:
        raise ConfigError("--data-free needs --input-range=LO,HI: the range of the model's (preprocessed) input "
                          "values, which no data is there to measure (e.g. -1,1 for EfficientNet-Lite0's inputs).")
    if adaround or mixed:
        raise ConfigError("--data-free cannot be combined with --adaround or mixed precision: both learn or measure "
                          "on the calibration data.")


def _calibrator_label(calibrator: str, data_free: str | None, rec: R.Recipe) -> str:
    """What set the activation ranges, for the table title and summary.json: the calibrator's name, or how a
    data-free run got them (``--calibrator`` plays no part in BatchNorm ranges)."""
    if data_free is None:
        return calibrator
    if rec.edge_spec() is None:
        return "data-free (no static activation ranges)"
    return "data-free (bn ranges)" if data_free == "bn" else f"data-free (distilled inputs, {calibrator})"


def _run_batch(model: nn.Module, batches: list) -> tuple[torch.Tensor, bool]:
    """The input that latency, ONNX export and the checkpoint's example use, and whether the batch size is
    fixed: one sample, or the whole first batch when ``model`` fails on one sample although it ran on that
    batch (a .pt2 exported without ``dynamic_shapes`` takes only its export batch size)."""
    x = _inputs(batches[0])
    if len(x) == 1:
        return x, False
    try:
        with torch.no_grad():
            model(x[:1])
    except Exception:  # the first batch ran (_check_fit): the batch size is part of the program
        return x, True
    return x[:1], False


def _full_batches(batches: list, size: int, name: str) -> tuple[list, str]:
    """The batches of exactly ``size`` samples (a fixed-batch model cannot run a shorter last batch) and a note."""
    keep = [b for b in batches if len(_inputs(b)) == size]
    left = sum(len(_inputs(b)) for b in batches) - size * len(keep)
    return keep, (f"{name} takes batches of exactly {size} samples (exported without dynamic_shapes): latency and "
                  f"ONNX export at batch {size}" + (f"; the last {left} sample(s) were left out" if left else ""))


def _onnx_name(qmodel: nn.Module) -> str:
    """``model_int8.onnx`` when every quantized activation (static edge or dynamic input) is an 8-bit integer,
    else ``model_quantized.onnx`` (weight-only, int16 or fp8 activations, fp16/bf16 casts)."""
    from .capture.readback import quant_table

    acts = [r.spec.format for r in quant_table(qmodel) if r.role != "weight"]
    return "model_int8.onnx" if acts and all(f.is_integer and f.bits == 8 for f in acts) else "model_quantized.onnx"


@dataclass(frozen=True)
class _Latency:
    """Median ms per batch of ``batch`` samples: PyTorch eager fp32, and ONNX Runtime fp32 / quantized."""

    batch: int
    fixed: bool
    eager: float
    float_ort: float | None = None
    quant_ort: float | None = None

    def note(self, variant: str, exported: bool) -> str:
        """The basis of the latency column: both figures in ONNX Runtime, the eager time as an extra."""
        fixed = " (the batch size the model was exported with)" if self.fixed else ""
        head = f"latency: batch {self.batch}{fixed}, median of 10 runs, {torch.get_num_threads()} thread(s); "
        eager = f"PyTorch eager fp32 {self.eager:.2f} ms (not compared)"
        if not exported:
            return head + f"not measured in ONNX Runtime (--no-export); {eager}"
        f = "fp32 in ONNX Runtime" if self.float_ort is not None else "fp32 not timed (no float ONNX)"
        q = (f"{variant} in ONNX Runtime" if self.quant_ort is not None else f"{variant} not timed (no ONNX file)")
        speed = (f"; ORT {variant} over ORT fp32: {self.float_ort / self.quant_ort:.2f}x"
                 if self.float_ort and self.quant_ort else "")
        return head + f"float {f}, {q}{speed}; {eager}"


def _export_and_time(qmodel: nn.Module, float_model: nn.Module, x: torch.Tensor, onnx_path: Path, lat: _Latency,
                     files: dict[str, str], notes: list[str], warnings: list[str]) -> _Latency:
    """Write the quantized ONNX file (QDQ, checked in ONNX Runtime) and time it and the float model, both in
    ONNX Runtime on ``x`` (the float model through a temporary fp32 export, as ``lowbit bench`` does). A
    failed export is a warning: the checkpoint and report are still written."""
    from .export import export_onnx

    dynamic = not lat.fixed
    q_lat = f_lat = None
    try:
        er = export_onnx(qmodel, x, onnx_path, overwrite=True, dynamic_batch=dynamic)
        files["onnx"] = str(onnx_path)
        if er.kernels is not None:
            notes.append(f"ONNX: {er.kernels}")
        if er.parity is not None:
            notes.append(f"ONNX Runtime vs simulation: {er.parity.fraction_within:.4f} of outputs within one "
                         f"step (max {er.parity.max_steps:.2f} steps)")
        q_lat = _ort_latency(onnx_path, x, iters=10)
    except ParityError as e:
        files["onnx"] = str(onnx_path)
        warnings.append(f"ONNX export written but ONNX Runtime disagrees with the simulation: {e}")
    except (ExportError, QuantizationError) as e:
        warnings.append(f"no ONNX file: {e}")
    f_lat = _float_ort_latency(float_model, x, dynamic, warnings)
    return replace(lat, float_ort=f_lat, quant_ort=q_lat)


def _float_ort_latency(float_model: nn.Module, x: torch.Tensor, dynamic: bool, warnings: list[str]) -> float | None:
    """Median ms of ``float_model`` on ``x`` in ONNX Runtime, through a temporary fp32 export (the baseline
    a quantized ONNX file is compared with); None, and a warning, when the float export fails."""
    import tempfile

    from .export import export_onnx_float

    try:
        with tempfile.TemporaryDirectory() as tmp:
            fpath = export_onnx_float(float_model, x, Path(tmp) / "model_fp32.onnx", dynamic_batch=dynamic)
            return _ort_latency(fpath, x, iters=10)
    except QuantizationError as e:
        warnings.append(f"float model not timed in ONNX Runtime (its fp32 export failed): {e}")
        return None


def _metrics_note(data_name: str, n: int, data_free: bool) -> str:
    """Which data the float-vs-quantized metrics were measured on (``quantize`` takes no evaluation data)."""
    what = ("the --calib data (not used to quantize: data-free)" if data_free else
            "the calibration data (no separate evaluation data is given to quantize)")
    return (f"metrics: measured on {what}, {n} samples of {data_name}; they show how far quantization moved the "
            "outputs, not accuracy on held-out data (`lowbit eval MODEL --quantized DIR --data HELD_OUT`)")


def run_quantize(
    model: str,
    *,
    out_dir: str | Path,
    recipe: str = "w8a8",
    calibrator: str = "minmax",
    calib: str | None = None,
    num_batches: int = 32,
    batch_size: int = 8,
    dfq: bool = False,
    adaround: bool = False,
    adaround_iters: int = 200,
    adaround_granularity: str = "layer",
    adaround_qdrop: float = 0.0,
    overwrite: bool = False,
    weights: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    export: bool = True,
    progress: bool = True,
    mixed: Sequence[str] = (),
    size_budget: str | None = None,
    min_sqnr: float | None = None,
    data_free: str | None = None,
    input_range: tuple[float, float] | None = None,
    distill_iters: int = 50,
    distill_label_weight: float = 0.0,
) -> Summary:
    """Quantize MODEL with a preset and write ``model_int8.onnx`` (QDQ, checked in ONNX Runtime; named
    ``model_quantized.onnx`` unless every quantized activation is an 8-bit integer),
    ``model.safetensors`` + ``quant_spec.json`` (the quantized-simulation state and every tensor's spec),
    ``report.html`` and ``summary.json`` into ``out_dir``. No file is written before the model is
    quantized, compared and the report's statistics are gathered, so a failure there leaves no partial output.

    With ``mixed`` (more preset names, less precise than ``recipe``), each layer gets one of ``recipe`` and
    ``mixed`` by :func:`lowbit.mixed_precision.search_mixed_precision` under ``size_budget`` (bytes or
    ``"3.5MB"``) and/or ``min_sqnr`` (output SQNR in dB on the calibration batches); the per-layer choice
    and sensitivities go to ``mixed_precision.txt``.

    With ``data_free`` (``"bn"`` or ``"distilled"``) no data is used to quantize: DFQ weights, and activation
    ranges from the BatchNorm statistics or from inputs distilled from them
    (``DFQ(act_range="std" | "distilled", input_range=input_range, distill=DistillConfig(iters=distill_iters,
    label_weight=distill_label_weight))``, ``calib_data=None``); the data only feeds the comparison below.

    The float and quantized models are compared on the calibration batches (top-1 when the data has
    labels, else top-1 agreement and cosine), so the figures say how far quantization moved the outputs,
    not how well the model generalises; use :func:`run_eval` on held-out data for that. Latency: both
    models in ONNX Runtime (the float one through a temporary fp32 export), at batch 1, or at the batch
    size of the data when the model takes only that one (a .pt2 exported without ``dynamic_shapes``; a
    shorter last batch is then left out); PyTorch eager fp32 only as a labelled extra in the notes.

    Raises:
        FileExistsRefusedError: ``out_dir`` is not empty and ``overwrite`` is False (checked first).
        ConfigError / DataNotFoundError / ModelFileError: bad arguments, files or models.
    """
    from . import api
    from .report import write_report
    from .report.build import build_report_data
    from .zoo.evaluate import compare

    t0 = time.perf_counter()
    rec = make_recipe(recipe, calibrator)
    if num_batches < 1 or batch_size < 1:
        raise ConfigError("--num-batches and --batch-size must be at least 1.")
    _check_out_dir(out_dir, overwrite)
    if mixed and size_budget is None and min_sqnr is None:
        raise ConfigError("--mixed chooses each layer's recipe under a limit: add --size-budget SIZE and/or "
                          "--min-sqnr DB.")
    if data_free is not None:
        _check_data_free(data_free, input_range, adaround, bool(mixed or size_budget is not None or min_sqnr is not None))
    loaded = load_model(model, weights, input_shape)
    ds = _resolve_data(loaded, calib, "--calib")
    labelled = _batches(ds, batch_size, num_batches, labels=True)
    _check_fit(loaded.model, model, labelled, ds.name)
    float_model = loaded.model
    x_run, fixed = _run_batch(float_model, labelled)
    notes: list[str] = []
    if fixed:
        labelled, note = _full_batches(labelled, len(x_run), model)
        notes.append(note)
    calib_x = [_inputs(b) for b in labelled]
    out = prepare_out_dir(out_dir, overwrite)  # after loading: the inputs may live in the folder it clears
    use = "calibration" if data_free is None else "comparison only (quantized data-free)"
    notes.insert(0, f"{use}: {sum(len(x) for x in calib_x)} samples from {ds.name} "
                    f"({len(calib_x)} batch(es) of {batch_size})")
    warnings: list[str] = []
    if isinstance(rec, R.W4A8) and not adaround:
        warnings.append("w4a8 without --adaround rounds 4-bit weights to nearest, which collapses most CNNs "
                        "(EfficientNet-Lite0: 14 % top-1); add --adaround (e.g. --adaround-iters 1500 "
                        "--adaround-granularity block --adaround-qdrop 0.5).")
    mixed_table = None
    dfq = dfq or data_free is not None
    passes = [name for name, on in (("dfq", dfq), ("adaround", adaround)) if on]
    if adaround and not any(s.format.is_integer for s in [rec.weight_spec(nn.Conv2d(1, 1, 1))] if s is not None):
        raise ConfigError("--adaround needs integer weights; the recipe's weights are not integers.")
    from .passes import DFQ, AdaRoundConfig

    if mixed or size_budget is not None or min_sqnr is not None:
        rec, mixed_table = _mixed_recipe(float_model, rec, [make_recipe(m, calibrator) for m in mixed], calib_x,
                                         size_budget, min_sqnr, notes, warnings, progress)
    dfq_config = DFQ() if dfq else False
    if data_free is not None:
        from .passes.distill import DistillConfig

        dfq_config = DFQ(input_range=input_range, act_range="std" if data_free == "bn" else "distilled",
                         distill=DistillConfig(iters=distill_iters, label_weight=distill_label_weight)
                         if data_free == "distilled" else None)
    ada_config = AdaRoundConfig(iters=adaround_iters, batch_size=min(32, len(calib_x[0])),
                                granularity=adaround_granularity, qdrop_prob=adaround_qdrop) if adaround else False
    qmodel = api.quantize(
        float_model, rec, None if data_free else calib_x, progress=progress,
        example_inputs=torch.zeros_like(x_run) if data_free else None,  # shapes only: no data seen
        dfq=dfq_config, adaround=ada_config,
    )
    if ada_config:
        notes.append(f"adaround: {ada_config.iters} iterations per {ada_config.granularity}, batch "
                     f"{ada_config.batch_size}, QDrop {ada_config.qdrop_prob:g}")
    if data_free is not None:
        how = ("the BatchNorm statistics" if data_free == "bn" else
               f"{dfq_config.distill.num_samples} inputs distilled from the BatchNorm statistics "
               f"({distill_iters} steps, label weight {distill_label_weight:g})")
        notes.append(f"data-free: activation ranges from {how}, input range {tuple(input_range)}; no data used "
                     "to quantize")
    plog = getattr(qmodel, "lowbit_passes", None)
    if plog is not None:
        notes.append(f"passes: {plog.summary()}")
    dlog = api.decision_log(qmodel)
    cal_label = _calibrator_label(calibrator, data_free, rec)

    res = compare(float_model, qmodel, labelled, progress=progress)
    # the report's analysis runs before any file is written, so that its failure leaves no partial output
    data = build_report_data(qmodel, calib_x, model_name=model, recipe=rec, num_batches=min(4, len(calib_x)))
    variant = recipe.upper() if mixed_table is None else "+".join(n.upper() for n in (recipe, *mixed)) + " mixed"
    files: dict[str, str] = {}
    if mixed_table is not None:
        (out / "mixed_precision.txt").write_text(mixed_table)
    lat = _Latency(len(x_run), fixed, _torch_latency(float_model, x_run, iters=10))
    if export:
        lat = _export_and_time(qmodel, float_model, x_run, out / _onnx_name(qmodel), lat, files, notes, warnings)
    results = (_float_rows(res, float_size_bytes(float_model), lat.float_ort)
               + _metric_rows(variant, res, quantized_size_bytes(qmodel), lat.quant_ort))
    meta = {"model": model, "recipe": recipe, "calibrator": cal_label, "passes": passes, "data_free": data_free,
            "input_shape": list(x_run.shape[1:]), "lowbit_recipe": repr(rec)}
    ckpt, spec_path = _save_checkpoint(qmodel, out, meta, x_run)
    files["checkpoint"], files["spec"] = str(ckpt), str(spec_path)
    basis = {"latency_basis": lat.note(variant, export),
             "metrics_basis": _metrics_note(ds.name, sum(len(x) for x in calib_x), data_free is not None)}
    data = replace(data, results=tuple(results), notes=(*data.notes, *notes, *basis.values(), *warnings))
    files["report"] = str(write_report(data, out / "report.html", overwrite=True))
    files["summary"] = str(out / "summary.json")
    summary = Summary(model, recipe, cal_label, str(out), files, tuple(results), len(dlog.quantized),
                      tuple((d.name, d.reason) for d in dlog.skipped), tuple(passes), tuple(warnings),
                      time.perf_counter() - t0, {**basis, "notes": notes})
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=1, allow_nan=False, default=str))
    return summary


def _mixed_recipe(model: nn.Module, first: R.Recipe, rest: list[R.Recipe], calib_x: list, size_budget: str | None,
                  min_sqnr: float | None, notes: list[str], warnings: list[str],
                  progress: bool) -> tuple[R.Recipe, str]:
    """The per-layer recipe of :func:`lowbit.mixed_precision.search_mixed_precision` and the text of
    ``mixed_precision.txt``; appends a note, and a warning when ``min_sqnr`` was not met (the model
    closest to it is still produced)."""
    from .mixed_precision import search_mixed_precision

    if not rest:
        raise ConfigError("--size-budget / --min-sqnr choose between recipes: add --mixed RECIPE (e.g. --mixed w4-g32).")
    plan = search_mixed_precision(model, [first, *rest], calib_x, size_budget=size_budget, min_metric=min_sqnr,
                                  progress=progress)
    counts = ", ".join(f"{k} x{v}" for k, v in plan.counts().items())
    notes.append(f"mixed precision: {counts}; {plan.size_bytes} bytes, output SQNR {plan.metric:.2f} dB on the "
                 f"calibration data" + ("" if plan.meets_budget else " (BUDGET NOT MET)"))
    if not plan.meets_budget:
        where, fix = ((f"at the most precise mix within --size-budget {size_budget}", "raise --size-budget or lower "
                       "--min-sqnr") if size_budget is not None else
                      (f"even with {type(first).__name__} on every layer", "lower --min-sqnr or use a more precise "
                       "--recipe"))
        warnings.append(f"BUDGET NOT MET: output SQNR {plan.metric:.2f} dB on the calibration data is below --min-sqnr "
                        f"{min_sqnr:g} {where}; the model written is that mix ({plan.size_bytes} bytes): {fix}.")
    return plan.recipe, plan.table() + "\n"


# ------------------------------------------------------------------------------------------- eval
@dataclass(frozen=True)
class EvalSummary:
    """``lowbit eval``: the rows (float and quantized), how the quantized model ran, and the sample count."""

    model: str
    quantized: str
    num_samples: int
    results: tuple[ResultRow, ...]
    notes: tuple[str, ...] = ()

    def table(self) -> str:
        """The rows, then how latency and size were measured."""
        return "\n".join([format_rows(self.results, f"{self.model} vs {self.quantized} on {self.num_samples} samples"),
                          *self.notes])


class _OrtModule(nn.Module):
    """An ONNX file run by ONNX Runtime behind the ``nn.Module`` call interface (for the harness)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        from .export.verify import make_session

        self.path = path
        self.sess = make_session(path, threads=torch.get_num_threads())
        self.input_name = self.sess.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(None, {self.input_name: x.numpy()})[0])


def run_eval(
    model: str,
    *,
    data: str | None = None,
    quantized: str | Path | None = None,
    recipe: str = "w8a8",
    calibrator: str = "minmax",
    num_batches: int | None = None,
    batch_size: int = 16,
    weights: str | None = None,
    progress: bool = True,
) -> EvalSummary:
    """Float MODEL vs its quantized version on DATA: metric (top-1 with labels, agreement, cosine), size, latency.

    ``quantized``: a ``lowbit quantize`` output folder; its ONNX file runs in ONNX Runtime (size: the
    ONNX file's bytes). Without it MODEL is quantized in memory with ``recipe``, calibrated on the first
    8 batches of DATA (simulated; size from :func:`quantized_size_bytes`).
    """
    from . import api
    from .zoo.evaluate import compare

    loaded = load_model(model, weights)
    ds = _resolve_data(loaded, data, "--data")
    batches = _batches(ds, batch_size, num_batches, labels=True)
    _check_fit(loaded.model, model, batches, ds.name)
    x1, fixed = _run_batch(loaded.model, batches)
    notes: list[str] = []
    if fixed:
        batches, note = _full_batches(batches, len(x1), model)
        notes.append(note)
    xs = [_inputs(b) for b in batches]
    if quantized is not None:
        qdir = Path(quantized)
        if not qdir.is_dir():
            raise DataNotFoundError(f"--quantized {qdir} is not a folder; pass the --out folder of `lowbit quantize`.")
        onnx_files = sorted(qdir.glob("*.onnx"))
        if not onnx_files:
            raise DataNotFoundError(f"{qdir} holds no .onnx file; rerun `lowbit quantize ... --out {qdir} --overwrite`.")
        qmodel: nn.Module = _OrtModule(onnx_files[0])
        _check_fit(qmodel, str(onnx_files[0]), batches[:1], ds.name)
        q_size = onnx_files[0].stat().st_size
        variant = f"{qdir.name} (ONNX Runtime)"
        q_lat = _ort_latency(onnx_files[0], x1, iters=10)
        notes.append(f"size: quantized = bytes of {onnx_files[0].name} (`lowbit quantize` prints the deployed "
                     "weight bytes instead); float = fp32 parameters")
    else:
        rec = make_recipe(recipe, calibrator)
        qmodel = api.quantize(loaded.model, rec, xs[:8], progress=progress)
        q_size = quantized_size_bytes(qmodel)
        variant = f"{recipe.upper()} (simulated)"
        q_lat = None
    res = compare(loaded.model, qmodel, batches, progress=progress)
    warnings: list[str] = []
    f_lat = _float_ort_latency(loaded.model, x1, not fixed, warnings)
    notes.insert(0, f"latency: batch {len(x1)}, median of 10 runs, {torch.get_num_threads()} thread(s); float fp32 "
                    "and the quantized file both in ONNX Runtime" + ("" if q_lat is not None else
                    " (the simulated model is not timed: pass --quantized DIR)"))
    notes += [f"warning: {w}" for w in warnings]
    rows = _float_rows(res, float_size_bytes(loaded.model), f_lat) + _metric_rows(variant, res, q_size, q_lat)
    return EvalSummary(model, variant, res.num_samples, tuple(rows), tuple(notes))


# ------------------------------------------------------------------------------------------- bench
@dataclass(frozen=True)
class BenchRow:
    """One latency measurement: ``backend`` ("PyTorch fp32", "ORT fp32", "ORT int8"), batch size, ms."""

    backend: str
    batch_size: int
    latency_ms: float


def run_bench(model: str, *, batch_sizes: Sequence[int] = (1, 32), iters: int = 10, calib: str | None = None,
              weights: str | None = None, input_shape: tuple[int, ...] | None = None) -> list[BenchRow]:
    """Latency of MODEL in PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8 (W8A8 QDQ export).

    The int8 model is calibrated on ``calib`` when given, else on a random input (the ranges then mean
    nothing, but the kernels and the timing are the same).
    """
    import tempfile

    from . import api
    from .export import export_onnx, export_onnx_float

    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}.")
    loaded = load_model(model, weights, input_shape)
    x1 = loaded.example_input(1)
    if calib is not None:
        cds = _resolve_data(loaded, calib, "--calib")
        calib_x = _batches(cds, 8, 4)
        _check_fit(loaded.model, model, calib_x, cds.name)
    else:
        calib_x = [loaded.example_input(2)]
    qmodel = api.quantize(loaded.model, R.W8A8(), calib_x, progress=False)
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        fpath = export_onnx_float(loaded.model, x1, Path(tmp) / "float.onnx")
        qpath = Path(tmp) / "int8.onnx"
        export_onnx(qmodel, x1, qpath, verify=False)
        for bs in batch_sizes:
            x = loaded.example_input(bs)
            rows.append(BenchRow("PyTorch fp32", bs, _torch_latency(loaded.model, x, iters)))
            rows.append(BenchRow("ORT fp32", bs, _ort_latency(fpath, x, iters)))
            rows.append(BenchRow("ORT int8", bs, _ort_latency(qpath, x, iters)))
    return rows


def format_bench(rows: Sequence[BenchRow]) -> str:
    """The bench rows as a table with the speedup over PyTorch fp32 at the same batch size."""
    base = {r.batch_size: r.latency_ms for r in rows if r.backend == "PyTorch fp32"}
    lines = [f"{'backend':14s} {'batch':>5s} {'ms/batch':>10s} {'ms/sample':>10s} {'speedup':>8s}"]
    for r in rows:
        sp = base.get(r.batch_size)
        lines.append(f"{r.backend:14s} {r.batch_size:5d} {r.latency_ms:10.2f} {r.latency_ms / r.batch_size:10.3f} "
                     f"{(sp / r.latency_ms if sp else float('nan')):7.2f}x")
    lines.append(f"threads: {torch.get_num_threads()}; median of timed runs after 2 warm-up runs")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- inspect / explain
def run_inspect(model: str, *, input_shape: tuple[int, ...] | None = None, data: str | None = None,
                weights: str | None = None):
    """:func:`lowbit.inspect.inspect_model` of MODEL on one sample (shape from the model, ``input_shape``
    or the first sample of ``data``). Returns the :class:`~lowbit.inspect.ModelSummary`."""
    from .inspect import inspect_model

    loaded = load_model(model, weights, input_shape)
    if input_shape is None and data is not None:
        ds = _resolve_data(loaded, data, "--data")
        x = _batches(ds, 1, 1)[0]
        _check_fit(loaded.model, model, [x], ds.name)
    elif loaded.name == "minilm":
        x = loaded.model.tokenize(["lowbit inspects a sentence encoder on one short sentence."])
    else:
        x = loaded.example_input(1)
    return inspect_model(loaded.model, x)


def run_explain(value: float, fmt: str = "fp16", *, scale: float = 1.0, zero_point: int = 0,
                saturate: bool | None = None):
    """:func:`lowbit.formats.decompose.decompose` with argument checks suited to the CLI."""
    from .formats import parse
    from .formats.decompose import decompose

    if not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"--scale must be a positive finite number, got {scale}.")
    f = parse(fmt)
    lo, hi = getattr(f, "min_value", None), getattr(f, "max_value", None)
    if zero_point and f.is_integer and lo is not None and not lo <= zero_point <= hi:
        raise ConfigError(f"--zero-point {zero_point} is not a {f.name} code; give one in [{lo}, {hi}].")
    return decompose(value, fmt, scale=scale, zero_point=zero_point, saturate=saturate)


# ------------------------------------------------------------------------------------------- demo
@dataclass(frozen=True)
class DemoResult:
    """``lowbit demo``: the rows, the text table, where the report went, and the data used."""

    results: tuple[ResultRow, ...]
    table: str
    out_dir: str
    eval_data: str
    seconds: float


def _eval_subset(n: int | None):
    """The 1000 ImageNet samples (an evenly spaced subset of ``n``) when found, else foolbox's 20 images."""
    from torch.utils.data import Subset

    from .errors import DataNotFoundError
    from .zoo import foolbox_images, imagenet_samples

    try:
        ds = imagenet_samples()
    except DataNotFoundError:
        return foolbox_images("imagenet"), "foolbox's 20 labelled ImageNet images (also the calibration set)"
    if n is not None and n < len(ds):
        idx = torch.linspace(0, len(ds) - 1, n).round().long().tolist()
        return Subset(ds, idx), f"{n} of the 1000 ImageNet sample images (evenly spaced classes)"
    return ds, "the 1000 ImageNet sample images"


@torch.no_grad()
def _compare_many(float_model: nn.Module, qmodels: Sequence[nn.Module], batches: Sequence, progress: bool) -> list:
    """One pass over labelled ``batches``: the float model once, every quantized model once per batch.
    Returns one :class:`~lowbit.zoo.evaluate.EvalResult` per quantized model (top-1 of both, agreement, cosine)."""
    from tqdm.auto import tqdm

    from .zoo import metrics
    from .zoo.evaluate import EvalResult

    n = correct_f = 0
    stats = [[0, 0, 0.0] for _ in qmodels]  # correct, agree, cosine sum
    t0 = time.perf_counter()
    for x, y in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        fo = float_model(x)
        correct_f += metrics.top1_correct(fo, y)
        for st, qm in zip(stats, qmodels):
            qo = qm(x)
            st[0] += metrics.top1_correct(qo, y)
            st[1] += metrics.agreement_count(fo, qo)
            st[2] += metrics.cosine_sum(fo, qo)
        n += len(y)
    secs = time.perf_counter() - t0
    return [EvalResult(num_samples=n, top1=c / n, float_top1=correct_f / n, agreement=a / n, cosine=cs / n,
                       seconds=secs) for c, a, cs in stats]


def _w4_g32(model: nn.Module) -> R.Recipe:
    """Weight-only int4 in groups of 32 input channels; int8 per channel where 32 does not divide the
    input channels (depthwise convolutions), so every weighted layer is quantized."""
    import re

    from .spec import QuantSpec

    int8 = QuantSpec("int8", symmetric=True, granularity="channel")
    odd = {re.escape(n): int8 for n, m in model.named_modules()
           if isinstance(m, nn.Conv2d | nn.Linear) and m.weight.shape[1] % 32}
    return R.WeightOnly(bits=4, group_size=32, overrides=odd)


def run_demo(out_dir: str | Path = "lowbit-demo", *, overwrite: bool = False, images: int | None = 200,
             calibrator: str = "minmax", progress: bool = True) -> DemoResult:
    """EfficientNet-Lite0 (ImageNet-pretrained, ships offline) float vs W8A8 (int8 per-channel weights,
    uint8 activations, ``calibrator`` ranges from foolbox's 20 labelled ImageNet images; min/max by default:
    EfficientNet-Lite0's activations are bounded by ReLU6) vs W4 g32 (weight-only int4
    per group of 32 input channels; int8 per channel for layers whose input channels are not a multiple of
    32, i.e. the depthwise convolutions; activations float): top-1, agreement with float, size, latency.
    Writes ``report.html``, ``summary.json`` and the W8A8 ONNX model to ``out_dir``.

    Latency is batch 1: float in PyTorch and ONNX Runtime fp32, W8A8 in ONNX Runtime int8. W4 has no
    latency: ORT's CPU provider has no int4 convolution kernel, so W4 is a size result here.
    """
    from . import api
    from .export import export_onnx, export_onnx_float
    from .report import write_report
    from .report.build import build_report_data
    from .zoo import calibration_batches, efficientnet_lite0, foolbox_images, loader
    t0 = time.perf_counter()
    out = prepare_out_dir(out_dir, overwrite)
    model = efficientnet_lite0()
    calib = calibration_batches(foolbox_images("imagenet"), batch_size=10)
    eval_ds, eval_name = _eval_subset(images)
    eval_batches = list(loader(eval_ds, batch_size=25))
    x1 = calib[0][:1]
    w8 = api.quantize(model, R.W8A8(calibrator=calibrator), calib, progress=progress)
    w4 = api.quantize(model, _w4_g32(model), progress=False)
    r8, r4 = _compare_many(model, [w8, w4], eval_batches, progress)
    export_onnx_float(model, x1, out / "model_fp32.onnx")
    warnings = []
    q_lat = None
    try:
        export_onnx(w8, x1, out / "model_w8a8.onnx")
    except ParityError as e:  # written, but ORT and the simulation differ: time it, and say so
        warnings.append(f"W8A8 ONNX export: {e}")
    except ExportError as e:
        warnings.append(f"W8A8 ONNX export failed: {e}")
    if (out / "model_w8a8.onnx").is_file():
        q_lat = _ort_latency(out / "model_w8a8.onnx", x1, iters=20)
    f_lat = _ort_latency(out / "model_fp32.onnx", x1, iters=20)
    pt_lat = _torch_latency(model, x1, iters=10)
    f_size = float_size_bytes(model)
    rows = (_float_rows(r8, f_size, f_lat) + _metric_rows("W8A8", r8, quantized_size_bytes(w8), q_lat)
            + _metric_rows("W4 g32 weight-only", r4, quantized_size_bytes(w4), None))
    rows = [r for r in rows if r.metric != "cosine"]
    title = f"EfficientNet-Lite0 on {eval_name}"
    table = format_rows(rows, title) + "".join(f"\nwarning: {w}" for w in warnings)
    notes = [f"evaluation: {eval_name}; calibration: foolbox's 20 labelled ImageNet images ({calibrator})",
             f"latency: batch 1, median of 20 runs, {torch.get_num_threads()} threads; float and W8A8 in ONNX "
             f"Runtime (PyTorch fp32: {pt_lat:.1f} ms); W4 not timed (no int4 convolution kernel in ONNX Runtime's "
             "CPU provider: a size result)",
             "W4 g32: weight-only int4, affine, one fp32 scale and zero point per 32 input channels; the layers "
             "whose input channels are not a multiple of 32 (the depthwise convolutions have 1) get int8 "
             "per-channel weights instead; activations float. Per-channel int4 without groups drops EfficientNet-"
             "Lite0 to about 0.2 top-1 agreement (measured here), which is why groups are used",
             *warnings]
    data = build_report_data(w8, calib, results=rows, model_name="EfficientNet-Lite0", recipe=w8.lowbit_recipe,
                             title="lowbit demo: EfficientNet-Lite0", num_batches=2, notes=notes)
    write_report(data, out / "report.html", overwrite=True)
    seconds = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(
        {"model": "efficientnet_lite0", "eval_data": eval_name, "results": [r.to_dict() for r in rows],
         "notes": notes, "seconds": round(seconds, 1)}, indent=1, allow_nan=False))
    return DemoResult(tuple(rows), table, str(out), eval_name, seconds)
