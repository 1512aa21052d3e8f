"""Every failure a user can cause raises a :class:`QuantizationError` subclass.

The message always says what was wrong and how to fix it. Catch ``lowbit.QuantizationError`` to catch
them all; each subclass also derives from the closest builtin (``ValueError``, ``FileNotFoundError`` ...)
so code written against the builtins keeps working.
"""

from __future__ import annotations


class QuantizationError(Exception):
    """Base class of all user-facing lowbit errors."""


class ConfigError(QuantizationError, ValueError):
    """An argument or configuration value is out of range or inconsistent (bit width, axis, group size...)."""


class NonFiniteError(QuantizationError, ValueError):
    """Data given to an observer or quantizer contains NaN or Inf."""


class EmptyCalibrationError(QuantizationError, ValueError):
    """Calibration saw no data, so no range can be computed."""


class NoBatchNormError(EmptyCalibrationError):
    """Data-free calibration inputs were asked for (``DFQ(act_range="distilled")``), but the model has no
    BatchNorm statistics to distill them from."""


class ShapeMismatchError(QuantizationError, ValueError):
    """A tensor's shape does not fit the spec, checkpoint or layer it is used with."""


class UnsupportedLayerError(QuantizationError, TypeError):
    """A layer or operator cannot take the requested quantization."""


class CaptureError(QuantizationError, RuntimeError):
    """The model could not be captured as a graph and no fallback applies."""


class ModelFileError(QuantizationError, ValueError):
    """A file is missing, corrupted, or not a model lowbit can read."""


class FileExistsRefusedError(QuantizationError, FileExistsError):
    """An output file already exists and ``overwrite=True`` was not given."""


class ExportError(QuantizationError, RuntimeError):
    """A model cannot be written to the requested deployment format."""


class ParityError(QuantizationError, AssertionError):
    """A deployed model disagrees with the simulated model beyond the documented tolerance."""


class DistributedError(QuantizationError, RuntimeError):
    """A torch.distributed operation was asked for without an initialised process group, or ranks disagree."""


def check_finite(x, name: str) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` if tensor ``x`` holds NaN or Inf.

    One pass over ``x``: ``torch.aminmax`` propagates NaN and keeps ``±inf``, and ``lo * 0 + hi * 0`` is 0
    exactly when both are finite (NaN otherwise, never an overflow), so the full tensor is read once
    (``isfinite(x).all()`` read it five times; on a GPU, QAT calls this twice per quantizer and step).
    Counting the NaN and Inf values for the message happens only on failure.
    """
    import torch

    if not x.is_floating_point() or x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    if not bool(lo * 0 + hi * 0 == 0):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise NonFiniteError(
            f"{name} contains {n_nan} NaN and {n_inf} Inf values out of {x.numel()}; "
            "quantization ranges need finite data. Check the preprocessing or the model's inputs "
            "(e.g. torch.nan_to_num) before calibrating."
        )


class MissingDependencyError(QuantizationError, ImportError):
    """An optional package (model weights, data set, library) is not installed; the message says what to install."""


class DataNotFoundError(QuantizationError, FileNotFoundError):
    """A data set or cached model file is not where it was looked for; the message says where to get it."""
