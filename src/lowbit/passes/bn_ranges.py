"""Data-free activation ranges from BatchNorm statistics (Nagel et al. 2019, "Data-Free Quantization").

A Conv/Linear layer with a folded BatchNorm has the pre-activation ``x_c ~ N(beta_c, gamma_c^2)`` per
output channel (:func:`~lowbit.passes.fold_bn.output_stats`, rescaled and shifted by CLE and high-bias
absorption). The range of the quantizer on the layer's output is, per channel, ``beta_c +- n |gamma_c|``
clipped by the activation that follows (ReLU ``[0, inf)``, ReLU6 ``[0, 6]``, an equalized ReLU6's
:class:`~lowbit.passes.clip.ChannelClip` ``[0, upper_c]``), and the per-tensor range is the union over
channels::

    lo = min_c clip(beta_c - n gamma_c, act_lo_c, act_hi_c)        hi = max_c clip(beta_c + n gamma_c, act_lo_c, act_hi_c)

Quantizers that do not sit right after such a layer get their range from per-channel Gaussian moments
propagated through the captured graph (every step an approximation, stated here):

* model input: the user's ``input_range`` (e.g. ``(-1, 1)`` for ``(x/255 - 0.5) / 0.5``), moments of a
  uniform distribution on it; zero padding adds 0 to the hard bounds;
* activation (ReLU / ReLU6 / ChannelClip / hardtanh): moments of the clipped normal
  (:func:`clipped_normal_moments`), hard bounds the clip points;
* Conv/Linear without BatchNorm statistics: ``mean = W E[x] + b``, ``var = W^2 Var[x]`` (inputs
  independent, zero padding ignored);
* add: means and variances add (inputs independent), hard bounds add; cat along channels: concatenated;
* average / max pooling, flatten, view, dropout, identity: moments unchanged (pooling does not reduce the
  variance here: an upper bound, as neighbouring positions are correlated).

Each quantizer's range is ``mean +- n std`` per channel intersected with the hard bounds, united over
channels (``estimator="std"``), or (``"mse"``) lowbit's MSE range estimator run on quantiles of the
modelled per-channel distributions, which clips a few wide channels to keep resolution for the rest.
Values after global pooling (one per image and channel, e.g. the logits) always use the std rule: their
extremes are the prediction, and the per-pixel spread the moments carry overstates theirs.

Anything else (mul, matmul, softmax, an unknown module) has no moments: a quantizer behind
it gets no range and :func:`bn_activation_ranges` raises, naming it.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..calibration import make_observer
from ..errors import ConfigError, EmptyCalibrationError
from ..granularity import PerTensor
from ..spec import compute_qparams
from ._graph import BN_TYPES, CONV_TYPES
from ._layer import weight_times_channel_vector
from .clip import ChannelClip
from .fold_bn import BNStats
from .log import PassLog

log = logging.getLogger(__name__)

__all__ = ["Moments", "clipped_normal_moments", "bn_activation_ranges"]


@dataclass(frozen=True)
class Moments:
    """Per-channel Gaussian approximation of an activation: ``mean``, ``std`` and hard bounds ``lo``,
    ``hi`` (float64, shape ``(C,)``, or ``(1,)`` for a per-tensor value that broadcasts)."""

    mean: torch.Tensor
    std: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    uniform: bool = False  # the model input: uniform on [lo, hi] rather than normal
    per_image: bool = False  # after global pooling: one value per image and channel (e.g. the logits)

    @staticmethod
    def normal(mean: torch.Tensor, std: torch.Tensor) -> Moments:
        mean, std = mean.double().reshape(-1), std.double().abs().reshape(-1)
        return Moments(mean, std, torch.full_like(mean, -math.inf), torch.full_like(mean, math.inf))

    def range(self, num_std: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor ``(lo, hi)``: ``mean +- num_std * std`` clipped into each channel's hard bounds, united
        over channels (a channel the clip always saturates, or a dead one, contributes its bound: ``lo <= hi``)."""
        lo = torch.clamp(self.mean - num_std * self.std, self.lo, self.hi)
        hi = torch.clamp(self.mean + num_std * self.std, self.lo, self.hi)
        return lo.min().float(), hi.max().float()

    def samples(self, k: int = 512) -> torch.Tensor:
        """``k`` evenly spaced quantiles per channel (``(i + 0.5) / k``), clipped to the hard bounds: shape
        ``(k, C)`` float32 on the CPU, a deterministic stand-in for data that a range estimator can read."""
        p = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        mean, std, lo, hi = (t.detach().double().cpu() for t in (self.mean, self.std, self.lo, self.hi))
        if self.uniform:
            x = lo[None, :] + (hi - lo)[None, :] * p[:, None]
        else:
            z = torch.special.ndtri(p)
            x = mean[None, :] + std[None, :] * z[:, None]
        return torch.maximum(torch.minimum(x, hi[None, :]), lo[None, :]).float()

    def bounded(self, lo: torch.Tensor | float, hi: torch.Tensor | float) -> Moments:
        """The same moments with the hard bounds narrowed to ``[lo, hi]`` (what a clip guarantees)."""
        lo_t = torch.as_tensor(lo, dtype=torch.float64, device=self.mean.device)
        hi_t = torch.as_tensor(hi, dtype=torch.float64, device=self.mean.device)
        return Moments(self.mean, self.std, torch.maximum(self.lo, lo_t), torch.minimum(self.hi, hi_t),
                       self.uniform, self.per_image)

    def clipped(self, lo: torch.Tensor | float, hi: torch.Tensor | float) -> Moments:
        """Moments of ``clip(X, lo, hi)``; the hard bounds are clipped too."""
        lo_t = torch.as_tensor(lo, dtype=torch.float64, device=self.mean.device)
        hi_t = torch.as_tensor(hi, dtype=torch.float64, device=self.mean.device)
        m, s = clipped_normal_moments(self.mean, self.std, lo_t, hi_t)
        b = self.bounded(lo_t, hi_t)
        return Moments(m, s, b.lo, b.hi, per_image=self.per_image)


