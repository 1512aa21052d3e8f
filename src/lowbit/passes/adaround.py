"""AdaRound: learn whether each weight rounds up or down (Nagel et al. 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization").

Per layer, with ``s, z`` the weight's min/max qparams under ``spec``, the soft-quantized weight is::

    h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)        zeta = 1.1, gamma = -0.1
    W~   = s * (clip(floor(W / s) + h(V) + z, qmin, qmax) - z)

and ``V`` minimizes the layer's output reconstruction error plus a regularizer that pushes ``h`` to 0/1::

    || W x - W~ x~ ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

(squared error summed over output channels, averaged over samples and positions), ``beta`` annealed
linearly from 20 to 2 after a warm start without the regularizer. ``V`` starts where ``h(V)`` equals the
fractional part of ``W / s`` (so ``W~ = W`` at the start). The final weight uses the hard rounding
``h = [V >= 0]``, and nearest rounding is kept instead when it reconstructs better on the calibration
inputs (so AdaRound never makes a layer worse on its own data). With ``post_activation=True`` both outputs
first go through the clip that follows the layer (ReLU, ReLU6, CLE's per-channel clip), as in the paper's
asymmetric reconstruction.

Layers are done one at a time in execution order. A layer's target output comes from the float model's
input ``x``; the optimized layer sees ``x~``, its input in the model whose earlier layers are already
rounded (optionally activation-quantized with ``act_spec``). QDrop (Wei et al. 2022): with
``qdrop_prob = p``, each element of ``x~`` is replaced by the float ``x`` with probability ``p`` during
optimization.

Block reconstruction (BRECQ, Li et al. 2021), ``AdaRoundConfig(granularity="block")``: the ``V`` of all
layers of a block (e.g. an inverted-residual block with its skip add) are optimized together against the
block's output error; see :mod:`~lowbit.passes.brecq` for the objective and for how blocks are found.

Capturing ``x`` and ``x~``: when the model traces with torch.fx, both models are run node by node over
all calibration batches and paused before each layer (``capture="auto"``), so every node runs once
per batch: O(L) work for L layers. The values are the ones a full forward gives (same nodes, same
order, a layer runs only after it was rounded). Models that do not trace re-run the forward up to each
layer (``capture="rerun"``, O(L^2)). Everything runs on the device of the model's weights (CPU or CUDA).

Memory: what scales with the number of samples N is the current unit's inputs in both models (N rows
each), the target when it is no larger than the inputs (else recomputed from the float inputs each
step, :class:`_Targets`), and while stepping to the next unit both models' live values. ``act_spec``
quantizes only the rows in use (:class:`_ActQuantRows`), and full-set forwards run in chunks of
:data:`CHUNK` rows.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from ..errors import ConfigError, EmptyCalibrationError, UnsupportedLayerError
from ..granularity import PerTensor, broadcast_param, to_blocks
from ..ops import fake_quantize
from ..spec import QuantSpec, compute_qparams
from ._graph import CONV_TYPES, activation_after, call_order, get_module, trace
from ._layer import batches, channel_dim, forward_with, spec_of, weight_qparams
from .log import PassLog

log = logging.getLogger(__name__)

__all__ = ["AdaRoundConfig", "AdaRoundResult", "adaround", "adaround_layer"]

ZETA, GAMMA = 1.1, -0.1
# Rows per no-grad forward over all stored inputs (targets, final errors): a conv's transient memory (oneDNN
# reorders its input) grows with it, and past a few dozen rows it no longer speeds the forward up.
CHUNK = 32
_TYPES = (*CONV_TYPES, nn.Linear)
_QPARAMS_ATTR = "lowbit_weight_qparams"
Granularity = Literal["layer", "block"]


@dataclass(frozen=True)
class AdaRoundConfig:
    """Optimization settings: the paper's, except ``iters`` (10000 in the paper), ``reg_weight`` and ``lr``
    (0.01 and 1e-3 in the paper). Adam moves each ``V`` by about ``lr`` per step, and at the paper's values
    a budget of a few hundred to a few thousand steps leaves most of ``h`` undecided between 0 and 1.
    EfficientNet-Lite0 W4A8, 200 steps per layer, 32 samples, 200 ImageNet images (float 0.880, nearest
    0.195): lambda 0.01 / lr 1e-3 gave top-1 0.685 (agreement with float 0.720); lambda 1 / lr 3e-2 gave
    0.830 (0.885). With the latter, 600 and 1500 steps gave -2.8 and -2.0 pt on 500 images
    (docs/benchmarks.md, "W4A8 with AdaRound"). For 10000+ steps the paper's values are the reference.

    Args:
        iters: Adam steps per layer. warm_start: fraction of steps without the regularizer.
        reg_weight: lambda. beta_start, beta_end: the regularizer's exponent, annealed linearly.
        lr: Adam learning rate for V. batch_size: samples (first dim of the stored inputs) per step.
        qdrop_prob: probability of using the float input instead of the quantized one, per element.
        act_spec: if set, the layer's (quantized-model) input is fake-quantized with a per-tensor
            min/max range under this spec before the layer sees it.
        seed: for batch sampling and QDrop masks.
        granularity: ``"layer"`` (AdaRound: each layer's own output error) or ``"block"`` (BRECQ: all
            layers of a block rounded together against the block's output error;
            :mod:`~lowbit.passes.brecq`). ``iters`` and ``batch_size`` then count per block; layers outside
            every block are reconstructed alone.
        blocks: with ``granularity="block"``, the module names of the blocks (e.g.
            ``("features.1", "features.2")``); None finds them with :func:`~lowbit.passes.brecq.find_blocks`
            (in a torch.fx GraphModule, e.g. after CLE, from the module stack its trace recorded).
        fisher: with ``granularity="block"``, weight each block's output error by BRECQ's diagonal Fisher,
            the squared gradient of the float model's cross-entropy (against its own prediction) with
            respect to the block output, normalized to mean 1 (:mod:`~lowbit.passes.brecq`).
        post_activation: reconstruct a layer's output after the clipping activation that alone consumes
            it (ReLU, ReLU6, Hardtanh, CLE's per-channel clip; through a folded BatchNorm), as the paper's
            asymmetric reconstruction does: ``|| f(W x) - f(W~ x~) ||^2``, so errors the activation clips
            away do not count. Layers without such an activation (or in a model that does not trace)
            reconstruct their own output. Off by default: on EfficientNet-Lite0 W4A8 (600 steps, 64
            samples, 500 images) it gave top-1 0.820 against 0.846 without it (docs/benchmarks.md).

    >>> AdaRoundConfig(granularity="block", iters=500).granularity
    'block'
    """

    iters: int = 1000
    warm_start: float = 0.2
    reg_weight: float = 1.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    lr: float = 3e-2
    batch_size: int = 32
    qdrop_prob: float = 0.0
    act_spec: QuantSpec | None = None
    seed: int = 0
    granularity: Granularity = "layer"
    blocks: tuple[str, ...] | None = None
    fisher: bool = False
    post_activation: bool = False

    def __post_init__(self) -> None:
        if self.granularity not in get_args(Granularity):
            raise ConfigError(f"AdaRoundConfig.granularity must be 'layer' or 'block', got {self.granularity!r}.")
        if self.fisher and self.granularity != "block":
            raise ConfigError("AdaRoundConfig.fisher weights block outputs: it needs granularity='block'.")
        if self.blocks is not None:
            if self.granularity != "block":
                raise ConfigError("AdaRoundConfig.blocks names the blocks of granularity='block'; "
                                  f"got blocks with granularity={self.granularity!r}.")
            if isinstance(self.blocks, str) or not all(isinstance(b, str) and b for b in self.blocks):
                raise ConfigError(f"AdaRoundConfig.blocks is a tuple of module names, got {self.blocks!r}.")
            if len(set(self.blocks)) != len(self.blocks):
                raise ConfigError(f"AdaRoundConfig.blocks names a block twice: {self.blocks!r}.")
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.iters < 1 or not 0 <= self.warm_start < 1 or self.batch_size < 1:
            raise ConfigError(f"AdaRoundConfig needs iters >= 1, 0 <= warm_start < 1, batch_size >= 1; got "
                              f"{self.iters}, {self.warm_start}, {self.batch_size}.")
        if not 0 <= self.qdrop_prob <= 1:
            raise ConfigError(f"qdrop_prob is a probability in [0, 1], got {self.qdrop_prob}.")
        if self.act_spec is not None and not isinstance(self.act_spec.granularity, PerTensor):
            raise ConfigError("AdaRound's act_spec must be per-tensor (granularity=PerTensor()).")


@dataclass
class AdaRoundResult:
    """Outcome for one layer: the rounded ``weight`` (float, on the quantization grid of ``scale`` /
    ``zero_point``), the final soft ``h`` (shape of the weight), and the reconstruction errors
    (mean squared output error per sample, on all stored inputs) of nearest rounding and of the result.
    With block reconstruction ``block`` names the block and the errors are the block's output errors."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    h: torch.Tensor
    error_nearest: float
    error: float
    used: str  # "adaround" or "nearest" (AdaRound reconstructed worse and was discarded)
    block: str | None = None


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _reconstruction_inputs(inputs: torch.Tensor, float_inputs: torch.Tensor | None, config: AdaRoundConfig
                           ) -> tuple[torch.Generator, torch.Generator, torch.Tensor | _ActQuantRows, torch.Tensor]:
    """``(gen, mask_gen, x_q, x_fp)`` of one reconstruction unit: the seeded batch-index stream (CPU on every
    device), the QDrop mask stream (where the inputs live; on CPU the same stream as the indices), the
    unit's inputs (rows fake-quantized on use with ``config.act_spec`` when set, :class:`_ActQuantRows`)
    and its float-model inputs."""
    gen = torch.Generator().manual_seed(config.seed)
    dev = inputs.device
    mask_gen = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(config.seed)
    x_fp = inputs if float_inputs is None else float_inputs
    x_q = inputs if config.act_spec is None else _ActQuantRows(inputs, config.act_spec)
    return gen, mask_gen, x_q, x_fp


def _sample(x_q: torch.Tensor | _ActQuantRows, x_fp: torch.Tensor, config: AdaRoundConfig, gen: torch.Generator,
            mask_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One reconstruction step's batch: ``config.batch_size`` random rows ``idx`` of the stored inputs and
    those rows of ``x_q``, each element replaced by ``x_fp``'s with probability ``config.qdrop_prob`` (QDrop).
    ``gen`` draws the rows, ``mask_gen`` the QDrop mask."""
    n = x_q.shape[0]
    idx = torch.randint(0, n, (min(config.batch_size, n),), generator=gen).to(x_q.device)
    xb = x_q[idx]
    if config.qdrop_prob > 0:
        keep_fp = torch.rand(xb.shape, generator=mask_gen, device=x_q.device) < config.qdrop_prob
        xb = torch.where(keep_fp, x_fp[idx], xb)
    return idx, xb


def _rounding_reg(hs: Sequence[torch.Tensor], it: int, warm: int, config: AdaRoundConfig) -> torch.Tensor | float:
    """AdaRound's regularizer at step ``it``: 0 during the warm start, then
    ``lambda * sum(1 - |2 h - 1|^beta)`` over every ``h`` with ``beta`` annealed linearly from ``beta_start``
    to ``beta_end``."""
    if it < warm:
        return 0.0
    rel = (it - warm) / max(1, config.iters - warm)
    beta = config.beta_end + (config.beta_start - config.beta_end) * (1 - rel)
    return config.reg_weight * sum((1 - (2 * h - 1).abs().pow(beta)).sum() for h in hs)


def _full(p: torch.Tensor, w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """A per-block parameter expanded to the weight's shape."""
    shape = tuple(w.shape)
    blocks = to_blocks(w, spec.granularity).shape
    return broadcast_param(p, shape, spec.granularity).expand(blocks).reshape(shape)


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y


def _recon_error(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor,
                 act=_identity) -> torch.Tensor:
    d = act(forward_with(layer, x, w, layer.bias)) - target
    return (d**2).sum(dim=channel_dim(layer)).mean()


def _chunked_errors(n: int, errors_of, bs: int = CHUNK) -> list[float]:
    """Means over ``n`` rows of losses that are each a mean over the rows they are given, computed ``bs``
    rows at a time without grad: ``errors_of(rows)`` (``rows`` a slice) returns a tuple of scalar tensors,
    and result ``k`` is ``sum_chunks errors_of(chunk)[k] * len(chunk) / n``. One call per chunk evaluates
    every candidate on the same rows, so a recomputed target or quantized input is made once per chunk."""
    tot: list[float] = []
    with torch.no_grad():
        for i in range(0, n, bs):
            errs = [float(e) * min(bs, n - i) for e in errors_of(slice(i, i + bs))]
            tot = errs if not tot else [a + b for a, b in zip(tot, errs)]
    return [t / n for t in tot]


class _Targets:
    """The reconstruction target ``fn(x_fp)`` (a float layer's or block's output on its float inputs
    ``x_fp``, shape ``(N, ...)``), indexed by rows like a tensor: ``targets[idx]``, ``targets[i:j]``.

    Stored (computed in chunks of ``bs`` rows) when one row of it is no larger than one row of ``x_fp``,
    so it at most doubles what the stored inputs hold; otherwise (a 1x1 expansion conv's output is 6x its
    input) recomputed from the ``x_fp`` rows on each use, one no-grad forward per step instead of memory
    that would set the peak of the whole pass."""

    def __init__(self, fn, x_fp: torch.Tensor, bs: int = CHUNK) -> None:
        self.fn, self.x_fp = fn, x_fp
        self.stored: torch.Tensor | None = None
        with torch.no_grad():
            first = fn(x_fp[:1])
            if first.numel() <= x_fp[:1].numel():
                self.stored = first.new_empty((x_fp.shape[0], *first.shape[1:]))
                for i in range(0, x_fp.shape[0], bs):
                    self.stored[i:i + bs] = fn(x_fp[i:i + bs])

    def __getitem__(self, rows) -> torch.Tensor:
        if self.stored is not None:
            return self.stored[rows]
        with torch.no_grad():
            return self.fn(self.x_fp[rows])


class _ActQuantRows:
    """The stored inputs ``x`` (shape ``(N, ...)``) fake-quantized under ``spec`` with one per-tensor range,
    ``s, z = qparams(min(x), max(x))`` over all rows, indexed by rows like a tensor: ``rows[idx]`` is
    ``fake_quantize(x[idx], s, z)``. Quantizing the rows a step uses, rather than a quantized copy of all
    of ``x``, gives the same values without holding the inputs twice."""

    def __init__(self, x: torch.Tensor, spec: QuantSpec) -> None:
        self.x, self.spec = x, spec
        self.scale, self.zero_point = compute_qparams(spec, x.min(), x.max())
        self.shape, self.device = x.shape, x.device

    def __getitem__(self, rows) -> torch.Tensor:
        return fake_quantize(self.x[rows], self.scale, self.zero_point, self.spec)


def adaround_layer(layer: nn.Module, inputs: torch.Tensor, spec: QuantSpec, config: AdaRoundConfig = AdaRoundConfig(),
                   *, float_inputs: torch.Tensor | None = None, activation=None) -> AdaRoundResult:
    """AdaRound one Conv1d/2d/3d or Linear layer; the layer itself is not modified.

    Args:
        layer: the float layer (its weight gives the target, its bias is kept).
        inputs: ``x~``, what the quantized layer sees, shape ``(N, ...)`` as the layer takes it.
        spec: integer weight :class:`~lowbit.spec.QuantSpec` (granularity per-tensor/channel/group).
        config: :class:`AdaRoundConfig`.
        float_inputs: ``x`` for the target ``W x + b``; defaults to ``inputs``.
        activation: ``f`` of a post-activation reconstruction ``|| f(W x + b) - f(W~ x~ + b) ||^2`` (a
            module or function applied elementwise to the layer output); None reconstructs ``W x + b``.

    Returns:
        :class:`AdaRoundResult`.
    """
    if not isinstance(layer, _TYPES):
        raise UnsupportedLayerError(f"AdaRound handles Conv1d/2d/3d and Linear, not {type(layer).__name__}.")
    if not spec.format.is_integer:
        raise ConfigError(f"AdaRound rounds to an integer grid; {spec.format.name} is not an integer format.")
    if inputs.shape[0] == 0:
        raise EmptyCalibrationError("AdaRound got no calibration inputs for the layer.")
    gen, mask_gen, x_q, x_fp = _reconstruction_inputs(inputs, float_inputs, config)
    w = layer.weight.detach().float()
    scale, zp = weight_qparams(w, spec)
    s, z = _full(scale, w, spec), _full(zp.float(), w, spec)
    qmin, qmax = float(spec.qmin), float(spec.qmax)
    w_floor = torch.floor(w / s)
    rest = (w / s - w_floor).clamp(1e-4, 1 - 1e-4)
    # h(V) = rest at the start: sigmoid(V) = (rest - gamma) / (zeta - gamma)
    v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def weight_of(h: torch.Tensor) -> torch.Tensor:
        return s * (torch.clamp(w_floor + h + z, qmin, qmax) - z)

    act = _identity if activation is None else activation
    target = _Targets(lambda x: act(forward_with(layer, x, w, layer.bias)), x_fp)
    opt = torch.optim.Adam([v], lr=config.lr)
    warm = int(config.warm_start * config.iters)
    for it in range(config.iters):
        idx, xb = _sample(x_q, x_fp, config, gen, mask_gen)
        h = _rectified_sigmoid(v)
        loss = _recon_error(layer, xb, weight_of(h), target[idx], act) + _rounding_reg([h], it, warm, config)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        h_soft = _rectified_sigmoid(v)
        w_ada = weight_of((v >= 0).float())
        w_near = weight_of(torch.round(w / s) - w_floor)  # nearest rounding as a 0/1 choice

        def errors_of(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            x, t = x_q[rows], target[rows]
            return _recon_error(layer, x, w_ada, t, act), _recon_error(layer, x, w_near, t, act)

        err_ada, err_near = _chunked_errors(x_q.shape[0], errors_of)
    used = "adaround" if err_ada <= err_near else "nearest"
    w_out = (w_ada if used == "adaround" else w_near).to(layer.weight.dtype)
    return AdaRoundResult(w_out, scale, zp, h_soft.detach(), err_near, min(err_ada, err_near), used)


class _Stop(Exception):
    pass


def _capture(model: nn.Module, name: str, data: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inputs of submodule ``name`` over all batches, concatenated on dim 0 (forward stops there)."""
    store: list[torch.Tensor] = []

    def hook(mod, inputs):
        store.append(inputs[0].detach())
        raise _Stop

    h = get_module(model, name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for x in data:
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        h.remove()
    if not store:
        raise EmptyCalibrationError(f"no calibration batch reached {name}.")
    return torch.cat(store)


class _LiveInterpreter(torch.fx.Interpreter):
    """``torch.fx.Interpreter`` whose placeholder is the current batch ``x`` and whose ``call_module``
    looks the submodule up on the live ``model`` (not on the traced copy), so a rounded layer runs rounded."""

    def __init__(self, model: nn.Module, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.model = model
        self.x: torch.Tensor | None = None

    def placeholder(self, target, args, kwargs):
        return self.x

    def call_module(self, target, args, kwargs):
        return get_module(self.model, str(target))(*args, **kwargs)


class _Stepper:
    """Runs a traced model node by node over every calibration batch, pausing before a layer's call.

    ``inputs_of(name)`` executes the graph up to the first call of submodule ``name`` and returns that
    call's first argument over all batches (concatenated on dim 0); the nodes before it never run again.
    Submodules are looked up on ``model`` at call time, so a layer rounded while paused runs rounded.
    Values are freed after their last use (the live set per batch is what a forward keeps alive anyway).
    """

    def __init__(self, model: nn.Module, gm: torch.fx.GraphModule, xs: Sequence[torch.Tensor]) -> None:
        self.xs = xs
        self.interp = _LiveInterpreter(model, gm)
        self.nodes = list(gm.graph.nodes)
        self.pos = 0
        self.envs: list[dict] = [{} for _ in xs]
        self.last_use: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        seen: set[torch.fx.Node] = set()
        for node in reversed(self.nodes):
            for arg in node.all_input_nodes:
                if arg not in seen:
                    seen.add(arg)
                    self.last_use.setdefault(node, []).append(arg)

    @classmethod
    def create(cls, model: nn.Module, xs: Sequence[torch.Tensor], leaves: Iterable[str] = ()) -> _Stepper | None:
        """``leaves``: module names traced as single calls (the blocks of block reconstruction)."""
        leaves = frozenset(leaves)
        if leaves:
            from .brecq import trace_with_leaves

            gm = trace_with_leaves(model, leaves)
        else:
            gm = trace(model)
        if gm is None or sum(n.op == "placeholder" for n in gm.graph.nodes) != 1:
            return None
        return cls(model, gm, xs)

    def inputs_of(self, name: str) -> torch.Tensor | None:
        """Inputs of the first call of ``name`` over all batches, or None when that call already ran
        (or never comes): the caller then re-runs the model."""
        stop = next((i for i in range(self.pos, len(self.nodes)) if self.nodes[i].op == "call_module"
                     and str(self.nodes[i].target) == name), None)
        if stop is None:
            return None
        with torch.no_grad():
            for env, x in zip(self.envs, self.xs):
                self.interp.env, self.interp.x = env, x
                for node in self.nodes[self.pos:stop]:
                    env[node] = self.interp.run_node(node)
                    for dead in self.last_use.get(node, ()):
                        env.pop(dead, None)
        self.pos = stop
        arg = self.nodes[stop].args[0] if self.nodes[stop].args else None
        if not isinstance(arg, torch.fx.Node):
            return None
        sizes = [env[arg].shape[0] for env in self.envs]
        first = self.envs[0][arg]
        joined = first.new_empty((sum(sizes), *first.shape[1:]))
        # Keep the inputs once, not twice: each batch's value is copied into the concatenation and replaced
        # by a view of it at once (so the copy never holds all batches twice; a view changes only when later
        # nodes run, after the caller is done with this unit's inputs).
        for env, view in zip(self.envs, joined.split(sizes)):
            view.copy_(env[arg].detach())
            env[arg] = view
        return joined


class _UnitInputs:
    """The inputs of each unit (a layer, or a block of block reconstruction) over all calibration batches,
    in the float model and in the partly rounded one, asked for in execution order. ``capture="auto"``:
    both models are stepped once through their torch.fx graphs (:class:`_Stepper`; ``leaves`` are traced as
    single calls); when either does not trace, or for ``"rerun"``, each model is re-run up to the unit."""

    def __init__(self, fp_model: nn.Module, model: nn.Module, xs: Sequence[torch.Tensor], capture: str,
                 leaves: Iterable[str] = ()) -> None:
        self.fp_model, self.model, self.xs = fp_model, model, xs
        self.steppers = None
        if capture == "auto":
            fp_step, q_step = _Stepper.create(fp_model, xs, leaves), _Stepper.create(model, xs, leaves)
            if fp_step is not None and q_step is not None:
                self.steppers = (fp_step, q_step)
            else:
                log.info("adaround: the model does not trace; re-running it up to each layer or block (O(L^2) forwards)")

    def of(self, name: str, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(float-model inputs, rounded-model inputs) of unit ``name``; ``first``: nothing is rounded yet,
        so the rounded model's inputs are the float ones."""
        x_fp = x_q = None
        if self.steppers is not None:
            x_fp, x_q = self.steppers[0].inputs_of(name), self.steppers[1].inputs_of(name)
        if x_fp is None or x_q is None:
            x_fp = _capture(self.fp_model, name, self.xs)
            x_q = x_fp if first else _capture(self.model, name, self.xs)
        return x_fp, x_q


def layer_activations(model: nn.Module, names: Sequence[str], config: AdaRoundConfig, plog: PassLog) -> dict:
    """``{layer: the clip its output goes through}`` for ``config.post_activation`` (else empty), noted
    in ``plog``."""
    if not config.post_activation:
        return {}
    gm = trace(model)
    if gm is None:
        plog.add("adaround", (), False, "post_activation: the model does not trace with torch.fx; every layer "
                 "reconstructs its own output")
        return {}
    acts = {n: a for n in names if (a := activation_after(gm, n)) is not None}
    plog.add("adaround", tuple(acts), True, f"post_activation: {len(acts)} of {len(names)} layer(s) reconstruct "
             "their output after the activation that follows them")
    return acts


def _set_rounded(layer: nn.Module, res: AdaRoundResult) -> None:
    """Write the rounded weight into ``layer`` and keep the grid it lies on (:func:`_QPARAMS_ATTR`)."""
    with torch.no_grad():
        layer.weight.copy_(res.weight)
    layer.__dict__[_QPARAMS_ATTR] = (res.scale, res.zero_point)


def adaround(model: nn.Module, data: Iterable, spec: QuantSpec | Mapping[str, QuantSpec],
             config: AdaRoundConfig = AdaRoundConfig(), *,
             layers: Sequence[str] | None = None, inplace: bool = False,
             progress: bool = True,
             capture: Literal["auto", "rerun"] = "auto") -> tuple[nn.Module, dict[str, AdaRoundResult], PassLog]:
    """AdaRound every Conv1d/2d/3d and Linear layer of ``model`` (or the named ``layers``), in execution order.

    Args:
        model: float model in eval mode (fold BatchNorms first); copied unless ``inplace``.
        data: calibration batches (tensors or ``(input, target)`` pairs); a few hundred samples suffice.
        spec: the integer weight spec; the rounded weights lie on its grid. Or ``{layer name: spec}``
            when layers differ (e.g. first/last layer 8-bit); layers not in the map are left alone.
        config: :class:`AdaRoundConfig`; ``granularity="block"`` rounds each block's layers together against
            the block output (BRECQ, :mod:`~lowbit.passes.brecq`). progress: a tqdm bar over the layers
            (over the blocks and lone layers with ``granularity="block"``).
        capture: ``"auto"``: step through the torch.fx graph once (O(L) forwards for L layers), falling
            back to re-running the model up to each layer when it does not trace; ``"rerun"``: always
            re-run (O(L^2); the same inputs, kept as the reference).
        Runs on the device of the model's weights; put the calibration batches anywhere (they are
        moved there).

    Returns:
        ``(model, results, log)``: the model with rounded float weights (each layer also carries its
        ``(scale, zero_point)`` as attribute ``lowbit_weight_qparams``, so re-quantizing with those is
        exact), the per-layer :class:`AdaRoundResult`, and the log.
    """
    from tqdm.auto import tqdm

    fp_model = model
    model = model if inplace else copy.deepcopy(model)
    if inplace:
        fp_model = copy.deepcopy(model)
    if capture not in ("auto", "rerun"):
        raise ConfigError(f"capture must be 'auto' or 'rerun', got {capture!r}.")
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    xs = [x.to(dev) for x in batches(data)]
    if not xs:
        raise EmptyCalibrationError("adaround needs calibration data; got no batches.")
    order = call_order(model, [n for n, m in model.named_modules() if isinstance(m, _TYPES)], (xs[0],))
    names = order if layers is None else [n for n in order if n in set(layers)]
    plog = PassLog()
    for n in [n for n in names if spec_of(spec, n) is None]:
        plog.add("adaround", (n,), False, "no weight spec given for this layer (its weight stays float)")
    names = [n for n in names if spec_of(spec, n) is not None]
    for n, m in model.named_modules():
        if isinstance(m, _TYPES) and n not in order:
            plog.add("adaround", (n,), False, "not called in the forward pass")
    if config.granularity == "block":
        from .brecq import adaround_blocks

        return adaround_blocks(model, fp_model, xs, names, spec, config, plog, progress=progress, capture=capture)
    results: dict[str, AdaRoundResult] = {}
    acts = layer_activations(model, names, config, plog)
    inputs = _UnitInputs(fp_model, model, xs, capture)
    for name in tqdm(names, desc="AdaRound", disable=not progress, unit="layer"):
        x_fp, x_q = inputs.of(name, first=not results)
        layer = get_module(model, name)
        res = adaround_layer(layer, x_q, spec_of(spec, name), config, float_inputs=x_fp, activation=acts.get(name))
        _set_rounded(layer, res)
        results[name] = res
        plog.add("adaround", (name,), True, f"{res.used}: error {res.error:.4g} vs nearest {res.error_nearest:.4g}")
        log.info("adaround %s: %s, error %.4g (nearest %.4g)", name, res.used, res.error, res.error_nearest)
    return model, results, plog
