"""Issue 3 accuracy table: float vs post-training-quantized models on real data, one recipe per row.

Models and data (all offline, see ../shared/DATA.md):
  * Fashion-MNIST CNN and small ResNet (trained once by lowbit.zoo.train_fashion, cached): test top-1 on the
    10 000 test images (``--test N``: the first N); calibration on 512 random training images;
  * EfficientNet-Lite0 (ImageNet-pretrained): top-1 on ``--images N`` of the 1000 labelled ImageNet samples
    (every ``1000 // N``-th, so the classes are spread), top-1 agreement and logit KL vs float; calibration
    on foolbox's 20 ImageNet images + ``--calib-extra`` samples from the images left out (disjoint);
  * all-MiniLM-L6-v2: STS-B test Spearman and mean cosine of quantized vs float embeddings (``--pairs N``:
    the first N pairs); calibration on 256 STS-B dev sentences.
The float outputs are computed once per model in the same run and every recipe is compared with them.
Size is the deployed size in bytes (lowbit.capture.readback.deployed_size_bytes: weights at their
format's bits + scales/zero points; other parameters at their own size).

    python bench/bench_ptq_accuracy.py                      # Fashion full test set, 200 ImageNet images, all STS-B pairs
    python bench/bench_ptq_accuracy.py --models fashion_cnn --test 2000
    python bench/bench_ptq_accuracy.py --json out.json      # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch

import lowbit
from lowbit import zoo
from lowbit.capture.readback import deployed_size_bytes
from lowbit.recipes import FP8, W4A16, W8A8, BinaryWeights, W8A8Dynamic
from lowbit.zoo import metrics

RECIPES = {
    "W8A8 minmax": W8A8(),
    "W8A8 kl": W8A8(calibrator="kl"),
    "W8A8 percentile": W8A8(calibrator="percentile"),
    "W8A8 mse": W8A8(calibrator="mse"),
    "W8A8 minmax, per-tensor W": W8A8(per_channel=False),
    "W8A8 mse, per-tensor W": W8A8(calibrator="mse", per_channel=False),
    "W8A8 dynamic": W8A8Dynamic(),
    "W4A16 g128": W4A16(group_size=128),
    "W4A16 g32": W4A16(group_size=32),
    "FP8 e4m3": FP8(),
    "binary W": BinaryWeights(),
}


@dataclass(frozen=True)
class Row:
    """One table row; ``quant`` and ``float`` are the model's metric (top-1 or STS-B Spearman)."""

    model: str
    recipe: str
    metric: str
    float: float
    quant: float
    vs_float: str  # top-1 agreement + logit KL, or embedding cosine
    layers: str  # capture path and layers quantized / left float
    float_bytes: int
    quant_bytes: int
    seconds: float

    def markdown(self) -> str:
        return (f"| {self.model} | {self.recipe} | {self.metric} | {self.float:.4f} | {self.quant:.4f} | "
                f"{self.vs_float} | {self.layers} | {self.float_bytes:,} | {self.quant_bytes:,} | {self.seconds:.0f} |")


HEADER = ("model", "recipe", "metric", "float", "quant", "vs float", "layers", "float bytes", "quant bytes", "s")


def _emit(rows: list[Row], row: Row) -> None:
    rows.append(row)
    print(row.markdown(), flush=True)


def _layers(q) -> str:
    d = lowbit.decision_log(q)
    return f"{d.path}, {len(d.quantized)} q / {len(d.skipped)} float"


@torch.no_grad()
def _logits(model, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x).float() for x, _ in batches])


def bench_classifier(name: str, model, calib, batches, rows: list[Row], recipes=RECIPES) -> None:
    """Top-1 of float and every recipe on ``batches`` (a list of ``(x, y)``), agreement and mean
    ``KL(softmax(float) || softmax(quant))`` per image against the float logits of the same run."""
    labels = torch.cat([y for _, y in batches])
    t = time.perf_counter()
    ref = _logits(model, batches)
    f_top1 = metrics.top1_accuracy(ref, labels)
    f_bytes = deployed_size_bytes(model)
    _emit(rows, Row(name, "float", "top-1", f_top1, f_top1, f"{len(labels)} images", "-", f_bytes, f_bytes,
                    time.perf_counter() - t))
    for rname, recipe in recipes.items():
        t = time.perf_counter()
        try:
            q = lowbit.quantize(model, recipe, calib, progress=False)
        except lowbit.QuantizationError as e:
            _emit(rows, Row(name, rname, "top-1", f_top1, math.nan, f"error: {e}"[:80], "-", f_bytes, 0, 0.0))
            continue
        out = _logits(q, batches)
        vs = f"agree {metrics.agreement_count(ref, out) / len(out):.4f} KL {metrics.mean_kl(ref, out):.4f}"
        _emit(rows, Row(name, rname, "top-1", f_top1, metrics.top1_accuracy(out, labels), vs, _layers(q), f_bytes,
                        deployed_size_bytes(q), time.perf_counter() - t))