def clipped_normal_moments(mean: torch.Tensor, std: torch.Tensor, lo: float | torch.Tensor = 0.0,
                           hi: float | torch.Tensor = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``clip(X, lo, hi)`` for ``X ~ N(mean, std^2)``, elementwise, float64.

    With ``a = (lo - mean) / std``, ``b = (hi - mean) / std``, ``P = Phi(b) - Phi(a)``::

        E[Y]   = lo Phi(a) + hi (1 - Phi(b)) + mean P + std (phi(a) - phi(b))
        E[Y^2] = lo^2 Phi(a) + hi^2 (1 - Phi(b)) + mean^2 P + 2 mean std (phi(a) - phi(b))
                 + std^2 (P + a phi(a) - b phi(b))

    (terms with an infinite bound vanish); ``std = 0`` gives ``(clip(mean), 0)``.

    >>> m, s = clipped_normal_moments(torch.tensor(0.0), torch.tensor(1.0))  # relu(N(0, 1))
    >>> round(float(m), 6), round(float(s**2), 6)  # 1/sqrt(2 pi), 1/2 - 1/(2 pi)
    (0.398942, 0.340845)
    """
    mean, std = torch.as_tensor(mean).double(), torch.as_tensor(std).double().abs()
    dev = mean.device
    lo_t = torch.as_tensor(lo, dtype=torch.float64, device=dev).expand_as(mean)
    hi_t = torch.as_tensor(hi, dtype=torch.float64, device=dev).expand_as(mean)
    sd = std.clamp_min(1e-300)
    normal = torch.distributions.Normal(torch.zeros((), dtype=torch.float64, device=dev),
                                        torch.ones((), dtype=torch.float64, device=dev))
    a, b = (lo_t - mean) / sd, (hi_t - mean) / sd
    cdf_a, cdf_b = normal.cdf(a), normal.cdf(b)
    pdf_a = torch.where(torch.isfinite(a), torch.exp(normal.log_prob(a.clamp(-1e150, 1e150))), torch.zeros_like(a))
    pdf_b = torch.where(torch.isfinite(b), torch.exp(normal.log_prob(b.clamp(-1e150, 1e150))), torch.zeros_like(b))
    apdf_a = torch.where(torch.isfinite(a), a * pdf_a, torch.zeros_like(a))
    bpdf_b = torch.where(torch.isfinite(b), b * pdf_b, torch.zeros_like(b))
    p = cdf_b - cdf_a
    zero = torch.zeros_like(mean)
    tail_lo = torch.where(torch.isfinite(lo_t), cdf_a, zero)
    tail_hi = torch.where(torch.isfinite(hi_t), 1 - cdf_b, zero)
    lo_f = torch.where(torch.isfinite(lo_t), lo_t, zero)
    hi_f = torch.where(torch.isfinite(hi_t), hi_t, zero)
    e1 = lo_f * tail_lo + hi_f * tail_hi + mean * p + std * (pdf_a - pdf_b)
    e2 = (lo_f**2 * tail_lo + hi_f**2 * tail_hi + mean**2 * p + 2 * mean * std * (pdf_a - pdf_b)
          + std**2 * (p + apdf_a - bpdf_b))
    var = (e2 - e1**2).clamp_min(0.0)
    degenerate = std <= 0
    e1 = torch.where(degenerate, torch.minimum(torch.maximum(mean, lo_t), hi_t), e1)
    return e1, torch.where(degenerate, zero, var.sqrt())


def _act_bounds(act: nn.Module | str) -> tuple[object, object] | None:
    """``(lo, hi)`` of a clipping activation module or functional name, None if it is not one."""
    if isinstance(act, ChannelClip):
        return 0.0, act.upper.double()
    if isinstance(act, nn.ReLU6) or act == "relu6":
        return 0.0, 6.0
    if isinstance(act, nn.Hardtanh):
        return float(act.min_val), float(act.max_val)
    if isinstance(act, nn.ReLU) or act == "relu":
        return 0.0, math.inf
    return None


def _through_layer(layer: nn.Module, x: Moments) -> Moments | None:
    """Moments of a Conv/Linear output from its input's, inputs independent (module doc)."""
    w = layer.weight.detach()
    cin = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if x.mean.numel() not in (1, cin):
        if x.mean.numel() == 0 or cin % x.mean.numel():
            return None
        rep = cin // x.mean.numel()  # flatten of (N, C, H, W): feature c * H * W + p belongs to channel c
        x = Moments(*(t.repeat_interleave(rep) for t in (x.mean, x.std, x.lo, x.hi)), per_image=x.per_image)
    mean, var = x.mean.expand(cin), (x.std**2).expand(cin)
    m = weight_times_channel_vector(layer, w, mean)
    if layer.bias is not None:
        m = m + layer.bias.detach().double()
    v = weight_times_channel_vector(layer, w * w, var)
    out = Moments.normal(m, v.clamp_min(0).sqrt())
    return Moments(out.mean, out.std, out.lo, out.hi, per_image=x.per_image)


def _add(a: Moments, b: Moments) -> Moments:
    return Moments(a.mean + b.mean, (a.std**2 + b.std**2).sqrt(), a.lo + b.lo, a.hi + b.hi,
                   per_image=a.per_image or b.per_image)


def _global_pool(x: Moments | None) -> Moments | None:
    """Moments after global average pooling: unchanged (an upper bound on the spread), marked per image."""
    return None if x is None else Moments(x.mean, x.std, x.lo, x.hi, x.uniform, per_image=True)


_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Flatten, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = (torch.flatten, torch.squeeze, torch.unsqueeze, F.dropout, F.adaptive_avg_pool2d, F.avg_pool2d,
                   F.max_pool2d, torch.mean)
_PASS_METHODS = ("view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "clone", "float")


class _Propagate:
    def __init__(self, gm: fx.GraphModule, stats: dict[str, BNStats], num_std: float,
                 input_range: tuple[float, float] | None, estimator: str) -> None:
        self.gm, self.stats, self.num_std, self.input_range = gm, stats, num_std, input_range
        self.estimator = estimator
        self.env: dict[fx.Node, Moments | None] = {}
        self.log = PassLog()
        self.missing: list[str] = []

    def set_range(self, q: nn.Module, x: Moments | None, why: str = "") -> None:
        from ..nn.quantizer import TensorQuantizer

        if not isinstance(q, TensorQuantizer) or not q.needs_calibration:
            return
        if x is None:
            self.missing.append(f"{q.name} (no moments reach it {why})")
            return
        if not isinstance(q.spec.granularity, PerTensor):
            self.missing.append(f"{q.name} (only per-tensor activation specs are supported)")
            return
        if self.estimator == "mse" and not x.per_image:  # MSE-optimal range of the modelled distribution
            obs = make_observer(q.spec.replace(calibrator="mse"), q.name)
            obs.update(x.samples())
            lo, hi = (t.double().reshape(()) for t in obs.compute_range())
        else:
            lo, hi = x.range(self.num_std)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            self.missing.append(f"{q.name} (unbounded: {why})")
            return
        dev = q.scale.device
        scale, zp = compute_qparams(q.spec, lo.to(dev), hi.to(dev))
        q.set_qparams(scale, zp)
        q.chosen_range = (lo.to(dev), hi.to(dev))
        q.quant_enabled.fill_(True)
        self.log.add("bn_ranges", (q.name,), True, f"[{float(lo):.4g}, {float(hi):.4g}] {why}")

    def arg(self, node: fx.Node, i: int = 0) -> Moments | None:
        a = node.args[i] if len(node.args) > i else None
        return self.env.get(a) if isinstance(a, fx.Node) else None

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.env[node] = self.step(node)

    def step(self, node: fx.Node) -> Moments | None:
        if node.op == "placeholder":
            if self.input_range is None:
                return None
            lo, hi = (float(v) for v in self.input_range)
            def one(v: float) -> torch.Tensor:
                return torch.tensor([v], dtype=torch.float64)
            return Moments(one((lo + hi) / 2), one((hi - lo) / math.sqrt(12)), one(lo), one(hi), uniform=True)
        if node.op == "call_module":
            return self.module(node, self.gm.get_submodule(str(node.target)))
        if node.op == "call_function":
            return self.function(node)
        if node.op == "call_method":
            if node.target == "mean":
                return _global_pool(self.arg(node))
            if node.target in _PASS_METHODS:
                return self.arg(node)
            if node.target in ("relu", "relu_"):
                x = self.arg(node)
                return None if x is None else x.clipped(0.0, math.inf)
        return None

    def function(self, node: fx.Node) -> Moments | None:
        t = node.target
        if t is torch.mean or (t is F.adaptive_avg_pool2d and node.args[1:2] in ((1,), ((1, 1),))):
            return _global_pool(self.arg(node))
        if t in _PASS_FUNCTIONS:
            return self.arg(node)
        if t in (F.relu, torch.relu, F.relu6, F.hardtanh):
            x = self.arg(node)
            if x is None:
                return None
            if t in (F.relu, torch.relu):
                return x.clipped(0.0, math.inf)
            if t is F.relu6:
                return x.clipped(0.0, 6.0)
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            return x.clipped(float(lo), float(hi))
        if t in (operator.add, torch.add) and len(node.args) == 2:
            a, b = self.arg(node, 0), self.arg(node, 1)
            return _add(a, b) if a is not None and b is not None else None
        return None

    def _post(self, mod: nn.Module, pre: Moments | None, what: str) -> Moments | None:
        """Fused activation, then the output quantizer (range from the pre-activation moments clipped)."""
        act = getattr(mod, "activation", None)
        out = pre
        if pre is not None and act is not None:
            bounds = _act_bounds(act)
            # the range: pre-activation mean +- n std, clipped by the activation (the DFQ paper's rule)
            out, pre = (None, None) if bounds is None else (pre.clipped(*bounds), pre.bounded(*bounds))
        if getattr(mod, "output_quantizer", None) is not None:
            self.set_range(mod.output_quantizer, pre, what)
        return out

    def module(self, node: fx.Node, mod: nn.Module) -> Moments | None:
        from ..nn.layers import QuantAdd, QuantCat, QuantJoin
        from ..nn.quantizer import TensorQuantizer

        x = self.arg(node)
        if isinstance(mod, TensorQuantizer):
            src = node.args[0] if node.args else None
            self.set_range(mod, x, f"(edge after {getattr(src, 'name', src)})")
            return x
        if isinstance(mod, (*CONV_TYPES, nn.Linear)):
            st = self.stats.get(str(node.target))
            if st is not None:
                pre, what = Moments.normal(st.mean.to(mod.weight.device), st.std.to(mod.weight.device)), "(BatchNorm)"
            else:
                pre, what = (None if x is None else _through_layer(mod, x)), "(propagated through the layer)"
            return self._post(mod, pre, what)
        if isinstance(mod, QuantJoin):
            ins = [self.env.get(a) if isinstance(a, fx.Node) else None for a in
                   (node.args[0] if isinstance(mod, QuantCat) else node.args[:2])]
            pre = None
            if isinstance(mod, QuantAdd) and len(ins) == 2 and all(i is not None for i in ins) and "alpha" not in node.kwargs:
                pre = _add(*ins)
            elif isinstance(mod, QuantCat) and mod.dim in (1, -3) and ins and all(i is not None for i in ins):
                pre = Moments(*(torch.cat([getattr(i, f).expand(max(1, i.mean.numel())) for i in ins])
                                for f in ("mean", "std", "lo", "hi")))
            return self._post(mod, pre, f"({type(mod).__name__}: moments combined)")
        bounds = _act_bounds(mod)
        if bounds is not None:
            return None if x is None else x.clipped(*bounds)
        if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ConstantPad1d)):
            if x is None:
                return None
            v = float(getattr(mod, "value", 0.0))
            return Moments(x.mean, x.std, torch.clamp(x.lo, max=v), torch.clamp(x.hi, min=v), x.uniform)
        if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) and mod.output_size in (1, (1, 1)):
            return _global_pool(x)
        if isinstance(mod, _PASS_MODULES):
            return x
        if isinstance(mod, BN_TYPES) and mod.running_mean is not None:  # unfolded BatchNorm: N(beta, gamma^2)
            beta = mod.bias.detach() if mod.affine else torch.zeros_like(mod.running_mean)
            gamma = mod.weight.detach() if mod.affine else torch.ones_like(mod.running_mean)
            return Moments.normal(beta, gamma)
        return None


