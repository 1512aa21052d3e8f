"""GPU throughput of lowbit's integer path and fake quantization, against PyTorch's float kernels.

Four tables, all measured in one run on one CUDA device, each figure the median of repeated timings
with CUDA events (after warm-up):

1. GEMM: ``torch._int_mm`` (int8 x int8 -> int32) against ``torch.mm`` in fp16, bf16 and fp32 (TF32
   off, then on) for LLM-like shapes ``(M, K) x (K, N)``, K = N = 4096, M in {16, 256, 4096}, in TOPS
   (``2 M N K / time``). ``torch._int_mm`` on CUDA needs M > 16, so M = 16 runs as lowbit's ``Int8Linear``
   runs it: padded with zero rows to 17.
2. A stack of 4 Linear(4096, 4096) layers: float32, float16, and ``lowbit.convert(backend="torch")`` of
   the ``W8A8Dynamic(act_dtype="int8", granularity="token")`` model (``Int8Linear``: per-token dynamic
   int8 activations, int8 weights, ``torch._int_mm``), latency per forward for 1 and 2048 tokens, and
   the bytes of the module's parameters and buffers.
3. Fake quantization (int8, per output channel, symmetric) of a 4096 x 16384 float32 tensor:
   ``lowbit.fake_quantize`` against ``torch.fake_quantize_per_channel_affine``, in GB/s of memory
   traffic (one float32 read + one write per element), plus the fraction of elements on which they agree
   (torch multiplies by ``1 / scale``, lowbit divides, as ONNX Runtime does: they can differ at ties).

4. Step overhead (``bench/bench_step_overhead.py`` on CUDA): a ResNet-18 (random weights) W8A8 QAT
   training step and PTQ eval forward against the float model, batch ``QAT_BATCH`` at 224 x 224: ms,
   aten ops and host syncs per step, with lowbit's NaN/Inf checks on and patched off.

    PYTHONPATH=src python3 bench/bench_gpu.py          # about 20-40 s on an H100
    PYTHONPATH=src python3 bench/bench_gpu.py --quick  # fewer repeats
    PYTHONPATH=src python3 bench/bench_gpu.py --smoke  # tiny shapes on the CPU: checks the script, not a figure

Prints markdown. Exits with a message (status 1) when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step_overhead import step_table, time_ms  # noqa: E402

DEV = "cuda"
DIM, TOKENS, FQ_SHAPE, MS = 4096, (1, 2048), (4096, 16384), (16, 256, 4096)
QAT_BATCH, QAT_SIZE = 32, 224


def _smoke() -> None:
    """Tiny shapes on the CPU (``--smoke``): runs every line of the script, measures nothing useful."""
    global DEV, DIM, TOKENS, FQ_SHAPE, MS, QAT_BATCH, QAT_SIZE
    DEV, DIM, TOKENS, FQ_SHAPE, MS = "cpu", 64, (1, 40), (64, 256), (16, 32)
    QAT_BATCH, QAT_SIZE = 2, 32


def _timeit(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs, each timed with its own pair of CUDA events."""
    return time_ms(fn, torch.device(DEV), reps, warmup)


