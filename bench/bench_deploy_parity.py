"""Deployment parity on the real models: lowbit's simulation vs ONNX Runtime int8 vs the integer runtime.

EfficientNet-Lite0, W8A8 (int8 per-channel weights, uint8 per-tensor activations, minmax), calibrated on
foolbox's 20 ImageNet images, exported with ``lowbit.export_onnx``. On the ImageNet samples:
  * top-1 agreement simulated vs ORT int8 (goal >= 99.5 %), logits within one output quantization step
    (goal >= 99 %) and logits exactly equal, for the default simulation (int32 bias), the simulation in
    ONNX Runtime's arithmetic (``lowbit.nn.ort_arithmetic``), the simulation with the float bias it had
    before (each layer's input link removed), and for scale the same figures between ORT's own unoptimized
    (float QDQ) and optimized (QLinearConv) execution of the same file;
  * ``IntegerRuntime(path, requant="float")`` vs ORT on a few images (codes of the output, bit-exact goal),
    and ``requant="fixed_point"``: differing codes per op (same inputs) and end to end.
MiniLM (all-MiniLM-L6-v2, mean pooling): ``export_onnx_dynamic`` (ORT quantize_dynamic over the float
export) and ``export_onnx`` of a ``W8A8Dynamic`` model; mean cosine of int8 ORT embeddings vs float on
STS-B sentences (goal >= 0.99), int8 kernels in ORT's optimized graph. Parity of the W8A8Dynamic export,
batches of 32 sentences:
  * stage by stage (``verify_export``, what the export checks for dynamic models): every DynamicQuantizeLinear's
    codes vs the simulation's when the simulation is fed the deployed codes of the stage before, and the
    embeddings of that fed run;
  * free running (the plain simulation, default and in ORT arithmetic, vs ORT), and for scale: ORT's
    unoptimized vs optimized execution of the same file, and the simulation vs itself with 1e-7 relative
    noise on every dynamic input (what last-bit float differences do to per-batch dynamic ranges over 6 layers).

    python bench/bench_deploy_parity.py                    # 1000 images, 400 sentences
    python bench/bench_deploy_parity.py --quick            # 200 images, 100 sentences
    python bench/bench_deploy_parity.py --models minilm    # MiniLM only
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import lowbit
from lowbit import zoo
from lowbit.export import count_kernels, export_onnx, export_onnx_dynamic, run_ort
from lowbit.export.verify import export_quantizers, make_session, output_scales, verify_export, verify_parity
from lowbit.nn import QuantLayerMixin
from lowbit.nn.layers import link_input_quantizer
from lowbit.runtime import IntegerRuntime, compare_requant_modes


def steps_figures(a: np.ndarray, b: np.ndarray, step: float) -> tuple[float, float, float]:
    """(top-1 agreement, fraction of values within one step, max steps) of two (N, C) logit arrays."""
    d = np.abs(a.astype(np.float64) - b) / step
    return float((a.argmax(1) == b.argmax(1)).mean()), float((d <= 1.0 + 1e-3).mean()), float(d.max())


def efficientnet(n_images: int, n_runtime: int, tmp: Path) -> list[str]:
    torch.manual_seed(0)
    model = zoo.efficientnet_lite0()
    calib = zoo.calibration_batches(zoo.foolbox_images(), batch_size=10)
    qmodel = lowbit.quantize(model, lowbit.recipes.W8A8(), calib, progress=False)
    data = zoo.imagenet_samples()
    idx = np.linspace(0, len(data) - 1, n_images).round().astype(int) if n_images < len(data) else np.arange(len(data))
    path = tmp / "efficientnet_lite0.int8.onnx"
    res = export_onnx(qmodel, calib[0], path, min_fraction=0.0)  # the figures below are the measurement
    step = output_scales(path)[0]
    sess = make_session(path)
    sess_noopt = make_session(path, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    layers = [m for m in qmodel.modules() if isinstance(m, QuantLayerMixin)]
    links = {m: m.__dict__.get("_lowbit_input_quantizer") for m in layers}
    fl, sim, sim_ort, sim_fb, dep, noopt, labels = [], [], [], [], [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(idx), 25):
        items = [data[int(j)] for j in idx[i:i + 25]]
        x = torch.stack([it[0] for it in items])
        labels += [it[1] for it in items]
        with torch.no_grad():
            fl.append(model(x).numpy())
            sim.append(qmodel(x).numpy())
            with lowbit.nn.ort_arithmetic(qmodel):
                sim_ort.append(qmodel(x).numpy())
            for m in layers:  # the simulation before the int32 bias: no input scale, so the float bias
                link_input_quantizer(m, None)
            sim_fb.append(qmodel(x).numpy())
            for m, q in links.items():
                link_input_quantizer(m, q)
        dep.append(run_ort(sess, [x])[0])
        noopt.append(run_ort(sess_noopt, [x])[0])
    fl, sim, sim_ort, sim_fb, dep, noopt = (np.concatenate(v) for v in (fl, sim, sim_ort, sim_fb, dep, noopt))
    labels = np.asarray(labels)
    t_eval = time.perf_counter() - t0
    pairs = [
        ("simulated (int32 bias, float32 requantization) vs ORT int8 (optimized: QLinearConv)", sim, dep),
        ("simulated in ORT arithmetic (`lowbit.nn.ort_arithmetic`) vs ORT int8", sim_ort, dep),
        ("simulated with the float bias (before) vs ORT int8", sim_fb, dep),
        ("simulated vs ORT unoptimized (float DQ -> Conv -> Q)", sim, noopt),
        ("ORT unoptimized vs ORT optimized (same file)", noopt, dep),
    ]
    rows = [
        f"EfficientNet-Lite0 W8A8, {len(idx)} ImageNet samples, output step {step:.4g}; ORT {res.kernels}",
        f"  top-1 vs labels: float {np.mean(fl.argmax(1) == labels):.3f}, simulated {np.mean(sim.argmax(1) == labels):.3f}, "
        f"ORT int8 {np.mean(dep.argmax(1) == labels):.3f}",
        "| pair | top-1 agreement | logits within 1 step | logits equal | max steps |",
        "|---|---|---|---|---|",
    ]
    for label, a, b in pairs:
        f = steps_figures(a, b, step)
        rows.append(f"| {label} | {f[0]:.4f} | {f[1]:.4f} | {float((a == b).mean()):.4f} | {f[2]:.1f} |")
    rows.append(f"  (evaluation {t_eval:.0f} s)")
    # integer-only runtime on a few images
    x = torch.stack([data[int(j)][0] for j in idx[:n_runtime]]).numpy()
    name = IntegerRuntime(path).input_names[0]
    t0 = time.perf_counter()
    rt_out = IntegerRuntime(path, requant="float").run({name: x})
    t_rt = (time.perf_counter() - t0) / n_runtime
    ort_out = run_ort(sess, [x])[0]
    out_name = next(iter(rt_out))
    codes_rt = np.rint(rt_out[out_name] / step).astype(np.int64)
    codes_ort = np.rint(ort_out / step).astype(np.int64)
    fx_out = IntegerRuntime(path, requant="fixed_point").run({name: x})[out_name]
    d_fx = np.abs(np.rint(fx_out / step).astype(np.int64) - codes_ort)
    cmp = compare_requant_modes(path, {name: x})
    rows += [
        f"Integer runtime, {n_runtime} images ({t_rt:.1f} s/image): float-requant output codes differing from ORT: "
        f"{int((codes_rt != codes_ort).sum())} of {codes_ort.size}",
        f"  fixed-point requant: per op (same inputs) {cmp.n_differing} of {cmp.n_total} codes differ "
        f"(max {cmp.worst} step); end to end, output codes differing from ORT {int((d_fx > 0).sum())} of "
        f"{d_fx.size} (max {int(d_fx.max())} steps)",
    ]
    return rows


SEQ = 128  # the exports have a symbolic batch dimension only: every batch is padded to this length


def tokenize(model, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    t = model.tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    return t["input_ids"], t["attention_mask"]


def _with_noise(qmodel, rel: float, seed: int):
    """The simulation with ``x * (1 + rel * N(0, 1))`` at every dynamic quantizer's input (1e-7: about one
    float32 ulp, the size of ORT's LayerNorm / Erf / Softmax differences from torch's)."""
    gen = torch.Generator().manual_seed(seed)
    dyn = [q for q in export_quantizers(qmodel) if q.spec.dynamic]

    def call(*inputs):
        for q in dyn:
            q.forward = (lambda x, _q=q: type(_q).forward(_q, x * (1 + rel * torch.randn(x.shape, generator=gen))))
        try:
            return qmodel(*inputs)
        finally:
            for q in dyn:
                q.__dict__.pop("forward", None)
    return call


def minilm(n_sentences: int, tmp: Path) -> list[str]:
    torch.manual_seed(0)
    model = zoo.minilm()
    pairs = zoo.stsb("test")
    sents = list(pairs.sentences1[: n_sentences // 2]) + list(pairs.sentences2[: n_sentences // 2])
    example = tokenize(model, sents[:8])
    p_dyn = export_onnx_dynamic(model, example, tmp / "minilm.dyn.onnx")
    qmodel = lowbit.quantize(model, lowbit.recipes.W8A8Dynamic(), example_inputs=example, progress=False)
    res = export_onnx(qmodel, example, tmp / "minilm.w8a8dyn.onnx", min_fraction=0.0, min_cosine=0.0)  # reported below
    sess = {"export_onnx_dynamic (ORT quantize_dynamic)": make_session(p_dyn),
            "export_onnx(W8A8Dynamic)": make_session(res.path)}
    sess_noopt = make_session(res.path, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    noisy = _with_noise(qmodel, 1e-7, seed=0)
    cos = {k: [] for k in [*sess, "simulated W8A8Dynamic"]}
    sim_all, sim_ort_all, dep_all, noopt_all, noisy_all, staged = [], [], [], [], [], []
    t0 = time.perf_counter()
    for i in range(0, len(sents), 32):
        ids, mask = tokenize(model, sents[i:i + 32])
        with torch.no_grad():
            ref = model(ids, mask).numpy()
            outs = {"simulated W8A8Dynamic": qmodel(ids, mask).numpy()}
            with lowbit.nn.ort_arithmetic(qmodel):  # what export_onnx compares with
                sim_ort_all.append(qmodel(ids, mask).numpy())
                noisy_all.append(noisy(ids, mask).numpy())
        for k, s in sess.items():
            outs[k] = run_ort(s, [ids, mask])[0]
        for k, o in outs.items():
            cos[k].append((o * ref).sum(1) / (np.linalg.norm(o, axis=1) * np.linalg.norm(ref, axis=1)))
        sim_all.append(outs["simulated W8A8Dynamic"])
        dep_all.append(outs["export_onnx(W8A8Dynamic)"])
        noopt_all.append(run_ort(sess_noopt, [ids, mask])[0])
        staged.append(verify_export(qmodel, (ids, mask), res.path, raise_on_fail=False))  # default tolerance
    t_eval = time.perf_counter() - t0
    rows = [f"MiniLM, {len(sents)} STS-B test sentences (padded to {SEQ} tokens): cosine of int8 embeddings vs float",
            "| model | mean cosine | min cosine | int8 kernels in ORT |", "|---|---|---|---|"]
    kern = {"export_onnx_dynamic (ORT quantize_dynamic)": count_kernels(p_dyn),
            "export_onnx(W8A8Dynamic)": res.kernels, "simulated W8A8Dynamic": None}
    for k, v in cos.items():
        c = np.concatenate(v)
        rows.append(f"| {k} | {c.mean():.4f} | {c.min():.4f} | {kern[k] if kern[k] else '-'} |")
    rows.append(f"  export_onnx(W8A8Dynamic) parity vs its simulation on the example: {res.parity}")
    # stage by stage: every DynamicQuantizeLinear, pooled over the batches
    n_codes = sum(st.n for r in staged for st in r.stages)
    within = sum(st.n * st.fraction_within for r in staged for st in r.stages) / n_codes
    equal = sum(st.n * st.fraction_equal for r in staged for st in r.stages) / n_codes
    worst = min((st for r in staged for st in r.stages), key=lambda st: st.fraction_equal)
    n_out = sum(r.n for r in staged)
    rows += [
        f"Parity of export_onnx(W8A8Dynamic), {len(sents)} sentences in {len(staged)} batches of 32 "
        f"(evaluation {t_eval:.0f} s); steps of float outputs are max|sim|/255",
        "| comparison | values within 1 step | values equal | max steps | lowest row cosine | passes default tolerance |",
        "|---|---|---|---|---|---|",
        f"| stage by stage (`verify_export`): codes of all {len(staged[0].stages)} DynamicQuantizeLinear, simulation fed "
        f"the deployed codes of the stage before ({n_codes} codes, {round(n_codes * (1 - equal))} differ) | {within:.7f} | {equal:.7f} | "
        f"{max(st.max_steps for r in staged for st in r.stages):.2f} | - | - |",
        f"| stage by stage: embeddings of that fed run (per batch) | "
        f"{sum(r.n * r.fraction_within for r in staged) / n_out:.4f} | - | {max(r.max_steps for r in staged):.4f} | "
        f"{min(r.min_cosine for r in staged):.6f} | "
        f"{sum(r.worst_stage.fraction_within >= 0.99 and r.min_cosine >= 0.999 for r in staged)}/{len(staged)} batches |",
    ]
    # free running, all sentences, one step over all of them (max|sim| / 255)
    sim_all, sim_ort_all, dep_all, noopt_all, noisy_all = (
        np.concatenate(v) for v in (sim_all, sim_ort_all, dep_all, noopt_all, noisy_all))
    for label, a, b in [
        ("free running: simulated (default arithmetic) vs ORT (optimized)", sim_all, dep_all),
        ("free running: simulated in ORT arithmetic (`ort_arithmetic`) vs ORT", sim_ort_all, dep_all),
        ("ORT unoptimized vs ORT optimized (same file)", noopt_all, dep_all),
        ("simulated in ORT arithmetic vs the same with 1e-7 relative noise at every dynamic input", sim_ort_all, noisy_all),
    ]:
        rep = verify_parity([a], [b], res.path, raise_on_fail=False)
        rows.append(f"| {label} | {rep.fraction_within:.4f} | {float((a == b).mean()):.4f} | {rep.max_steps:.2f} | "
                    f"{rep.min_cosine:.5f} | {'yes' if rep.fraction_within >= 0.99 or rep.min_cosine >= 0.999 else 'no'} |")
    rows.append(f"  worst stage: {worst.name} ({worst.fraction_equal:.7f} of {worst.n} codes equal)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 images and 100 sentences")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="efficientnet,minilm", help="comma-separated: efficientnet, minilm")
    args = ap.parse_args()
    models = {m.strip() for m in args.models.split(",") if m.strip()}
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    n_images = args.images or (200 if args.quick else 1000)
    with tempfile.TemporaryDirectory() as tmp:
        if "efficientnet" in models:
            print("\n".join(efficientnet(n_images, 4, Path(tmp))), flush=True)
        if "minilm" in models:
            print("\n".join(minilm(100 if args.quick else 400, Path(tmp))), flush=True)
    cmd = "python bench/bench_deploy_parity.py" + (" --quick" if args.quick else "") + (
        f" --images {args.images}" if args.images else "") + (f" --threads {args.threads}" if args.threads != 2 else "") + (
        f" --models {args.models}" if models != {"efficientnet", "minilm"} else "")
    print(f"\ncommand: {cmd}  (torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
