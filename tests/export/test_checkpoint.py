"""safetensors + JSON checkpoints: bit-exact round trips, no pickle, and every refusal."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit.errors import ConfigError, FileExistsRefusedError, ModelFileError, ShapeMismatchError
from lowbit.export.checkpoint import load, read_metadata, save


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_round_trip_from_float_model_bit_exact(small_net, qnet, calib, tmp_path):
    p = save(qnet, tmp_path / "q.safetensors", example_inputs=calib[0])
    meta = read_metadata(p)
    assert meta["recipe"]["type"] == "W8A8"
    assert meta["quantizers"]["c1.weight_quantizer"]["granularity"] == "channel:0"
    assert meta["quantizers"]["c1.weight_quantizer"]["format"] == "int8"
    assert meta["lowbit_version"] == lowbit.__version__ and meta["torch_version"] == torch.__version__
    fresh = nn.Module.__new__(type(small_net))
    fresh.__init__()  # a new float model with other (random) weights: the file must supply everything
    loaded = load(p, fresh)
    _same_state(qnet, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(calib[2]), qnet(calib[2]))


def test_round_trip_into_prebuilt_structure_and_factory(qnet, small_net, calib, tmp_path):
    p = save(qnet, tmp_path / "q.safetensors")
    loaded = load(p, lambda: lowbit.quantize(small_net, lowbit.recipes.W8A8(), calib[:1], progress=False))
    with torch.no_grad():
        assert torch.equal(loaded(calib[2]), qnet(calib[2]))


def test_weight_only_int4_round_trip(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    q = lowbit.quantize(m, lowbit.recipes.W4A16(group_size=8), None, progress=False)
    p = save(q, tmp_path / "w4.safetensors")
    loaded = load(p, nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)))
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_no_pickle_in_file(qnet, tmp_path):
    raw = save(qnet, tmp_path / "q.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # safetensors: JSON header + raw tensor bytes, nothing else
    assert "__metadata__" in header
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous tensor data
    assert len(raw) == 8 + header_len + spans[-1][1]  # no byte left for a pickle
    assert set(header) - {"__metadata__"} == set(qnet.state_dict())


def test_metadata_without_its_tables_is_refused(small_net, tmp_path):
    for meta in ({"format": "lowbit-checkpoint", "checkpoint_version": 1}, ["lowbit-checkpoint"]):
        p = tmp_path / "partial.safetensors"
        save_file({"w": torch.zeros(2)}, str(p), metadata={"lowbit": json.dumps(meta)})
        with pytest.raises(ModelFileError, match="unrecognised lowbit metadata"):
            load(p, small_net)


def test_refuses_existing_file(qnet, tmp_path):
    p = tmp_path / "q.safetensors"
    p.write_bytes(b"x")
    with pytest.raises(FileExistsRefusedError):
        save(qnet, p)


def test_corrupted_and_foreign_files(qnet, small_net, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        load(bad, small_net)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ModelFileError, match="not a lowbit checkpoint"):
        load(foreign, small_net)
    with pytest.raises(ModelFileError, match="does not exist"):
        load(tmp_path / "missing.safetensors", small_net)
    good = save(qnet, tmp_path / "q.safetensors")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ModelFileError):
        load(truncated, small_net)


def test_refuses_other_lowbit_version(qnet, small_net, tmp_path, monkeypatch):
    p = save(qnet, tmp_path / "q.safetensors")
    monkeypatch.setattr(lowbit, "__version__", "9.9.0")
    with pytest.raises(ModelFileError, match="written by lowbit 0.1.0.*allow_version_mismatch"):
        load(p, small_net)


def test_refuses_shape_and_spec_mismatch(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4)).eval()
    q = lowbit.quantize(m, lowbit.recipes.WeightOnly(bits=8), None, progress=False)
    p = save(q, tmp_path / "q.safetensors")
    with pytest.raises(ShapeMismatchError, match=r"0\.(weight|bias).*\(4,\).*expects.*\(5,"):
        load(p, lowbit.quantize(nn.Sequential(nn.Linear(8, 5)), lowbit.recipes.WeightOnly(bits=8), None, progress=False))
    with pytest.raises(ConfigError, match=r"quantizer .0.weight_quantizer."):
        load(p, lowbit.quantize(nn.Sequential(nn.Linear(8, 4)), lowbit.recipes.WeightOnly(bits=4), None, progress=False))


def test_static_rebuild_needs_example(qnet, small_net, tmp_path):
    p = save(qnet, tmp_path / "q.safetensors")  # no example_inputs stored
    with pytest.raises(ConfigError, match="example_inputs"):
        load(p, small_net)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_checkpoint_file_mode_follows_umask(qnet, tmp_path, umask):
    """A checkpoint gets the mode a plain open() gives a new file (0o666 less the umask), as the ONNX files
    do; safetensors alone writes 0600."""
    old = os.umask(umask)
    try:
        p = save(qnet, tmp_path / "q.safetensors")
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"")
        again = save(qnet, p, overwrite=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(again.stat().st_mode) == 0o666 & ~umask
    assert sorted(f.name for f in tmp_path.iterdir()) == ["plain.bin", "q.safetensors"]  # no temporary left
    assert read_metadata(p)["quantizers"]  # still a readable checkpoint
