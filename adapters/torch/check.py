"""``check``: what torch a torch file needs, and what (if anything) keeps
``torch.load with weights_only=True`` from loading it, named and placed in the
tree.

Nothing here imports torch or runs a pickle: ``check`` works from ckptconv's
own reading of the file (every GLOBAL it names, every opcode) and the tables
of ``weights_only.py``. Ground truth for the archive records:
``torch/serialization.py`` (zip vs legacy, TorchScript dispatch).
"""
from __future__ import annotations

import io
import os
import pickletools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ckptconv.paths import as_path, open_source
from ckptconv._lazy import np

from ckptconv.errors import EXIT_OK, EXIT_UNSAFE, FormatError, UnsafePickleError
from ckptconv.reports import Report
from ckptconv.tensor import FileHandle, TensorRef
from ckptconv.tree import Checkpoint, ObjectRecord, children, is_container, join_path
from ckptconv.ziputil import member_root, read_member_bytes, read_members

from .known_globals import ENUM, KNOWN_GLOBALS, py3_qualname
from .weights_only import (DTYPE_MIN_TORCH, GLOBAL_MIN_TORCH, MATRIX, WEIGHTS_ONLY_DEFAULT,
                           ZIP_MIN_TORCH, Version, fmt_version, parse_version,
                           weights_only_allowlist, weights_only_opcodes)


# --- the report -------------------------------------------------------------------

@dataclass
class Blocker:
    """One thing ``torch.load with weights_only=True`` refuses, and where it sits."""

    name: str             # a global ("argparse.Namespace") or "opcode BINFLOAT"
    reason: str
    paths: list[str] = field(default_factory=list)
    allowed_since: str | None = None  # first matrix release whose allowlist has it

    def to_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason, "paths": self.paths,
                "allowed_since": self.allowed_since}


