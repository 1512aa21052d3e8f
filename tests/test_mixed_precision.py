"""Mixed precision search: the greedy path on known costs, budgets met on a real quantized model,
the sensitive layer kept precise, the plan's recipe reproducing the measured model, and bad input."""

import logging
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import recipes
from lowbit.capture.readback import deployed_size_bytes
from lowbit.errors import ConfigError
from lowbit.mixed_precision import _greedy_path, parse_size, search_mixed_precision
from lowbit.report.metrics import sqnr_db

CANDIDATES = (recipes.W8A8(), recipes.W4A16(group_size=32))


@pytest.fixture(scope="module")
def mlp_and_data():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                      nn.Linear(256, 10)).eval()
    with torch.no_grad():
        # equalization in reverse (same float function): every 32nd input column of layer 4 is 30x larger,
        # so each int4 group of 32 has an outlier and loses its other weights; int8 per channel copes
        j = slice(0, 256, 32)
        m[2].weight[j] /= 30
        m[2].bias[j] /= 30
        m[4].weight[:, j] *= 30
    data = [torch.randn(32, 64) for _ in range(3)]
    return m, data


def test_greedy_path_takes_cheapest_cost_per_byte_first():
    costs = {"a": (0.0, 1.0, 5.0), "b": (0.0, 0.1, 0.2), "c": (0.0, 3.0, math.nan)}
    sizes = {"a": (100, 50, 25), "b": (100, 50, 25), "c": (100, 10, 0)}
    allowed = {"a": (0, 1, 2), "b": (0, 1, 2), "c": (0, 1)}
    path = _greedy_path(costs, sizes, allowed)
    # ratios: b 0.1/50, b again 0.1/25, a 1/50, c 3/90, a 4/25
    assert [p for p in path] == [
        {"a": 0, "b": 0, "c": 0}, {"a": 0, "b": 1, "c": 0}, {"a": 0, "b": 2, "c": 0},
        {"a": 1, "b": 2, "c": 0}, {"a": 1, "b": 2, "c": 1}, {"a": 2, "b": 2, "c": 1},
    ]


def test_greedy_path_negative_rise_counts_as_free_and_zero_saving_goes_last():
    costs = {"a": (0.5, 0.2), "b": (0.0, 0.0)}
    sizes = {"a": (100, 60), "b": (100, 100)}
    path = _greedy_path(costs, sizes, {"a": (0, 1), "b": (0, 1)})
    assert path == [{"a": 0, "b": 0}, {"a": 1, "b": 0}, {"a": 1, "b": 1}]


@pytest.mark.parametrize("text,expected", [(1234, 1234), ("3.5MB", 3_500_000), ("512kB", 512_000),
                                           ("2MiB", 2 * 1024**2), ("10 B", 10), ("1.5GB", 1_500_000_000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "3 parsecs", "-1MB", 0, -5])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_size_budget_is_met_and_the_sensitive_layer_stays_8bit(mlp_and_data):
    m, data = mlp_and_data
    full8 = deployed_size_bytes(lowbit.quantize(m, CANDIDATES[0], data, progress=False))
    budget = full8 - 25_000  # one big 256x256 layer (23.5 kB saved) and more must go to 4 bits
    plan = search_mixed_precision(m, CANDIDATES, data, size_budget=budget, progress=False)
    assert plan.meets_budget and plan.size_bytes <= budget
    # layer "4" is by far the most sensitive to int4: it keeps W8A8 while the others drop
    assert plan.sensitivity["4"][1] > 20 * max(plan.sensitivity[n][1] for n in ("0", "2", "6"))
    assert plan.choice["4"] == 0 and plan.choice["2"] == 1
    # the plan's recipe reproduces the measured model exactly (same size, same output SQNR)
    q = lowbit.quantize(m, plan.recipe, data, progress=False)
    assert deployed_size_bytes(q) == plan.size_bytes
    with torch.no_grad():
        with lowbit.capture.readback.quantization_disabled(q):
            ref = torch.cat([q(x) for x in data])
        out = torch.cat([q(x) for x in data])
    assert sqnr_db(ref, out) == pytest.approx(plan.metric, abs=1e-6)
    assert plan.counts() == {"W8A8": sum(v == 0 for v in plan.choice.values()),
                             "W4A16(g32)": sum(v == 1 for v in plan.choice.values())}
    assert "budget met: True" in plan.table()


def test_min_metric_takes_the_last_configuration_that_meets_it(mlp_and_data):
    m, data = mlp_and_data
    one_layer_sqnr = []
    plan = search_mixed_precision(m, CANDIDATES, data, min_metric=18.0, progress=False)
    assert plan.meets_budget and plan.metric >= 18.0
    moved = sum(v == 1 for v in plan.choice.values())
    assert 0 < moved < 4
    # the next configuration along the path (one more layer at 4 bits) must fall below the floor:
    # rebuild it from the sensitivities (cheapest remaining move per byte) and measure it independently
    rest = [n for n, v in plan.choice.items() if v == 0]
    cheapest = min(rest, key=lambda n: (plan.sensitivity[n][1] - plan.sensitivity[n][0])
                   / (plan.layer_bytes[n][0] - plan.layer_bytes[n][1]))
    nxt = dict(plan.choice, **{cheapest: 1})
    q = lowbit.quantize(m, recipes.W8A8(overrides={n: CANDIDATES[1] for n, v in nxt.items() if v == 1}), data,
                        progress=False)
    with torch.no_grad():
        with lowbit.capture.readback.quantization_disabled(q):
            ref = torch.cat([q(x) for x in data])
        one_layer_sqnr.append(sqnr_db(ref, torch.cat([q(x) for x in data])))
    assert one_layer_sqnr[0] < 18.0


def test_user_metric_and_unreachable_floor_is_reported_not_silent(mlp_and_data, caplog):
    m, data = mlp_and_data
    x = torch.cat(data)
    with torch.no_grad():
        y = m(x)

    def neg_mse(model):
        with torch.no_grad():
            return -float(((model(x) - y) ** 2).mean())

    with caplog.at_level(logging.WARNING, logger="lowbit"):  # in-process CLI tests raise lowbit's level
        plan = search_mixed_precision(m, CANDIDATES, data, min_metric=0.0, metric=neg_mse, metric_name="-MSE",
                                      progress=False)
    assert plan.float_metric == pytest.approx(0.0, abs=1e-10)
    assert not plan.meets_budget and plan.metric < 0
    assert all(v == 0 for v in plan.choice.values())
    assert "below min_metric" in caplog.text


def test_bad_configurations_raise(mlp_and_data):
    m, data = mlp_and_data
    with pytest.raises(ConfigError, match="two or more"):
        search_mixed_precision(m, CANDIDATES[:1], data, size_budget="1MB", progress=False)
    with pytest.raises(ConfigError, match="give a budget"):
        search_mixed_precision(m, CANDIDATES, data, progress=False)
    with pytest.raises(ConfigError, match="smallest model"):
        search_mixed_precision(m, CANDIDATES, data, size_budget=1000, progress=False)
