"""The harness on tiny models whose outputs are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowbit.errors import ConfigError, EmptyCalibrationError
from lowbit.zoo import EvalResult, compare, compare_sts, evaluate_classifier, evaluate_sts
from lowbit.zoo.data import SentencePairs

scipy_stats = pytest.importorskip("scipy.stats", reason="scipy not installed: pip install scipy")


class Scale(nn.Module):
    """``y = s * x``: its logits are the inputs themselves, so every metric has a closed form."""

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s)))

    def forward(self, x):
        return self.s * x


def _batches():
    x = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 4.0], [2.0, 5.0, 1.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 0, 2])
    return [(x[:2], y[:2]), (x[2:], y[2:])], x, y


def test_evaluate_classifier_top1_and_size():
    data, _, _ = _batches()
    r = evaluate_classifier(Scale(1.0), data, progress=False)
    assert isinstance(r, EvalResult)
    assert r.num_samples == 5 and r.top1 == pytest.approx(3 / 5) and r.size_bytes == 4
    assert r.kl is None and "kl" not in r.as_dict()
    with pytest.raises(ConfigError, match="labelled"):
        evaluate_classifier(Scale(1.0), [torch.zeros(2, 3)], progress=False)
    with pytest.raises(EmptyCalibrationError):
        evaluate_classifier(Scale(1.0), [], progress=False)


def test_compare_closed_form():
    data, x, y = _batches()
    # quant = 2 * float: same argmax, KL(softmax(x) || softmax(2x)) and cosine 1
    r = compare(Scale(1.0), Scale(2.0), data, progress=False)
    kl_ref = torch.nn.functional.kl_div(torch.log_softmax(2 * x.double(), 1), torch.log_softmax(x.double(), 1),
                                        reduction="batchmean", log_target=True)
    assert r.agreement == 1.0 and r.cosine == pytest.approx(1.0)
    assert r.kl == pytest.approx(float(kl_ref), rel=1e-9) and r.kl > 0
    assert r.top1 == r.float_top1 == pytest.approx(3 / 5)
    assert r.size_bytes == r.float_size_bytes == 4
    # quant = -float: no row agrees (argmax -> argmin), cosine -1
    r = compare(Scale(1.0), Scale(-1.0), [b[0] for b in data], progress=False)
    assert r.agreement == 0.0 and r.cosine == pytest.approx(-1.0)
    assert r.top1 is None and r.float_top1 is None


def test_compare_identical_models_zero_drift():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 4))
    data = [torch.randn(8, 6) for _ in range(3)]
    r = compare(m, m, data, progress=False)
    assert r.num_samples == 24 and r.agreement == 1.0 and r.kl == pytest.approx(0.0, abs=1e-15)
    assert r.cosine == pytest.approx(1.0, abs=1e-12)


def test_compare_embeddings_has_no_kl():
    data = [torch.ones(4, 2, 3)]
    r = compare(nn.Identity(), nn.Identity(), data, progress=False)
    assert r.agreement is None and r.kl is None and r.cosine == pytest.approx(1.0)
    assert r.size_bytes == 0


class BagEncoder:
    """Sentence -> a fixed vector per word count; cosines and hence Spearman are known exactly."""

    def __init__(self, flip: bool = False) -> None:
        self.flip = flip

    def encode(self, sentences):
        out = []
        for s in sentences:
            n = len(s.split())
            angle = n * 0.3 * (-1 if self.flip else 1)
            out.append([math.cos(angle), math.sin(angle)])
        return torch.tensor(out)


def test_sts_metrics():
    s1 = ("a", "a", "a", "a")
    s2 = ("a", "a b", "a b c", "a b c d")  # cos(0), cos(.3), cos(.6), cos(.9): decreasing
    pairs = SentencePairs(s1, s2, torch.tensor([5.0, 3.0, 2.5, 0.0], dtype=torch.float64))
    r = evaluate_sts(BagEncoder(), pairs)
    assert r.num_samples == 4 and r.spearman == pytest.approx(1.0) and r.size_bytes is None
    pairs2 = SentencePairs(s1, s2, torch.tensor([5.0, 1.0, 3.0, 0.0], dtype=torch.float64))
    sims = [math.cos(0.3 * k) for k in range(4)]
    ref = scipy_stats.spearmanr(sims, [5.0, 1.0, 3.0, 0.0]).statistic
    c = compare_sts(BagEncoder(), BagEncoder(flip=True), pairs2)
    assert c.spearman == pytest.approx(ref) and c.float_spearman == pytest.approx(ref)
    # embeddings at angles +-0.3n: cosine between them is cos(0.6 n)
    n = [1, 1, 1, 1, 1, 2, 3, 4]
    assert c.cosine == pytest.approx(sum(math.cos(0.6 * k) for k in n) / 8)
