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


def test_greedy_path_ties_go_in_layer_order():
    costs = {"x": (0.0, 1.0), "y": (0.0, 1.0), "z": (0.0, 1.0)}
    sizes = {n: (10, 5) for n in costs}
    path = _greedy_path(costs, sizes, {n: (0, 1) for n in costs})
    assert [sum(p.values()) for p in path] == [0, 1, 2, 3]
    assert [n for a, b in zip(path, path[1:]) for n in b if b[n] != a[n]] == ["x", "y", "z"]


def test_greedy_path_negative_rise_counts_as_free_and_zero_saving_goes_last():
    costs = {"a": (0.5, 0.2), "b": (0.0, 0.0)}
    sizes = {"a": (100, 60), "b": (100, 100)}
    path = _greedy_path(costs, sizes, {"a": (0, 1), "b": (0, 1)})
    assert path == [{"a": 0, "b": 0}, {"a": 1, "b": 0}, {"a": 1, "b": 1}]


@pytest.mark.parametrize("text,expected", [(1234, 1234), ("3.5MB", 3_500_000), ("512kB", 512_000),
                                           ("2MiB", 2 * 1024**2), ("10 B", 10), ("1.5GB", 1_500_000_000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [("3.5 MiB", 3_670_016), ("1.001kB", 1001), ("4.35kB", 4350),
                                           (" 7 ", 7), (2.9, 2)])
def test_parse_size_is_exact(text, expected):
    # float("1.001") * 1000 is 1000.999..., which truncated to int would lose a byte
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad,match", [("", "cannot read"), ("3 parsecs", "cannot read"), ("abc", "cannot read"),
                                       ("3.5mb", "cannot read"), (True, "cannot read"), (None, "cannot read"),
                                       ("-1MB", "at least 1"), (0, "at least 1"), (-5, "at least 1"),
                                       (0.4, "at least 1"), ("0MB", "at least 1"), (float("inf"), "finite"),
                                       (float("nan"), "finite")])
def test_parse_size_rejects(bad, match):
    with pytest.raises(ConfigError, match=match):
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


# ---- sizes against a hand count on a two-layer model
# Linear(64, 32) -> ReLU -> Linear(32, 10). Per layer (out, in):
#   W8A8:       int8 per output channel, symmetric: out*in + 4*out (scales) bytes; float32 bias 4*out;
#               its input and output edges get a uint8 affine per-tensor quantizer: 4 (scale) + 1 (zero point)
#   W4A16(g32): uint4 per group of 32: out*in/2 + (out*in/32) * (4 + 1) (scale + zero point); bias 4*out
SHAPES = {"0": (32, 64), "2": (10, 32)}


def _hand_weight_bytes(name, c):
    out, inp = SHAPES[name]
    return out * inp + 4 * out if c == 0 else out * inp // 2 + out * inp // 32 * 5


def _hand_size(choice):
    w8 = [choice["0"] == 0, choice["2"] == 0]
    edges = [w8[0], w8[0] or w8[1], w8[1]]  # model input, between the layers, model output
    return sum(_hand_weight_bytes(n, c) + 4 * SHAPES[n][0] for n, c in choice.items()) + 5 * sum(edges)


@pytest.fixture(scope="module")
def tiny_and_data():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    return m, [torch.randn(8, 64) for _ in range(2)]


def test_hand_count_of_the_candidates(tiny_and_data):
    m, data = tiny_and_data
    assert _hand_size({"0": 0, "2": 0}) == 2719 and _hand_size({"0": 1, "2": 1}) == 1722
    for choice in ({"0": 0, "2": 0}, {"0": 0, "2": 1}, {"0": 1, "2": 0}, {"0": 1, "2": 1}):
        over = {n: CANDIDATES[1] for n, c in choice.items() if c == 1}
        q = lowbit.quantize(m, recipes.W8A8(overrides=over), data, progress=False)
        assert deployed_size_bytes(q) == _hand_size(choice), choice


@pytest.mark.parametrize("budget", [2719, 2718, 2564, 2563, 1882, 1881, 1730, 1722])
def test_size_budget_against_hand_count(tiny_and_data, budget):
    m, data = tiny_and_data
    plan = search_mixed_precision(m, CANDIDATES, data, size_budget=budget, progress=False)
    assert plan.layer_bytes == {n: (_hand_weight_bytes(n, 0), _hand_weight_bytes(n, 1)) for n in SHAPES}
    assert plan.size_bytes == _hand_size(plan.choice) <= budget and plan.meets_budget
    # the first configuration along the path that fits: the path moves first the layer with the smaller
    # cost rise per byte saved, then the other
    first = min(SHAPES, key=lambda n: (plan.sensitivity[n][1] - plan.sensitivity[n][0])
                / (_hand_weight_bytes(n, 0) - _hand_weight_bytes(n, 1)))
    path = [{"0": 0, "2": 0}, {"0": 0, "2": 0, first: 1}, {"0": 1, "2": 1}]
    assert plan.choice == next(c for c in path if _hand_size(c) <= budget)


def test_unreachable_size_budget_names_the_smallest_size(tiny_and_data):
    m, data = tiny_and_data
    with pytest.raises(ConfigError, match=r"below the smallest model these candidates give \(1722 bytes.*at least 1722"):
        search_mixed_precision(m, CANDIDATES, data, size_budget=1721, progress=False)


def test_default_metric_is_pooled_output_sqnr_against_the_float_model(tiny_and_data):
    m, data = tiny_and_data
    plan = search_mixed_precision(m, CANDIDATES, data, size_budget=2000, progress=False)
    over = {n: CANDIDATES[1] for n, c in plan.choice.items() if c == 1}
    q = lowbit.quantize(m, recipes.W8A8(overrides=over), data, progress=False)
    with torch.no_grad():
        y = torch.cat([m(x) for x in data]).double().numpy()  # the original float model
        yq = torch.cat([q(x) for x in data]).double().numpy()
    # one ratio over all batches (not a mean of per-batch dB)
    assert plan.metric == pytest.approx(10 * math.log10((y**2).sum() / ((y - yq) ** 2).sum()), abs=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), "20", "20dB", True])
def test_min_metric_must_be_a_number(tiny_and_data, bad):
    m, data = tiny_and_data
    with pytest.raises(ConfigError, match="min_metric must be a number"):
        search_mixed_precision(m, CANDIDATES, data, min_metric=bad, progress=False)


@pytest.mark.parametrize("bad", [None, math.nan, "0.9", torch.ones(2)])
def test_user_metric_that_returns_no_number_raises(tiny_and_data, bad):
    m, data = tiny_and_data
    with pytest.raises(ConfigError, match="must return a number"):
        search_mixed_precision(m, CANDIDATES, data, min_metric=0.5, metric=lambda _m: bad, progress=False)


def test_generator_calibration_data_gives_the_same_plan_as_a_list(tiny_and_data):
    # the search quantizes once per candidate and per probe: a one-shot generator must not run dry
    m, data = tiny_and_data
    from_list = search_mixed_precision(m, CANDIDATES, data, size_budget=2000, progress=False)
    from_gen = search_mixed_precision(m, CANDIDATES, (x for x in data), size_budget=2000, progress=False)
    assert (from_gen.choice, from_gen.size_bytes, from_gen.metric) == (from_list.choice, from_list.size_bytes,
                                                                         from_list.metric)
    assert _hand_size(from_gen.choice) == from_gen.size_bytes <= 2000
