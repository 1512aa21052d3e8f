"""``lowbit``: the command line (argparse over :mod:`lowbit.workflows`; no logic of its own).

Exit codes: 0 success, 1 a :class:`~lowbit.errors.QuantizationError` (bad file, model, data, output
folder; the message says how to fix it, no traceback), 2 bad command-line arguments (argparse).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence

from .errors import ConfigError, QuantizationError

__all__ = ["main", "build_parser"]

MODEL_HELP = ("MODEL: a built-in name (efficientnet_lite0, fashion_cnn, fashion_resnet, minilm), "
              "torchvision:NAME (random weights unless --weights), package.module:factory or file.py:factory "
              "(a function returning the nn.Module), or a .pt2 file (torch.export.save)")
DATA_HELP = ("DATA: an image folder (ImageNet layout: root/<class>/<image>), a .npy/.npz file (inputs 'x', "
             "optional labels 'y'), or imagenet-samples / foolbox-imagenet / fashion-mnist")

EPILOGS = {
    "quantize": """examples:
  lowbit quantize efficientnet_lite0 --recipe w8a8 --calibrator kl --calib foolbox-imagenet --out out/lite0
  lowbit quantize torchvision:resnet18 --weights resnet18.pth --calib images/ --num-batches 16 --out out/r18
  lowbit quantize mymodels:build --calib calib.npy --recipe w4-g32 --out out/mine --overwrite
  lowbit quantize efficientnet_lite0 --recipe w8a8 --dfq --out out/lite0-dfq
  lowbit quantize efficientnet_lite0 --recipe w4a8 --calib imagenet-samples --num-batches 63 --batch-size 8 \\
      --adaround --adaround-iters 1500 --adaround-granularity block --adaround-qdrop 0.5 --out out/lite0-w4a8
  lowbit quantize efficientnet_lite0 --recipe w8a8 --data-free distilled --input-range=-1,1 \\
      --distill-label-weight 50 --out out/lite0-free