def fashion(name: str, n_test: int, rows: list[Row]) -> None:
    model = getattr(zoo, name)(train_if_missing=True)
    calib = zoo.calibration_batches(zoo.fashion_mnist("train"), 512, batch_size=64, seed=0)
    test = zoo.fashion_mnist("test")
    test = torch.utils.data.Subset(test, range(n_test)) if n_test else test
    bench_classifier(name, model, calib, list(zoo.loader(test, batch_size=500)), rows)


def efficientnet(n_images: int, n_extra: int, rows: list[Row]) -> None:
    model = zoo.efficientnet_lite0()
    calib, batches = zoo.imagenet_eval_and_calibration(zoo.imagenet_samples(), n_images, n_extra)
    bench_classifier("EfficientNet-Lite0", model, calib, batches, rows)


def minilm(n_pairs: int, rows: list[Row], recipes=RECIPES) -> None:
    """STS-B Spearman of ``cos(e(s1), e(s2))`` vs the gold scores, and the mean cosine of quantized vs
    float embeddings over both sentences of every pair (``zoo.evaluate.compare_sts``'s definitions)."""
    enc = zoo.minilm()
    pairs = zoo.stsb("test")
    if n_pairs:
        pairs = type(pairs)(pairs.sentences1[:n_pairs], pairs.sentences2[:n_pairs], pairs.scores[:n_pairs])
    dev = zoo.stsb("dev")
    sents = list(dev.sentences1[:128]) + list(dev.sentences2[:128])
    calib = [enc.tokenize(sents[i:i + 32]) for i in range(0, len(sents), 32)]
    s1, s2 = list(pairs.sentences1), list(pairs.sentences2)

    def spearman(e1, e2):
        return metrics.spearman(torch.nn.functional.cosine_similarity(e1.double(), e2.double(), dim=1), pairs.scores)

    t = time.perf_counter()
    f1, f2 = enc.encode(s1), enc.encode(s2)
    f_sp, f_bytes = spearman(f1, f2), deployed_size_bytes(enc)
    _emit(rows, Row("MiniLM-L6", "float", "STS-B Spearman", f_sp, f_sp, f"{len(pairs)} pairs", "-", f_bytes,
                    f_bytes, time.perf_counter() - t))
    for rname, recipe in recipes.items():
        t = time.perf_counter()
        try:
            q = lowbit.quantize(enc, recipe, calib, progress=False)
        except lowbit.QuantizationError as e:
            _emit(rows, Row("MiniLM-L6", rname, "STS-B Spearman", f_sp, math.nan, f"error: {e}"[:80], "-", f_bytes,
                            0, 0.0))
            continue
        q1, q2 = q.encode(s1), q.encode(s2)
        cos = (metrics.cosine_sum(f1, q1) + metrics.cosine_sum(f2, q2)) / (2 * len(pairs))
        _emit(rows, Row("MiniLM-L6", rname, "STS-B Spearman", f_sp, spearman(q1, q2), f"cosine {cos:.4f}",
                        _layers(q), f_bytes, deployed_size_bytes(q), time.perf_counter() - t))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="fashion_cnn,fashion_resnet,efficientnet_lite0,minilm")
    p.add_argument("--test", type=int, default=0, help="Fashion-MNIST test images (0: all 10 000)")
    p.add_argument("--images", type=int, default=200, help="ImageNet samples evaluated (of 1000)")
    p.add_argument("--calib-extra", type=int, default=44, help="ImageNet samples added to foolbox's 20 for calibration")
    p.add_argument("--pairs", type=int, default=0, help="STS-B test pairs (0: all)")
    p.add_argument("--recipes", default="", help="comma-separated subset of: " + ", ".join(RECIPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.recipes:
        keep = [r.strip() for r in args.recipes.split(",")]
        unknown = [r for r in keep if r not in RECIPES]
        if unknown:
            p.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
        for r in list(RECIPES):
            if r not in keep:
                del RECIPES[r]
    models = args.models.split(",")
    rows: list[Row] = []
    print("command: python bench/bench_ptq_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER), flush=True)
    for name in ("fashion_cnn", "fashion_resnet"):
        if name in models:
            fashion(name, args.test, rows)
    if "efficientnet_lite0" in models:
        efficientnet(args.images, args.calib_extra, rows)
    if "minilm" in models:
        minilm(args.pairs, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