def gemm_table(reps: int) -> list[str]:
    k = n = DIM
    rows = ["| M | K = N | int8 `_int_mm` TOPS | fp16 `mm` TFLOPS | bf16 `mm` TFLOPS | fp32 `mm` TFLOPS (no TF32) "
            "| fp32 `mm` TFLOPS (TF32) | int8 / fp16 |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    g = torch.Generator(device=DEV).manual_seed(0)
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV, generator=g)
    wf = torch.randn(n, k, device=DEV, generator=g)
    for m in MS:
        a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV, generator=g)
        af = torch.randn(m, k, device=DEV, generator=g)
        m_run = max(m, 17) if DEV == "cuda" else m
        a8_run = torch.nn.functional.pad(a8, (0, 0, 0, m_run - m)) if m_run != m else a8
        flops = 2.0 * m * n * k  # useful work: the padded rows are overhead, not throughput
        t_int8 = _timeit(lambda a8_run=a8_run: torch._int_mm(a8_run, w8.t()), reps)
        # the int8 path is exact: int32 accumulation of the same codes (float64 holds every partial sum)
        ref = (a8.double() @ w8.t().double()).to(torch.int32)
        assert torch.equal(torch._int_mm(a8_run, w8.t())[:m], ref), f"torch._int_mm is not exact at M={m}"
        out = {}
        for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
            a, b = af.to(dt), wf.to(dt)
            if dt == torch.float32:
                for tf32 in (False, True):
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    out[f"fp32{'-tf32' if tf32 else ''}"] = _timeit(lambda a=a, b=b: torch.mm(a, b.t()), reps)
                torch.backends.cuda.matmul.allow_tf32 = False
            else:
                out[name] = _timeit(lambda a=a, b=b: torch.mm(a, b.t()), reps)
        tops = {key: flops / (ms * 1e-3) / 1e12 for key, ms in out.items()}
        t8 = flops / (t_int8 * 1e-3) / 1e12
        label = f"{m} (padded to 17)" if m_run != m else str(m)
        rows.append(f"| {label} | {k} | {t8:.1f} | {tops['fp16']:.1f} | {tops['bf16']:.1f} | {tops['fp32']:.1f} "
                    f"| {tops['fp32-tf32']:.1f} | {t8 / tops['fp16']:.2f}x |")
    return rows