writes: model_int8.onnx (QDQ, checked in ONNX Runtime; model_quantized.onnx unless the activations are
8-bit integers), model.safetensors + quant_spec.json, report.html, summary.json.
latency: float and quantized both in ONNX Runtime; metrics: on the calibration data (see `lowbit eval`)""",
    "eval": """examples:
  lowbit eval efficientnet_lite0 --quantized out/lite0 --data imagenet-samples
  lowbit eval mymodels:build --data test.npz --recipe w8a8""",
    "bench": """examples:
  lowbit bench torchvision:resnet18 --batch-sizes 1,32
  lowbit bench mymodels:build --input-shape 3,64,64 --batch-sizes 1,8""",
    "inspect": """examples:
  lowbit inspect torchvision:resnet50
  lowbit inspect mymodels:build --input-shape 3,32,32""",
    "explain": """examples:
  lowbit explain 0.1 --format fp16
  lowbit explain 300 --format fp8_e4m3 --saturate
  lowbit explain 0.1 --format int8 --scale 0.0039""",
    "demo": """examples:
  lowbit demo
  lowbit demo --out /tmp/demo --overwrite --images 1000""",
}


def _name_list(text: str) -> list[str]:
    from .workflows import RECIPE_NAMES

    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in RECIPE_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected recipe names from {', '.join(RECIPE_NAMES)}, got {text!r}")
    return names


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,32, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers such as 1,32, got {text!r}")
    return vals


def _shape(text: str) -> tuple[int, ...]:
    from .loading import parse_shape

    try:
        return parse_shape(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI such as -1,1 or 0,1, got {text!r}") from None
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"expected LO < HI, got {text!r}")
    return lo, hi


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return v


def _model_args(p: argparse.ArgumentParser, shape: bool = True) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--weights", metavar="FILE", help="state_dict to load into MODEL (.pt/.pth/.safetensors)")
    if shape:
        p.add_argument("--input-shape", type=_shape, metavar="C,H,W",
                       help="one sample's input shape when MODEL does not say it (factory / .pt2 models)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``lowbit`` and its subcommands."""
    from .workflows import RECIPE_NAMES

    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(
        prog="lowbit", formatter_class=fmt,
        description="Turn a trained PyTorch model into a low-precision model and show the evidence.",
        epilog="start with `lowbit demo`; every command has --help with examples.")
    ap.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    recipes_help = "; ".join(f"{k}: {v}" for k, v in RECIPE_NAMES.items())

    q = sub.add_parser("quantize", help="quantize a model; write ONNX, checkpoint, report and summary",
                       description="Quantize MODEL with a preset recipe and calibration data.",
                       epilog=EPILOGS["quantize"], formatter_class=fmt)
    _model_args(q)
    q.add_argument("--recipe", default="w8a8", choices=list(RECIPE_NAMES), metavar="RECIPE",
                   help=f"preset (default w8a8). {recipes_help}")
    q.add_argument("--calibrator", default="minmax", metavar="NAME",
                   help="activation range method: minmax (default), kl, percentile[:99.99], mse, moving_average")
    q.add_argument("--calib", metavar="DATA", help=f"calibration data (default: the model's built-in data). {DATA_HELP}")
    q.add_argument("--num-batches", type=_positive, default=32, help="calibration batches (default 32)")
    q.add_argument("--batch-size", type=_positive, default=8, help="samples per batch (default 8)")
    q.add_argument("--out", required=True, metavar="DIR", help="output folder (refused if not empty, see --overwrite)")
    q.add_argument("--dfq", action="store_true",
                   help="data-free quantization first: BN folding, cross-layer equalization, high-bias absorption, "
                        "analytic bias correction")
    q.add_argument("--data-free", choices=("bn", "distilled"), default=None,
                   help="quantize without calibration data (implies --dfq): activation ranges from the BatchNorm "
                        "statistics (bn), or calibrated on inputs distilled from them (distilled: ZeroQ; EfficientNet-"
                        "Lite0 at 50 steps: ~2 min on 2 CPU cores). Needs --input-range; --calib data then only feeds "
                        "the float-vs-quantized comparison of the report")
    q.add_argument("--input-range", type=_range, metavar="LO,HI",
                   help="--data-free: the range of the model's input values after preprocessing, e.g. --input-range=-1,1 "
                        "(with '=' when LO is negative)")
    q.add_argument("--distill-iters", type=_positive, default=None,
                   help="--data-free distilled: Adam steps of the distillation (default 50)")
    q.add_argument("--distill-label-weight", type=float, default=None, metavar="W",
                   help="--data-free distilled: weight of a cross-entropy to random classes added to the BatchNorm "
                        "loss (default 0; 50 measured best for EfficientNet-Lite0, classifiers only)")
    q.add_argument("--adaround", action="store_true", help="AdaRound the weights on the calibration data")
    q.add_argument("--adaround-iters", type=_positive, default=None,
                   help="AdaRound iterations per layer or block (default 200)")
    q.add_argument("--adaround-granularity", choices=("layer", "block"), default=None,
                   help="AdaRound unit: each layer alone (default) or each block's layers jointly on the block's "
                        "output (BRECQ; blocks = children of Sequential/ModuleList containers)")
    q.add_argument("--adaround-qdrop", type=_probability, default=None, metavar="P",
                   help="AdaRound: during reconstruction keep each quantized activation's float value with "
                        "probability P (QDrop; default 0 = off, 0.5 as in the paper)")
    q.add_argument("--mixed", type=_name_list, default=[], metavar="RECIPE[,RECIPE]",
                   help="mixed precision: less precise recipes each layer may take instead of --recipe, chosen by "
                        "measured sensitivity (needs --size-budget and/or --min-sqnr)")
    q.add_argument("--size-budget", metavar="SIZE", help="mixed precision: largest model size (e.g. 3.5MB, 2MiB)")
    q.add_argument("--min-sqnr", type=float, metavar="DB", help="mixed precision: lowest output SQNR (dB) vs float")
    q.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out folder")
    q.add_argument("--no-export", action="store_true", help="skip the ONNX export")

    e = sub.add_parser("eval", help="float vs quantized: metric, size, latency",
                       description="Compare float MODEL with its quantized version on DATA.",
                       epilog=EPILOGS["eval"], formatter_class=fmt)
    _model_args(e, shape=False)
    e.add_argument("--data", metavar="DATA", help=f"evaluation data (default: the model's built-in data). {DATA_HELP}")
    e.add_argument("--quantized", metavar="DIR", help="a `lowbit quantize` output folder (its ONNX runs in ONNX Runtime); "
                                                       "without it MODEL is quantized in memory with --recipe")
    e.add_argument("--recipe", default="w8a8", choices=list(RECIPE_NAMES), metavar="RECIPE", help="without --quantized")
    e.add_argument("--calibrator", default="minmax", metavar="NAME", help="without --quantized")
    e.add_argument("--num-batches", type=_positive, default=None, help="evaluate on at most this many batches")
    e.add_argument("--batch-size", type=_positive, default=16)

    b = sub.add_parser("bench", help="latency table: PyTorch fp32, ONNX Runtime fp32, ONNX Runtime int8",
                       description="Time MODEL in PyTorch fp32, ORT fp32 and ORT int8 (W8A8 QDQ).",
                       epilog=EPILOGS["bench"], formatter_class=fmt)
    _model_args(b)
    b.add_argument("--batch-sizes", type=_int_list, default=[1, 32], metavar="N,M", help="default 1,32")
    b.add_argument("--iters", type=_positive, default=10, help="timed runs per figure (default 10)")
    b.add_argument("--calib", metavar="DATA", help="calibration data for the int8 model (default: a random input)")

    i = sub.add_parser("inspect", help="per-layer params, MACs, weight ranges, bytes per precision",
                       description="Summarise MODEL layer by layer (FLOPs by torch.utils.flop_counter).",
                       epilog=EPILOGS["inspect"], formatter_class=fmt)
    _model_args(i)
    i.add_argument("--data", metavar="DATA", help="take the input shape from the first sample of DATA")
    i.add_argument("--max-rows", type=_positive, default=None, help="show only the layers with the most MACs")
    i.add_argument("--json", action="store_true", help="print the totals as JSON")

    x = sub.add_parser("explain", help="how one number is stored in a format (bits, fields, error)",
                       description="Take VALUE apart in a number format: IEEE754 fields, class, stored value, error.",
                       epilog=EPILOGS["explain"], formatter_class=fmt)
    x.add_argument("value", type=float, metavar="VALUE")
    x.add_argument("--format", default="fp16", metavar="FMT",
                   help="fp16, bf16, fp8_e4m3, fp8_e5m2, fp4_e2m1, int8, uint8, int4 ... (default fp16)")
    x.add_argument("--scale", type=float, default=1.0, help="divide by this first (quantizer scale)")
    x.add_argument("--zero-point", type=int, default=0, help="integer formats: added after rounding")
    x.add_argument("--saturate", action="store_true", help="minifloats: clip to ±max instead of inf/NaN")
    x.add_argument("--json", action="store_true", help="print the fields as JSON")

    d = sub.add_parser("demo", help="EfficientNet-Lite0: float vs W8A8 vs W4 on real images, with a report",
                       description="Quantize the pretrained EfficientNet-Lite0 that ships offline and write the report.",
                       epilog=EPILOGS["demo"], formatter_class=fmt)
    d.add_argument("--out", default="lowbit-demo", metavar="DIR", help="output folder (default ./lowbit-demo)")
    d.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out folder")
    d.add_argument("--images", type=_positive, default=200,
                   help="evaluation images taken from the 1000 ImageNet samples when found (default 200)")
    d.add_argument("--calibrator", default="minmax", metavar="NAME", help="W8A8 activation range method (default minmax)")
    return ap


