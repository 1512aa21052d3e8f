"""Issue 3 accuracy table: float vs post-training-quantized models on real data, one recipe per row.

Models and data (all offline, see ../shared/DATA.md):
  * EfficientNet-Lite0 (ImageNet-pretrained): top-1 on the labelled ImageNet samples, top-1 agreement and
    logit KL vs float; calibration on foolbox's 20 ImageNet images (disjoint from the evaluation set);
  * Fashion-MNIST CNN and small ResNet (trained once by lowbit.zoo.train_fashion, cached): test top-1;
    calibration on 512 training images;
  * all-MiniLM-L6-v2: STS-B test Spearman and mean cosine of quantized vs float embeddings;
    calibration on 256 STS-B dev sentences.
Size is the deployed size in bytes (lowbit.capture.readback.deployed_size_bytes: weights at their
format's bits + scales/zero points; other parameters at their own size).

    python bench/bench_ptq_accuracy.py            # full: every sample (tens of minutes on 2 CPU cores)
    python bench/bench_ptq_accuracy.py --quick    # 200 images / 2000 test images / 300 pairs
    python bench/bench_ptq_accuracy.py --models fashion_cnn,fashion_resnet --quick
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

import lowbit
from lowbit import zoo
from lowbit.capture.readback import deployed_size_bytes
from lowbit.recipes import FP8, W4A16, W8A8, BinaryWeights, W8A8Dynamic

CNN_RECIPES = {
    "W8A8 minmax": W8A8(),
    "W8A8 kl": W8A8(calibrator="kl"),
    "W8A8 percentile": W8A8(calibrator="percentile"),
    "W8A8 mse": W8A8(calibrator="mse"),
    "W8A8 per-tensor W": W8A8(per_channel=False),
    "W8A8 dynamic": W8A8Dynamic(),
    "W4A16 g128": W4A16(group_size=128),
    "FP8 e4m3": FP8(),
    "binary W": BinaryWeights(),
}
NLP_RECIPES = {
    "W8A8 dynamic": W8A8Dynamic(),
    "W8A8 minmax": W8A8(),
    "W8A8 percentile": W8A8(calibrator="percentile"),
    "W4A16 g128": W4A16(group_size=128),
    "FP8 e4m3": FP8(),
    "binary W": BinaryWeights(),
}


def _subset(ds, n):
    return torch.utils.data.Subset(ds, range(min(n, len(ds)))) if n else ds


def _row(model, recipe, metric, fval, qval, extra, size_f, size_q, secs):
    return (model, recipe, metric, fval, qval, extra, size_f, size_q, secs)


def bench_classifier(name, model, calib, test, recipes, rows, metric="top-1"):
    f = None
    for rname, recipe in recipes.items():
        t = time.perf_counter()
        try:
            q = lowbit.quantize(model, recipe, calib, progress=False)
        except lowbit.QuantizationError as e:
            rows.append(_row(name, rname, metric, float("nan"), float("nan"), f"error: {e}"[:60], 0, 0, 0))
            continue
        r = zoo.compare(model, q, test, progress=False)
        f = r.float_top1
        d = lowbit.decision_log(q)
        extra = f"agree {r.agreement:.4f} KL {r.kl:.4f} ({d.path}, {len(d.quantized)} q / {len(d.skipped)} skip)"
        rows.append(_row(name, rname, metric, r.float_top1, r.top1, extra, deployed_size_bytes(model),
                         deployed_size_bytes(q), time.perf_counter() - t))
        print(_fmt(rows[-1]), flush=True)
    return f


def bench_minilm(n_pairs, rows):
    enc = zoo.minilm()
    pairs = zoo.stsb("test")
    if n_pairs:
        pairs = type(pairs)(pairs.sentences1[:n_pairs], pairs.sentences2[:n_pairs], pairs.scores[:n_pairs])
    dev = zoo.stsb("dev")
    sents = list(dev.sentences1[:128]) + list(dev.sentences2[:128])
    calib = [enc.tokenize(sents[i:i + 32]) for i in range(0, len(sents), 32)]
    for rname, recipe in NLP_RECIPES.items():
        t = time.perf_counter()
        q = lowbit.quantize(enc, recipe, calib, progress=False)
        r = zoo.compare_sts(enc, q, pairs)
        d = lowbit.decision_log(q)
        extra = f"cosine {r.cosine:.4f} ({d.path}, {len(d.quantized)} q / {len(d.skipped)} skip)"
        rows.append(_row("MiniLM-L6", rname, "STS-B Spearman", r.float_spearman, r.spearman, extra,
                         deployed_size_bytes(enc), deployed_size_bytes(q), time.perf_counter() - t))
        print(_fmt(rows[-1]), flush=True)


HEADER = ("model", "recipe", "metric", "float", "quant", "vs float", "float bytes", "quant bytes", "s")


def _fmt(r) -> str:
    return (f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.4f} | {r[4]:.4f} | {r[5]} | {r[6]:,} | {r[7]:,} | {r[8]:.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="subsets: bounded time (~10 min on 2 CPU cores)")
    p.add_argument("--models", default="fashion_cnn,fashion_resnet,efficientnet_lite0,minilm")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    models = args.models.split(",")
    rows: list = []
    print("command: python bench/bench_ptq_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER), flush=True)
    for name in ("fashion_cnn", "fashion_resnet"):
        if name not in models:
            continue
        model = getattr(zoo, name)(train_if_missing=True)
        train = zoo.fashion_mnist("train")
        calib = zoo.calibration_batches(train, 512, batch_size=64, seed=0)
        test = zoo.loader(_subset(zoo.fashion_mnist("test"), 2000 if args.quick else 0), batch_size=500)
        bench_classifier(name, model, calib, test, CNN_RECIPES, rows)
    if "efficientnet_lite0" in models:
        model = zoo.efficientnet_lite0()
        calib = zoo.calibration_batches(zoo.foolbox_images("imagenet"), batch_size=10)
        test = zoo.loader(_subset(zoo.imagenet_samples(), 200 if args.quick else 0), batch_size=25)
        bench_classifier("EfficientNet-Lite0", model, calib, test, CNN_RECIPES, rows)
    if "minilm" in models:
        bench_minilm(300 if args.quick else 0, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
