"""The decision log: for every layer and op the capture looked at, quantized or skipped, and why.

Nothing is skipped silently (the torch.ao complaint): :func:`lowbit.quantize` logs every skip at
WARNING level, keeps the log on the returned model (``lowbit.decision_log(qmodel)``) and with
``strict=True`` raises :class:`~lowbit.errors.UnsupportedLayerError` on the first skip.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("lowbit.capture")

__all__ = ["Decision", "DecisionLog"]


@dataclass(frozen=True)
class Decision:
    """One layer or op: ``name`` (module path or graph node), ``kind`` (type or op), whether it is
    ``quantized``, a ``reason`` (always set for skips), the weight/activation specs as text, and
    ``by_user`` (excluded by the user, or a layer type the chosen recipe does not cover: ``strict``
    does not count it)."""

    name: str
    kind: str
    quantized: bool
    reason: str = ""
    weight: str | None = None
    activation: str | None = None
    by_user: bool = False

    def __str__(self) -> str:
        if self.quantized:
            parts = [p for p in (f"W {self.weight}" if self.weight else "", f"A {self.activation}" if self.activation else "") if p]
            return f"{self.name} [{self.kind}]: quantized ({'; '.join(parts) or 'edges only'}){' - ' + self.reason if self.reason else ''}"
        return f"{self.name} [{self.kind}]: SKIPPED - {self.reason}"


@dataclass
class DecisionLog:
    """What :func:`lowbit.quantize` did: the capture ``path`` ("graph" or "module_swap"), why
    (``path_reason``, e.g. the tracing error), and one :class:`Decision` per layer/op."""

    path: str = "graph"
    path_reason: str = ""
    decisions: list[Decision] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, decision: Decision) -> None:
        self.decisions.append(decision)
        if decision.quantized:
            log.debug("%s", decision)
        else:
            log.warning("lowbit: %s", decision)

    def note(self, text: str) -> None:
        """A model-level remark (e.g. a fusion or fold that was applied)."""
        self.notes.append(text)
        log.info("lowbit: %s", text)

    @property
    def quantized(self) -> list[Decision]:
        return [d for d in self.decisions if d.quantized]

    @property
    def skipped(self) -> list[Decision]:
        return [d for d in self.decisions if not d.quantized]

    @property
    def unexpected_skips(self) -> list[Decision]:
        """Skips the user did not ask for (``exclude`` / ``None`` overrides are asked for)."""
        return [d for d in self.decisions if not d.quantized and not d.by_user]

    def get(self, name: str) -> Decision:
        for d in self.decisions:
            if d.name == name:
                return d
        raise KeyError(name)

    def table(self) -> str:
        """A plain-text table: name, kind, status, weight spec, activation spec, reason."""
        rows = [("name", "kind", "status", "weight", "activation", "reason")]
        for d in self.decisions:
            rows.append((d.name, d.kind, "quantized" if d.quantized else "SKIPPED", d.weight or "-", d.activation or "-", d.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        head = f"capture path: {self.path}" + (f" ({self.path_reason})" if self.path_reason else "")
        return (f"{head}; {len(self.quantized)} quantized, {len(self.skipped)} skipped\n" + self.table())
