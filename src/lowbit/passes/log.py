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

    def summary(self) -> str:
        """One line: per pass, the applied records and the distinct layers they touched, then the skipped count.

        E.g. ``cle x1 (2 layers), adaround x19 (50 layers); 3 skipped``: a record is one decision (a CLE
        pair, a BRECQ block), so the two counts differ."""
        recs: dict[str, int] = {}
        layers: dict[str, set[str]] = {}
        for r in self.applied:
            recs[r.pass_name] = recs.get(r.pass_name, 0) + 1
            layers.setdefault(r.pass_name, set()).update(r.layers)
        done = ", ".join(f"{k} x{n} ({len(layers[k])} layer{'s' if len(layers[k]) != 1 else ''})"
                         for k, n in recs.items())
        return f"{done or 'none applied'}; {len(self.skipped)} skipped"

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self)