# quantize options that only mean something beside another: dest -> (the option it needs, is that on?).
# Their argparse default is None, so that a given one can be told apart; run_quantize's defaults apply otherwise.
DEPENDENT_OPTIONS = {
    "adaround_iters": ("--adaround", lambda a: a.adaround),
    "adaround_granularity": ("--adaround", lambda a: a.adaround),
    "adaround_qdrop": ("--adaround", lambda a: a.adaround),
    "input_range": ("--data-free", lambda a: a.data_free is not None),
    "distill_iters": ("--data-free distilled", lambda a: a.data_free == "distilled"),
    "distill_label_weight": ("--data-free distilled", lambda a: a.data_free == "distilled"),
}


def _dependent_options(a: argparse.Namespace) -> dict:
    """The :data:`DEPENDENT_OPTIONS` given on the command line, as keyword arguments of ``run_quantize``; one
    given without the option it needs would be ignored, so it is refused instead (:class:`ConfigError`)."""
    given = {dest: getattr(a, dest) for dest in DEPENDENT_OPTIONS if getattr(a, dest) is not None}
    for dest in given:
        needs, is_on = DEPENDENT_OPTIONS[dest]
        if not is_on(a):
            flag = "--" + dest.replace("_", "-")
            raise ConfigError(f"{flag} only applies with {needs}, which is not given: add {needs}, or leave "
                              f"{flag} out.")
    return given


