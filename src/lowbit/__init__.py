"""lowbit: turn a trained PyTorch model into a smaller, faster, low-precision model, and prove it still works."""

from __future__ import annotations

# ``lowbit.quantize`` is the model entry point; tensor-level quantize/dequantize live in ``lowbit.ops``.
from . import formats, recipes
from .api import calibrate, decision_log, quantize
from .capture.readback import format_quant_table, format_sqnr_table, layer_sqnr, quant_table
from .errors import (
    CaptureError,
    ConfigError,
    DataNotFoundError,
    DistributedError,
    EmptyCalibrationError,
    ExportError,
    FileExistsRefusedError,
    MissingDependencyError,
    ModelFileError,
    NoBatchNormError,
    NonFiniteError,
    ParityError,
    QuantizationError,
    ShapeMismatchError,
    UnsupportedLayerError,
)
from .export import export_onnx, export_onnx_dynamic, export_onnx_float, load, save  # deployment (issue 4)
from .granularity import PerChannel, PerGroup, PerTensor, PerToken
from .mixed_precision import MixedPrecisionPlan, search_mixed_precision  # per-layer recipe by sensitivity
from .nn import TensorQuantizer, calibrating, quantizers
from .nn.int8 import convert
from .ops import dequantize, fake_quantize
from .passes import DFQ, AdaRoundConfig, DistillConfig
from .qat import distillation_loss, prepare_qat  # quantization-aware training (issue 7)
from .spec import QuantSpec, compute_qparams

__version__ = "0.1.0"

# Subpackages that ``import lowbit`` does not load (torch.distributed, the integer runtime, the data sets, the
# report): ``lowbit.distributed.int8_hook`` works after a plain ``import lowbit``, importing on first use.
_LAZY_SUBMODULES = ("calibration", "distributed", "inspect", "loading", "report", "runtime", "workflows", "zoo")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


__all__ = [
    "formats", "QuantSpec", "compute_qparams", "PerTensor", "PerChannel", "PerGroup", "PerToken",
    "quantize", "dequantize", "fake_quantize",
    "QuantizationError", "ConfigError", "NonFiniteError", "EmptyCalibrationError", "NoBatchNormError",
    "ShapeMismatchError", "UnsupportedLayerError", "CaptureError", "ModelFileError", "FileExistsRefusedError",
    "ExportError", "ParityError", "DistributedError", "MissingDependencyError", "DataNotFoundError",
    "recipes", "calibrate", "decision_log", "quant_table", "format_quant_table", "layer_sqnr", "format_sqnr_table",
    "TensorQuantizer", "calibrating", "quantizers", "DFQ", "AdaRoundConfig", "DistillConfig",
    "export_onnx", "export_onnx_float", "export_onnx_dynamic", "save", "load", "convert",
    "prepare_qat", "distillation_loss", "search_mixed_precision", "MixedPrecisionPlan",
]
