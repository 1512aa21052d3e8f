"""Output-path checks shared by every writer in :mod:`lowbit.export`."""

from __future__ import annotations

import os
from collections.abc import Callable
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


def write_replacing(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` all at once: ``write(tmp)`` fills a temporary file beside it, which then replaces
    ``path`` (a reader never sees half a file; a failed write leaves ``path`` as it was).

    The file gets the permission bits a plain ``open(path, "w")`` gives a new file, ``0o666`` less the
    umask (0644 under the usual 022): the temporary file is first created by ``open`` and its mode is put
    back after ``write``, since some writers replace it with a private one (safetensors 0.8 writes 0600).
    """
    tmp = path.with_name(path.name + ".lowbit-tmp")
    tmp.unlink(missing_ok=True)  # a leftover from an interrupted run would keep its own mode
    try:
        with open(tmp, "wb"):
            pass
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
