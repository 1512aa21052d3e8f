"""BRECQ: AdaRound with block reconstruction (Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training
Quantization by Block Reconstruction").

Per-layer AdaRound (:mod:`~lowbit.passes.adaround`) makes each layer's output match its float output on
its own; the errors of consecutive layers then add up, and a layer cannot compensate the rounding of the
layer before it. BRECQ makes a *block* the unit: the rounding variables ``V_l`` of every layer ``l`` of
the block (AdaRound's rectified sigmoid ``h(V_l)``, same initialization) are optimized together so that
the block's output matches the float block's output::

    min_V  || f(x) - f~(x~; W~_1(V_1), ..., W~_k(V_k)) ||^2  +  lambda * sum_l sum(1 - |2 h(V_l) - 1|^beta)

``f`` is the float block on its input ``x`` in the float model, ``f~`` the same block with the soft-
rounded weights on its input ``x~`` in the model whose earlier units are already rounded (squared error
summed over channels, averaged over samples and positions; ``beta`` annealed as in AdaRound). The block's
whole forward runs, residual add included. ``AdaRoundConfig(fisher=True)`` weights each output element's
squared error by BRECQ's diagonal Fisher ``(dL / dz)^2``: ``L`` is the float model's cross-entropy against
its own top-1 prediction (no labels needed), ``z`` the block's output in the float model, per sample;
the weights are normalized to mean 1 per block so that ``lambda`` keeps its meaning. (BRECQ's code takes
the gradient of KL(quantized || float) in the partly quantized model, one pass per block; here one
forward and backward of the float model per batch gives every block's weights, kept for all samples:
about 2.3 MB per sample on EfficientNet-Lite0.) With ``act_spec``, the block input and the input of every rounded layer inside
the block are fake-quantized (per tensor, min/max ranges taken once on the stored inputs, clipped
straight-through gradient), and QDrop (``qdrop_prob = p``) keeps each element's unquantized value with
probability ``p`` at each of those points (at the block input: the float model's ``x``). At the end the
hard rounding ``h = [V >= 0]`` of the whole block is kept, or nearest rounding of the whole block when
that reconstructs the block output better on the stored inputs.

Which modules are blocks: ``AdaRoundConfig(blocks=(...))`` names them; otherwise :func:`find_blocks`:
every module that is a direct child of an ``nn.Sequential`` or ``nn.ModuleList`` (subclasses included),
is neither such a container itself nor a Conv/Linear layer, and holds at least one layer to round.
Containers are searched recursively (a Sequential in a Sequential is looked into, not made a block),
other modules that are not blocks are searched too, blocks are not (blocks do not nest). On
EfficientNet-Lite0 this gives the 16 MBConv blocks ``_blocks.0`` ... ``_blocks.15``; the stem conv, the
head conv and the classifier are not in a container and are reconstructed alone, as layers. On
torchvision's ResNet it gives ``layer1.0`` ... ``layer4.1`` (BasicBlock / Bottleneck), on MobileNetV2 the
InvertedResidual blocks (``features.0`` and ``features.18``, Conv2dNormActivation, are Sequentials: their
conv is a layer of its own).

A block must be called exactly once per forward with one tensor input (other arguments constant, e.g.
EfficientNet's ``drop_connect_rate``) and return one tensor; a block that is not (never called, or
called twice) is logged and its layers are reconstructed one by one. Block inputs are captured like
layer inputs: stepping through the torch.fx graph traced with the blocks as single calls (O(L)), or by
re-running the model up to each block.

A torch.fx GraphModule (what CLE returns when it splits a shared ReLU6, e.g. with ``dfq=DFQ()`` on
EfficientNet-Lite0) calls its layers directly and keeps no containers, so its blocks are found from the
module stack its trace recorded (:func:`~lowbit.passes._fx_blocks.graph_blocks`, the same rule) and each
block's nodes are folded into one call of a GraphModule of its own
(:func:`~lowbit.passes._fx_blocks.fold_blocks`: same layers, same function) for the reconstruction; a
block whose nodes cannot be folded (not contiguous, more than one input or output) is logged and its
layers are reconstructed alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, EmptyCalibrationError, UnsupportedLayerError
from ..ops import fake_quantize
from ..spec import QuantSpec, compute_qparams
from ._fx_blocks import fold_blocks, graph_blocks
from ._graph import BN_TYPES, LAYER_TYPES, get_module
from ._layer import spec_of, weight_qparams
from .adaround import (
    _TYPES,
    CHUNK,
    GAMMA,
    ZETA,
    AdaRoundConfig,
    AdaRoundResult,
    _chunked_errors,
    _full,
    _reconstruction_inputs,
    _rectified_sigmoid,
    _rounding_reg,
    _sample,
    _set_rounded,
    _Targets,
    _UnitInputs,
    adaround_layer,
    layer_activations,
)
from .log import PassLog

log = logging.getLogger(__name__)

__all__ = ["find_blocks", "reconstruct_block", "block_fisher"]

_CONTAINERS = (nn.Sequential, nn.ModuleList)


def find_blocks(model: nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """The blocks of BRECQ block reconstruction, found from the module tree (see the module docstring).

    A block is a direct child of an ``nn.Sequential`` / ``nn.ModuleList`` that is not itself such a
    container nor a Conv/Linear layer, and whose subtree holds one of ``layers`` (default: every
    Conv1d/2d/3d and Linear). Returned in registration order; blocks never nest.

    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(4, 4, 1)
    ...     def forward(self, x):
    ...         return x + self.conv(x)
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(Block(), Block()), nn.ReLU())
    >>> find_blocks(net)
    ['1.0', '1.1']
    """
    if layers is None:
        layers = [n for n, m in model.named_modules() if isinstance(m, _TYPES)]
    layers = list(layers)
    out: list[str] = []

    def holds_layer(name: str) -> bool:
        return any(n.startswith(name + ".") for n in layers)

    def visit(module: nn.Module, prefix: str, in_container: bool) -> None:
        for child_name, child in module.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, _CONTAINERS):
                visit(child, full, True)
            elif isinstance(child, _TYPES):
                continue  # a layer outside any block is its own unit
            elif in_container and holds_layer(full):
                out.append(full)
            else:
                visit(child, full, False)

    visit(model, "", isinstance(model, _CONTAINERS))
    return out


def trace_with_leaves(model: nn.Module, leaves: frozenset[str]) -> torch.fx.GraphModule | None:
    """torch.fx graph of ``model`` in which the modules named in ``leaves`` are single ``call_module``
    nodes (as Conv/Linear/BatchNorm are); None when the model does not trace. A GraphModule is
    returned as it is (its blocks are not called: the caller falls back to layers)."""
    if isinstance(model, torch.fx.GraphModule):
        return model
    from .clip import ChannelClip

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return (qualname in leaves or isinstance(m, (ChannelClip, *LAYER_TYPES, *BN_TYPES))
                    or super().is_leaf_module(m, qualname))

    try:
        return torch.fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # same failure modes as _graph.trace
        log.info("brecq: torch.fx could not trace %s with blocks as leaves (%s); re-running the model instead",
                 type(model).__name__, type(e).__name__)
        return None


@dataclass
class _Rounding:
    """AdaRound state of one layer inside a block: ``W~ = s (clip(floor(W / s) + h(V) + z) - z)``."""

    key: str  # the weight's name relative to the block, for torch.func.functional_call
    w: torch.Tensor
    scale: torch.Tensor
    zp: torch.Tensor
    s: torch.Tensor
    z: torch.Tensor
    w_floor: torch.Tensor
    v: nn.Parameter
    qmin: float
    qmax: float

    @classmethod
    def of(cls, key: str, layer: nn.Module, spec: QuantSpec) -> _Rounding:
        w = layer.weight.detach().float()
        scale, zp = weight_qparams(w, spec)
        s, z = _full(scale, w, spec), _full(zp.float(), w, spec)
        w_floor = torch.floor(w / s)
        rest = (w / s - w_floor).clamp(1e-4, 1 - 1e-4)
        v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(V) = rest: W~ = W at the start
        return cls(key, w, scale, zp, s, z, w_floor, v, float(spec.qmin), float(spec.qmax))

    def weight_of(self, h: torch.Tensor) -> torch.Tensor:
        return self.s * (torch.clamp(self.w_floor + h + self.z, self.qmin, self.qmax) - self.z)

    def hard(self) -> torch.Tensor:
        return self.weight_of((self.v >= 0).float())

    def nearest(self) -> torch.Tensor:
        return self.weight_of(torch.round(self.w / self.s) - self.w_floor)


class _ActQuant:
    """Forward pre-hooks that fake-quantize the inputs of the rounded layers inside a block.

    ``mode``: ``"off"`` (float), ``"calib"`` (record each input's min/max, and which layers read the block
    input itself, already quantized), ``"quant"`` (fake-quantize; with ``drop > 0`` QDrop keeps each
    element's unquantized value with that probability)."""

    def __init__(self, layers: Mapping[str, nn.Module], spec: QuantSpec, gen: torch.Generator) -> None:
        self.spec, self.gen = spec, gen
        self.mode, self.drop = "off", 0.0
        self.block_input: torch.Tensor | None = None
        self.ranges: dict[str, list[torch.Tensor]] = {}
        self.reads_block_input: set[str] = set()
        self.qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [m.register_forward_pre_hook(lambda mod, inp, k=k: self._hook(k, inp)) for k, m in layers.items()]

    def _hook(self, key: str, inp: tuple):
        x = inp[0]
        if self.mode == "calib":
            if x is self.block_input:
                self.reads_block_input.add(key)
            lo, hi = x.detach().min(), x.detach().max()
            r = self.ranges.setdefault(key, [lo, hi])
            r[0], r[1] = torch.minimum(r[0], lo), torch.maximum(r[1], hi)
            return None
        if self.mode != "quant" or key in self.reads_block_input:
            return None
        s, z = self.qparams[key]
        xq = fake_quantize(x, s, z, self.spec)
        if self.drop > 0:
            keep = torch.rand(x.shape, generator=self.gen, device=x.device) < self.drop
            xq = torch.where(keep, x, xq)
        return (xq, *inp[1:])

    def finish_calib(self) -> None:
        self.qparams = {k: compute_qparams(self.spec, lo, hi) for k, (lo, hi) in self.ranges.items()}
        self.mode = "off"

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _out_error(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error (times ``weight`` elementwise, the Fisher) summed over channels (dim 1, or the last
    dim of a 2-D output), mean over the rest."""
    d2 = (out - target) ** 2
    if weight is not None:
        d2 = d2 * weight
    return d2.sum(dim=1 if out.dim() > 2 else -1).mean()


def block_fisher(model: nn.Module, blocks: Sequence[str], xs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """BRECQ's diagonal Fisher of each block's output: ``(dL / dz)^2`` per sample and output element,
    ``L`` the cross-entropy of ``model``'s logits ``(N, classes)`` against its own argmax, ``z`` the
    block's output; one forward and backward per batch. Normalized to mean 1 per block (all ones when the
    gradient is zero everywhere). Returns ``{block: tensor (N, *output shape)}`` on the output's device."""
    grads: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}

    def hook(mod, inp, out, b):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda g: grads[b].append(g.detach().float() ** 2))

    handles = [get_module(model, b).register_forward_hook(lambda m, i, o, b=b: hook(m, i, o, b)) for b in blocks]
    try:
        for x in xs:
            x = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                logits = model(x)
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise ConfigError("AdaRoundConfig(fisher=True) needs a model that returns logits (N, classes).")
                F.cross_entropy(logits, logits.argmax(1), reduction="sum").backward(inputs=[x])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for b, g in grads.items():
        if len(g) != len(xs):
            raise ConfigError(f"AdaRoundConfig(fisher=True): no gradient reached block {b} in every batch.")
        f = torch.cat(g)
        mean = f.mean()
        out[b] = f / mean if mean > 0 else torch.ones_like(f)
    return out


