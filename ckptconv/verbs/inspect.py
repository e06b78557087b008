"""``inspect``: what a checkpoint holds (format, tensors, dtypes, shapes, bytes,
tree values, metadata), from its headers only."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..reports import Report
from ..tensor import TensorRef, human_bytes
from ..tree import Checkpoint, ObjectRecord, iter_leaves, join_path

MAX_LISTED = 50


def _describe_leaf(v: Any) -> str:
    if isinstance(v, ObjectRecord):
        return repr(v) if len(repr(v)) < 120 else f"<{v.cls} record>"
    r = repr(v)
    return r if len(r) <= 120 else r[:117] + "..."


@dataclass
class InspectReport(Report):
    path: str
    format: str
    tensors: list[dict] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    show_all: bool = False
    layout: dict[str, Any] = field(default_factory=dict)   # from the format's layout hook
    remote: dict | None = None  # object-storage requests and bytes (URL sources)

    @property
    def total_bytes(self) -> int:
        return sum(t["bytes"] for t in self.tensors if t["name"] not in self.tied)

    def dtype_summary(self) -> dict[str, int]:
        c = Counter(t["dtype"] for t in self.tensors if t["name"] not in self.tied)
        return dict(c.most_common())

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format,
                "tensor_count": len(self.tensors) - len(self.tied),
                "names": len(self.tensors), "total_bytes": self.total_bytes,
                "dtypes": self.dtype_summary(), "tensors": self.tensors, "tied": self.tied,
                "values": self.values, "metadata": self.metadata, "info": self.info,
                **({"layout": self.layout} if self.layout else {}),
                **({"remote": self.remote} if self.remote else {})}

    def __str__(self) -> str:
        unique = len(self.tensors) - len(self.tied)
        lines = [f"{self.path}: {self.format}, {unique} tensors"
                 + (f" ({len(self.tied)} more names tied)" if self.tied else "")
                 + f", {human_bytes(self.total_bytes)}",
                 "dtypes: " + ", ".join(f"{k} x{v}" for k, v in self.dtype_summary().items())]
        for k, v in self.info.items():
            if isinstance(v, (str, int, float)):
                lines.append(f"{k}: {v}")
        lines += [f"{k}: {v}" for k, v in self.layout.items()]
        listed = self.tensors if self.show_all else self.tensors[:MAX_LISTED]
        if listed:
            lines.append("tensors:")
            width = min(max(len(t["name"]) for t in listed), 60)
            for t in listed:
                tie = f"  = {self.tied[t['name']]}" if t["name"] in self.tied else ""
                obj = f"  ({t['object']})" if t.get("object") else ""
                lines.append(f"  {t['name']:<{width}}  {t['dtype']:<10} {str(t['shape']):<18}"
                             f" {human_bytes(t['bytes'])}{tie}{obj}")
            if len(listed) < len(self.tensors):
                lines.append(f"  ... {len(self.tensors) - len(listed)} more (--all lists them)")
        if self.values:
            lines.append("values:")
            lines += [f"  {k} = {v}" for k, v in self.values.items()]
        if self.metadata:
            lines.append("metadata:")
            lines += [f"  {k}: {v if len(v) < 200 else v[:197] + '...'}" for k, v in self.metadata.items()]
        return "\n".join(lines)


def inspect_checkpoint(ck: Checkpoint, show_all: bool = False) -> InspectReport:
    rep = InspectReport(str(ck.path), str(ck.format), metadata=dict(ck.metadata),
                        info={k: v for k, v in ck.info.items()}, show_all=show_all)
    rep.tied = ck.aliases
    # readers may name the object a stored tensor belongs to (TF2 object graphs)
    objects = ck.info.get("object_paths") if isinstance(ck.info.get("object_paths"), dict) else {}
    for path, leaf in iter_leaves(ck.tree):
        name = join_path(path)
        if isinstance(leaf, TensorRef):
            rep.tensors.append({"name": name, "dtype": leaf.dtype.name, "shape": list(leaf.shape),
                                "bytes": leaf.nbytes})
            if name in objects:
                rep.tensors[-1]["object"] = objects[name]
        else:
            rep.values[name or "(root)"] = _describe_leaf(leaf)
    return rep
