"""``json-weights``: tensors as a JSON document, a toy format that shows how a
third-party adapter plugs into ckptconv (README, "Adding a format").

    {"format": "json-weights", "metadata": {...},
     "tensors": {"fc.weight": {"dtype": "float32", "shape": [2, 3], "data": [...]}}}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ckptconv.errors import FormatError
from ckptconv.registry import Adapter
from ckptconv.reports import Report
from ckptconv.tensor import ArrayTensor
from ckptconv.tree import Checkpoint, iter_tensors

MAGIC = b'"format": "json-weights"'   # the first key, written first


@dataclass
class JsonVerifyReport(Report):
    path: str
    tensors: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    dict_properties = ("exit_code",)

    def __str__(self) -> str:
        head = f"{self.path}: json-weights, {self.tensors} tensors, "
        return head + ("ok" if not self.problems else "\n  ".join(["PROBLEMS"] + self.problems))


class JsonWeightsAdapter(Adapter):
    name = "json-weights"
    extensions = (".weights.json",)
    description = "tensors as JSON (example plugin)"
    read_options = ()
    write_options = ("indent",)          # ckptconv.save(ck, "x.weights.json", indent=2)

    def sniff(self, head: bytes, path: Path) -> bool:
        return head.lstrip().startswith(b"{") and MAGIC in head[:64]

    def read(self, path: Path, **options) -> Checkpoint:
        import numpy as np

        doc = _load(path)
        tensors = {}
        for name, t in doc["tensors"].items():
            array = np.asarray(t["data"], dtype=t["dtype"]).reshape(t["shape"])
            tensors[name] = ArrayTensor(array)
        return Checkpoint(tensors, dict(doc.get("metadata", {})), self.name, str(path))

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False, indent: int | None = None,
              **options) -> dict:
        from ckptconv.atomic import atomic_file    # no partial file, no overwrite without force

        tensors = {name: {"dtype": ref.dtype.name, "shape": list(ref.shape),
                          "data": ref.numpy().reshape(-1).tolist()}
                   for name, ref in iter_tensors(ckpt.tree)}
        doc = {"format": "json-weights", "metadata": dict(ckpt.metadata), "tensors": tensors}
        with atomic_file(path, force) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=indent))
        return {"files": [str(path)], "notes": []}

    # a hook: `ckptconv verify x.weights.json`
    def verify(self, path: Path, **options) -> JsonVerifyReport:
        import math

        report = JsonVerifyReport(str(path))
        doc = _load(path)
        for name, t in doc["tensors"].items():
            report.tensors += 1
            if len(t["data"]) != math.prod(t["shape"]):
                report.problems.append(f"tensor '{name}': {len(t['data'])} values for shape "
                                       f"{t['shape']}")
        return report


    # a hook: lines of its own in `ckptconv inspect x.weights.json`
    def layout(self, ckpt: Checkpoint) -> dict:
        return {"storage": "values inline in JSON (no byte offsets)"}


def _load(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{Path(path).name}: not a json-weights file ({e})") from None
