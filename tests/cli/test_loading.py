"""``lowbit.loading``: MODEL and DATA strings -> model / dataset, with the error for each bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import ConfigError, DataNotFoundError, ModelFileError
from lowbit.loading import load_data, load_model, parse_shape

from .tiny_models import tiny_net


def test_factory_and_input_shape():
    lm = load_model("tests.cli.tiny_models:tiny_net")
    assert lm.input_shape == (3, 8, 8) and not lm.model.training
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(lm.model(x), tiny_net()(x))


def test_python_file_factory(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    lm = load_model(f"{f}:build", input_shape=(4,))
    assert isinstance(lm.model, torch.nn.Linear) and lm.example_input(3).shape == (3, 4)


def test_pt2_program(tmp_path):
    m = tiny_net()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(m, (x,)), str(path))
    lm = load_model(str(path))
    assert lm.input_shape == (3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), m(x))
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="not a torch.export program"):
        load_model(str(bad))


def test_weights_file_loads_and_mismatch_is_explained(tmp_path):
    src = tiny_net()
    with torch.no_grad():
        src.fc.bias.fill_(3.0)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    lm = load_model("tests.cli.tiny_models:tiny_net", weights=str(path))
    assert torch.equal(lm.model.fc.bias, torch.full((4,), 3.0))
    torch.save({"other": torch.zeros(1)}, path)
    with pytest.raises(ModelFileError, match="for this exact architecture"):
        load_model("tests.cli.tiny_models:tiny_net", weights=str(path))
    with pytest.raises(DataNotFoundError):
        load_model("tests.cli.tiny_models:tiny_net", weights=str(tmp_path / "none.pt"))


def test_unknown_shape_asks_for_it(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    with pytest.raises(ConfigError, match="--input-shape"):
        load_model(f"{f}:build").example_input()


def test_parse_shape():
    assert parse_shape("3,224,224") == (3, 224, 224) == parse_shape("3x224x224")
    for bad in ("", "3,-1", "a,b"):
        with pytest.raises(ConfigError):
            parse_shape(bad)


def test_tensor_files(tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    np.save(tmp_path / "a.npy", x)
    d = load_data(str(tmp_path / "a.npy"))
    assert not d.labelled and d.dataset.tensors[0].dtype == torch.float32
    assert torch.equal(d.dataset.tensors[0], torch.from_numpy(x).float())
    np.savez(tmp_path / "b.npz", x=x, y=np.array([1, 0]))
    d = load_data(str(tmp_path / "b.npz"))
    assert d.labelled and d.dataset.tensors[1].tolist() == [1, 0]
    with pytest.raises(DataNotFoundError, match="built-in data set"):
        load_data(str(tmp_path / "nothing"))
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ModelFileError):
        load_data(str(tmp_path / "c.txt"))


def test_image_folder_uses_model_preprocessing(tmp_path):
    from PIL import Image

    from lowbit.zoo.transforms import Preprocess

    for k, cls in enumerate(("cat", "dog")):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((10, 12, 3), 40 * (k + 1), np.uint8)).save(tmp_path / cls / "a.png")
    pre = Preprocess(resize=None, crop=8, mean=(0.0,) * 3, std=(1.0,) * 3)
    d = load_data(str(tmp_path), pre)
    assert d.labelled and len(d.dataset) == 2
    x, y = d.dataset[1]
    assert y == 1 and x.shape == (3, 8, 8)
    torch.testing.assert_close(x, torch.full((3, 8, 8), 80 / 255))
