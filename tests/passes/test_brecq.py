"""BRECQ block reconstruction: never worse than nearest rounding on the block output (held-out inputs
too), weights on the grid (floor or ceil of W / s), the block finder, the model-level path, config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit import QuantSpec
from lowbit.errors import ConfigError, UnsupportedLayerError
from lowbit.passes import AdaRoundConfig, adaround
from lowbit.passes._layer import weight_qparams
from lowbit.passes.brecq import block_fisher, find_blocks, reconstruct_block

INT3PC = QuantSpec("int3", symmetric=True, granularity="channel")
U8 = QuantSpec("uint8", symmetric=False)


class _ResBlock(nn.Module):
    """x + conv2(relu(conv1(x))): an inverted-residual-like block whose two layers' errors interact."""

    def __init__(self, c: int = 6, hidden: int = 12) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 3, padding=1)

    def forward(self, x, scale: float = 1.0):
        return x + scale * self.conv2(torch.relu(self.conv1(x)))


def _data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(6, 6, generator=torch.Generator().manual_seed(99))  # same correlation in train and test
    return torch.einsum("nchw,dc->ndhw", torch.randn(n, 6, 5, 5, generator=g), mix)


def _block_error(block: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    """Block output error, computed independently: plain copies of the block with the given weights."""
    import copy

    q = copy.deepcopy(block)
    with torch.no_grad():
        for name, w in weights.items():
            q.get_submodule(name).weight.copy_(w)
        return float(((q(x) - block(x)) ** 2).sum(1).mean())


def _nearest(block: nn.Module, name: str, spec: QuantSpec) -> torch.Tensor:
    w = block.get_submodule(name).weight.detach()
    s, _ = weight_qparams(w, spec)
    s = s.reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / s), spec.qmin, spec.qmax) * s


def test_block_beats_nearest_on_train_and_held_out_inputs():
    torch.manual_seed(0)
    block = _ResBlock().eval()
    train, test = _data(256, 1), _data(256, 2)
    cfg = AdaRoundConfig(granularity="block", iters=800, lr=1e-2, batch_size=64, reg_weight=0.05)
    res = reconstruct_block(block, {"conv1": INT3PC, "conv2": INT3PC}, train, cfg)
    assert set(res) == {"conv1", "conv2"}
    assert all(r.used == "adaround" for r in res.values())
    ours = {k: r.weight for k, r in res.items()}
    near = {k: _nearest(block, k, INT3PC) for k in res}
    # the reported errors are the block's output errors on the training inputs
    assert res["conv1"].error == pytest.approx(_block_error(block, ours, train), rel=1e-4)
    assert res["conv1"].error_nearest == pytest.approx(_block_error(block, near, train), rel=1e-4)
    assert _block_error(block, ours, train) < 0.8 * _block_error(block, near, train)
    assert _block_error(block, ours, test) < 0.9 * _block_error(block, near, test)  # generalizes
    for r in res.values():
        undecided = ((r.h > 0.01) & (r.h < 0.99)).float().mean()
        assert undecided < 0.05


def test_rounded_weights_are_floor_or_ceil_of_w_over_s():
    torch.manual_seed(1)
    block = _ResBlock().eval()
    spec = QuantSpec("int4", symmetric=False, granularity="channel")
    cfg = AdaRoundConfig(granularity="block", iters=100, lr=1e-2, batch_size=32, act_spec=U8, qdrop_prob=0.5)
    res = reconstruct_block(block, {"conv1": spec, "conv2": spec}, _data(64, 3), cfg, kwargs={"scale": 0.5})
    for name, r in res.items():
        w = block.get_submodule(name).weight.detach()
        s = r.scale.reshape(-1, 1, 1, 1)
        z = r.zero_point.reshape(-1, 1, 1, 1).float()
        code = r.weight / s
        assert torch.allclose(code, code.round(), atol=1e-4)
        code = code.round()
        lo, hi = torch.floor(w / s), torch.ceil(w / s)
        clamp_lo, clamp_hi = spec.qmin - z, spec.qmax - z
        assert (((code == lo) | (code == hi)) | (code == clamp_lo) | (code == clamp_hi)).all(), name
        assert ((code + z >= spec.qmin) & (code + z <= spec.qmax)).all()
        assert r.error <= r.error_nearest


