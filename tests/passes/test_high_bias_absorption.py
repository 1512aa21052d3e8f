"""High-bias absorption: exact inside the 3-sigma assumption, c = max(0, beta - 3 gamma)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.passes import BNStats, absorb_high_bias, equalize, fold_bn, output_stats
from lowbit.passes.fold_bn import set_output_stats


def test_closed_form_and_exact_within_three_sigma():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    beta = torch.tensor([5.0, 0.5, 3.0, -1.0, 10.0, 2.0])
    gamma = torch.tensor([1.0, 1.0, 0.5, 2.0, -2.0, 0.1])
    with torch.no_grad():
        m[0].weight.mul_(0.05)
        m[0].bias.copy_(beta)
    set_output_stats(m[0], BNStats(beta, gamma.abs()))
    x = torch.randn(64, 4)
    pre = m[0](x)
    c_expected = torch.tensor([2.0, 0.0, 1.5, 0.0, 4.0, 1.7])
    assert ((pre >= c_expected) | (c_expected == 0)).all(), "inputs must satisfy the 3-sigma assumption for an exact check"
    out, log = absorb_high_bias(m)
    assert len(log.applied) == 1
    assert torch.allclose(out[0].bias, beta - c_expected, atol=1e-6)
    assert torch.allclose(out[2].bias, m[2].bias + m[2].weight @ c_expected, atol=1e-5)
    assert torch.allclose(output_stats(out[0]).mean, beta - c_expected)
    assert torch.allclose(out(x), m(x), atol=1e-5)
    # outside the assumption (a pre-activation below c) the output differs: the test can fail
    x_bad = torch.full((1, 4), -200.0)
    assert not torch.allclose(out(x_bad), m(x_bad), atol=1e-3)


def test_conv_after_fold_and_equalize_with_relu6():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 3, 3, groups=1))
    with torch.no_grad():
        m[0].weight.mul_(0.01)
        m[1].weight.copy_(torch.tensor([0.2, 0.3, 1.0, 0.1]))
        m[1].bias.copy_(torch.tensor([2.0, 4.0, 0.5, 3.0]))
    m.eval()
    x = torch.randn(2, 2, 5, 5)
    ref = m(x)
    folded, _ = fold_bn(m)
    eq, _ = equalize(folded)
    out, log = absorb_high_bias(eq)
    assert [r.layers for r in log.applied] == [("0", "3")]
    assert (out[0].bias < eq[0].bias).sum() == 3, "three channels have beta > 3 gamma"
    assert torch.allclose(out(x), ref, atol=1e-4)
    # a plain ReLU6 (not equalized) is skipped with the reason
    _, log2 = absorb_high_bias(folded)
    assert not log2.applied and "equalize" in log2.skipped[0].detail


def test_conv_into_linear_without_flatten_refused():
    """A Linear straight after a Conv1d reads the length dim, not the channels c is per."""
    torch.manual_seed(2)
    x = torch.randn(4, 3, 5)
    for cout in (5, 4):  # 5: counts agree by chance (was absorbed wrongly); 4: they differ (was a RuntimeError)
        m = nn.Sequential(nn.Conv1d(3, cout, 1), nn.ReLU(), nn.Linear(5, 2))
        set_output_stats(m[0], BNStats(torch.full((cout,), 10.0), torch.ones(cout)))
        out, log = absorb_high_bias(m)
        assert not log.applied and "flatten" in log.skipped[0].detail
        assert torch.equal(out(x), m(x))


def test_padded_conv_exact_inside_shifted_at_the_border():
    """The module doc's caveat, to the value: positions whose window touches the zero padding see 0, not -c,
    so they change by sum over the padded taps of W2 c; every other position is unchanged."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))
    beta, gamma = torch.tensor([4.0, 6.0, 1.0]), torch.tensor([0.5, 1.0, 0.5])
    with torch.no_grad():
        m[0].weight.mul_(0.01)
        m[0].bias.copy_(beta)
    set_output_stats(m[0], BNStats(beta, gamma))
    c = torch.tensor([2.5, 3.0, 0.0])
    x = torch.randn(2, 2, 6, 6)
    assert (m[0](x) >= c.reshape(1, 3, 1, 1)).all()
    out, _ = absorb_high_bias(m)
    diff = out(x) - m(x)
    torch.testing.assert_close(diff[..., 1:-1, 1:-1], torch.zeros_like(diff[..., 1:-1, 1:-1]), rtol=0, atol=1e-5)
    w = m[2].weight.detach()
    corner = (w[:, :, 0, :].sum(-1) + w[:, :, 1:, 0].sum(-1)) @ c  # output (0, 0): kernel row 0 and column 0 are padding
    edge = w[:, :, 0, :].sum(-1) @ c  # output (0, j) inside: kernel row 0 is padding
    torch.testing.assert_close(diff[:, :, 0, 0], corner.expand(2, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(diff[:, :, 0, 2], edge.expand(2, 2), rtol=0, atol=1e-5)


def test_unfolded_model_says_to_fold_first():
    m = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1)).eval()
    out, log = absorb_high_bias(m)
    assert not log.applied and any("fold_bn first" in r.detail for r in log.skipped)
    _, log = absorb_high_bias(fold_bn(m)[0])
    assert len(log.applied) == 1 and not any("fold_bn" in r.detail for r in log.skipped)
