"""Output-path checks shared by every writer in :mod:`lowbit.export`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ExportError, FileExistsRefusedError


def check_output_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """The output path as a :class:`Path` after checking it can be written.

    Raises:
        ExportError: the parent directory does not exist, or ``path`` is a directory.
        FileExistsRefusedError: the file exists and ``overwrite`` is False.
    """
    p = Path(path)
    if not p.parent.exists():
        raise ExportError(
            f"cannot write {p}: its directory {p.parent} does not exist; create it first "
            f"(Path({str(p.parent)!r}).mkdir(parents=True)) or choose another path."
        )
    if p.is_dir():
        raise ExportError(f"cannot write {p}: it is a directory; give a file name such as {p / 'model.onnx'}.")
    if p.exists() and not overwrite:
        raise FileExistsRefusedError(f"{p} already exists; pass overwrite=True to replace it, or choose another path.")
    return p
