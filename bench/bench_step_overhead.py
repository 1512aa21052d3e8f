"""What fake quantization adds to a training step and a forward: ResNet-18, float vs lowbit W8A8.

Rows, all in one process on one device (``--device cpu`` or ``cuda``): the float training step
(forward, cross-entropy, backward, SGD step), the W8A8 QAT step (``lowbit.prepare_qat``, STE, observers
on), the same with lowbit's NaN/Inf checks (``check_finite``) replaced by a no-op, the float eval forward
and the W8A8 PTQ eval forward (``lowbit.quantize``). Columns: median ms over ``--repeats`` timings (CUDA
events on a GPU), the ratio to the float row of the same kind, the aten ops one step dispatches (views and
detaches not counted: they launch nothing) and the host syncs among them (``aten::_local_scalar_dense``,
what ``bool()`` / ``.item()`` of a tensor runs, plus ``nonzero`` / ``equal``; on CUDA each one waits for
the GPU, on the CPU the count is what a CUDA run would make). Random weights: speed only.

    PYTHONPATH=src python3 bench/bench_step_overhead.py                      # CPU, batch 8 at 64 x 64
    PYTHONPATH=src python3 bench/bench_step_overhead.py --device cuda --batch 32 --size 224

Prints markdown. ``bench/bench_gpu.py`` runs the CUDA form as its fourth table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NO_LAUNCH = frozenset({"aten::view", "aten::detach", "aten::t", "aten::_unsafe_view", "aten::expand",
                        "aten::as_strided", "aten::alias"})
_SYNC = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero"})


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> tuple[int, int]:
    """(aten ops that launch work, host syncs) during one ``fn()``."""
    with _OpCounter() as c:
        fn()
    ops = sum(n for name, n in c.counts.items() if name not in _NO_LAUNCH)
    return ops, sum(c.counts[name] for name in _SYNC)


def time_ms(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _checks_off() -> contextlib.ExitStack:
    """``check_finite`` as a no-op in every module that imported it by name."""
    stack = contextlib.ExitStack()
    for mod in ("lowbit.spec", "lowbit.nn.quantizer", "lowbit.calibration.base", "lowbit.calibration.histogram"):
        stack.enter_context(mock.patch(f"{mod}.check_finite", lambda *a, **k: None))
    return stack


def step_table(device: torch.device, batch: int, size: int, reps: int) -> list[str]:
    """The markdown table of the module docstring."""
    import torchvision

    import lowbit
    from lowbit import recipes

    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(batch, 3, size, size, device=device, generator=g)
    y = torch.randint(0, 1000, (batch,), device=device, generator=g)
    float_model = torchvision.models.resnet18(num_classes=1000).to(device)
    qat = lowbit.prepare_qat(float_model, recipes.W8A8(), [x], x, progress=False)
    ptq = lowbit.quantize(float_model.eval(), recipes.W8A8(), [x], x, progress=False).eval()
    float_model.train()
    opt_f = torch.optim.SGD(float_model.parameters(), lr=1e-4)
    opt_q = torch.optim.SGD(qat.parameters(), lr=1e-4)

    def train_step(model, opt):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    n_q = sum(1 for _ in lowbit.nn.quantizers(qat))
    rows = [f"ResNet-18 (random weights), batch {batch}, {size} x {size}, W8A8 ({n_q} quantizers in the QAT model), "
            f"{device.type}{f', {torch.get_num_threads()} thread(s)' if device.type == 'cpu' else ''}.", "",
            "| step | NaN/Inf checks | ms | vs float | aten ops | host syncs |", "|---|---|---:|---:|---:|---:|"]

    def row(label, checks, fn, base=None) -> float:
        """Time and count ``fn``, append its row; ``base`` None: the float row (1.00x) of its kind."""
        t = time_ms(fn, device, reps)
        ops, syncs = count_ops(fn)
        rows.append(f"| {label} | {checks} | {t:.2f} | {t / (base or t):.2f}x | {ops} | {syncs} |")
        return t

    t_train = row("float train step", "-", lambda: train_step(float_model, opt_f))
    row("W8A8 QAT train step (STE, observers on)", "on", lambda: train_step(qat, opt_q), t_train)
    with _checks_off():
        row("W8A8 QAT train step (STE, observers on)", "off (patched)", lambda: train_step(qat, opt_q), t_train)
    float_model.eval()
    with torch.inference_mode():
        t_fwd = row("float eval forward", "-", lambda: float_model(x))
    with torch.no_grad():
        row("W8A8 PTQ eval forward (fake quant)", "-", lambda: ptq(x), t_fwd)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    print("\n".join(step_table(device, args.batch, args.size, args.repeats)))
    print(f"\nTotal {time.perf_counter() - t0:.0f} s; torch {torch.__version__}.")


if __name__ == "__main__":
    main()