def reconstruct_block(block: nn.Module, layers: Mapping[str, QuantSpec], inputs: torch.Tensor,
                      config: AdaRoundConfig | None = None, *,
                      float_inputs: torch.Tensor | None = None, args: Sequence = (),
                      kwargs: Mapping | None = None,
                      out_weight: torch.Tensor | None = None) -> dict[str, AdaRoundResult]:
    """Round the weights of ``layers`` (names relative to ``block``) together, minimizing the block's
    output error (BRECQ); ``block`` itself is not modified.

    Args:
        block: the float block, called as ``block(x, *args, **kwargs)`` and returning one tensor.
        layers: ``{relative layer name: integer weight spec}`` (Conv1d/2d/3d or Linear inside ``block``).
        inputs: ``x~``, the block's input in the quantized model, shape ``(N, ...)``.
        config: :class:`~lowbit.passes.AdaRoundConfig` (default ``AdaRoundConfig(granularity="block")``; ``iters``, ``batch_size``, ``lr``, regularizer,
            ``qdrop_prob``, ``act_spec``, ``seed`` are used; ``iters`` counts steps for the whole block).
        float_inputs: ``x``, the block's input in the float model (the target is ``block(x)``);
            defaults to ``inputs``.
        args, kwargs: the block's other (constant) arguments.
        out_weight: per-sample, per-element weights of the output error, shape ``(N, *output shape)``
            (BRECQ's Fisher, :func:`block_fisher`); None: plain squared error.

    Returns:
        ``{relative layer name: AdaRoundResult}``; every result carries the block's output errors
        (nearest rounding of all its layers vs the result) and the same ``used``.

    >>> torch.manual_seed(0) and None
    >>> blk = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> res = reconstruct_block(blk, {"0": QuantSpec("int3"), "2": QuantSpec("int3")}, torch.randn(64, 8),
    ...                         AdaRoundConfig(granularity="block", iters=50, lr=1e-2))
    >>> sorted(res), res["0"].error <= res["0"].error_nearest
    (['0', '2'], True)
    """
    config = AdaRoundConfig(granularity="block") if config is None else config
    if not layers:
        raise ConfigError("reconstruct_block needs at least one layer to round.")
    if inputs.shape[0] == 0:
        raise EmptyCalibrationError("block reconstruction got no calibration inputs for the block.")
    mods: dict[str, nn.Module] = {}
    for rel, spec in layers.items():
        try:
            m = get_module(block, rel)
        except AttributeError as e:
            raise ConfigError(f"block has no submodule {rel!r}.") from e
        if not isinstance(m, _TYPES):
            raise UnsupportedLayerError(f"AdaRound handles Conv1d/2d/3d and Linear, not {type(m).__name__} ({rel}).")
        if not spec.format.is_integer:
            raise ConfigError(f"AdaRound rounds to an integer grid; {spec.format.name} is not an integer format.")
        mods[rel] = m
    kwargs = dict(kwargs or {})
    gen, mask_gen, x_q, x_fp = _reconstruction_inputs(inputs, float_inputs, config)
    rounds = [_Rounding.of(f"{rel}.weight" if rel else "weight", mods[rel], spec) for rel, spec in layers.items()]
    n, bs = x_q.shape[0], CHUNK

    def run(x: torch.Tensor, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        out = torch.func.functional_call(block, dict(weights or {}), (x, *args), kwargs)
        if not isinstance(out, torch.Tensor):
            raise UnsupportedLayerError(f"block reconstruction needs a block that returns one tensor, got "
                                        f"{type(out).__name__} from {type(block).__name__}.")
        return out

    acts = _ActQuant(mods, config.act_spec, mask_gen) if config.act_spec is not None else None

    def run_float(x: torch.Tensor) -> torch.Tensor:
        """The float block's output: activation quantization off, also when a target is recomputed mid-loop."""
        if acts is None:
            return run(x)
        mode, acts.mode = acts.mode, "off"
        try:
            return run(x)
        finally:
            acts.mode = mode

    try:
        target = _Targets(run_float, x_fp)
        with torch.no_grad():
            if acts is not None:
                acts.mode = "calib"
                for i in range(0, n, bs):
                    acts.block_input = x_q[i:i + bs]
                    run(acts.block_input)
                acts.block_input = None
                acts.finish_calib()
                acts.mode, acts.drop = "quant", config.qdrop_prob
        opt = torch.optim.Adam([r.v for r in rounds], lr=config.lr)
        warm = int(config.warm_start * config.iters)
        for it in range(config.iters):
            idx, xb = _sample(x_q, x_fp, config, gen, mask_gen)
            hs = [_rectified_sigmoid(r.v) for r in rounds]
            loss = _out_error(run(xb, {r.key: r.weight_of(h) for r, h in zip(rounds, hs)}), target[idx],
                              None if out_weight is None else out_weight[idx]) + _rounding_reg(hs, it, warm, config)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            if acts is not None:
                acts.drop = 0.0

            w_ada = {r.key: r.hard() for r in rounds}
            w_near = {r.key: r.nearest() for r in rounds}

            def errors_of(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
                x, t = x_q[rows], target[rows]
                ow = None if out_weight is None else out_weight[rows]
                return _out_error(run(x, w_ada), t, ow), _out_error(run(x, w_near), t, ow)

            err_ada, err_near = _chunked_errors(n, errors_of)
    finally:
        if acts is not None:
            acts.remove()
    used = "adaround" if err_ada <= err_near else "nearest"
    chosen = w_ada if used == "adaround" else w_near
    out: dict[str, AdaRoundResult] = {}
    for rel, r in zip(layers, rounds):
        w = chosen[r.key].to(mods[rel].weight.dtype)
        out[rel] = AdaRoundResult(w, r.scale, r.zp, _rectified_sigmoid(r.v).detach(), err_near,
                                  min(err_ada, err_near), used)
    return out


def _block_calls(model: nn.Module, blocks: Sequence[str], x: torch.Tensor) -> dict[str, list[tuple[tuple, dict]]]:
    """Every call of each block in one forward: ``(args after the first, kwargs)``."""
    calls: dict[str, list[tuple[tuple, dict]]] = {b: [] for b in blocks}
    handles = [get_module(model, b).register_forward_pre_hook(
        lambda mod, a, kw, b=b: calls[b].append((tuple(a[1:]), dict(kw))), with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _check_blocks(model: nn.Module, blocks: Sequence[str]) -> None:
    for b in blocks:
        try:
            get_module(model, b)
        except AttributeError as e:
            raise ConfigError(f"AdaRoundConfig.blocks: the model has no module {b!r}.") from e
        for other in blocks:
            if other != b and other.startswith(b + "."):
                raise ConfigError(f"AdaRoundConfig.blocks: {other!r} lies inside {b!r}; blocks must not nest.")


def _is_tensorish(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return any(_is_tensorish(e) for e in v)
    if isinstance(v, dict):
        return any(_is_tensorish(e) for e in v.values())
    return False


def adaround_blocks(model: nn.Module, fp_model: nn.Module, xs: list[torch.Tensor], names: list[str],
                    spec: QuantSpec | Mapping[str, QuantSpec], config: AdaRoundConfig, plog: PassLog, *,
                    progress: bool = True, capture: str = "auto") -> tuple[nn.Module, dict[str, AdaRoundResult], PassLog]:
    """The ``granularity="block"`` path of :func:`~lowbit.passes.adaround` (its arguments prepared there:
    ``model`` is rounded in place, ``fp_model`` is the float reference, ``names`` the layers to round in
    execution order)."""
    from tqdm.auto import tqdm

    rounded = model
    traced = isinstance(model, torch.fx.GraphModule)  # e.g. after CLE: its layers are called directly
    if config.blocks is not None:
        blocks = list(config.blocks)
    else:
        blocks = graph_blocks(model, names, _TYPES) if traced else find_blocks(model, names)
    _check_blocks(model, blocks)
    if traced:  # fold each block's nodes into one call
        model, unfolded = fold_blocks(model, blocks)
        if isinstance(fp_model, torch.fx.GraphModule):
            fp_model, _ = fold_blocks(fp_model, blocks)
        for b, why in unfolded.items():
            plog.add("adaround", (b,), False, f"block {b} of the torch.fx graph: {why}; its layers are "
                     "reconstructed alone")
            log.info("brecq: block %s of the torch.fx graph: %s; layers reconstructed alone", b, why)
        blocks = [b for b in blocks if b not in unfolded]
    members = {b: [n for n in names if n == b or n.startswith(b + ".")] for b in blocks}
    for b in [b for b in blocks if not members[b]]:
        plog.add("adaround", (b,), False, "block holds no layer to round")
    blocks = [b for b in blocks if members[b]]
    if not blocks:
        why = ("no block holds a layer to round" if config.blocks is not None else "find_blocks found no block "
               "(no module below an nn.Sequential / nn.ModuleList holds a layer to round)")
        plog.add("adaround", (), False, f"granularity='block': {why}; every layer is reconstructed alone")
        log.warning("brecq: %s; every layer is reconstructed alone", why)
    calls = _block_calls(model, blocks, xs[0]) if blocks else {}
    extras: dict[str, tuple[tuple, dict]] = {}
    for b in blocks:
        c = calls[b]
        why = None
        if len(c) != 1:
            why = f"the block module is called {len(c)} times per forward (block reconstruction needs once)"
        elif _is_tensorish(c[0]):
            why = "the block takes more than one tensor argument"
        if why is not None:
            plog.add("adaround", tuple(members[b]), False, f"block {b}: {why}; its layers are reconstructed alone")
            log.info("brecq: block %s: %s; layers reconstructed alone", b, why)
        else:
            extras[b] = c[0]
    block_of = {n: b for b in extras for n in members[b]}
    units: list[str] = []
    for n in names:
        u = block_of.get(n, n)
        if u not in units:
            units.append(u)
    fisher = block_fisher(fp_model, list(extras), xs) if config.fisher and extras else {}
    acts = layer_activations(model, [u for u in units if u not in extras], config, plog)
    inputs = _UnitInputs(fp_model, model, xs, capture, extras)
    results: dict[str, AdaRoundResult] = {}
    bar = tqdm(units, desc="BRECQ", disable=not progress, unit="block")
    for unit in bar:
        bar.set_postfix_str(unit)
        x_fp, x_q = inputs.of(unit, first=not results)
        if unit not in extras:
            layer = get_module(model, unit)
            res = adaround_layer(layer, x_q, spec_of(spec, unit), config, float_inputs=x_fp,
                                 activation=acts.get(unit))
            unit_results = {unit: res}
        else:
            block = get_module(model, unit)
            rel = {n[len(unit) + 1:] if n != unit else "": spec_of(spec, n) for n in members[unit]}
            a, kw = extras[unit]
            got = reconstruct_block(block, rel, x_q, config, float_inputs=x_fp, args=a, kwargs=kw,
                                    out_weight=fisher.pop(unit, None))
            unit_results = {(f"{unit}.{r}" if r else unit): AdaRoundResult(**{**vars(res), "block": unit})
                            for r, res in got.items()}
        for name, res in unit_results.items():
            _set_rounded(get_module(model, name), res)
            results[name] = res
        res = next(iter(unit_results.values()))
        what = f"block {unit} ({len(unit_results)} layers)" if unit in extras else "layer"
        plog.add("adaround", tuple(unit_results), True,
                 f"{what}: {res.used}: error {res.error:.4g} vs nearest {res.error_nearest:.4g}")
        log.info("brecq %s: %s, error %.4g (nearest %.4g)", unit, res.used, res.error, res.error_nearest)
    return rounded, {n: results[n] for n in names if n in results}, plog
