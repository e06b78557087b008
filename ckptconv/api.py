"""The Python API: ``load``, ``save``, ``convert`` (and the verbs built on them).

The CLI is a thin layer over these functions; everything it can do a Python
user can do here.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import dtypes as _dt
from .errors import UsageError
from .registry import detect_format, format_for_target, get_adapter
from .tensor import cast
from .tree import Checkpoint


def load(path: str | os.PathLike, format: str | None = None, **options) -> Checkpoint:
    """Open a checkpoint lazily: headers are parsed, no tensor bytes are read."""
    p = Path(path)
    fmt = format or detect_format(p)
    adapter = get_adapter(fmt)
    adapter.check_available("reading")
    ck = adapter.read(p, **options)
    ck.format = ck.format or fmt
    ck.path = ck.path or str(p)
    return ck


def save(ck: Checkpoint | dict, path: str | os.PathLike, format: str | None = None,
         force: bool = False, **options) -> dict[str, Any]:
    """Write a checkpoint (or a plain dict of tensors) atomically."""
    if not isinstance(ck, Checkpoint):
        if not isinstance(ck, dict):
            raise UsageError(f"save() takes a Checkpoint or a dict, not {type(ck).__name__}")
        ck = Checkpoint.from_state_dict(ck)
    fmt = format_for_target(path, format)
    adapter = get_adapter(fmt)
    if not adapter.can_write:
        raise UsageError(f"format '{fmt}' can be read but not written")
    adapter.check_available("writing")
    return adapter.write(ck, Path(path), force=force, **options) or {}


@dataclass
class ConvertReport:
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

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"{self.source} ({self.source_format}) -> {self.target} ({self.target_format}): "
                 f"{self.tensors} tensors, {_human(self.bytes)} in {self.seconds:.2f} s"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _human(n):
    from .tensor import human_bytes

    return human_bytes(n)


def cast_floats(ck: Checkpoint, dtype: str) -> Checkpoint:
    """Cast every floating-point tensor to ``dtype`` (ints and bools stay)."""
    target = _dt.get(dtype)

    def one(ref):
        n = ref.dtype.name
        if n.startswith(("float", "bfloat")):
            return cast(ref, target)
        return ref

    return ck.map_tensors(one)


def resolve_mapping(mapping):
    """A Mapping from a Mapping, a preset name, a rules file, rules text or a list of those."""
    if mapping is None:
        return None
    from .mapping import Mapping

    if isinstance(mapping, Mapping):
        return mapping
    if isinstance(mapping, (list, tuple)):
        parts = [resolve_mapping(m) for m in mapping]
        return Mapping.chain(parts) if len(parts) > 1 else parts[0]
    return Mapping.load(str(mapping))


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None,
            mapping=None, select: str | None = None, force: bool = False,
            dtype: str | None = None, format: str | None = None, strict: bool = False,
            **options) -> ConvertReport:
    """Read ``src``, optionally select/map/cast, write ``dst``; returns a report."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise UsageError(f"{dst}: source and target are the same file")
    target_format = format_for_target(dst, to)
    ck = load(src, format=format)
    source_format = ck.format
    if select:
        ck = ck.select(select)
    report = ConvertReport(str(src), source_format, str(dst), target_format)
    m = resolve_mapping(mapping)
    if m is not None:
        ck = m.apply(ck, strict=strict)
        report.mapping = m.report.to_dict() if hasattr(m.report, "to_dict") else m.report
    if dtype:
        ck = cast_floats(ck, dtype)
    uniq = ck.unique_tensors()
    manifest = options.pop("manifest", False)
    from .progress import progress

    with progress(sum(r.nbytes for r in uniq.values()), bool(options.pop("progress", False)),
                  f"{src.name} -> {dst.name}"):
        info = save(ck, dst, format=target_format, force=force, **options)
    report.tensors = len(uniq)
    report.bytes = sum(r.nbytes for r in uniq.values())
    report.files = [str(f) for f in info.get("files", [dst])]
    if manifest:  # <dst>.sha256.json: file and per-tensor SHA-256, for `verify --manifest`
        from .integrity import write_manifest

        report.files.append(str(write_manifest(dst, report.files)))
    report.notes = list(info.get("notes", []))
    report.seconds = time.perf_counter() - t0
    return report


# --- verbs that live in their own modules ------------------------------------

def inspect(path: str | os.PathLike, format: str | None = None):
    from .inspect_ import inspect_checkpoint

    return inspect_checkpoint(load(path, format=format))


def load_into(module, path, mapping=None, strict: bool = False, device=None, select=None):
    from .partial import load_into as _load_into

    return _load_into(module, path, mapping=mapping, strict=strict, device=device, select=select)


def _hook(path: Path, verb: str):
    """The adapter of ``path``'s format and its ``verb`` hook (a format without it says so)."""
    fmt = detect_format(path)
    adapter = get_adapter(fmt)
    hook = getattr(adapter, verb, None)
    if hook is None:
        from .errors import FormatError

        raise FormatError(f"{path.name}: `{verb}` is for torch files; this is {fmt} "
                          f"(`ckptconv convert {path.name} out.pt` writes one)")
    return hook


def check(path):
    """What torch a torch file needs, and what blocks ``torch.load(weights_only=True)``."""
    p = Path(path)
    return _hook(p, "check")(p)


def sanitize(src, dst, force: bool = False, torch_compat: str | None = None):
    """Rewrite ``src`` as a torch file that ``torch.load(weights_only=True)`` loads."""
    src_p, dst_p = Path(src), Path(dst)
    if src_p.exists() and dst_p.exists() and src_p.resolve() == dst_p.resolve():
        raise UsageError(f"{dst_p}: source and target are the same file")
    ck = load(src_p)
    return get_adapter("torch").sanitize(ck, dst_p, force=force, torch_compat=torch_compat)


def verify(path, manifest: bool = False):
    from .integrity import verify as _verify

    return _verify(path, manifest=manifest)


def scan(path):
    from .safety import scan as _scan

    return _scan(path)