@dataclass
class CheckReport(Report):
    path: str
    format: str | None = None
    torch_format: str | None = None          # zip, legacy, torchscript
    archive_root: str | None = None
    zip_version: str | None = None
    records: list[str] = field(default_factory=list)
    writer: list[str] = field(default_factory=list)
    min_torch: str | None = None
    min_torch_reasons: list[dict] = field(default_factory=list)
    weights_only: bool | None = None         # loads with weights_only=True in torch >= 2.6
    weights_only_since: str | None = None    # first matrix release that loads it so
    weights_only_by_version: dict[str, bool] = field(default_factory=dict)
    weights_only_blockers_by_version: dict[str, list[str]] = field(default_factory=dict)
    blockers: list[Blocker] = field(default_factory=list)
    globals: list[str] = field(default_factory=list)
    opcodes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unsafe: str | None = None
    torch_loadable: bool = True              # False for a bare pickle

    @property
    def exit_code(self) -> int:
        return EXIT_UNSAFE if self.unsafe else EXIT_OK

    def loads_in(self, version: str | Version) -> bool:
        """Whether torch ``version`` can ``torch.load`` it at all (without weights_only)."""
        if self.unsafe or not self.torch_loadable:
            return False
        need = parse_version(self.min_torch) or (0, 0)
        return parse_version(version) >= need

    def loads_weights_only_in(self, version: str | Version) -> bool:
        """Whether ``torch.load with weights_only=True`` of ``version`` loads it."""
        v = parse_version(version)
        if not self.loads_in(v) or self.torch_format == "torchscript":
            return False
        return not self.blockers_for(v)

    def blockers_for(self, version: str | Version) -> list[str]:
        v = parse_version(version)
        allow, ops = weights_only_allowlist(v), weights_only_opcodes(v)
        out = [g for g in self.globals if py3_qualname(g) not in allow]
        out += [f"opcode {o}" for o in self.opcodes if o not in ops]
        return out

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in (
            "path", "format", "torch_format", "archive_root", "zip_version", "records", "writer",
            "min_torch", "min_torch_reasons", "weights_only", "weights_only_since",
            "weights_only_by_version", "weights_only_blockers_by_version", "torch_loadable")}
        d["blockers"] = [b.to_dict() for b in self.blockers]
        d["globals"], d["opcodes"] = self.globals, self.opcodes
        d["notes"], d["unsafe"], d["exit_code"] = self.notes, self.unsafe, self.exit_code
        return d

    def __str__(self) -> str:
        if self.unsafe:
            return f"{self.path}: UNSAFE: {self.unsafe}"
        kind = {"zip": "torch zip (torch.save, torch >= 1.6)",
                "legacy": "torch legacy (pre-1.6 layout, or _use_new_zipfile_serialization=False)",
                "torchscript": "TorchScript archive (torch.jit.save)",
                "pickle": "a bare pickle (not torch.save)"}.get(self.torch_format or "",
                                                                           self.format or "?")
        lines = [f"{self.path}: {kind}"]
        if self.archive_root is not None:
            lines.append(f"  archive root '{self.archive_root}', format version {self.zip_version}")
        lines += [f"  writer: {w}" for w in self.writer]
        lines.append("  minimum torch: none can torch.load it" if not self.torch_loadable
                     else f"  minimum torch: {self.min_torch or 'any'}")
        lines += [f"    {r['torch']}: {r['why']}" for r in self.min_torch_reasons]
        if self.torch_format == "torchscript":
            lines.append("  weights_only: not applicable (load it with torch.jit.load)")
        elif self.weights_only:
            since = parse_version(self.weights_only_since)
            lines.append("  torch.load with weights_only=True: loads in torch >= 2.6"
                         + (f" (and from torch {self.weights_only_since})"
                            if since and since < WEIGHTS_ONLY_DEFAULT else ""))
        else:
            since = f"; loads so from torch {self.weights_only_since}" \
                if self.weights_only_since else ""
            lines.append(f"  torch.load with weights_only=True: FAILS in torch >= 2.6{since}; blocked by:")
            for b in self.blockers:
                where = ", ".join(b.paths[:4]) + (f" (+{len(b.paths) - 4} more)"
                                                  if len(b.paths) > 4 else "")
                lines.append(f"    {b.name}: {b.reason}" + (f" at {where}" if where else ""))
            lines.append("  `ckptconv sanitize SRC DST` writes a copy that loads with weights_only=True")
        for v, names in self.weights_only_blockers_by_version.items():
            if self.weights_only or parse_version(v) < WEIGHTS_ONLY_DEFAULT:
                lines.append(f"  torch {v} weights_only refuses: {', '.join(names)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --- reading what the file says -----------------------------------------------------

def _pickle_streams(path: Path, ck) -> list[bytes]:
    """The raw pickles torch.load interprets: data.pkl, or the legacy file's five pickles."""

    if ck.info.get("torch_format") in ("zip", "torchscript"):
        handle = FileHandle(path)
        members = read_members(handle)
        root = member_root(members, path)
        prefix = f"{root}/" if root else ""
        return [read_member_bytes(handle, members[f"{prefix}data.pkl"])]
    out = []
    count = 5 if ck.info.get("torch_format") == "legacy" else 1
    with open_source(path) as f:
        for _ in range(count):  # legacy: magic, protocol, sys_info, main pickle, storage keys
            start = f.tell()
            try:
                for op, _, pos in pickletools.genops(f):
                    if op.name == "STOP":
                        break
            except Exception as e:  # noqa: BLE001 - the reader already accepted it
                raise FormatError(f"{path.name}: corrupt legacy pickle ({e})") from None
            end = f.tell()
            f.seek(start)
            out.append(f.read(end - start))
    return out


def _opcodes(streams: list[bytes]) -> list[str]:
    ops: set[str] = set()
    for data in streams:
        for op, _, _ in pickletools.genops(io.BytesIO(data)):
            ops.add(op.name)
    return sorted(ops)


def _zip_members(path: Path) -> list[str]:

    return list(read_members(FileHandle(path)))


def _writer_hints(path: Path, ck, members: list[str]) -> list[str]:
    """What the archive's records say about the torch that wrote it."""
    root = ck.info.get("archive_root")
    prefix = f"{root}/" if root else ""
    names = {m[len(prefix):] for m in members if m.startswith(prefix)}
    hints = []
    if ".data/serialization_id" in names:
    
        handle = FileHandle(path)
        sid = read_member_bytes(handle, read_members(handle)[f"{prefix}.data/serialization_id"], 64)
        if sid.strip(b"0") == b"":
            hints.append("ckptconv (serialization_id is all zeros)")
        else:
            hints.append("torch newer than 2.0 (has .data/serialization_id; 2.0.1 had none)")
    elif "byteorder" in names:
        hints.append("torch newer than 2.0 (has a byteorder record; 2.0.1 had none)")
    else:
        hints.append("torch <= 2.0 (no byteorder or serialization_id records)")
    if ".format_version" in names or ".storage_alignment" in names:
        hints.append("torch newer than 2.6 (.format_version, .storage_alignment records)")
    if root == "archive":
        hints.append("archive root 'archive' (ckptconv, or torch.save to a file object)")
    elif root:
        hints.append(f"archive root '{root}' (torch.save to a path: the file's name then)")
    return hints


# --- where each blocker sits in the tree --------------------------------------------

def _value_globals(value, scalar_global: str, reconstruct: str) -> list[str]:
    """The globals (and opcodes) a value's pickle uses, as torch.save writes it."""

    if isinstance(value, TensorRef):
        out = []
        if value.dtype.storage_class is None:  # written by _rebuild_tensor_v3 + a dtype global
            out += ["torch._utils._rebuild_tensor_v3", f"torch.{value.dtype.name}"]
        return out
    if isinstance(value, ObjectRecord):
        return [value.cls]
    if isinstance(value, np.generic):
        return [scalar_global, "numpy.dtype"]
    if isinstance(value, np.ndarray):
        return [reconstruct, "numpy.ndarray", "numpy.dtype"]
    if isinstance(value, np.dtype):
        return ["numpy.dtype"]
    if isinstance(value, (bytes,)):
        return ["_codecs.encode"]
    if isinstance(value, bytearray):
        return ["builtins.bytearray"]
    if isinstance(value, frozenset):
        return ["builtins.frozenset"]
    if isinstance(value, set):
        return ["builtins.set"]
    if isinstance(value, complex):
        return ["builtins.complex"]
    if isinstance(value, float):
        return ["opcode BINFLOAT"]
    return []


def _every_node(tree, path: tuple = ()) -> Iterator[tuple[str, Any]]:
    """Every node (not only leaves) with its dotted path: the tree's own
    ``children``, plus what a pickle also names inside set members and the
    arguments of calls (``torch.finfo(torch.float32)``)."""
    yield join_path(path) or "<root>", tree
    if isinstance(tree, (set, frozenset)):
        kids: Any = [("{}", v) for v in tree]
    elif isinstance(tree, ObjectRecord) and not is_container(tree):
        kids = [("__args__", tree.args)] if tree.args else []
    else:
        kids = children(tree)
    for k, v in kids:
        yield from _every_node(v, path + (k,))


_WHY = {
    "numpy.core.multiarray.scalar": "a numpy scalar (np.int64, np.float32...)",
    "numpy._core.multiarray.scalar": "a numpy scalar (np.int64, np.float32...), numpy >= 2 spelling",
    "numpy.dtype": "a numpy dtype (inside numpy scalars and arrays)",
    "numpy.core.multiarray._reconstruct": "a numpy array",
    "numpy._core.multiarray._reconstruct": "a numpy array, numpy >= 2 spelling",
    "numpy.ndarray": "a numpy array",
    "opcode BINFLOAT": "a Python float (torch 1.13's weights-only loader has no float opcode)",
    "builtins.frozenset": "a frozenset (only set is allowlisted)",
}


def _blocker_reason(name: str, ck) -> str:
    if name in _WHY:
        return _WHY[name]
    role = KNOWN_GLOBALS.get(name)
    if role is not None:
        what = {ENUM: "an Enum member"}.get(role, "a framework object" if role != "type"
                                             else "a type named as a value")
        return (f"{what} of {name.split('.')[0]} (ckptconv reads it as an inert record; "
                "sanitize writes the plain value)")
    if name in ck.info.get("records", ()):
        return "a class instance (NEWOBJ) not in torch's allowlist"
    if name.startswith("opcode "):
        return "a pickle opcode torch's weights-only loader does not implement " \
               "(saved with pickle_protocol > 2?)"
    if name.startswith("torch."):
        return "a torch name not in the weights-only allowlist"
    return "a global not in torch's weights-only allowlist"


# --- check ------------------------------------------------------------------------

def check_torch_file(path: str | os.PathLike, read: Callable[[Path], Checkpoint]) -> CheckReport:
    """What torch a file needs, and whether ``torch.load with weights_only=True`` loads it.

    ``read``: the torch reader (with this run's options, e.g. extra inert globals).
    """
    p = as_path(path)  # a local Path, or a RemotePath for a URL
    report = CheckReport(str(p), "torch")
    try:
        ck = read(p)
    except UnsafePickleError as e:
        report.unsafe = " ".join(str(e).split())
        return report
    if "shards" in ck.info:
        return _check_shards(p, ck, read)
    info = ck.info
    report.torch_format = info.get("torch_format")
    report.archive_root = info.get("archive_root")
    report.zip_version = info.get("zip_version")
    streams = _pickle_streams(p, ck)
    report.opcodes = _opcodes(streams)
    report.globals = sorted({py3_qualname(g) for g in info.get("pickle_globals", ())})
    if report.torch_format in ("zip", "torchscript"):
        members = _zip_members(p)
        prefix = f"{report.archive_root}/" if report.archive_root else ""
        report.records = sorted(m[len(prefix):] for m in members
                                if m.startswith(prefix) and not m[len(prefix):].startswith(
                                    ("data/", "code/", "constants/")))
        report.writer = _writer_hints(p, ck, members)
    elif report.torch_format == "legacy":
        report.writer = ["torch.save(..., _use_new_zipfile_serialization=False), or torch < 1.6"]
    else:  # a bare pickle: torch.load wants the legacy magic number or a zip
        report.torch_loadable = False
        report.writer = ["pickle.dump (not torch.save)"]
        report.notes.append("a bare pickle: torch.load refuses it ('Invalid magic number'); "
                            "`ckptconv convert` writes a torch file from it")
    _min_torch(report, ck)
    _weights_only(report, ck)
    locs = [loc for loc in info.get("storage_locations", ()) if loc != "cpu"]
    if locs:
        report.notes.append(f"tensors were saved on {', '.join(locs)}: torch.load on a machine "
                            "without that device needs map_location='cpu' (ckptconv does not)")
    if any(g.startswith("numpy._core.") for g in report.globals):
        report.notes.append("numpy._core.* names (pickled under numpy >= 2) need numpy >= 1.26 "
                            "where the file is loaded")
    return report


def _min_torch(report: CheckReport, ck) -> None:
    reasons: list[tuple[Version, str]] = []
    if report.torch_format in ("zip", "torchscript"):
        reasons.append((ZIP_MIN_TORCH, "zip format (torch.save since 1.6)"))
    table = DTYPE_MIN_TORCH
    seen: dict[str, str] = {}
    for name, ref in ck.unique_tensors().items():
        if ref.dtype.name in table and ref.dtype.name not in seen:
            seen[ref.dtype.name] = name
    for dtype, name in seen.items():
        reasons.append((table[dtype], f"{dtype} tensors (e.g. '{name}')"))
    for g in report.globals:
        if g in GLOBAL_MIN_TORCH:
            reasons.append((GLOBAL_MIN_TORCH[g], f"the pickle calls {g}"))
    if not reasons:
        return
    need = max(v for v, _ in reasons)
    report.min_torch = fmt_version(need)
    report.min_torch_reasons = [{"torch": fmt_version(v), "why": why}
                                for v, why in sorted(reasons, key=lambda r: r[0], reverse=True)]


# torch's weights-only loader refuses TorchScript archives (torch.jit.load reads them)
TORCHSCRIPT_LOADS_WITH_WEIGHTS_ONLY = False


def _weights_only(report: CheckReport, ck) -> None:
    if report.torch_format == "torchscript":
        report.weights_only = TORCHSCRIPT_LOADS_WITH_WEIGHTS_ONLY
        report.notes.append("TorchScript archive: torch.load with weights_only=True refuses it "
                            "(torch >= 2.x); torch.jit.load reads it")
        return
    for v in MATRIX:
        ok = report.loads_weights_only_in(v)
        report.weights_only_by_version[fmt_version(v)] = ok
        if not ok and report.loads_in(v):
            report.weights_only_blockers_by_version[fmt_version(v)] = report.blockers_for(v)
    since = next((v for v in MATRIX if all(report.loads_weights_only_in(w)
                                           for w in MATRIX if w >= v)), None)
    report.weights_only_since = fmt_version(since)
    # "torch >= 2.6": every matrix release from 2.6 (or the file's minimum torch) on
    floor = max(WEIGHTS_ONLY_DEFAULT, parse_version(report.min_torch) or (0, 0))
    relevant = [v for v in MATRIX if v >= floor] or [MATRIX[-1]]
    report.weights_only = all(report.loads_weights_only_in(v) for v in relevant)
    if report.weights_only:
        return
    names = list(dict.fromkeys(n for v in relevant for n in report.blockers_for(v)))
    scalar = next((g for g in report.globals if g.endswith("multiarray.scalar")),
                  "numpy.core.multiarray.scalar")
    recon = next((g for g in report.globals if g.endswith("multiarray._reconstruct")),
                 "numpy.core.multiarray._reconstruct")
    where: dict[str, list[str]] = {}
    for path, node in _every_node(ck.tree):
        for g in _value_globals(node, scalar, recon):
            where.setdefault(g, []).append(path)
    for name in names:
        since_v = next((v for v in MATRIX if v >= floor and name not in report.blockers_for(v)),
                       None)
        report.blockers.append(Blocker(name, _blocker_reason(name, ck), where.get(name, []),
                                       fmt_version(since_v)))


def _check_shards(p: Path, ck, read) -> CheckReport:
    """A sharded ``*.bin.index.json``: every shard checked, the strictest answer kept."""
    parts = [check_torch_file(p.parent / s, read) for s in ck.info["shards"]]
    report = CheckReport(str(p), "torch", "sharded")
    for r in parts:
        if r.unsafe:
            report.unsafe = r.unsafe
            return report
    mins = [parse_version(r.min_torch) for r in parts if r.min_torch]
    report.min_torch = fmt_version(max(mins)) if mins else None
    report.min_torch_reasons = [dict(x, shard=Path(r.path).name) for r in parts
                                for x in r.min_torch_reasons]
    report.globals = sorted({g for r in parts for g in r.globals})
    report.opcodes = sorted({o for r in parts for o in r.opcodes})
    report.weights_only = all(r.weights_only for r in parts)
    for v in MATRIX:
        report.weights_only_by_version[fmt_version(v)] = all(
            r.weights_only_by_version.get(fmt_version(v)) for r in parts)
    sinces = [parse_version(r.weights_only_since) for r in parts]
    report.weights_only_since = None if None in sinces else fmt_version(max(sinces))
    report.blockers = [b for r in parts for b in r.blockers]
    report.notes = [f"{Path(r.path).name}: {n}" for r in parts for n in r.notes]
    return report

