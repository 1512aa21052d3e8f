"""Run an exported model in ONNX Runtime, count its integer kernels, and check parity in quantization steps.

Parity (the documented tolerance): for every output, ``steps = |sim - ort| / s_out`` where ``s_out`` is
the output's quantization scale (the scale of the DequantizeLinear that produces the graph output). The
export is accepted when at least ``min_fraction`` (default 99 %) of the outputs are within one step.
``export_onnx`` computes ``sim`` in ONNX Runtime's arithmetic (:func:`lowbit.nn.ort_arithmetic`: the int32
bias, QLinearConv / QGemm / QLinearAdd requantization and the DynamicQuantizeMatMul / MatMulIntegerToFloat
output in float32 as ORT does it), which is bit-exact with
ORT on EfficientNet-Lite0 (1000 ImageNet samples, docs/benchmarks.md "Deployment parity"); the default
simulation (int32 bias, float32 fake quantization) differs from ORT at float32 rounding ties only, one code
at a time, but those compound over deep networks (EfficientNet-Lite0: ~97 % of logits within one step). An
output without a quantization scale (a float last layer, e.g. a dynamically quantized transformer whose
embeddings are normalized in float) is measured in steps of ``max|sim| / 255`` (one step of an 8-bit grid
over its range) and is also accepted when every row's cosine similarity between simulated and deployed
outputs is at least ``min_cosine`` (default 0.999): with per-batch (dynamic) scales a tiny difference in
one layer moves every later scale, so a float output can be a few such steps off while pointing the same way.

Models with dynamic activation quantizers (``W8A8Dynamic``): stage by stage (:func:`verify_export`). Every
``DynamicQuantizeLinear`` of the file is also a graph output; the simulation runs once more with each dynamic
quantizer *fed the deployed codes of its own stage* (it computes its own codes from its input, which come
from the deployed codes of the stage before, compares them with ORT's, then passes ORT's values on). Each
stage must have ``min_fraction`` of its codes within one step of that stage's scale, and the final outputs
of that run the tolerance above. Why not end to end: with per-tensor dynamic ranges, one code flipped at a
float32 rounding tie moves the next tensor by a whole step in one row, attention spreads it over the
sentence, the row moves the next per-batch range, and in a few layers the rounding of every row of the
batch is redrawn. On all-MiniLM-L6-v2 (400 STS-B sentences, batches of 32; docs/benchmarks.md "Deployment
parity"): fed the deployed codes, 613 of the 1.06e9 codes of the 36 stages differ from ORT's (by one step,
at ties of ORT's float LayerNorm / Erf / attention vs torch's) and the embeddings of the fed run agree
(row cosine 1.000000); running free, the simulation in ORT's arithmetic is as far from ORT (53 % of values
within one ``max|sim|/255`` step, lowest row cosine 0.9933) as from itself with 1e-7 relative noise at every
dynamic input (55 %, 0.9937). An export bug (a wrong scale, zero point, weight code or bias) is a stage whose
codes differ by many steps, and the error names it; the free-running figures are kept in
``ParityReport.free_running``.
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
from ..nn.quantizer import DYNAMIC_QPARAMS_ATTR, TensorQuantizer
from ..nn.requant import ort_arithmetic

__all__ = [
    "INT_KERNELS", "FLOAT_KERNELS", "KernelCount", "ParityReport", "StageParity", "count_kernels", "run_ort",
    "verify_parity", "verify_export", "export_quantizers", "make_session", "ORT_SESSION_CONFIG",
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
class StageParity:
    """One dynamic quantization stage (a ``DynamicQuantizeLinear``): the simulation's codes, computed from
    the deployed model's values of the stage before, vs ORT's codes, in steps of ORT's scale.

    Attributes:
        name: the quantizer's name (``layer.input``).
        n: number of codes.
        fraction_within: fraction of codes within one step.
        fraction_equal: fraction of codes equal (the same dequantized value).
        max_steps: the largest ``|sim - ort| / s``.
    """

    name: str
    n: int
    fraction_within: float
    fraction_equal: float
    max_steps: float


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
        stages: for a model with dynamic activation quantizers checked by :func:`verify_export`, one
            :class:`StageParity` per ``DynamicQuantizeLinear`` (the figures above are then those of the
            outputs with every stage fed the deployed codes); empty otherwise.
        free_running: the same model's outputs compared without feeding (the plain simulation vs ORT),
            reported, not checked, when ``stages`` is not empty; None otherwise.
    """

    max_steps: float
    fraction_within: float
    top1_agreement: float | None
    n: int
    min_cosine: float | None = None
    stages: tuple[StageParity, ...] = ()
    free_running: ParityReport | None = None

    def __str__(self) -> str:
        """One line: ``99.80 % of 4000 outputs within one step (max 1.00 steps), top-1 agreement 1.0000 ...``."""
        parts = [f"{self.fraction_within:.2%} of {self.n} outputs within one step (max {self.max_steps:.2f} steps)"]
        if self.top1_agreement is not None:
            parts.append(f"top-1 agreement {self.top1_agreement:.4f}")
        if self.min_cosine is not None:
            parts.append(f"lowest row cosine {self.min_cosine:.5f}")
        worst = self.worst_stage
        if worst is not None:
            parts.append(f"{len(self.stages)} dynamic stages, worst {worst.name} {worst.fraction_within:.2%}")
        return ", ".join(parts)

    @property
    def worst_stage(self) -> StageParity | None:
        """The dynamic stage with the fewest codes within one step (None without dynamic stages)."""
        return min(self.stages, key=lambda st: (st.fraction_within, -st.max_steps)) if self.stages else None


