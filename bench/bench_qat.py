"""Issue 7 evidence: QAT recovers the accuracy that post-training quantization loses.

Model and data (offline, see ../shared/DATA.md): the Fashion-MNIST CNN of ``lowbit.zoo`` (trained once by
``python -m lowbit.zoo.train_fashion``, cached), top-1 on the 10 000 test images. For each low-bit recipe:
float top-1, PTQ top-1 (``lowbit.quantize``, min/max calibration on 512 training images), then QAT
(``lowbit.prepare_qat`` from the float model, same calibration, Adam, ``--epochs`` passes over a
``--train`` image subset of the 60 000 training images) and ``lowbit.convert``: top-1 of the converted
model, training time and epochs. Knowledge distillation from the float teacher with ``--kd``.

    python bench/bench_qat.py                          # W4A4 + binary weights, 12 000 images, 1 epoch
    python bench/bench_qat.py --train 60000 --epochs 3
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
import torch.nn.functional as F

import lowbit
from lowbit import zoo
from lowbit.qat import distillation_loss
from lowbit.recipes import BinaryWeights, Custom
from lowbit.spec import QuantSpec

RECIPES = {
    "W4A4 (int4 per-channel W, uint4 A)": (
        Custom(weight=QuantSpec("int4", granularity="channel"), activation=QuantSpec("uint4", symmetric=False)),
        ("ste", "lsq")),
    "W3A8 (int3 per-channel W, uint8 A)": (
        Custom(weight=QuantSpec("int3", granularity="channel"), activation=QuantSpec("uint8", symmetric=False)),
        ("ste",)),
    "binary W (per-channel), float A": (BinaryWeights(), ("ste",)),
}


def top1(model, test) -> float:
    return zoo.evaluate_classifier(model.eval(), test, progress=False).top1


def run_qat(model, recipe, learnable, calib, train, epochs, lr, kd):
    qat = lowbit.prepare_qat(model, recipe, calib_data=calib, learnable=learnable)
    opt = torch.optim.Adam(qat.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(train))
    t0 = time.perf_counter()
    for _ in range(epochs):
        qat.train()
        for x, y in train:
            logits = qat(x)
            loss = F.cross_entropy(logits, y)
            if kd:
                with torch.no_grad():
                    teacher = model(x)
                loss = 0.5 * loss + 0.5 * distillation_loss(logits, teacher, T=4.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return lowbit.convert(qat), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=12000, help="training images used for QAT (first N, shuffled)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kd", action="store_true", help="add the distillation loss against the float model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = zoo.fashion_cnn().eval()
    train_set = zoo.fashion_mnist("train")
    subset = torch.utils.data.Subset(train_set, range(args.train))
    train = zoo.loader(subset, 128, shuffle=True, seed=0)
    test = zoo.loader(zoo.fashion_mnist("test"), 1000)
    calib = zoo.calibration_batches(train_set, 512, batch_size=128, seed=1)
    f_top1 = top1(model, test)

    cmd = "python bench/bench_qat.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# QAT on Fashion-MNIST CNN ({cmd.strip()})")
    print(f"# QAT data: {args.train} training images, {args.epochs} epoch(s), Adam lr {args.lr}, batch 128, "
          f"cosine decay{', KD T=4' if args.kd else ''}; test: 10 000 images; {args.threads} CPU threads")
    print("| recipe | float top-1 | PTQ top-1 | QAT | QAT top-1 | recovered | QAT time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, (recipe, modes) in RECIPES.items():
        ptq = lowbit.quantize(model, recipe, calib, progress=False)
        p_top1 = top1(ptq, test)
        for mode in modes:
            deployed, secs = run_qat(model, recipe, mode, calib, train, args.epochs, args.lr, args.kd)
            q_top1 = top1(deployed, test)
            lost = f_top1 - p_top1
            rec = f"{(q_top1 - p_top1) / lost:.0%}" if lost > 1e-4 else "n/a"
            print(f"| {name} | {f_top1:.4f} | {p_top1:.4f} | {mode} | {q_top1:.4f} | {rec} | {secs:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
