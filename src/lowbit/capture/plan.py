"""Which spec each layer gets: the recipe, then ``exclude`` and ``overrides``, then the first/last guard.

Keys of ``exclude`` and ``overrides`` are checked against the model before anything changes: a string
is an exact module name (a container name covers everything under it) or a regular expression (full
match); a key that is the name of a layer or op is only that name (``"layer1.0"`` does not also match
``"layer1x0"`` as the regex would); a key that matches nothing raises :class:`~lowbit.errors.ConfigError` listing the closest names
(``difflib``), so a typo never silently quantizes the layer it meant to protect.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..recipes import W8A8, LayerSpec, Recipe
from ..spec import QuantSpec

__all__ = ["Planner", "Resolved"]


@dataclass(frozen=True)
class Resolved:
    """The spec for one layer/join, where it came from (``source``) and whether the user named this
    layer explicitly (an explicit request the layer cannot take is an error, not a skip)."""

    spec: LayerSpec
    source: str
    explicit: bool = False


def _compile(key: str, names: set[str]) -> re.Pattern | None:
    """``key`` as a regular expression, or None where it is a name of the model or no valid regex."""
    if key in names:
        return None
    try:
        return re.compile(key)
    except re.error:
        return None


def _name_matches(key: str, pattern: re.Pattern | None, name: str) -> bool:
    if name == key or name.startswith(key + "."):
        return True
    return pattern is not None and pattern.fullmatch(name) is not None


class Planner:
    """Resolve :class:`Resolved` specs for named layers and joins.

    Args:
        recipe: the recipe (its ``exclude`` / ``overrides`` already merged with the call's).
        names: every name a key may refer to (module names and graph join names).
        weighted_order: weighted layer names in execution order (for ``keep_first_last_8bit``).
    """

    def __init__(self, recipe: Recipe, names: list[str], weighted_order: list[str] | None = None) -> None:
        self.recipe = recipe
        self.names = [n for n in names if n]
        known = set(self.names)
        self._exclude = [(k, _compile(k, known)) for k in recipe.exclude]
        self._overrides = [(k, _compile(k, known) if isinstance(k, str) else None, v) for k, v in recipe.overrides.items()]
        self._check_keys()
        order = weighted_order or []
        self.first_last = {order[0], order[-1]} if (order and recipe.keep_first_last_8bit) else set()

    def _check_keys(self) -> None:
        keys = self._exclude + [(k, p) for k, p, _ in self._overrides if isinstance(k, str)]
        for key, pattern in keys:
            if any(_name_matches(key, pattern, n) for n in self.names):
                continue
            close = difflib.get_close_matches(key, self.names, n=5, cutoff=0.5)
            hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else (
                f" Known names include: {', '.join(repr(n) for n in self.names[:8])}"
                f"{' ...' if len(self.names) > 8 else ''}."
            )
            raise ConfigError(
                f"exclude/overrides key {key!r} matches no layer or op of this model (as a name, a container "
                f"prefix or a full-match regex).{hint}"
            )

    def resolve(self, name: str, module: nn.Module | None = None, join: str | None = None) -> Resolved:
        """The spec for weighted layer ``module`` or functional ``join`` called ``name``."""
        r = self.recipe
        for key, pattern in self._exclude:
            if _name_matches(key, pattern, name):
                return Resolved(LayerSpec(), f"excluded by exclude={key!r}", True)
        value, source = None, None
        named = [(k, v) for k, _, v in self._overrides if isinstance(k, str) and _name_matches(k, None, name)]
        regex = [(k, v) for k, p, v in self._overrides if isinstance(k, str) and _name_matches(k, p, name)]
        # the layer's own name, else its innermost named container, else the first regex that matches
        hit = max(named, key=lambda kv: len(kv[0])) if named else (regex[0] if regex else None)
        if hit is not None:
            value, source = hit[1], f"override {hit[0]!r}"
        if source is None and module is not None:
            for key, _, v in self._overrides:
                if isinstance(key, type) and isinstance(module, key):
                    value, source = v, f"override {key.__name__}"
                    break
        if source is not None:
            return Resolved(self._from_value(value, module, join), source, True)
        spec = r.layer_spec(module, join)
        if name in self.first_last and spec.weight is not None and module is not None:
            w8 = W8A8(per_channel=True).weight_spec(module)
            if spec.weight.format != w8.format or spec.weight.granularity != w8.granularity:
                return Resolved(LayerSpec(w8, spec.activation), "keep_first_last_8bit", False)
        return Resolved(spec, type(r).__name__, False)

    def _from_value(self, value, module: nn.Module | None, join: str | None) -> LayerSpec:
        if value is None:
            return LayerSpec()
        if isinstance(value, LayerSpec):
            return value
        if isinstance(value, Recipe):
            return value.layer_spec(module, join)
        if isinstance(value, QuantSpec):
            if join is not None:
                return LayerSpec(None, value)
            return LayerSpec(value, self.recipe.layer_spec(module, None).activation)
        raise ConfigError(f"unsupported override value {value!r}")
