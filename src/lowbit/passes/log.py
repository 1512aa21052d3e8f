"""What a pass did and did not do, layer by layer (no silent skipping)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassRecord:
    """One decision of a pass: ``layers`` it concerns, whether it was ``applied``, and why / what."""

    pass_name: str
    layers: tuple[str, ...]
    applied: bool
    detail: str

    def __str__(self) -> str:
        verb = "applied" if self.applied else "skipped"
        return f"[{self.pass_name}] {verb} {' -> '.join(self.layers)}: {self.detail}"


class PassLog(list):
    """A list of :class:`PassRecord` with the applied and skipped ones at hand."""

    def add(self, pass_name: str, layers, applied: bool, detail: str) -> None:
        self.append(PassRecord(pass_name, tuple(layers), applied, detail))

    @property
    def applied(self) -> list[PassRecord]:
        return [r for r in self if r.applied]

    @property
    def skipped(self) -> list[PassRecord]:
        return [r for r in self if not r.applied]

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self)
