"""``convert``'s report (the verb itself is ``ckptconv.api.convert``).

Kept out of ``ckptconv.api`` so that importing the API (``load_state_dict``'s
first call) creates no dataclass it does not use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..reports import Report


@dataclass
class ConvertReport(Report):
    """What ``convert`` did: source, target, formats, bytes, seconds, notes."""

    source: str
    source_format: str
    target: str
    target_format: str
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mapping: dict | None = None
    remote: dict | None = None      # object-storage requests and bytes, when a URL was involved

    def __str__(self) -> str:
        from ..tensor import human_bytes

        lines = [f"{self.source} ({self.source_format}) -> {self.target} ({self.target_format}): "
                 f"{self.tensors} tensors, {human_bytes(self.bytes)} in {self.seconds:.2f} s"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
