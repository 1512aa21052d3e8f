"""User-facing quantization presets: frozen dataclasses that say which spec every layer gets.

A recipe answers two questions for :func:`lowbit.quantize`:

* :meth:`Recipe.layer_spec` -- for one layer (Linear, Conv, Embedding ...) or one functional join
  (matmul, add, mul, cat), the :class:`LayerSpec` ``(weight, activation)``;
* :meth:`Recipe.edge_spec` -- the spec of the static activation quantizers the graph capture puts on
  tensors (model inputs, outputs of quantized ops), or None for weight-only / dynamic recipes.

An activation spec with ``dynamic=True`` becomes the layer's own ``input_quantizer`` (range measured on
every batch at run time); a static one becomes the quantizer on the layer's output edge.

Presets (named by what they are)::

    W8A8()            int8 per-channel symmetric weights, uint8 per-tensor affine activations (static)
    W8A8Dynamic()     int8 per-channel weights, activations quantized per batch at run time (Linear)
    W8A16()           int8 per-channel weights, int16 symmetric activations (static)
    W4A8()            uint4 per-channel weights with a zero point (first/last layer int8), uint8 activations
    WeightOnly(bits, group_size) / W4A16(group_size=128)   weight-only integers, float activations
    FP8()             fp8 e4m3 weights (per channel) and activations (per tensor)
    FP16() / BF16()   plain casts of weights and activations
    BinaryWeights() / TernaryWeights() / PowerOfTwoWeights()   weight-only special formats
    Custom(weight=..., activation=...)                          every spec chosen by hand

Every recipe takes ``exclude=`` (names or regular expressions, full match), ``overrides=``
``{name | regex | layer type: QuantSpec | LayerSpec | Recipe | None}`` (a ``QuantSpec`` replaces the
weight spec, ``None`` keeps the layer float) and ``keep_first_last_8bit=`` (the first and last weighted
layers get :class:`W8A8` weights, the usual guard for low-bit recipes).

>>> W8A8(calibrator="kl").layer_spec(nn.Linear(4, 2)).weight.format.name
'int8'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from .errors import ConfigError
from .granularity import PerChannel, PerGroup, PerTensor, PerToken
from .spec import QuantSpec

__all__ = [
    "LayerSpec",
    "Recipe",
    "W8A8",
    "W4A8",
    "W8A8Dynamic",
    "W8A16",
    "WeightOnly",
    "W4A16",
    "FP8",
    "FP16",
    "BF16",
    "BinaryWeights",
    "TernaryWeights",
    "PowerOfTwoWeights",
    "Custom",
    "WEIGHTED_TYPES",
    "JOIN_KINDS",
]

WEIGHTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)
"""Layer types with a quantized counterpart in :mod:`lowbit.nn.layers`."""

JOIN_KINDS: tuple[str, ...] = ("matmul", "add", "mul", "cat")
"""Functional ops the graph capture can quantize."""


@dataclass(frozen=True)
class LayerSpec:
    """How one layer or join is quantized: ``weight`` spec (None: float weight) and ``activation`` spec
    (None: no activation quantizer; static: the output edge; ``dynamic=True``: the layer's input)."""

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.activation is None


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Base class of the presets. Subclasses implement :meth:`weight_spec` and :meth:`activation_spec`.

    Args:
        exclude: layer names or regular expressions (full match) to keep float.
        overrides: ``{name | regex | layer type: QuantSpec | LayerSpec | Recipe | None}``; checked in
            the order exact name (the layer's own, then its innermost container's), regex (the first
            that matches, in the dict's order), type. A key that is the name of a layer is that name only,
            not also a regex. A ``QuantSpec`` replaces the weight spec (or, for a
            join, the activation spec); ``None`` keeps the layer float.
        keep_first_last_8bit: give the first and last weighted layer (execution order) :class:`W8A8`
            weights (int8 per channel) when the recipe would give them something else.
    """

    exclude: tuple[str, ...] = ()
    overrides: Mapping = field(default_factory=dict)
    keep_first_last_8bit: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        if not isinstance(self.exclude, list | tuple) or not all(isinstance(e, str) for e in self.exclude):
            raise ConfigError(f"exclude must be layer names or regular expressions (strings), got {self.exclude!r}.")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(f"overrides must be a dict {{name | regex | type: spec}}, got {type(self.overrides).__name__}.")
        for k, v in self.overrides.items():
            if not isinstance(k, str | type):
                raise ConfigError(f"override key {k!r} must be a layer name, a regex or a layer type.")
            if v is not None and not isinstance(v, QuantSpec | LayerSpec | Recipe):
                raise ConfigError(
                    f"override for {k!r} must be a QuantSpec, LayerSpec, Recipe or None, got {type(v).__name__}."
                )

    # ---- what subclasses define
    def weight_spec(self, module: nn.Module) -> QuantSpec | None:
        """Spec of ``module``'s weight, or None to keep it float."""
        return None

    def activation_spec(self) -> QuantSpec | None:
        """Spec of the activations (static edges, or dynamic layer inputs), or None for weight-only."""
        return None

    def covers(self, module: nn.Module) -> bool:
        """Whether this recipe quantizes layers of this kind at all."""
        return isinstance(module, WEIGHTED_TYPES)

    quantize_joins: bool = field(default=True, init=False, repr=False)

    # ---- derived
    def edge_spec(self) -> QuantSpec | None:
        """Spec of the static activation quantizers on graph edges (None when dynamic or weight-only)."""
        a = self.activation_spec()
        return None if a is None or a.dynamic else a

    def layer_spec(self, module: nn.Module | None = None, join: str | None = None) -> LayerSpec:
        """The :class:`LayerSpec` for a weighted ``module`` or a functional ``join`` (one of
        :data:`JOIN_KINDS`). Embeddings are weight-only (their input is integer indices)."""
        act = self.activation_spec()
        if join is not None:
            if not self.quantize_joins or act is None or act.dynamic:
                return LayerSpec()
            return LayerSpec(None, act)
        if module is None or not self.covers(module):
            return LayerSpec()
        w = self.weight_spec(module)
        if isinstance(module, nn.Embedding):
            return LayerSpec(w, None)
        if act is not None and act.dynamic and not isinstance(module, nn.Linear):
            act = None  # dynamic activation quantization is for Linear layers (matmul-heavy models)
        return LayerSpec(w, act)


def _act_granularity(g: str) -> PerTensor | PerToken:
    if g in ("tensor", "per-tensor"):
        return PerTensor()
    if g in ("token", "per-token"):
        return PerToken()
    raise ConfigError(f"activation granularity must be 'tensor' or 'token', got {g!r}.")


def _weight_gran(per_channel: bool):
    return PerChannel(0) if per_channel else PerTensor()


@dataclass(frozen=True)
class W8A8(Recipe):
    """Static int8: weights int8 symmetric (per output channel unless ``per_channel=False``),
    activations ``act_dtype`` per tensor, affine unless ``symmetric_act``, range from ``calibrator``
    ("minmax", "moving_average", "kl", "percentile", "mse") over the calibration data.

    >>> r = W8A8(calibrator="percentile", act_dtype="int8")
    >>> str(r.activation_spec())
    'int8 affine per-tensor percentile'
    """

    calibrator: str = "minmax"
    per_channel: bool = True
    act_dtype: Literal["uint8", "int8"] = "uint8"
    symmetric_act: bool = False
    weight_calibrator: str = "minmax"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_dtype not in ("uint8", "int8"):
            raise ConfigError(f"W8A8 act_dtype must be 'uint8' or 'int8', got {self.act_dtype!r}; use W8A16 for int16.")
        if self.symmetric_act and self.act_dtype == "uint8":
            raise ConfigError("symmetric activations need a signed type: use act_dtype='int8' with symmetric_act=True.")

    def weight_spec(self, module: nn.Module) -> QuantSpec:
        return QuantSpec("int8", symmetric=True, granularity=_weight_gran(self.per_channel), calibrator=self.weight_calibrator)

    def activation_spec(self) -> QuantSpec:
        return QuantSpec(self.act_dtype, symmetric=self.symmetric_act, calibrator=self.calibrator)


@dataclass(frozen=True)
class W4A8(Recipe):
    """Static W4A8: 4-bit weights per output channel, ``symmetric=False`` (default) as uint4 codes with a
    zero point per channel (16 levels over [min, max] of the channel, BRECQ's weight grid), ``True`` as int4
    over [-max|w|, max|w|]; uint8 per-tensor affine activations (static, ``calibrator``); the first and last
    weighted layers keep int8 per-channel weights (``keep_first_last_8bit=True``). Round-to-nearest at 4 bits
    collapses most CNNs (EfficientNet-Lite0: 14 % top-1): pair it with ``adaround=AdaRoundConfig(...)``.

    >>> str(W4A8().layer_spec(nn.Conv2d(8, 8, 3)).weight)
    'uint4 affine per-channel(axis=0) minmax'
    """

    calibrator: str = "minmax"
    symmetric: bool = False
    weight_calibrator: str = "minmax"
    keep_first_last_8bit: bool = True

    def weight_spec(self, module: nn.Module) -> QuantSpec:
        return QuantSpec("int4" if self.symmetric else "uint4", symmetric=self.symmetric,
                         granularity=PerChannel(0), calibrator=self.weight_calibrator)

    def activation_spec(self) -> QuantSpec:
        return QuantSpec("uint8", symmetric=False, calibrator=self.calibrator)


@dataclass(frozen=True)
class W8A8Dynamic(Recipe):
    """Dynamic int8 for Linear layers: int8 per-channel symmetric weights; each Linear's input is
    quantized with a range measured on every batch at run time (``granularity="tensor"``: one uint8
    affine range per batch, ONNX ``DynamicQuantizeLinear``; ``"token"``: one per row). No calibration
    data needed. Other layer types are left float (logged)."""

    act_dtype: Literal["uint8", "int8"] = "uint8"
    granularity: Literal["tensor", "token"] = "tensor"
    per_channel: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.act_dtype not in ("uint8", "int8"):
            raise ConfigError(f"W8A8Dynamic act_dtype must be 'uint8' or 'int8', got {self.act_dtype!r}.")
        _act_granularity(self.granularity)

    def covers(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def weight_spec(self, module: nn.Module) -> QuantSpec:
        return QuantSpec("int8", symmetric=True, granularity=_weight_gran(self.per_channel))

    def activation_spec(self) -> QuantSpec:
        return QuantSpec(self.act_dtype, symmetric=False, granularity=_act_granularity(self.granularity), dynamic=True)


@dataclass(frozen=True)
class W8A16(Recipe):
    """int8 per-channel symmetric weights, int16 symmetric per-tensor activations (static, calibrated)."""

    calibrator: str = "minmax"
    per_channel: bool = True

    def weight_spec(self, module: nn.Module) -> QuantSpec:
        return QuantSpec("int8", symmetric=True, granularity=_weight_gran(self.per_channel))

    def activation_spec(self) -> QuantSpec:
        return QuantSpec("int16", symmetric=True, calibrator=self.calibrator)


@dataclass(frozen=True)
class WeightOnly(Recipe):
    """Weight-only integers, activations stay float: ``bits`` in {8, 4, 2}, one scale per
    ``group_size`` consecutive input channels (None: per output channel). ``symmetric=False`` (default)
    stores ``uint<bits>`` codes with a zero point per group (the int4 weight-only layout of torchao,
    GPTQ and AWQ); ``symmetric=True`` stores ``int<bits>`` codes."""

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = False
    calibrator: str = "minmax"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (2, 3, 4, 5, 6, 7, 8) or isinstance(self.bits, bool):
            raise ConfigError(f"WeightOnly bits must be an integer between 2 and 8, got {self.bits!r}.")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ConfigError(f"group_size must be a positive integer or None, got {self.group_size!r}.")

    def weight_spec(self, module: nn.Module) -> QuantSpec:
        fmt = f"int{self.bits}" if self.symmetric else f"uint{self.bits}"
        g = PerChannel(0) if self.group_size is None else PerGroup(self.group_size, -1)
        return QuantSpec(fmt, symmetric=self.symmetric, granularity=g, calibrator=self.calibrator)


@dataclass(frozen=True)
class W4A16(WeightOnly):
    """Weight-only int4 per group of 128 input channels (affine, uint4 codes + zero point)."""

    bits: int = 4
    group_size: int | None = 128


@dataclass(frozen=True)
class FP8(Recipe):
    """fp8 W8A8: ``format`` ("fp8_e4m3" or "fp8_e5m2") weights scaled per output channel and
    activations scaled per tensor (static, ``calibrator``), symmetric (fp8 has no zero point)."""

    format: str = "fp8_e4m3"
    per_channel: bool = True
    calibrator: str = "minmax"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in ("fp8_e4m3", "fp8_e5m2"):
            raise ConfigError(f"FP8 format must be 'fp8_e4m3' or 'fp8_e5m2', got {self.format!r}; use Custom(...) "
                              "for other formats.")

    def weight_spec(self, module: nn.Module) -> QuantSpec:
        return QuantSpec(self.format, symmetric=True, granularity=_weight_gran(self.per_channel))

    def activation_spec(self) -> QuantSpec:
        return QuantSpec(self.format, symmetric=True, calibrator=self.calibrator)


@dataclass(frozen=True)
class FP16(Recipe):
    """Plain fp16 casts (no scale) of weights and, with ``activations=True``, of activations."""

    activations: bool = True
    _format = "fp16"

    def weight_spec(self, module: nn.Module) -> QuantSpec:
        return QuantSpec(self._format, symmetric=True, scaled=False)

    def activation_spec(self) -> QuantSpec | None:
        return QuantSpec(self._format, symmetric=True, scaled=False) if self.activations else None


@dataclass(frozen=True)
class BF16(FP16):
    """Plain bfloat16 casts of weights and activations."""

    _format = "bf16"


@dataclass(frozen=True)
class _SpecialWeights(Recipe):
    # MSE-optimal scale: for binary weights it is mean|w| per channel (XNOR-Net's closed form), where
    # minmax (max|w|) would lose ~99% of the signal energy.
    per_channel: bool = True
    calibrator: str = "mse"
    activation: QuantSpec | None = None
    _format = "binary"

    def weight_spec(self, module: nn.Module) -> QuantSpec:
        return QuantSpec(self._format, symmetric=True, granularity=_weight_gran(self.per_channel), calibrator=self.calibrator)

    def activation_spec(self) -> QuantSpec | None:
        return self.activation


@dataclass(frozen=True)
class BinaryWeights(_SpecialWeights):
    """Binary weights ``{-a, +a}`` (one ``a`` per output channel); activations float unless
    ``activation=`` gives a spec."""

    _format = "binary"


@dataclass(frozen=True)
class TernaryWeights(_SpecialWeights):
    """Ternary weights ``{-a, 0, +a}`` per output channel; activations float unless ``activation=``."""

    _format = "ternary"


@dataclass(frozen=True)
class PowerOfTwoWeights(_SpecialWeights):
    """Power-of-two (log2) weights with ``bits`` bits per output channel; activations float unless
    ``activation=``."""

    bits: int = 4

    def weight_spec(self, module: nn.Module) -> QuantSpec:
        return QuantSpec(f"log2_{self.bits}", symmetric=True, granularity=_weight_gran(self.per_channel), calibrator=self.calibrator)


@dataclass(frozen=True)
class Custom(Recipe):
    """Every spec chosen: ``weight`` for every weighted layer of ``layer_types`` (None: float weights),
    ``activation`` for activations (static edges, or ``dynamic=True`` for per-batch input ranges;
    None: weight-only), ``quantize_joins`` for matmul/add/mul/cat."""

    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    layer_types: tuple[type[nn.Module], ...] = WEIGHTED_TYPES
    joins: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "quantize_joins", self.joins)
        for t in self.layer_types:
            if t not in WEIGHTED_TYPES:
                raise ConfigError(
                    f"Custom.layer_types: {getattr(t, '__name__', t)} has no quantized layer; choose among "
                    f"{[c.__name__ for c in WEIGHTED_TYPES]}."
                )

    def covers(self, module: nn.Module) -> bool:
        return isinstance(module, self.layer_types)

    def weight_spec(self, module: nn.Module) -> QuantSpec | None:
        return self.weight

    def activation_spec(self) -> QuantSpec | None:
        return self.activation


def with_options(recipe: Recipe, *, exclude=(), overrides=None) -> Recipe:
    """``recipe`` with extra ``exclude`` entries and ``overrides`` merged in (the call's win)."""
    if not isinstance(recipe, Recipe):
        raise ConfigError(
            f"recipe must be a lowbit.recipes.Recipe (W8A8(), W4A16() ...), got {type(recipe).__name__}."
        )
    if isinstance(exclude, str):
        exclude = (exclude,)
    ov = dict(recipe.overrides)
    ov.update(overrides or {})
    return dataclasses.replace(recipe, exclude=tuple(recipe.exclude) + tuple(exclude), overrides=ov)
