"""``formats``: every format ckptconv can use here, from the registry's table
(no built-in adapter is imported) and the installed plugins."""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import available_formats, format_info, option_flag
from ..reports import Report


@dataclass
class FormatsReport(Report):
    formats: list[dict]

    def to_dict(self):
        return {"formats": self.formats}

    def __str__(self):
        lines = []
        for f in self.formats:
            status = "ok" if f["available"] else f"needs: {f['missing']}"
            lines.append(f"{f['name']:<12} {', '.join(f['extensions']) or '-':<38} {status}")
            extras = [f"{what}: {', '.join(show(x) for x in f[key])}" for what, key, show in (
                ("reads with", "read_options", option_flag),
                ("writes with", "write_options", option_flag),
                ("verbs", "hooks", str)) if f.get(key)]
            if extras:
                lines.append(" " * 13 + "; ".join(extras))
        return "\n".join(lines)


def formats_report() -> FormatsReport:
    """Every format of the table and every plugin: extensions, whether its
    optional modules are installed, the options it takes and its hooks. Reads
    the table only: no built-in adapter is imported."""
    import importlib.util

    out = []
    for name in available_formats():
        try:
            info = format_info(name)
        except Exception as e:  # a broken plugin is listed, not fatal
            out.append({"name": name, "extensions": [], "available": False, "missing": str(e),
                        "builtin": False})
            continue
        missing = [f"{mod} (pip install 'ckptconv[{info.extra}]')" if info.extra else mod
                   for mod in info.requires if importlib.util.find_spec(mod) is None]
        out.append({"name": name, "extensions": list(info.extensions), "available": not missing,
                    "missing": ", ".join(missing), "builtin": info.builtin,
                    "description": info.description, "reads": info.reads, "writes": info.writes,
                    "read_options": sorted(info.read_options),
                    "write_options": sorted(info.write_options), "hooks": sorted(info.hooks)})
    return FormatsReport(out)