def bn_activation_ranges(qmodel: nn.Module, stats: dict[str, BNStats], *, num_std: float = 6.0,
                         input_range: tuple[float, float] | None = None,
                         estimator: Literal["std", "mse"] = "std") -> PassLog:
    """Set every static activation quantizer of a captured model (a torch.fx GraphModule from
    :func:`lowbit.quantize`) from BatchNorm statistics, without data (module doc).

    Args:
        qmodel: the captured model; its activation quantizers get qparams in place.
        stats: ``{layer name: BNStats}`` of the float model the capture started from (after the passes).
        num_std: ``n`` in ``mean +- n std``.
        input_range: ``(lo, hi)`` of the model input (needed when the input itself is quantized or a
            range depends on it).
        estimator: ``"std"``: ``mean +- num_std * std`` united over channels (the DFQ paper's rule);
            ``"mse"``: lowbit's MSE range estimator run on :meth:`Moments.samples` (512 quantiles of each
            channel's modelled distribution, clipped by the activation), which trades the clipping of a
            few wide channels against the resolution of all the others.

    Returns:
        A :class:`~lowbit.passes.log.PassLog` with one record per quantizer (its range and source).

    Raises:
        EmptyCalibrationError: some activation quantizer has no data-free range (named, with the reason).
    """
    if not isinstance(qmodel, fx.GraphModule):
        raise EmptyCalibrationError(
            "BatchNorm-derived activation ranges need the torch.fx graph of the model, but it did not trace "
            "(module-swap capture); pass calib_data= to calibrate the activation ranges on data."
        )
    if estimator not in ("std", "mse"):
        raise ConfigError(f"estimator must be 'std' or 'mse', got {estimator!r}.")
    prop = _Propagate(qmodel, stats, num_std, input_range, estimator)
    with torch.no_grad():
        prop.run()
    from ..nn.quantizer import quantizers

    for _, q in quantizers(qmodel):
        if q.needs_calibration and not q.is_calibrated and not any(m.startswith(q.name + " ") for m in prop.missing):
            prop.missing.append(f"{q.name} (not on a path the propagation knows)")
    if prop.missing:
        hint = "" if input_range is not None else " Pass DFQ(input_range=(lo, hi)) for the model input's range."
        raise EmptyCalibrationError(
            f"no data-free activation range for {len(prop.missing)} quantizer(s): " + "; ".join(prop.missing[:8])
            + (" ..." if len(prop.missing) > 8 else "") + "." + hint
            + " Or pass calib_data= to calibrate activation ranges on data."
        )
    log.info("bn_ranges: %d activation range(s) set from BatchNorm statistics", len(prop.log))
    return prop.log
