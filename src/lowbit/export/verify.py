"""Run an exported model in ONNX Runtime, count its integer kernels, and check parity in quantization steps.

Parity (the documented tolerance): for every output, ``steps = |sim - ort| / s_out`` where ``s_out`` is
the output's quantization scale (the scale of the DequantizeLinear that produces the graph output). The
export is accepted when at least ``min_fraction`` (default 99 %) of the outputs are within one step.
``export_onnx`` computes ``sim`` in ONNX Runtime's arithmetic (:func:`lowbit.nn.ort_arithmetic`: the int32
bias, QLinearConv / QGemm / QLinearAdd requantization in float32 as ORT does it), which is bit-exact with
ORT on EfficientNet-Lite0 (1000 ImageNet samples, docs/benchmarks.md "Deployment parity"); the default
simulation (int32 bias, float32 fake quantization) differs from ORT at float32 rounding ties only, one code
at a time, but those compound over deep networks (EfficientNet-Lite0: ~97 % of logits within one step). An
output without a quantization scale (a float last layer, e.g. a dynamically quantized transformer whose
embeddings are normalized in float) is measured in steps of ``max|sim| / 255`` (one step of an 8-bit grid
over its range) and is also accepted when every row's cosine similarity between simulated and deployed
outputs is at least ``min_cosine`` (default 0.999): with per-batch (dynamic) scales a tiny difference in
one layer moves every later scale, so a float output can be a few such steps off while pointing the same way.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from ..errors import ModelFileError, ParityError

__all__ = [
    "INT_KERNELS", "FLOAT_KERNELS", "KernelCount", "ParityReport", "count_kernels", "run_ort", "verify_parity",
    "make_session",
]

INT_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "QGemm", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QAttention", "MatMulNBits", "QLinearConvTranspose",
})
"""ORT op types that compute a Conv/MatMul/Gemm with integer operands."""

FLOAT_KERNELS = frozenset({"Conv", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose"})
"""ORT op types that compute a Conv/MatMul/Gemm in floating point (NCHWc ``Conv`` included)."""


@dataclass(frozen=True)
class KernelCount:
    """Compute kernels in ORT's optimized graph: ``int8`` (:data:`INT_KERNELS`) and ``float``
    (:data:`FLOAT_KERNELS`), each as ``{op_type: count}``."""

    int8: dict[str, int] = field(default_factory=dict)
    float: dict[str, int] = field(default_factory=dict)

    @property
    def n_int8(self) -> int:
        return sum(self.int8.values())

    @property
    def n_float(self) -> int:
        return sum(self.float.values())

    def __str__(self) -> str:
        return f"{self.n_int8}/{self.n_int8 + self.n_float} convs/matmuls as int8 kernels {dict(self.int8)}"


@dataclass(frozen=True)
class ParityReport:
    """Simulated vs deployed outputs, in output quantization steps.

    Attributes:
        max_steps: the largest ``|sim - ort| / s_out``.
        fraction_within: fraction of outputs within one step.
        top1_agreement: fraction of rows whose argmax agrees (outputs of rank 2), else None.
        n: number of compared values.
        min_cosine: the smallest row cosine similarity over outputs without a quantization scale
            (rows = last dimension), None when every output is quantized.
    """

    max_steps: float
    fraction_within: float
    top1_agreement: float | None
    n: int
    min_cosine: float | None = None


def make_session(path: str | os.PathLike, threads: int | None = None, optimized_path: str | None = None,
                 level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 spinning: bool = True) -> ort.InferenceSession:
    """An ORT CPU session for ``path``; a file ORT cannot parse raises :class:`ModelFileError`.

    ``spinning=False`` stops the intra-op threads from busy-waiting after each run (ORT spins by
    default): needed when several sessions take turns on few cores, where one session's spinning
    threads would steal the cores of the next."""
    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = optimized_path
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        raise ModelFileError(f"ONNX Runtime cannot load {path}: {str(e)[:300]}") from e


def count_kernels(path: str | os.PathLike) -> KernelCount:
    """Count integer and float Conv/MatMul/Gemm kernels in the graph ORT runs after its optimizations
    (``SessionOptions.optimized_model_filepath``, ORT_ENABLE_ALL, CPU provider)."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = os.path.join(tmp, "optimized.onnx")
        make_session(path, optimized_path=opt)
        graph = onnx.load(opt).graph
    ops = Counter(n.op_type for n in graph.node)
    return KernelCount({k: v for k, v in ops.items() if k in INT_KERNELS},
                       {k: v for k, v in ops.items() if k in FLOAT_KERNELS})


