"""MinMax observer against plain torch reductions; user errors of every observer raise QuantizationError
subclasses that name the tensor."""

from __future__ import annotations

import pytest
import torch

from lowbit.calibration import as_calibrator, make_observer
from lowbit.errors import ConfigError, NonFiniteError, QuantizationError, ShapeMismatchError
from lowbit.spec import QuantSpec

ALL = ["minmax", "moving_average", "kl", "percentile", "mse", "admm"]


@pytest.mark.parametrize("granularity,dims", [("tensor", None), ("channel", (1, 2)), ("channel:1", (0, 2)),
                                              ("channel:-1", (0, 1))])
def test_running_min_max_along_the_right_axis(granularity, dims):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, generator=g) * (k + 1) + k for k in range(4)]
    obs = make_observer(QuantSpec("int8", granularity=granularity, calibrator="minmax"))
    for b in batches:
        obs.update(b)
    x = torch.stack(batches)  # (batch, 4, 3, 5): the observer's axes are shifted by one
    lo, hi = obs.compute_range()
    if dims is None:
        ref_lo, ref_hi = x.min().reshape(lo.shape), x.max().reshape(hi.shape)
    else:
        dims = (0,) + tuple(d + 1 for d in dims)
        ref_lo, ref_hi = x.amin(dim=dims), x.amax(dim=dims)
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)


@pytest.mark.parametrize("cal", ["minmax", "moving_average", "percentile"])
@pytest.mark.parametrize("channels", [1, 5])
def test_channel_count_change_raises_shape_mismatch(cal, channels):
    # 3 -> 1 channels used to broadcast silently into a 3-channel range; 3 -> 5 raised a bare RuntimeError
    obs = make_observer(QuantSpec("int8", granularity="channel:1", calibrator=cal), "blocks.0.out")
    obs.update(torch.randn(4, 3))
    with pytest.raises(ShapeMismatchError, match="blocks.0.out"):
        obs.update(torch.randn(4, channels))
    other = make_observer(QuantSpec("int8", granularity="channel:1", calibrator=cal), "blocks.0.out")
    other.update(torch.randn(4, channels))
    with pytest.raises(ShapeMismatchError):
        obs.merge(other)


def test_merging_another_kind_raises_config_error():
    a = make_observer(QuantSpec("int8", calibrator="minmax"), "act")
    b = make_observer(QuantSpec("int8", calibrator="kl"), "act")
    a.update(torch.randn(8))
    b.update(torch.randn(8))
    with pytest.raises(ConfigError, match="HistogramObserver"):
        a.merge(b)


@pytest.mark.parametrize("text", ["percentile:abc", "ema:x", "percentile:150", "percentile:0", "percentile:nan",
                                  "kl:3", "nope"])
def test_bad_calibrator_strings_raise_config_error(text):
    with pytest.raises(ConfigError):
        as_calibrator(text)


@pytest.mark.parametrize("cal", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_naming_the_tensor(cal, bad):
    obs = make_observer(QuantSpec("int8", calibrator=cal), "layer3.conv.weight")
    with pytest.raises(NonFiniteError, match="layer3.conv.weight") as info:
        obs.update(torch.tensor([1.0, bad, 2.0]))
    assert isinstance(info.value, QuantizationError)
    assert obs.num_batches == 0


@pytest.mark.parametrize("cal", ALL)
def test_empty_calibration_raises(cal):
    from lowbit.errors import EmptyCalibrationError

    obs = make_observer(QuantSpec("int8", calibrator=cal), "head.out")
    obs.update(torch.empty(0, 3))  # an empty batch is skipped, not counted
    with pytest.raises(EmptyCalibrationError, match="head.out"):
        obs.compute_range()
