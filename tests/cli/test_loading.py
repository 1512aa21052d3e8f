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


def test_unreadable_tensor_files_are_model_file_errors(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ModelFileError, match=r"cannot read DATA .*bad\.npz \(BadZipFile"):
        load_data(str(tmp_path / "bad.npz"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ModelFileError, match="no pickled objects"):
        load_data(str(tmp_path / "obj.npy"))
    np.savez(tmp_path / "onehot.npz", x=np.zeros((3, 2), np.float32), y=np.eye(3))
    with pytest.raises(ModelFileError, match=r"one class index per sample .* got shape \(3, 3\)"):
        load_data(str(tmp_path / "onehot.npz"))


def test_pt2_program_is_quantized_layer_by_layer(tmp_path):
    """ep.module() refuses eval() and calls ATen ops: the loaded program must still quantize like the module."""
    import lowbit
    from lowbit import recipes

    m = tiny_net()
    batch = torch.export.Dim("batch", min=1)
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(m, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},)), str(path))
    lm = load_model(str(path))
    x = torch.randn(8, 3, 8, 8)
    q = lowbit.quantize(lm.model, recipes.W8A8(), [x], progress=False)
    assert sorted(d.name for d in lowbit.decision_log(q).quantized) == ["conv1", "dw", "fc"]
    with torch.no_grad():
        ref = m(x)
        assert torch.nn.functional.cosine_similarity(q(x).flatten(), ref.flatten(), dim=0) > 0.99
        assert not torch.equal(q(x), ref)  # really quantized


def test_torchvision_weights_with_another_class_count(tmp_path):
    """README: `torchvision:resnet18 --weights` takes the state_dict of `resnet18(num_classes=10)`."""
    tv = pytest.importorskip("torchvision")
    src = tv.models.get_model("mobilenet_v3_small", num_classes=10).eval()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    lm = load_model("torchvision:mobilenet_v3_small", weights=str(tmp_path / "w.pt"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(lm.model(x), src(x))
    state = src.state_dict()
    state["features.0.0.weight"] = torch.zeros(5, 3, 3, 3)  # not only the classifier differs: still an error
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ModelFileError, match="for this exact architecture"):
        load_model("torchvision:mobilenet_v3_small", weights=str(tmp_path / "w.pt"))