def _cmd_quantize(a: argparse.Namespace) -> int:
    from .workflows import run_quantize

    s = run_quantize(a.model, out_dir=a.out, recipe=a.recipe, calibrator=a.calibrator, calib=a.calib,
                     num_batches=a.num_batches, batch_size=a.batch_size, dfq=a.dfq, adaround=a.adaround,
                     overwrite=a.overwrite, weights=a.weights, input_shape=a.input_shape, export=not a.no_export,
                     mixed=a.mixed, size_budget=a.size_budget, min_sqnr=a.min_sqnr, data_free=a.data_free,
                     **_dependent_options(a))
    print(s.table())
    print(f"\n{s.quantized} layer(s)/op(s) quantized, {len(s.skipped)} kept float"
          + "".join(f"\n  kept float: {n} ({r})" for n, r in s.skipped[:10]))
    for w in s.warnings:
        print(f"warning: {' '.join(w.split())}", file=sys.stderr)  # one line each, like errors
    print("\nwrote:\n" + "\n".join(f"  {k:10s} {v}" for k, v in s.files.items()))
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from .workflows import run_eval

    s = run_eval(a.model, data=a.data, quantized=a.quantized, recipe=a.recipe, calibrator=a.calibrator,
                 num_batches=a.num_batches, batch_size=a.batch_size, weights=a.weights)
    print(s.table())
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from .workflows import format_bench, run_bench

    rows = run_bench(a.model, batch_sizes=a.batch_sizes, iters=a.iters, calib=a.calib, weights=a.weights,
                     input_shape=a.input_shape)
    print(f"{a.model}\n" + format_bench(rows))
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect import format_summary
    from .workflows import run_inspect

    s = run_inspect(a.model, input_shape=a.input_shape, data=a.data, weights=a.weights)
    if a.json:
        print(json.dumps({"model": s.model, "input_shapes": [list(x) for x in s.input_shapes],
                          "total_params": s.total_params, "total_flops": s.total_flops, "total_macs": s.total_macs,
                          "bytes": dict(s.bytes), "layers": len(s.layers)}, indent=1))
    else:
        print(format_summary(s, max_rows=a.max_rows))
    return 0


def _cmd_explain(a: argparse.Namespace) -> int:
    from .workflows import run_explain

    d = run_explain(a.value, a.format, scale=a.scale, zero_point=a.zero_point, saturate=a.saturate or None)
    if a.json:
        keys = ("format", "value", "scale", "zero_point", "code", "bits", "sign", "exponent_bits", "mantissa_bits",
                "biased_exponent", "exponent", "kind", "stored", "error", "saturated")
        print(json.dumps({k: getattr(d, k) for k in keys}, default=str))
    else:
        print(d)
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from .workflows import run_demo

    r = run_demo(a.out, overwrite=a.overwrite, images=a.images, calibrator=a.calibrator)
    print(r.table)
    print(f"\nreport: {r.out_dir}/report.html  ({r.seconds:.0f} s)")
    return 0


COMMANDS = {"quantize": _cmd_quantize, "eval": _cmd_eval, "bench": _cmd_bench, "inspect": _cmd_inspect,
            "explain": _cmd_explain, "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowbit`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    lowbit_log = logging.getLogger("lowbit")
    saved_level = lowbit_log.level
    with warnings.catch_warnings():
        if args.verbose == 0:
            lowbit_log.setLevel(logging.ERROR)  # skips are summarised in the output and report
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")  # exporter chatter
        try:
            return COMMANDS[args.command](args)
        except QuantizationError as e:
            msg = " ".join(str(e).split())  # one line, whatever the message (a load_state_dict report ...)
            print(f"lowbit {args.command}: error: {msg}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:  # main() called in-process (tests, notebooks) leaves lowbit's logging as it found it
            lowbit_log.setLevel(saved_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
