"""Mixed precision on EfficientNet-Lite0: int8 or int4 weights per layer, chosen by measured sensitivity
(``lowbit.mixed_precision.search_mixed_precision``) under a size budget, against uniform W8A8, uniform
W4A8, and a sensitivity-blind baseline of the same size (the largest layers to int4 first).

Both candidates quantize activations uint8 per tensor (min/max) and weights symmetric per output channel;
only the weight bits differ. Data: ../shared/data/imagenet-samples (1000 images, one per class, likely
training split: read the deltas). Calibration and the search's output-SQNR metric: ``--calib`` images
(every 4th file); evaluation: ``--images`` evenly spaced among the others. Float measured in the same run.

    .venv/bin/python bench/bench_mixed_precision.py --images 300 --calib 32 --budgets 4.0MB,3.5MB,3.2MB
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import lowbit
from lowbit import QuantSpec
from lowbit.capture.readback import deployed_size_bytes, quantized_weight_layers, weight_bytes
from lowbit.mixed_precision import parse_size, search_mixed_precision
from lowbit.recipes import Custom
from lowbit.zoo.data import every_fourth_split, imagenet_samples
from lowbit.zoo.metrics import model_size_bytes
from lowbit.zoo.models import efficientnet_lite0

U8 = QuantSpec("uint8", symmetric=False)
W8 = Custom(weight=QuantSpec("int8", granularity="channel"), activation=U8)
W4 = Custom(weight=QuantSpec("int4", granularity="channel"), activation=U8)


def split(n_eval: int, n_calib: int, data: str | None):
    ds = imagenet_samples(data)
    ev, calib_idx = every_fourth_split(len(ds), n_eval, n_calib)
    x = torch.stack([ds[i][0] for i in ev])
    y = torch.tensor([ds[i][1] for i in ev])
    calib = torch.stack([ds[i][0] for i in calib_idx])
    return x, y, list(calib.split(8))


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((torch.cat([model(x[i:i + 50]).argmax(1) for i in range(0, len(x), 50)]) == y).float().mean())


def largest_first(model: nn.Module, calib, budget: int) -> Custom:
    """Sensitivity-blind baseline: int4 for the layers with the most weight bytes until the budget is met."""
    q8 = lowbit.quantize(model, W8, calib, progress=False)
    q4 = lowbit.quantize(model, W4, calib, progress=False)
    m4 = dict(q4.named_modules())
    layers = sorted(quantized_weight_layers(q8),
                    key=lambda nm: -nm[1].weight.numel())
    size, moved = deployed_size_bytes(q8), {}
    for n, m in layers:
        if size <= budget:
            break
        size -= weight_bytes(m.weight, m.weight_quantizer) - weight_bytes(m4[n].weight, m4[n].weight_quantizer)
        moved[n] = W4
    return Custom(weight=W8.weight, activation=U8, overrides=moved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--budgets", default="4.0MB,3.5MB,3.2MB")
    ap.add_argument("--data", default=None, help="imagenet-samples folder (default ../shared/data/imagenet-samples)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = efficientnet_lite0()
    x, y, calib = split(a.images, a.calib, a.data)
    rows = [("float", "", top1(model, x, y), model_size_bytes(model), None, 0.0)]
    for name, rec in (("W8A8", W8), ("W4A8", W4)):
        q = lowbit.quantize(model, rec, calib, progress=False)
        rows.append((name, "uniform", top1(q, x, y), deployed_size_bytes(q), None, 0.0))
    for b in a.budgets.split(","):
        t0 = time.perf_counter()
        plan = search_mixed_precision(model, [W8, W4], calib, size_budget=b, progress=False)
        dt = time.perf_counter() - t0
        q = lowbit.quantize(model, plan.recipe, calib, progress=False)
        n4 = sum(v == 1 for v in plan.choice.values())
        rows.append((f"mixed <= {b}", f"{n4}/{len(plan.choice)} layers int4, SQNR {plan.metric:.1f} dB",
                     top1(q, x, y), deployed_size_bytes(q), plan.meets_budget, dt))
        qb = lowbit.quantize(model, largest_first(model, calib, parse_size(b)), calib, progress=False)
        rows.append((f"largest-first <= {b}", "sensitivity-blind: largest layers int4 first",
                     top1(qb, x, y), deployed_size_bytes(qb), deployed_size_bytes(qb) <= parse_size(b), 0.0))
    f = rows[0][2]
    print(f"EfficientNet-Lite0, {a.images} eval images, {a.calib} calibration images, {a.threads} threads")
    print("| variant | detail | top-1 | vs float | size MB | budget met | search s |")
    print("|---|---|---|---|---|---|---|")
    for name, detail, acc, size, met, dt in rows:
        print(f"| {name} | {detail} | {acc:.3f} | {100 * (acc - f):+.1f} pt | "
              f"{'' if size is None else f'{size / 1e6:.2f}'} | {'' if met is None else met} | "
              f"{'' if not dt else f'{dt:.0f}'} |")


if __name__ == "__main__":
    main()
