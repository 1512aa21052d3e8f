"""Save and load quantized models as safetensors + a JSON description (no pickle).

File layout: one ``.safetensors`` file. Its tensors are the model's ``state_dict`` (float weights and
every ``TensorQuantizer`` buffer: ``scale``, ``zero_point``, state flags); its string metadata holds
``lowbit`` = JSON with the checkpoint format version, the lowbit and torch versions, the recipe (when it
is a plain preset), every quantizer's spec (format, granularity, symmetric, rounding, calibrator, dynamic,
scaled), every tensor's dtype and shape, and optionally the example input shapes.

``load`` rebuilds the quantized structure (from a float model plus the stored recipe, or from a model the
caller already built) and refuses any mismatch in tensor names, shapes, dtypes, quantizer specs or
lowbit version with a message that says which.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelFileError, ShapeMismatchError
from ..granularity import PerChannel, PerGroup, PerTensor, PerToken
from ..nn.quantizer import TensorQuantizer, place_quantizers, quantizers
from ..nn.root import set_root_attr
from ..spec import QuantSpec
from ._io import check_output_path, write_replacing

log = logging.getLogger("lowbit")

__all__ = ["save", "load", "CHECKPOINT_VERSION"]

CHECKPOINT_VERSION = 1
_KEY = "lowbit"


def _lowbit_version() -> str:
    from .. import __version__

    return __version__


def granularity_text(g) -> str:
    """A :func:`~lowbit.granularity.parse_granularity` string for ``g``."""
    if isinstance(g, PerTensor):
        return "tensor"
    if isinstance(g, PerChannel):
        return f"channel:{g.axis}"
    if isinstance(g, PerGroup):
        return f"group:{g.group_size}:{g.axis}"
    if isinstance(g, PerToken):
        return "token"
    raise ConfigError(f"unknown granularity {g!r}")


def spec_to_json(spec: QuantSpec) -> dict[str, Any]:
    """Plain-JSON description of a spec (what :func:`load` compares)."""
    return {
        "format": spec.format.name, "symmetric": spec.symmetric, "granularity": granularity_text(spec.granularity),
        "rounding": spec.rounding, "calibrator": spec.calibrator.name, "dynamic": spec.dynamic, "scaled": spec.scaled,
    }


def _recipe_to_json(recipe) -> dict | None:
    if recipe is None or getattr(recipe, "overrides", None):
        return None
    fields = {}
    for f in dataclasses.fields(recipe):
        if not f.init or f.name == "overrides":  # empty here (checked above)
            continue
        v = getattr(recipe, f.name)
        v = list(v) if isinstance(v, tuple) else v
        if not isinstance(v, str | int | float | bool | list | type(None)) or (isinstance(v, list) and not all(isinstance(i, str) for i in v)):
            return None
        fields[f.name] = v
    return {"type": type(recipe).__name__, "fields": fields}


def _recipe_from_json(d: dict):
    from .. import recipes

    cls = getattr(recipes, d["type"], None)
    if cls is None:
        raise ModelFileError(f"the checkpoint's recipe {d['type']!r} is not a lowbit.recipes preset in this version.")
    fields = {k: tuple(v) if k == "exclude" else v for k, v in d["fields"].items()}
    return cls(**fields)


def save(qmodel: nn.Module, path: str | os.PathLike, *, overwrite: bool = False, example_inputs: Any = None) -> Path:
    """Write ``qmodel``'s tensors and a JSON description of its quantizers to a safetensors file.

    Args:
        qmodel: a lowbit quantized model (or any model; float layers are saved as plain tensors).
        path: output file (``.safetensors``); its directory must exist.
        overwrite: replace an existing file.
        example_inputs: optional tensor or tuple of tensors whose shapes are stored, so :func:`load` can
            rebuild a statically quantized graph from the float model without being given inputs.

    Returns the path. Raises :class:`ExportError` / :class:`FileExistsRefusedError` for a bad path.
    """
    from safetensors.torch import save_file

    out = check_output_path(path, overwrite)
    state = {k: v.detach().contiguous().cpu() for k, v in qmodel.state_dict().items()}
    # safetensors refuses shared storage: every tensor gets its own copy
    state = {k: v.clone() for k, v in state.items()}
    meta = {
        "format": "lowbit-checkpoint", "checkpoint_version": CHECKPOINT_VERSION,
        "lowbit_version": _lowbit_version(), "torch_version": torch.__version__,
        "recipe": _recipe_to_json(getattr(qmodel, "lowbit_recipe", None)),
        "quantizers": {name: spec_to_json(q.spec) for name, q in quantizers(qmodel)},
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in state.items()},
        "example_inputs": None,
    }
    if example_inputs is not None:
        from .onnx_qdq import as_input_tuple

        meta["example_inputs"] = [{"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                                  for t in as_input_tuple(example_inputs)]
    write_replacing(out, lambda tmp: save_file(state, str(tmp), metadata={_KEY: json.dumps(meta)}))
    return out


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON description stored in a lowbit checkpoint; :class:`ModelFileError` for anything else."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p} does not exist or is not a file; give the path of a file written by lowbit.save.")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get(_KEY)
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise ModelFileError(f"{p} is not a readable safetensors file ({str(e)[:200]}); is it corrupted or truncated?") from e
    if raw is None:
        raise ModelFileError(f"{p} is a safetensors file but not a lowbit checkpoint (no '{_KEY}' metadata); "
                             "load it with safetensors directly, or save the model with lowbit.save.")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{p}: the lowbit metadata is not valid JSON ({e}); the file is corrupted.") from e
    if (not isinstance(meta, dict) or meta.get("format") != "lowbit-checkpoint"
            or not isinstance(meta.get("checkpoint_version"), int)
            or not isinstance(meta.get("tensors"), dict) or not isinstance(meta.get("quantizers"), dict)):
        raise ModelFileError(f"{p}: unrecognised lowbit metadata; the file is corrupted or from another tool.")
    return meta


def _check_versions(meta: dict, path: Path, allow_version_mismatch: bool) -> None:
    if meta["checkpoint_version"] > CHECKPOINT_VERSION:
        raise ModelFileError(
            f"{path} uses checkpoint format {meta['checkpoint_version']}, newer than this lowbit reads "
            f"({CHECKPOINT_VERSION}); upgrade lowbit (it was written by lowbit {meta.get('lowbit_version')})."
        )
    mine, theirs = _lowbit_version(), str(meta.get("lowbit_version"))
    if mine.split(".")[:2] != theirs.split(".")[:2] and not allow_version_mismatch:
        raise ModelFileError(
            f"{path} was written by lowbit {theirs}, this is lowbit {mine}; quantization numerics may differ "
            "between versions. Pass allow_version_mismatch=True to load it anyway, or re-quantize."
        )
    if meta.get("torch_version") != torch.__version__:
        log.info("lowbit: %s was saved with torch %s, loading with torch %s", path, meta.get("torch_version"),
                 torch.__version__)


def _rebuild(model: nn.Module, meta: dict, example_inputs: Any) -> nn.Module:
    from ..api import _capture, _example_call
    from ..capture.log import DecisionLog
    from ..passes.fold_bn import fold_bn

    if meta.get("recipe") is None:
        raise ModelFileError(
            "the checkpoint's recipe could not be stored (custom overrides); pass the quantized model structure "
            "instead: load(path, lambda: lowbit.quantize(float_model, recipe, calib_data))."
        )
    recipe = _recipe_from_json(meta["recipe"])
    example = None
    if recipe.edge_spec() is not None:
        if example_inputs is None and meta.get("example_inputs"):
            device = next((p.device for p in model.parameters()), torch.device("cpu"))  # trace where the model lives
            example_inputs = tuple(torch.zeros(e["shape"], dtype=getattr(torch, e["dtype"]), device=device)
                                   for e in meta["example_inputs"])
        if example_inputs is None:
            raise ConfigError(
                "rebuilding a statically quantized model needs one example input to place the activation "
                "quantizers: pass example_inputs= to load, or save with lowbit.save(..., example_inputs=x)."
            )
        example = _example_call(example_inputs, model)
    work = copy.deepcopy(model).eval()
    work, _ = fold_bn(work, inplace=True)
    qmodel = _capture(work, recipe, DecisionLog(), example)
    set_root_attr(qmodel, "lowbit_recipe", recipe)
    return qmodel


def load(
    path: str | os.PathLike,
    model: nn.Module | Callable[[], nn.Module],
    *,
    example_inputs: Any = None,
    allow_version_mismatch: bool = False,
) -> nn.Module:
    """Load a checkpoint written by :func:`save`.

    Args:
        path: the ``.safetensors`` file.
        model: the float model (its quantized structure is rebuilt with the stored recipe, BatchNorm folded as
            :func:`lowbit.quantize` does), a model that already has the quantized structure, or a callable
            returning either.
        example_inputs: one input for rebuilding static quantizer placement (else the stored shapes).
        allow_version_mismatch: load a file written by another lowbit minor version.

    Returns the quantized model in eval mode, bit-exact with the saved one.

    Raises:
        ModelFileError: missing, corrupted or foreign file; newer format or other lowbit version.
        ShapeMismatchError: tensor names, shapes or dtypes differ between file and model (names them).
        ConfigError: a quantizer's spec differs between file and model (names it).
    """
    from safetensors.torch import load_file

    p = Path(path)
    meta = read_metadata(p)
    _check_versions(meta, p, allow_version_mismatch)
    if not isinstance(model, nn.Module):
        model = model()
    if not any(True for _ in quantizers(model)) and meta["quantizers"]:
        model = _rebuild(model, meta, example_inputs)
    try:
        state = load_file(str(p))
    except Exception as e:
        raise ModelFileError(f"{p}: cannot read the tensors ({str(e)[:200]}); the file is corrupted.") from e
    _check_state(model, state, meta, p)
    model.load_state_dict(state, strict=True)
    place_quantizers(model)  # a rebuilt model's quantizers start on the CPU; put them with a CUDA model's weights
    for m in model.modules():
        m.__dict__.pop("_lowbit_wcache", None)
    return model.eval()


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    for k, info in meta["tensors"].items():
        t = state.get(k)
        if t is None or list(t.shape) != info["shape"] or str(t.dtype).removeprefix("torch.") != info["dtype"]:
            raise ModelFileError(f"{path}: tensor {k!r} does not match the file's own description; the file is corrupted.")
    mine = {name: spec_to_json(q.spec) for name, q in quantizers(model)}
    theirs = meta["quantizers"]
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            raise ConfigError(
                f"quantizer {name!r}: the file has {theirs.get(name)}, the model has {mine.get(name)}; load into a model "
                "quantized with the same recipe (or the float model, to rebuild it from the stored recipe)."
            )
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ShapeMismatchError(
            f"{path} does not fit this model: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected "
            f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}. Is it the same architecture?"
        )
    qbuf = {f"{n}.{b}" if n else b for n, m in model.named_modules() if isinstance(m, TensorQuantizer)
            for b in ("scale", "zero_point")}
    for k, t in state.items():
        e = expected[k]
        if e.dtype != t.dtype or (e.shape != t.shape and k not in qbuf):
            raise ShapeMismatchError(
                f"{k}: the file has {t.dtype} {tuple(t.shape)}, the model expects {e.dtype} {tuple(e.shape)}; "
                "the checkpoint belongs to a different architecture or configuration."
            )
