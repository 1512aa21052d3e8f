"""Deployment: ONNX QDQ export checked in ONNX Runtime, and safetensors save/load."""

from .checkpoint import load, save
from .onnx_qdq import ExportResult, export_onnx, export_onnx_dynamic, export_onnx_float
from .verify import (
    ORT_SESSION_CONFIG,
    KernelCount,
    ParityReport,
    StageParity,
    count_kernels,
    run_ort,
    verify_export,
    verify_parity,
)

__all__ = [
    "ExportResult", "export_onnx", "export_onnx_float", "export_onnx_dynamic",
    "save", "load", "KernelCount", "ParityReport", "StageParity", "count_kernels", "run_ort", "verify_export",
    "verify_parity", "ORT_SESSION_CONFIG",
]
