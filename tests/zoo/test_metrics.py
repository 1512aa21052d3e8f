"""Metrics against closed forms, torch's own functions and scipy."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.errors import ShapeMismatchError
from lowbit.zoo import metrics

scipy_stats = pytest.importorskip("scipy.stats", reason="scipy not installed: pip install scipy")


def test_top1_closed_form():
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
    labels = torch.tensor([1, 1, 2, 0])
    assert metrics.top1_correct(logits, labels) == 2
    assert metrics.top1_accuracy(logits, labels) == 0.5


def test_top1_shape_error():
    with pytest.raises(ShapeMismatchError, match="logits"):
        metrics.top1_accuracy(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))


def test_agreement_count():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.2]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.1, 0.2]])
    assert metrics.agreement_count(a, b) == 1


def test_kl_two_class_closed_form():
    # softmax([0, log 3]) = (1/4, 3/4); softmax([0, 0]) = (1/2, 1/2)
    p = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    q = torch.zeros(1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert metrics.mean_kl(p, q) == pytest.approx(expected, abs=1e-12)
    assert metrics.mean_kl(p, p) == pytest.approx(0.0, abs=1e-15)


def test_kl_matches_torch_kl_div():
    torch.manual_seed(0)
    p, q = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3
    ref = torch.nn.functional.kl_div(torch.log_softmax(q.double(), -1), torch.log_softmax(p.double(), -1),
                                     reduction="batchmean", log_target=True)
    assert metrics.mean_kl(p, q) == pytest.approx(float(ref), rel=1e-12)
    # large logits stay finite (log-softmax, not softmax then log)
    assert math.isfinite(metrics.mean_kl(p * 1e4, q * 1e4))


def test_cosine_matches_torch_and_zero_rows():
    torch.manual_seed(0)
    a, b = torch.randn(8, 3, 4), torch.randn(8, 3, 4)
    ref = torch.nn.functional.cosine_similarity(a.reshape(8, -1).double(), b.reshape(8, -1).double()).mean()
    assert metrics.mean_cosine(a, b) == pytest.approx(float(ref), rel=1e-12)
    assert metrics.mean_cosine(a, -2 * a) == pytest.approx(-1.0)
    z = torch.zeros(2, 3)
    assert metrics.mean_cosine(z, z) == 1.0
    assert metrics.mean_cosine(z, torch.ones(2, 3)) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=2, max_size=40))
def test_rank_average_matches_scipy(values):
    x = torch.tensor(values, dtype=torch.float64)
    assert metrics.rank_average(x).tolist() == scipy_stats.rankdata(values).tolist()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.floats(-3, 3, allow_nan=False)), min_size=3, max_size=50))
def test_spearman_matches_scipy(pairs):
    x = torch.tensor([float(p[0]) for p in pairs])
    y = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    if len(set(x.tolist())) < 2 or len(set(y.tolist())) < 2:
        assert math.isnan(metrics.spearman(x, y))
        return
    ref = scipy_stats.spearmanr(x.numpy(), y.numpy()).statistic
    assert metrics.spearman(x, y) == pytest.approx(float(ref), abs=1e-12)


def test_spearman_monotone_is_one():
    x = torch.arange(10.0)
    assert metrics.spearman(x, x.exp()) == pytest.approx(1.0)
    assert metrics.spearman(x, -x**3) == pytest.approx(-1.0)


def test_model_size_bytes_closed_form_and_tied_weights():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    # linear 3*4+4 float32, bn weight/bias/mean/var 4*4 float32, num_batches_tracked int64
    assert metrics.model_size_bytes(m) == (12 + 4) * 4 + 16 * 4 + 8
    tied = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert metrics.model_size_bytes(tied) == 5 * 2 * 4
    m.register_buffer("q", torch.zeros(10, dtype=torch.int8))
    assert metrics.model_size_bytes(m) == (12 + 4) * 4 + 16 * 4 + 8 + 10