class _Net(nn.Module):
    """stem conv, a ModuleList of residual blocks, a Sequential(Sequential(block), conv-relu) stage,
    a block holding no layer, a classifier: the block finder's cases."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.blocks = nn.ModuleList([_ResBlock(), _ResBlock()])
        self.stage = nn.Sequential(nn.Sequential(_ResBlock()), nn.Conv2d(6, 6, 1), nn.ReLU(), _Scale())
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x, scale=0.5)
        return self.head(self.stage(x).mean((2, 3)))


class _Scale(nn.Module):
    def forward(self, x):
        return 0.5 * x


def test_find_blocks_on_a_nested_model():
    net = _Net()
    assert find_blocks(net) == ["blocks.0", "blocks.1", "stage.0.0"]
    # only blocks that hold a layer to round
    assert find_blocks(net, ["stem", "blocks.1.conv2", "head"]) == ["blocks.1"]
    # a Sequential root: its non-container children holding layers
    seq = nn.Sequential(_ResBlock(), nn.Conv2d(6, 6, 1), _ResBlock())
    assert find_blocks(seq) == ["0", "2"]


def test_model_level_blocks_stepwise_equals_rerun_and_weights_on_grid():
    torch.manual_seed(4)
    net = _Net().eval()
    data = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    cfg = AdaRoundConfig(granularity="block", iters=40, lr=1e-2, batch_size=8, act_spec=U8, qdrop_prob=0.3)
    spec = QuantSpec("int4", symmetric=True, granularity="channel")
    out_a, res_a, log_a = adaround(net, data, spec, cfg, progress=False)
    out_b, res_b, _ = adaround(net, data, spec, cfg, progress=False, capture="rerun")
    names = ["stem", "blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2",
             "stage.0.0.conv1", "stage.0.0.conv2", "stage.1", "head"]
    assert list(res_a) == list(res_b) == names
    assert [res_a[n].block for n in names] == [None, "blocks.0", "blocks.0", "blocks.1", "blocks.1",
                                               "stage.0.0", "stage.0.0", None, None]
    for n in names:
        assert torch.equal(res_a[n].weight, res_b[n].weight), n
        layer = out_a.get_submodule(n)
        scale, _ = layer.lowbit_weight_qparams
        q = layer.weight / scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
        assert torch.allclose(q, q.round(), atol=1e-4) and (q.round().abs() <= 8).all()
        assert res_a[n].error <= res_a[n].error_nearest
    assert len(log_a.applied) == 6  # stem, 3 blocks, stage.1, head
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(out_a(x), out_b(x))
    assert not torch.equal(net.stem.weight, out_a.stem.weight), "the input model stays float"


def test_user_blocks_and_fallback_for_a_block_called_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _ResBlock()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(self.inner(self.inner(x)).mean((2, 3)))

    torch.manual_seed(5)
    m = Twice().eval()
    data = [torch.randn(4, 6, 5, 5)]
    cfg = AdaRoundConfig(granularity="block", blocks=("inner",), iters=10, lr=1e-2)
    _, res, plog = adaround(m, data, INT3PC, cfg, progress=False)
    assert all(r.block is None for r in res.values())
    assert any("called 2 times" in r.detail for r in plog.skipped)
    # no block found: said in the log, every layer alone
    _, res, plog = adaround(nn.Sequential(nn.Conv2d(6, 6, 1), nn.ReLU()).eval(), data, INT3PC,
                            AdaRoundConfig(granularity="block", iters=5), progress=False)
    assert res["0"].block is None and any("found no block" in r.detail for r in plog.skipped)
    # one layer as a user-named block works (the unit is its output)
    _, res, _ = adaround(_ResBlock().eval(), [torch.randn(4, 6, 5, 5)], INT3PC,
                         AdaRoundConfig(granularity="block", blocks=("conv2",), iters=10), progress=False)
    assert res["conv2"].block == "conv2" and res["conv1"].block is None


def test_config_errors():
    with pytest.raises(ConfigError):
        AdaRoundConfig(granularity="net")
    with pytest.raises(ConfigError):
        AdaRoundConfig(blocks=("a",))  # blocks need granularity="block"
    with pytest.raises(ConfigError):
        AdaRoundConfig(granularity="block", blocks="blocks.0")
    with pytest.raises(ConfigError):
        AdaRoundConfig(granularity="block", blocks=("a", "a"))
    with pytest.raises(ConfigError):
        AdaRoundConfig(fisher=True)  # the Fisher weights block outputs
    assert AdaRoundConfig(granularity="block", blocks=["a", "b"]).blocks == ("a", "b")
    net, data = _Net().eval(), [torch.randn(2, 3, 6, 6)]
    with pytest.raises(ConfigError, match="no module"):
        adaround(net, data, INT3PC, AdaRoundConfig(granularity="block", blocks=("nope",)), progress=False)
    with pytest.raises(ConfigError, match="nest"):
        adaround(net, data, INT3PC, AdaRoundConfig(granularity="block", blocks=("stage", "stage.0.0")), progress=False)
    block = _ResBlock()
    with pytest.raises(UnsupportedLayerError):
        reconstruct_block(nn.Sequential(nn.ConvTranspose2d(2, 2, 1)), {"0": INT3PC}, torch.randn(2, 2, 3, 3))
    with pytest.raises(ConfigError):
        reconstruct_block(block, {"conv1": QuantSpec("fp8_e4m3")}, torch.randn(2, 6, 3, 3))
    with pytest.raises(ConfigError):
        reconstruct_block(block, {}, torch.randn(2, 6, 3, 3))


def test_block_option_through_quantize_matches_the_pass():
    """``lowbit.quantize(..., adaround=AdaRoundConfig(granularity="block"))`` rounds as the pass does."""
    import lowbit
    from lowbit.recipes import Custom

    torch.manual_seed(8)
    net = _Net().eval()
    data = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    spec = QuantSpec("int4", symmetric=True, granularity="channel")
    cfg = AdaRoundConfig(granularity="block", iters=20, lr=1e-2, batch_size=8)
    qm = lowbit.quantize(net, Custom(weight=spec, activation=U8), data, adaround=cfg, progress=False)
    ref, res, _ = adaround(net, data, spec, AdaRoundConfig(**{**cfg.__dict__, "act_spec": U8}), progress=False)
    assert res["blocks.0.conv1"].block == "blocks.0"
    quant = {n: m for n, m in qm.named_modules() if getattr(m, "weight_quantizer", None) is not None}
    assert set(quant) == set(res)
    with torch.no_grad():
        for name, layer in quant.items():
            assert torch.equal(layer.weight, ref.get_submodule(name).weight), name
            assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight), name


def test_fisher_is_the_squared_gradient_of_the_self_labelled_cross_entropy():
    torch.manual_seed(7)
    net = _Net().eval()
    xs = [torch.randn(3, 3, 6, 6), torch.randn(2, 3, 6, 6)]
    f = block_fisher(net, ["blocks.1", "stage.0.0"], xs)
    ref = []
    for x in xs:  # per sample, by hand: the block output as a leaf, the rest of the model after it
        for xi in x.split(1):
            with torch.no_grad():
                z = net.blocks[1](net.blocks[0](net.stem(xi), scale=0.5), scale=0.5)
            z.requires_grad_(True)
            logits = net.head(net.stage(z).mean((2, 3)))
            g, = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, logits.argmax(1)), z)
            ref.append(g**2)
    ref = torch.cat(ref)
    assert f["blocks.1"].shape == ref.shape == (5, 6, 6, 6)
    assert torch.allclose(f["blocks.1"], ref / ref.mean(), rtol=1e-4, atol=1e-6)
    assert f["stage.0.0"].mean().item() == pytest.approx(1.0)
    # weights of ones are plain MSE; the model-level Fisher path runs and never loses to nearest
    block, x = _ResBlock().eval(), _data(32, 8)
    cfg = AdaRoundConfig(granularity="block", iters=30, lr=1e-2, batch_size=16)
    a = reconstruct_block(block, {"conv1": INT3PC}, x, cfg)
    b = reconstruct_block(block, {"conv1": INT3PC}, x, cfg, out_weight=torch.ones(32, 6, 5, 5))
    assert torch.equal(a["conv1"].weight, b["conv1"].weight) and a["conv1"].error == pytest.approx(b["conv1"].error)
    cfg = AdaRoundConfig(granularity="block", iters=20, lr=1e-2, batch_size=8, fisher=True)
    _, res, _ = adaround(net, xs, INT3PC, cfg, progress=False)
    assert all(r.error <= r.error_nearest for r in res.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_block_reconstruction_on_cuda():
    torch.manual_seed(6)
    block = _ResBlock().eval().cuda()
    cfg = AdaRoundConfig(granularity="block", iters=50, lr=1e-2, act_spec=U8, qdrop_prob=0.5)
    res = reconstruct_block(block, {"conv1": INT3PC, "conv2": INT3PC}, _data(32, 7).cuda(), cfg)
    assert all(r.weight.is_cuda and r.error <= r.error_nearest for r in res.values())


def test_recomputed_block_targets_are_float_under_act_quant(store_every_target):
    """A block whose output is twice its input recomputes its target mid-loop, while the activation
    quantization hooks are on: the target must still be the float block's output, so the result equals
    the one with every target kept in memory."""
    torch.manual_seed(7)
    block = nn.Sequential(nn.Conv2d(6, 12, 1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1)).eval()
    spec = QuantSpec("int4", symmetric=False, granularity="channel")
    cfg = AdaRoundConfig(granularity="block", iters=60, lr=1e-2, batch_size=8, act_spec=U8, qdrop_prob=0.3)
    x = _data(40, 4)
    lean = reconstruct_block(block, {"0": spec, "2": spec}, x, cfg)
    store_every_target()
    kept = reconstruct_block(block, {"0": spec, "2": spec}, x, cfg)
    for name in ("0", "2"):
        assert torch.equal(lean[name].weight, kept[name].weight), name
        assert lean[name].error == pytest.approx(kept[name].error, rel=1e-5)
        assert lean[name].error_nearest == pytest.approx(kept[name].error_nearest, rel=1e-5)
