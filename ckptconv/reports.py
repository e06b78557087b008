"""One base for every verb's report, and the one-line error rendering.

A report is what an API verb returns and what the CLI prints: ``str(report)``
for people, ``report.to_dict()`` (``--json``) for scripts, and
``report.exit_code`` for the shell (the contract's codes: 0 ok, 1 bad input or
integrity failure, 3 unsafe content). Subclasses are usually dataclasses:
``to_dict`` then returns their fields, plus properties listed in
``dict_properties`` (e.g. ``exit_code`` when it is computed).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from .errors import EXIT_OK, error_line

__all__ = ["Report", "error_line", "name_list"]   # error_line: the one-line rendering of an error


class Report:
    """Base of the report classes: to_dict, to_json, __str__, exit_code."""

    exit_code: int = EXIT_OK
    dict_properties: tuple[str, ...] = ()   # computed attributes to_dict adds

    def to_dict(self) -> dict[str, Any]:
        if dataclasses.is_dataclass(self):
            data = dataclasses.asdict(self)
        else:
            data = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        for name in self.dict_properties:
            data[name] = getattr(self, name)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        return "\n".join(f"{k}: {v}" for k, v in self.to_dict().items())


def name_list(names: Sequence[str], limit: int = 8) -> str:
    """``a, b, c ... (+12)``: the first ``limit`` names of a long list, for report lines."""
    more = f" ... (+{len(names) - limit})" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