# Session settings the exported files are verified (and benchmarked) with; set them in your own ORT session
# too. ORT fuses a weight-only ``DequantizeLinear -> MatMul`` (3-D inputs: transformer Linears) into
# ``MatMulNBits``, whose default accuracy level 4 quantizes the activations to int8 inside the kernel: a W8A16
# or weight-only model then computes something else than it was quantized to be (a W8A16 MLP: 211 output
# steps off). Level 1 keeps the activations fp32, which is what weight-only quantization means.
ORT_SESSION_CONFIG: dict[str, str] = {"session.qdq_matmulnbits_accuracy_level": "1"}


def make_session(path: str | os.PathLike | bytes, threads: int | None = None, optimized_path: str | None = None,
                 level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 spinning: bool = True, profile_prefix: str | None = None) -> ort.InferenceSession:
    """An ORT CPU session for ``path`` (or a serialized model as ``bytes``) with :data:`ORT_SESSION_CONFIG`; a
    file ORT cannot parse raises :class:`ModelFileError`.

    ``spinning=False`` stops the intra-op threads from busy-waiting after each run (ORT spins by
    default): needed when several sessions take turns on few cores, where one session's spinning
    threads would steal the cores of the next. ``profile_prefix`` turns on ORT's profiler: every node's
    kernel time goes to a JSON trace named ``<prefix>_<date>.json``, whose path ``session.end_profiling()``
    returns."""
    so = ort.SessionOptions()
    for key, value in ORT_SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
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
        src = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
        where = "the serialized model" if isinstance(path, bytes) else path
        raise ModelFileError(f"ONNX Runtime cannot load {where}: {str(e)[:300]}") from e


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
    ``min_cosine``. A different number of outputs (or none) always raises.
    """
    sim, deployed = list(sim), list(deployed)
    if len(sim) != len(deployed) or not sim:
        raise ParityError(f"the simulation gave {len(sim)} output(s), ONNX Runtime {len(deployed)}; the file does "
                          "not match the model (or nothing was compared).")
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


# ------------------------------------------------------------------------------ stage by stage (dynamic models)
def export_quantizers(qmodel: torch.nn.Module) -> list[TensorQuantizer]:
    """``qmodel``'s quantizers in the export's numbering: the ``k``-th enabled :class:`TensorQuantizer` in
    ``named_modules()`` order writes the tensors ``lowbit_q{k}_*`` (``export_onnx`` numbers them so)."""
    return [m for _, m in qmodel.named_modules() if isinstance(m, TensorQuantizer) and bool(m.quant_enabled)]


def _dynamic_stages(model: onnx.ModelProto, quantizers: Sequence[TensorQuantizer]) -> list[tuple[TensorQuantizer, tuple[str, str, str]]]:
    """(quantizer, (codes, scale, zero point) tensor names) for every dynamic quantizer whose export wrote
    exactly one ``DynamicQuantizeLinear``; a quantizer called more than once per forward (several nodes) or
    whose node was removed as dead (an unused pooler; the key and value inputs of an attention block packed
    into ``QAttention``, which reads the query input's codes: the same tensor, the same codes) is left out."""
    found: dict[int, list[tuple[str, str, str]]] = {}
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear" or not node.output[0].startswith("lowbit_q"):
            continue
        key = node.output[0][len("lowbit_q"):].split("_", 1)[0]
        if key.isdigit():
            found.setdefault(int(key), []).append(tuple(node.output[:3]))
    return [(quantizers[k], outs[0]) for k, outs in sorted(found.items())
            if len(outs) == 1 and k < len(quantizers) and quantizers[k].spec.dynamic]


def _flat(out) -> list[np.ndarray]:
    if torch.is_tensor(out):
        return [out.detach().float().cpu().numpy()]
    if isinstance(out, tuple | list):
        return [a for o in out for a in _flat(o)]
    if isinstance(out, dict):
        return [a for o in out.values() for a in _flat(o)]
    raise ParityError(f"the model returned a {type(out).__name__}; parity needs tensors (or tuples/dicts of them).")


@torch.no_grad()
def verify_export(qmodel: torch.nn.Module, inputs: Sequence[torch.Tensor], path: str | os.PathLike, *,
                  quantizers: Sequence[TensorQuantizer] | None = None, min_fraction: float = 0.99,
                  min_cosine: float = 0.999, raise_on_fail: bool = True) -> ParityReport:
    """Check the file ``path`` written from ``qmodel`` against the simulation on ``inputs`` (what
    ``export_onnx`` verifies). The simulation computes in ONNX Runtime's arithmetic (:func:`lowbit.nn.ort_arithmetic`).

    Without dynamic activation quantizers: :func:`verify_parity` of the outputs. With them, stage by stage
    (module docstring): every ``DynamicQuantizeLinear`` of the file becomes a graph output, the simulation
    runs with each dynamic quantizer fed the deployed codes of its stage, and the export passes when every
    stage has at least ``min_fraction`` of its codes within one step (``|sim - ort| / s_ort <= 1``) and the
    outputs of that run pass :func:`verify_parity` (``min_fraction``, ``min_cosine``). The plain (free-running)
    comparison is reported in ``ParityReport.free_running``.

    Args:
        qmodel: the quantized-simulation model the file was exported from.
        inputs: its positional inputs (the example inputs of the export).
        path: the exported ``.onnx`` file.
        quantizers: the quantizers in the export's numbering (default :func:`export_quantizers`).
        min_fraction, min_cosine: the tolerance (:func:`verify_parity`).
        raise_on_fail: raise :class:`ParityError` (naming the worst stage) instead of returning the report.

    >>> import lowbit, tempfile, os
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    >>> q = lowbit.quantize(net, lowbit.recipes.W8A8Dynamic(), None, progress=False)
    >>> x = torch.randn(5, 8)
    >>> f = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> rep = lowbit.export_onnx(q, x, f, verify=False)
    >>> r = verify_export(q, (x,), f)
    >>> len(r.stages), r.worst_stage.fraction_within
    (2, 1.0)
    """
    inputs = tuple(inputs)
    model = onnx.load(str(path))
    was_training = qmodel.training
    qmodel.eval()
    try:
        with ort_arithmetic(qmodel):
            free_sim = _flat(qmodel(*inputs))
        deployed = run_ort(make_session(path), inputs)
        stages = _dynamic_stages(model, quantizers if quantizers is not None else export_quantizers(qmodel))
        if not stages:
            return verify_parity(free_sim, deployed, model, min_fraction=min_fraction, min_cosine=min_cosine,
                                 raise_on_fail=raise_on_fail)
        free = verify_parity(free_sim, deployed, model, raise_on_fail=False)
        fed_sim, fed_ort, stage_rows = _fed_run(qmodel, inputs, model, stages)
    finally:
        qmodel.train(was_training)
    rep = verify_parity(fed_sim, fed_ort, model, min_fraction=min_fraction, min_cosine=min_cosine, raise_on_fail=False)
    rep = ParityReport(rep.max_steps, rep.fraction_within, rep.top1_agreement, rep.n, rep.min_cosine,
                       tuple(stage_rows), free)
    worst = rep.worst_stage
    if raise_on_fail and worst is not None and worst.fraction_within < min_fraction:
        raise ParityError(
            f"ONNX Runtime disagrees with the simulated model at dynamic quantization stage {worst.name}: fed the "
            f"deployed codes of the stage before, only {worst.fraction_within:.2%} of its {worst.n} codes are within "
            f"one step of ORT's (need {min_fraction:.0%}; worst {worst.max_steps:.1f} steps). The layer is quantized "
            "differently in the two: check its scale, zero point, weight codes and bias in the file "
            "(lowbit.decision_log(qmodel)). Pass min_fraction= to accept a looser tolerance."
        )
    if raise_on_fail:  # the outputs of the fed run: the usual rule
        verify_parity(fed_sim, fed_ort, model, min_fraction=min_fraction, min_cosine=min_cosine)
    return rep


def _fed_run(qmodel: torch.nn.Module, inputs: tuple[torch.Tensor, ...], model: onnx.ModelProto,
             stages: list[tuple[TensorQuantizer, tuple[str, str, str]]]):
    """Run ORT with every stage's (codes, scale, zero point) as extra outputs, then the simulation with each
    dynamic quantizer comparing its own codes with ORT's and passing ORT's values on. Returns (simulated
    outputs, ORT outputs, [StageParity])."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    n_out = len(probe.graph.output)
    for _, names in stages:
        for name in names:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    outs = run_ort(make_session(probe.SerializeToString()), inputs)
    ort_final = outs[:n_out]
    fed = {}
    for i, (q, _) in enumerate(stages):
        codes, scale, zp = outs[n_out + 3 * i: n_out + 3 * i + 3]
        fed[id(q)] = (codes, np.float32(scale), np.float32(zp))
    seen: dict[int, tuple[int, int, int, float]] = {}

    def feed(q: TensorQuantizer, x: torch.Tensor) -> torch.Tensor:
        codes, s, z = fed[id(q)]
        if id(q) in seen:
            raise ParityError(f"{q.name}: the simulation quantizes here twice per forward, the file once; "
                              "the export does not match the model.")
        if tuple(codes.shape) != tuple(x.shape):  # not the stage the file computes
            raise ParityError(f"{q.name}: the simulation quantizes a {tuple(x.shape)} tensor here, the file's "
                              f"DynamicQuantizeLinear a {tuple(codes.shape)} one; the export does not match the model.")
        own = type(q).forward(q, x).detach().float().cpu().numpy()
        q.__dict__[DYNAMIC_QPARAMS_ATTR] = (torch.tensor(s), torch.tensor(z))  # the layer computes with ORT's stage
        ort_val = (codes.astype(np.float32) - z) * s  # DequantizeLinear, float32 as ORT computes it
        steps = np.abs(own.astype(np.float64) - ort_val) / max(float(s), 1e-30)
        equal = np.rint(own / s) == codes.astype(np.float32) - z  # the same code on ORT's grid
        seen[id(q)] = (codes.size, int((steps <= 1.0 + 1e-3).sum()), int(equal.sum()), float(steps.max(initial=0.0)))
        return torch.from_numpy(ort_val).to(x.device, x.dtype)

    patched = []
    try:
        for q, _ in stages:
            q.forward = (lambda x, _q=q: feed(_q, x))
            patched.append(q)
        with ort_arithmetic(qmodel):
            sim_final = _flat(qmodel(*inputs))
    finally:
        for q in patched:
            q.__dict__.pop("forward", None)
    rows = [StageParity(q.name, n, w / n if n else 1.0, e / n if n else 1.0, mx)
            for q, _ in stages if id(q) in seen for n, w, e, mx in [seen[id(q)]]]
    return sim_final, ort_final, rows
