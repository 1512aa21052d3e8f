"""IDX reader/writer against hand-built bytes."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from lowbit.errors import DataNotFoundError, ModelFileError
from lowbit.zoo.idx import read_idx, write_idx


def test_read_hand_built_uint8(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 4) + data.tobytes()
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    for name in ("a-idx3-ubyte.gz", "a-idx3-ubyte"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got, data)


def test_read_big_endian_int32(tmp_path):
    raw = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + struct.pack(">3i", -1, 256, 70000)
    (tmp_path / "b").write_bytes(raw)
    assert read_idx(tmp_path / "b").tolist() == [-1, 256, 70000]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_roundtrip(tmp_path, dtype):
    arr = (np.arange(30) - 7).astype(dtype).reshape(5, 6)
    write_idx(tmp_path / "r.gz", arr)
    got = read_idx(tmp_path / "r.gz")
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, arr)


def test_errors(tmp_path):
    with pytest.raises(DataNotFoundError):
        read_idx(tmp_path / "missing")
    (tmp_path / "bad").write_bytes(b"\x1f\x8bxxxxxxxx")
    with pytest.raises(ModelFileError, match="not an IDX"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 9)
    with pytest.raises(ModelFileError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "cut").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">I", 10))  # 3 sizes announced, 1 there
    with pytest.raises(ModelFileError, match="header of a 3-d array needs 16 bytes, the file holds 8"):
        read_idx(tmp_path / "cut")
    with pytest.raises(ModelFileError, match="dtype"):
        write_idx(tmp_path / "c", np.zeros(3, dtype=np.uint16))
