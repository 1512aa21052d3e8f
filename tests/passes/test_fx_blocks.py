"""Blocks of a torch.fx GraphModule (BRECQ after CLE): found as on the module, folded into one call each
without changing the function, and block reconstruction on the GraphModule rounds exactly as on the module."""

from __future__ import annotations

import torch
from torch import nn

from lowbit import QuantSpec
from lowbit.passes import AdaRoundConfig, adaround
from lowbit.passes._fx_blocks import fold_blocks, graph_blocks
from lowbit.passes.adaround import _TYPES
from lowbit.passes.brecq import find_blocks
from lowbit.passes.cle import equalize

from .test_brecq import _Net

INT4PC = QuantSpec("int4", symmetric=True, granularity="channel")


def _layers(m: nn.Module) -> list[str]:
    return [n for n, mod in m.named_modules() if isinstance(mod, _TYPES)]


def test_graph_blocks_follow_the_module_rule():
    net = _Net().eval()
    gm = torch.fx.symbolic_trace(net)
    assert graph_blocks(gm, _layers(net), _TYPES) == find_blocks(net) == ["blocks.0", "blocks.1", "stage.0.0"]
    assert find_blocks(gm) == [], "the GraphModule's containers are plain modules: the module rule finds nothing"
    assert graph_blocks(gm, ["stem", "blocks.1.conv2"], _TYPES) == ["blocks.1"]


def test_fold_blocks_keeps_the_function_and_shares_the_layers():
    torch.manual_seed(0)
    net = _Net().eval()
    gm = torch.fx.symbolic_trace(net)
    before = gm.code
    view, skipped = fold_blocks(gm, ["blocks.0", "blocks.1", "stage.0.0"])
    assert skipped == {}
    assert gm.code == before, "the GraphModule itself is not changed"
    calls = [n.target for n in view.graph.nodes if n.op == "call_module"]
    assert calls == ["stem", "blocks.0", "blocks.1", "stage.0.0", "stage.1", "stage.2", "head"]
    for name in _layers(net):
        assert view.get_submodule(name) is gm.get_submodule(name), name
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(view(x), gm(x)) and torch.equal(view(x), net(x))


def test_a_block_that_cannot_be_folded_is_reported():
    class Cross(nn.Module):
        """Block ``a`` reads a value computed outside it besides its input: two inputs, not foldable."""

        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Conv2d(3, 3, 1)
            self.a = nn.ModuleList([_Two()])

        def forward(self, x):
            y = self.pre(x)
            return self.a[0](x, y)

    gm = torch.fx.symbolic_trace(Cross().eval())
    assert graph_blocks(gm, _layers(gm), _TYPES) == ["a.0"]
    view, skipped = fold_blocks(gm, ["a.0", "nowhere"])
    assert "2 and returns 1" in skipped["a.0"] and "no node" in skipped["nowhere"]
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(view(x), gm(x))
    _, res, plog = adaround(gm, [x], INT4PC, AdaRoundConfig(granularity="block", iters=5), progress=False)
    assert all(r.block is None for r in res.values())
    assert any("a.0 of the torch.fx graph" in r.detail for r in plog.skipped)


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, y):
        return self.conv(x) + y


def test_block_reconstruction_on_the_graph_module_equals_the_module():
    torch.manual_seed(3)
    net = _Net().eval()
    gm = torch.fx.symbolic_trace(net)
    data = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    cfg = AdaRoundConfig(granularity="block", iters=30, lr=1e-2, batch_size=8)
    out_m, res_m, _ = adaround(net, data, INT4PC, cfg, progress=False)
    out_g, res_g, _ = adaround(gm, data, INT4PC, cfg, progress=False)
    assert isinstance(out_g, torch.fx.GraphModule) and type(out_g.get_submodule("blocks.0")) is nn.Module
    assert list(res_g) == list(res_m)
    assert [r.block for r in res_g.values()] == [r.block for r in res_m.values()]
    assert res_g["blocks.1.conv2"].block == "blocks.1"
    for name in res_m:
        assert torch.equal(res_g[name].weight, res_m[name].weight), name
        assert torch.equal(out_g.get_submodule(name).weight, res_m[name].weight), name
    assert not torch.equal(gm.stem.weight, out_g.stem.weight), "the input GraphModule stays float"


def test_block_reconstruction_after_cle_splits_a_shared_relu6():
    """CLE makes a GraphModule when a ReLU6 is shared; its blocks are still reconstructed as blocks."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand, self.dw, self.project = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), \
                nn.Conv2d(8, 4, 1)
            self.act = nn.ReLU6()

        def forward(self, x):
            return x + self.project(self.act(self.dw(self.act(self.expand(x)))))

    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), Block(), Block()).eval()
    eq, log = equalize(net)
    assert isinstance(eq, torch.fx.GraphModule)
    data = [torch.rand(8, 3, 6, 6) * 4]
    _, res, plog = adaround(eq, data, INT4PC, AdaRoundConfig(granularity="block", iters=10), progress=False)
    assert [r.block for r in res.values()] == [None] + ["1"] * 3 + ["2"] * 3
    assert not any("reconstructed alone" in r.detail for r in plog.skipped)
