"""Metrics against closed forms, torch's own reductions and the quantizer's half-step bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit import PerChannel, PerGroup, QuantSpec, compute_qparams, fake_quantize
from lowbit.errors import NonFiniteError, ShapeMismatchError
from lowbit.report.metrics import (
    StepError,
    cosine_similarity,
    sqnr_db,
    step_error,
    top1_accuracy,
    top1_agreement,
)


def test_sqnr_closed_form():
    # signal 3^2 + 4^2 = 25, noise 1^2 = 1
    assert sqnr_db([3.0, 4.0], [3.0, 3.0]) == pytest.approx(10 * math.log10(25.0), abs=1e-12)
    # x_hat = (1 + e) x  ->  noise = e^2 signal  ->  SQNR = -20 log10(e) = 20 dB for e = 0.1
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6)
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0, abs=1e-5)
    assert sqnr_db(x.numpy(), (x * 0.99).numpy()) == pytest.approx(40.0, abs=1e-4)


def test_sqnr_special_values():
    x = torch.tensor([1.0, -2.0, 0.5])
    assert sqnr_db(x, x.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.zeros(3)) == math.inf
    assert sqnr_db(torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])) == -math.inf


def test_sqnr_matches_norm_ratio_reference():
    # the amplitude form used by torch.ao's numeric suite: 20 log10(|x| / |x - y|), here with numpy
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    y = (x + 0.03 * rng.standard_normal((64, 32))).astype(np.float32)
    ref = 20 * np.log10(np.linalg.norm(x.astype(np.float64)) / np.linalg.norm(x.astype(np.float64) - y))
    assert sqnr_db(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(float(ref), rel=1e-12)


def test_sqnr_of_int8_uniform_quantization_near_6db_per_bit():
    # a uniform signal over the full int8 range: noise power s^2/12, signal power (127 s)^2 / 3
    # -> SQNR = 10 log10(4 * 127^2) = 48.13 dB (the "6.02 dB per bit" rule)
    torch.manual_seed(2)
    x = (torch.rand(200_000) * 2 - 1) * 127 * 0.01
    spec = QuantSpec("int8", symmetric=True)
    s, z = compute_qparams(spec, x.min(), x.max())
    got = sqnr_db(x, fake_quantize(x, s, z, spec))
    assert got == pytest.approx(10 * math.log10(4 * 127**2), abs=0.1)


@given(st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_sqnr_is_scale_invariant(c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, generator=g, dtype=torch.float64)
    y = x + 0.1 * torch.randn(50, generator=g, dtype=torch.float64)
    assert sqnr_db(c * x, c * y) == pytest.approx(sqnr_db(x, y), abs=1e-9)


def test_cosine_closed_forms_and_torch():
    assert cosine_similarity([1.0, 0.0], [0.0, 2.0]) == 0.0
    assert cosine_similarity([1.0, 2.0], [2.0, 4.0]) == pytest.approx(1.0, abs=1e-15)
    assert cosine_similarity([1.0, 2.0], [-1.0, -2.0]) == pytest.approx(-1.0, abs=1e-15)
    assert cosine_similarity([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert cosine_similarity(np.zeros(4), np.zeros(4)) == 1.0
    assert cosine_similarity(np.zeros(4), np.ones(4)) == 0.0
    torch.manual_seed(3)
    a, b = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    ref = torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1), eps=0.0)
    assert cosine_similarity(a, b) == pytest.approx(float(ref), abs=1e-12)


def test_step_error_per_tensor_closed_form():
    assert step_error([0.0, 0.5, 1.0], [0.1, 0.5, 0.8], 0.1) == StepError(max=2.0, mean=1.0)
    assert step_error(torch.ones(2, 2), torch.ones(2, 2), torch.tensor(0.5)) == StepError(0.0, 0.0)


def test_step_error_per_channel_and_per_group():
    a = torch.zeros(2, 4)
    b = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    # channel 0 step 0.5 -> 2 steps; channel 1 step 3 -> 1 step
    r = step_error(a, b, torch.tensor([0.5, 3.0]), PerChannel(0))
    assert r.max == 2.0 and r.mean == pytest.approx(3.0 / 8)
    # groups of 2 along the last dim: scales [[1, 1], [1, 0.25]] -> (3 / 0.25) = 12 steps
    r = step_error(a, b, torch.tensor([[1.0, 1.0], [1.0, 0.25]]), PerGroup(2, axis=-1))
    assert r.max == 12.0 and r.mean == pytest.approx((1 + 12) / 8)


@given(st.integers(0, 2**31 - 1), st.sampled_from(["int8", "int4", "uint8"]))
def test_fake_quantize_within_half_step(seed, fmt):
    # inside the calibrated range, round-to-nearest is at most half a step off (ONNX QuantizeLinear)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, generator=g)
    spec = QuantSpec(fmt, symmetric=fmt != "uint8", granularity="channel")
    s, z = compute_qparams(spec, x.amin(dim=1), x.amax(dim=1))
    r = step_error(x, fake_quantize(x, s, z, spec), s, PerChannel(0))
    assert r.max <= 0.5 + 1e-6
    assert 0.0 < r.mean < 0.5


def test_step_error_rejects_bad_scale_and_shapes():
    with pytest.raises(ShapeMismatchError, match="positive"):
        step_error([1.0], [1.0], 0.0)
    with pytest.raises(ShapeMismatchError, match="same shape"):
        step_error(torch.zeros(3), torch.zeros(4), 1.0)
    with pytest.raises(ShapeMismatchError, match="needs 2"):
        step_error(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), PerChannel(0))


def test_top1_helpers():
    a = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [1.0, 0.0, 0.0]])
    assert top1_agreement(a, b) == 0.5
    assert top1_agreement(a, a) == 1.0
    assert top1_accuracy(a, torch.tensor([1, 0, 0, 2])) == 0.75
    assert top1_accuracy(a.numpy(), np.array([1, 1, 1, 1])) == 0.25
    with pytest.raises(ShapeMismatchError, match="integer class indices"):
        top1_accuracy(a, torch.tensor([1.0, 0.0, 0.0, 2.0]))
    with pytest.raises(ShapeMismatchError, match="same batch"):
        top1_agreement(a, b[:3])


def test_non_finite_inputs_raise():
    with pytest.raises(NonFiniteError, match="x_hat"):
        sqnr_db([1.0, 2.0], [1.0, float("nan")])
    with pytest.raises(NonFiniteError):
        cosine_similarity([1.0, float("inf")], [1.0, 1.0])
    with pytest.raises(ShapeMismatchError):
        sqnr_db(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3\) and \(3, 2\)"):  # same numel, not the same tensor
        cosine_similarity(torch.ones(2, 3), torch.ones(3, 2))
