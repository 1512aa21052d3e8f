"""Whole models quantized by ORT's own quantize_static (QDQ), run bit-exact against ONNX Runtime."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from lowbit.runtime import IntegerRuntime, compare_requant_modes


class SmallCNN(nn.Module):
    """conv-bn-relu, depthwise, pointwise + residual add, max/avg/global pooling, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(self.pw(self.dw(y)) + y)
        y = torch.relu(self.down(self.pool(y)))
        y = nn.functional.adaptive_avg_pool2d(self.avg(y), 1)
        return self.fc(torch.flatten(y, 1))


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]) -> None:
        self._it = iter([{"input": b} for b in batches])

    def get_next(self):
        return next(self._it, None)


def _quantize(model: nn.Module, shape: tuple[int, ...], tmp_path, n_calib: int = 4) -> str:
    f32, qdq = str(tmp_path / "f32.onnx"), str(tmp_path / "qdq.onnx")
    torch.onnx.export(model, torch.randn(*shape), f32, input_names=["input"], output_names=["out"],
                      dynamo=False, opset_version=17)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(*shape, generator=gen).numpy() for _ in range(n_calib)]
    quantize_static(f32, qdq, _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return qdq


def _ort(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()  # default: ORT_ENABLE_ALL, so ORT fuses the QDQ groups into QLinear kernels
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _random_bn(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)


def test_small_cnn_bit_exact_with_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    _random_bn(model)
    path = _quantize(model, (2, 3, 16, 16), tmp_path)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Conv", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Gemm", "QuantizeLinear"} <= ops
    rt = IntegerRuntime(path, requant="float")
    sess = _ort(path)
    for seed in range(3):
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(100 + seed)).numpy()
        ref = sess.run(None, {"input": x})[0]
        out, codes = rt.run_with_intermediates({"input": x})
        np.testing.assert_array_equal(out["out"], ref)
        assert len(np.unique(ref)) > 5
    # one integer result per QuantizeLinear in the graph
    assert len(codes) == sum(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node)
    per_op = compare_requant_modes(path, {"input": x})
    assert per_op.n_total == sum(c.size for c in codes.values())
    assert per_op.worst <= 1 and 0 < per_op.n_differing / per_op.n_total < 0.05
    compounded = compare_requant_modes(path, {"input": x}, compounded=True)
    assert compounded.n_differing >= per_op.n_differing


def test_small_cnn_fixed_point_stays_close_to_float(tmp_path):
    torch.manual_seed(1)
    model = SmallCNN().eval()
    _random_bn(model)
    path = _quantize(model, (1, 3, 16, 16), tmp_path, n_calib=2)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)).numpy()
    a = IntegerRuntime(path, "float").run({"input": x})["out"]
    b = IntegerRuntime(path, "fixed_point").run({"input": x})["out"]
    step = np.abs(np.diff(np.unique(a))).min()
    assert np.abs(a - b).max() <= 4 * step + 1e-7


@pytest.mark.slow
def test_resnet18_bit_exact_and_timed(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    _random_bn(model)
    path = _quantize(model, (1, 3, 224, 224), tmp_path, n_calib=2)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7)).numpy()
    ref = _ort(path).run(None, {"input": x})[0]
    rt = IntegerRuntime(path)
    t0 = time.perf_counter()
    out = rt.run({"input": x})["out"]
    seconds = time.perf_counter() - t0
    np.testing.assert_array_equal(out, ref)
    per_op = compare_requant_modes(path, {"input": x})
    cmp = compare_requant_modes(path, {"input": x}, compounded=True)
    print(f"resnet18 224x224 integer runtime: {seconds:.2f} s; fixed_point vs float per op: "
          f"{per_op.n_differing}/{per_op.n_total} codes differ (worst {per_op.worst}); end to end: "
          f"{cmp.n_differing}/{cmp.n_total} differ (worst {cmp.worst} steps)")
    assert per_op.worst <= 1
    assert seconds < 20.0
