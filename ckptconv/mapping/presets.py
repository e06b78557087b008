"""Mapping presets: DSL files shipped in ``ckptconv/mapping/preset_rules/``
(``bert-tf-to-hf``, ``strip-module-prefix``...), listed by ``ckptconv presets``."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..reports import Report
from .parse import parse_stages

# --- presets ----------------------------------------------------------------------------------

def _preset_dir():
    from importlib.resources import files

    return files("ckptconv.mapping") / "preset_rules"


def preset_names() -> list[str]:
    return sorted(p.name[:-6] for p in _preset_dir().iterdir() if p.name.endswith(".rules"))


def preset_text(name: str) -> str:
    p = _preset_dir() / f"{name}.rules"
    if not name or "/" in name or not p.is_file():
        raise UsageError(f"unknown preset '{name}'; presets: {', '.join(preset_names())}")
    return p.read_text()


def _description(text: str) -> str:
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            return s.lstrip("#").strip()
        if s:
            break
    return ""


@dataclass
class PresetsReport(Report):
    presets: list[dict]
    text: str | None = None

    def to_dict(self) -> dict:
        if self.text is not None:
            return {"name": self.presets[0]["name"], "description": self.presets[0]["description"],
                    "rules": self.text}
        return {"presets": self.presets}

    def __str__(self) -> str:
        if self.text is not None:
            return self.text.rstrip("\n")
        width = max((len(p["name"]) for p in self.presets), default=0)
        return "\n".join(f"{p['name']:<{width}}  {p['description']}" for p in self.presets)


def presets_report(name: str | None = None) -> PresetsReport:
    """Every preset with its one-line description, or one preset's rules."""
    if name:
        text = preset_text(name)
        parse_stages(text, f"{name}.rules")  # a shipped preset must parse
        return PresetsReport([{"name": name, "description": _description(text)}], text)
    return PresetsReport([{"name": n, "description": _description(preset_text(n))}
                          for n in preset_names()])