def run_ort(path: str | os.PathLike | ort.InferenceSession, inputs: Sequence[torch.Tensor | np.ndarray]) -> list[np.ndarray]:
    """Run ``path`` (or a session) on positional ``inputs``; returns the outputs as numpy arrays."""
    sess = path if isinstance(path, ort.InferenceSession) else make_session(path)
    feeds = {}
    for meta, x in zip(sess.get_inputs(), inputs):
        arr = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
        feeds[meta.name] = arr
    return sess.run(None, feeds)


def output_scales(model: onnx.ModelProto | str | Path) -> list[float | None]:
    """Per graph output, the per-tensor scale of the DequantizeLinear that produces it (None if none)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    scales: list[float | None] = []
    for out in g.output:
        node = producer.get(out.name)
        while node is not None and node.op_type in ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            node = producer.get(node.input[0])
        s = None
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in inits:
            arr = numpy_helper.to_array(inits[node.input[1]])
            s = float(arr) if arr.size == 1 else None
        scales.append(s)
    return scales


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a2, b2 = a.reshape(-1, a.shape[-1] if a.ndim else 1), b.reshape(-1, b.shape[-1] if b.ndim else 1)
    num = (a2 * b2).sum(1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.abs(a2 - b2).max(1) == 0, 1.0, 0.0))


def verify_parity(sim: Sequence[np.ndarray], deployed: Sequence[np.ndarray], model: onnx.ModelProto | str | Path,
                  *, min_fraction: float = 0.99, min_cosine: float = 0.999, raise_on_fail: bool = True) -> ParityReport:
    """Compare simulated and deployed outputs in output quantization steps (module docstring).

    ``steps = |sim - deployed| / s_out`` per value; ``cosine = <sim, dep> / (|sim| |dep|)`` per row of a
    float output. Raises :class:`ParityError` (unless ``raise_on_fail=False``) when shapes differ, when
    fewer than ``min_fraction`` of the quantized outputs' values are within one step, or when a float
    output has fewer than ``min_fraction`` within its ``max|sim|/255`` step and a row cosine below
    ``min_cosine``.
    """
    scales = output_scales(model)
    steps_q, steps_f, cosines, top1 = [], [], [], []
    for i, (a, b) in enumerate(zip(sim, deployed)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ParityError(f"output {i}: simulated shape {a.shape} but ONNX Runtime gave {b.shape}.")
        quantized = i < len(scales) and bool(scales[i])
        s = scales[i] if quantized else max(float(np.abs(a).max()), 1e-12) / 255.0
        (steps_q if quantized else steps_f).append((np.abs(a - b) / s).ravel())
        if not quantized and a.size:
            cosines.append(_row_cosine(a, b))
        if a.ndim == 2 and a.shape[1] > 1:
            top1.append(a.argmax(1) == b.argmax(1))

    def within(parts: list[np.ndarray]) -> float:  # slack for float32 rounding of exact 1-step gaps
        v = np.concatenate(parts) if parts else np.zeros(0)
        return float((v <= 1.0 + 1e-3).mean()) if v.size else 1.0

    steps = np.concatenate(steps_q + steps_f) if steps_q or steps_f else np.zeros(0)
    agree = float(np.concatenate(top1).mean()) if top1 else None
    cos = float(np.concatenate(cosines).min()) if cosines else None
    rep = ParityReport(float(steps.max()) if steps.size else 0.0, within(steps_q + steps_f), agree, int(steps.size), cos)
    bad_q = bool(steps_q) and within(steps_q) < min_fraction
    bad_f = bool(steps_f) and within(steps_f) < min_fraction and (cos is None or cos < min_cosine)
    if raise_on_fail and (bad_q or bad_f):
        raise ParityError(
            f"ONNX Runtime disagrees with the simulated model: only {rep.fraction_within:.2%} of {rep.n} outputs are within one "
            f"output quantization step (need {min_fraction:.0%}; worst {rep.max_steps:.1f} steps"
            + (f"; float outputs' lowest row cosine {cos:.5f}, need {min_cosine}" if cos is not None else "")
            + "). A worst case of a few steps in a deep network is usually one-code flips at float32 rounding ties "
            "that compound layer by layer (compare under lowbit.nn.ort_arithmetic(qmodel), which computes as "
            "ORT does; EfficientNet-Lite0 without it: ~97 % within one step); a worst case of tens of steps "
            "points at a layer quantized differently in the two (check lowbit.decision_log(qmodel)). Pass "
            "min_fraction= to accept a looser tolerance."
        )
    return rep