def linear_stack_table(reps: int) -> list[str]:
    import lowbit
    from lowbit import recipes
    from lowbit.nn.int8 import Int8Linear, module_nbytes

    torch.manual_seed(0)
    dim, depth = DIM, 4
    layers = []
    for _ in range(depth):
        lin = torch.nn.Linear(dim, dim)
        torch.nn.init.normal_(lin.weight, std=dim**-0.5)
        layers.append(lin)
    f32 = torch.nn.Sequential(*layers).eval().to(DEV)
    f16 = torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(depth)]).eval().to(DEV).half()
    f16.load_state_dict({k: v.half() for k, v in f32.state_dict().items()})
    t0 = time.perf_counter()
    qmodel = lowbit.quantize(f32, recipes.W8A8Dynamic(act_dtype="int8", granularity="token"), progress=False)
    i8 = lowbit.convert(qmodel, backend="torch")
    convert_s = time.perf_counter() - t0
    n_int8 = sum(isinstance(m, Int8Linear) for m in i8.modules())
    assert n_int8 == depth, f"expected {depth} Int8Linear layers, got {n_int8}: {i8.lowbit_convert_log}"
    del qmodel
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = [f"{depth} x Linear({dim}, {dim}); lowbit quantize + convert took {convert_s:.1f} s.", "",
            "| tokens | fp32 ms | fp16 ms | lowbit int8 ms | int8 vs fp16 | int8 vs fp32 | SQNR int8 vs fp32 (dB) |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    g = torch.Generator(device=DEV).manual_seed(1)
    with torch.inference_mode():
        for tokens in TOKENS:
            x = torch.randn(tokens, dim, device=DEV, generator=g)
            xh = x.half()
            t32 = _timeit(lambda x=x: f32(x), reps)
            t16 = _timeit(lambda xh=xh: f16(xh), reps)
            t8 = _timeit(lambda xh=xh: i8(xh), reps)
            y32, y8 = f32(x).double(), i8(xh).double()
            sqnr = 10 * torch.log10((y32**2).sum() / ((y32 - y8) ** 2).sum()).item()
            rows.append(f"| {tokens} | {t32:.3f} | {t16:.3f} | {t8:.3f} | {t16 / t8:.2f}x | {t32 / t8:.2f}x | {sqnr:.1f} |")
    mb = {name: module_nbytes(m) / 2**20 for name, m in (("fp32", f32), ("fp16", f16), ("lowbit int8", i8))}
    rows += ["", "| module | parameter + buffer MiB (weights, biases, scales) | fp32 bytes / these bytes |", "|---|---:|---:|"]
    rows += [f"| {name} | {v:.2f} | {mb['fp32'] / v:.2f} |" for name, v in mb.items()]
    return rows


def fake_quant_table(reps: int) -> list[str]:
    from lowbit import PerChannel, QuantSpec
    from lowbit.ops import fake_quantize
    from lowbit.spec import compute_qparams

    rows_, cols = FQ_SHAPE
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(rows_, cols, device=DEV, generator=g)
    spec = QuantSpec("int8", symmetric=True, granularity=PerChannel(0))
    amax = x.abs().amax(dim=1)
    scale, zp = compute_qparams(spec, -amax, amax)
    scale, zp = scale.to(DEV), zp.to(DEV)
    traffic = 2 * x.numel() * x.element_size()
    t_lowbit = _timeit(lambda: fake_quantize(x, scale, zp, spec), reps)
    t_torch = _timeit(lambda: torch.fake_quantize_per_channel_affine(x, scale, zp, 0, -128, 127), reps)
    same = (fake_quantize(x, scale, zp, spec) == torch.fake_quantize_per_channel_affine(x, scale, zp, 0, -128, 127))
    agree = same.float().mean().item()
    return [
        f"int8 symmetric per output channel, float32 tensor {rows_} x {cols} ({x.numel() * 4 / 2**20:.0f} MiB).", "",
        "| op | ms | GB/s (read + write) | vs torch |", "|---|---:|---:|---:|",
        f"| torch.fake_quantize_per_channel_affine | {t_torch:.3f} | {traffic / (t_torch * 1e-3) / 1e9:.0f} | 1.00x |",
        f"| lowbit.fake_quantize | {t_lowbit:.3f} | {traffic / (t_lowbit * 1e-3) / 1e9:.0f} | {t_torch / t_lowbit:.2f}x |",
        "", f"Elements on which the two agree: {100 * agree:.4f} % (the rest are ties: x / s vs x * (1 / s)).",
    ]




def qat_sync_table(reps: int) -> list[str]:
    """The fourth table: ``bench_step_overhead.step_table`` on this device."""
    return step_table(torch.device(DEV), QAT_BATCH, QAT_SIZE, reps)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    args = ap.parse_args()
    if args.smoke:
        _smoke()
    elif not torch.cuda.is_available():
        sys.exit(f"bench_gpu.py needs a CUDA GPU, and torch {torch.__version__} sees none "
                 "(torch.cuda.is_available() is False); run it on a GPU machine: PYTHONPATH=src python3 bench/bench_gpu.py")
    reps = 10 if args.quick or args.smoke else 30
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU smoke run (tiny shapes, figures meaningless)"
    print(f"# lowbit GPU benchmark: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    flags = "".join(f" --{f}" for f in ("quick", "smoke") if getattr(args, f))
    print(f"Command: `PYTHONPATH=src python3 bench/bench_gpu.py{flags}`; "
          f"median of {reps} timings (CUDA events) after warm-up.\n")
    print("## int8 GEMM (`torch._int_mm`) vs float `torch.mm`\n")
    print("\n".join(gemm_table(reps)), "\n", flush=True)
    print("## Linear stack: lowbit `convert(backend=\"torch\")` int8 vs float\n")
    print("\n".join(linear_stack_table(reps)), "\n", flush=True)
    print("## Fake quantization throughput\n")
    print("\n".join(fake_quant_table(reps)), "\n", flush=True)
    print("## Step overhead: QAT and PTQ against float\n")
    print("\n".join(qat_sync_table(reps)), "\n")
    print(f"Total wall time {time.perf_counter() - t0:.1f} s.")


if __name__ == "__main__":
    main()
