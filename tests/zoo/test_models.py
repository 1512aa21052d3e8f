"""Model loaders: architectures against functional references, the weight cache, missing-package errors."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ConfigError, DataNotFoundError, MissingDependencyError, ModelFileError
from lowbit.zoo import models
from lowbit.zoo.fashion_nets import BasicBlock, FashionResNet
from lowbit.zoo.paths import cache_dir, require


def test_fashion_cnn_matches_functional_reference():
    torch.manual_seed(0)
    m = models.fashion_cnn(pretrained=False)
    assert not m.training and sum(p.numel() for p in m.parameters()) == 421_642
    x = torch.randn(2, 1, 28, 28)
    h = F.max_pool2d(F.relu(F.conv2d(x, m.conv1.weight, m.conv1.bias, padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, m.conv2.weight, m.conv2.bias, padding=1)), 2)
    ref = F.linear(F.relu(F.linear(h.flatten(1), m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)
    torch.testing.assert_close(m(x), ref)


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def test_resnet_block_residual_add_reference():
    torch.manual_seed(0)
    for cin, cout, stride in ((4, 4, 1), (4, 8, 2)):
        b = BasicBlock(cin, cout, stride)
        for bn in [m for m in b.modules() if isinstance(m, nn.BatchNorm2d)]:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
        b.eval()
        x = torch.randn(2, cin, 8, 8)
        main = _bn(F.conv2d(F.relu(_bn(F.conv2d(x, b.conv1.weight, stride=stride, padding=1), b.bn1)),
                            b.conv2.weight, padding=1), b.bn2)
        short = x if stride == 1 else _bn(F.conv2d(x, b.shortcut[0].weight, stride=stride), b.shortcut[1])
        torch.testing.assert_close(b(x), F.relu(main + short))
    net = FashionResNet().eval()
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 9
    out = net(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_missing_weights_say_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    with pytest.raises(DataNotFoundError, match="python -m lowbit.zoo.train_fashion --models fashion_resnet"):
        models.fashion_resnet()


def test_train_save_load_roundtrip(tmp_path, monkeypatch):
    """train_fashion on a tiny synthetic set (band k lit for class k) writes weights that load back."""
    from lowbit.zoo import train_fashion as tf

    def tiny(split="test", root=None, normalize=True):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        y = torch.randint(0, 10, (60,), generator=g)
        x = torch.rand(60, 1, 28, 28, generator=g) * 0.1
        for i, k in enumerate(y.tolist()):
            x[i, 0, 2 * k + 4] += 1.0
        return torch.utils.data.TensorDataset(x, y)

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(tf, "fashion_mnist", tiny)
    trained, res = tf.train_fashion("fashion_cnn", tf.TrainConfig(epochs=1, batch_size=30), progress=False)
    assert res.path == tmp_path / "fashion" / "fashion_cnn.safetensors" and res.path.is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert res.path.stat().st_mode & 0o777 == 0o666 & ~umask  # a plain file's mode (safetensors alone writes 0600)
    loaded = models.fashion_cnn()
    x = tiny("test").tensors[0]
    torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
    from safetensors import safe_open

    with safe_open(str(res.path), "pt") as f:
        assert f.metadata()["test_top1"] == f"{res.test_top1:.4f}" and f.metadata()["epochs"] == "1"
    acc = (loaded(x).argmax(1) == tiny("test").tensors[1]).float().mean().item()
    assert acc == pytest.approx(res.test_top1)
    res.path.write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match="--force"):
        models.fashion_cnn()
    with pytest.raises(ConfigError):
        tf.train_fashion("vgg", progress=False)


def test_sentence_encoder_masked_mean_pooling():
    class Fake(nn.Module):
        def forward(self, input_ids, attention_mask):
            h = torch.stack([input_ids.float(), 2 * input_ids.float()], dim=-1)  # (N, T, 2)
            return type("Out", (), {"last_hidden_state": h})()

    enc = models.SentenceEncoder(Fake(), tokenizer=None, normalize=False)
    ids = torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    torch.testing.assert_close(enc(ids, mask), torch.tensor([[2.0, 4.0], [4.0, 8.0]]))
    enc.normalize = True
    torch.testing.assert_close(enc(ids, mask), torch.tensor([[1.0, 2.0], [1.0, 2.0]]) / 5**0.5)


def test_missing_package_errors(monkeypatch):
    with pytest.raises(MissingDependencyError, match="pip install no_such_pkg_lowbit"):
        require("no_such_pkg_lowbit", "a test")
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import now raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install efficientnet_lite_pytorch"):
        models.efficientnet_lite0()
    err = MissingDependencyError("x")
    assert isinstance(err, ImportError)


def test_torchvision_by_name():
    pytest.importorskip("torchvision", reason="torchvision not installed: pip install torchvision")
    m = models.torchvision_model("resnet18")
    assert not m.training and sum(p.numel() for p in m.parameters()) == 11_689_512
    with pytest.raises(ConfigError, match="resnet18"):
        models.torchvision_model("resnet_nonexistent")
