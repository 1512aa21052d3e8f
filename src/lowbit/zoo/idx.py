"""The IDX file format of (Fashion-)MNIST: read and write, gzip or plain.

Layout (LeCun, "THE MNIST DATABASE" page): two zero bytes, one type byte (0x08 uint8, 0x09 int8,
0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), one byte with the number of dimensions ``n``,
then ``n`` big-endian uint32 sizes, then the data in C order, big-endian.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import DataNotFoundError, ModelFileError

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open(path: Path, mode: str):
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` is decompressed) into a native-endian numpy array of its stored shape.

    Raises DataNotFoundError when the file is absent and ModelFileError when the header is invalid or the
    payload size does not match it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"IDX file {path} does not exist")
    with _open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ModelFileError(f"{path} is not an IDX file (bad magic {raw[:4]!r}); expected 00 00 <type> <ndim>")
    dtype = np.dtype(_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ModelFileError(f"{path}: the IDX header of a {ndim}-d array needs {header} bytes, the file holds "
                             f"{len(raw)}; the file is truncated or corrupted")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ModelFileError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
                             f"{len(raw) - header} bytes of data; the file is truncated or corrupted")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip when the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    code = next((c for c, d in _DTYPES.items() if np.dtype(d).newbyteorder("=") == array.dtype), None)
    if code is None:
        raise ModelFileError(f"IDX cannot store dtype {array.dtype}; use one of uint8, int8, int16, int32, "
                             "float32, float64")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with _open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array).astype(_DTYPES[code]).tobytes())
