"""Torch compatibility of a checkpoint: ``check`` (what a torch file needs) and
``sanitize`` (rewrite it with allowlisted content only).

Sources of truth, read from each torch of the matrix (tox.ini):
``torch/_weights_only_unpickler.py`` (``_get_allowed_globals`` and the opcodes
``Unpickler.load`` understands: what ``torch.load with weights_only=True``, the
default since torch 2.6, accepts), ``torch/serialization.py`` (zip vs legacy,
archive records, TorchScript dispatch), ``torch/_utils.py`` (which
``_rebuild_*`` functions exist), ``torch/storage.py`` (dtypes). The tables
below are those sources transcribed; ``tests/compat`` compares them with the
real torch in every env of the matrix, in both directions (what we say loads
does, what we say fails does).

Nothing here imports torch or runs a pickle: ``check`` works from
ckptconv's own reading of the file (every GLOBAL it names, every opcode).
"""
from __future__ import annotations

import io
import os
import pickletools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import (EXIT_OK, EXIT_UNSAFE, FormatError, UnsafePickleError, UnsupportedError,
                     UsageError)

Version = tuple[int, int]

# --- torch's weights_only allowlist, by version -----------------------------------

# Legacy tensor/storage type names (torch._tensor_classes, torch._storage_classes).
_TENSOR_TYPES = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long",
                 "Short")
_STORAGE_TYPES = _TENSOR_TYPES + ("ComplexDouble", "ComplexFloat")
_QSTORAGE_TYPES = ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")


def _names(pattern: str, items) -> set[str]:
    return {pattern.format(x) for x in items}


# torch 1.13.1 ``_get_allowed_globals()``: exactly these names.
_ALLOW_1_13 = frozenset(
    {"collections.OrderedDict", "torch.nn.parameter.Parameter", "torch.serialization._get_layout",
     "torch.Size", "torch.Tensor", "torch.storage.TypedStorage", "torch.storage.UntypedStorage"}
    | _names("torch.{}", ("complex32", "complex64", "complex128", "float16", "float32", "float64",
                          "int8", "int16", "int32", "int64"))
    | _names("torch.{}Tensor", _TENSOR_TYPES) | _names("torch.cuda.{}Tensor", _TENSOR_TYPES)
    | _names("torch.sparse.{}Tensor", _TENSOR_TYPES[:1] + _TENSOR_TYPES[2:])
    | _names("torch.cuda.sparse.{}Tensor", _TENSOR_TYPES[:1] + _TENSOR_TYPES[2:])
    | _names("torch.{}Storage", _STORAGE_TYPES + _QSTORAGE_TYPES)
    | _names("torch.cuda.{}Storage", _STORAGE_TYPES)
    | _names("torch._utils.{}", ("_rebuild_meta_tensor_no_storage", "_rebuild_parameter",
                                 "_rebuild_sparse_csr_tensor", "_rebuild_sparse_tensor",
                                 "_rebuild_tensor", "_rebuild_tensor_v2")))

# What each later release changed (added, removed), read from its source.
_ALLOW_CHANGES: list[tuple[Version, set[str], set[str]]] = [
    ((2, 0), {"torch._tensor._rebuild_from_type_v2"}, {"torch._utils._rebuild_sparse_csr_tensor"}),
    ((2, 4), {"collections.Counter", "torch.device", "torch.bfloat16", "torch.bool", "torch.uint8",
              "torch.float8_e4m3fn", "torch.float8_e4m3fnuz", "torch.float8_e5m2",
              "torch.float8_e5m2fnuz", "torch.qint32", "torch.qint8", "torch.quint2x4",
              "torch.quint4x2", "torch.quint8"}
     | _names("torch.bits{}", ("16", "1x8", "2x4", "4x2", "8"))
     | _names("torch.{}", ("per_channel_affine", "per_channel_affine_float_qparams",
                           "per_channel_symmetric", "per_tensor_affine", "per_tensor_symmetric"))
     | _names("torch._utils.{}", ("_rebuild_nested_tensor", "_rebuild_parameter_with_state",
                                  "_rebuild_qtensor", "_rebuild_tensor_v3",
                                  "_rebuild_wrapper_subclass")), set()),
    ((2, 6), {"_codecs.encode", "builtins.bytearray", "builtins.complex", "builtins.set",
              "torch._utils._rebuild_device_tensor_from_cpu_tensor",
              "torch._utils._rebuild_device_tensor_from_numpy", "torch.uint16", "torch.uint32",
              "torch.uint64"}, set()),
    ((2, 13), {"torch.float4_e2m1fn_x2", "torch.float8_e8m0fnu"}
     | _names("torch.int{}", range(1, 8)) | _names("torch.uint{}", range(1, 8)), set()),
    ((2, 14), {"torch.bcomplex32"}, set()),
]

# The opcodes torch's weights-only Unpickler.load understands (protocol 2, as
# torch.save writes). 1.13 lacks BINFLOAT: no Python float loads there.
_OPS_1_13 = frozenset({
    "APPEND", "APPENDS", "BINGET", "BININT", "BININT1", "BININT2", "BINPERSID", "BINPUT",
    "BINUNICODE", "BUILD", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "EMPTY_TUPLE", "GLOBAL",
    "LONG1", "LONG_BINGET", "LONG_BINPUT", "MARK", "NEWFALSE", "NEWOBJ", "NEWTRUE", "NONE",
    "PROTO", "REDUCE", "SETITEM", "SETITEMS", "SHORT_BINSTRING", "STOP", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3"})
_OPS_CHANGES: list[tuple[Version, set[str]]] = [((2, 0), {"BINFLOAT"})]

# The torch releases the matrix runs (tox.ini); reports speak of these.
MATRIX: tuple[Version, ...] = ((1, 13), (2, 0), (2, 4), (2, 6), (2, 13), (2, 14))
WEIGHTS_ONLY_DEFAULT: Version = (2, 6)  # torch.load with weights_only=True by default since


def weights_only_allowlist(version: Version) -> frozenset[str]:
    """The globals ``torch.load with weights_only=True`` of ``version`` accepts (transcribed)."""
    names = set(_ALLOW_1_13)
    for since, added, removed in _ALLOW_CHANGES:
        if version >= since:
            names = (names | added) - removed
    return frozenset(names)


def weights_only_opcodes(version: Version) -> frozenset[str]:
    ops = set(_OPS_1_13)
    for since, added in _OPS_CHANGES:
        if version >= since:
            ops |= added
    return frozenset(ops)


# torch's NAME_MAPPING/IMPORT_MAPPING (Python 2 spellings) as its unpickler applies them
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _py3_name(qualname: str) -> str:
    module, _, name = qualname.rpartition(".")
    return f"{_PY2_MODULES.get(module, module)}.{name}"


# --- what a file needs to load at all ---------------------------------------------

ZIP_MIN_TORCH: Version = (1, 6)
# functions a pickle may name that older torch does not have (torch/_utils.py)
GLOBAL_MIN_TORCH: dict[str, Version] = {
    "torch._utils._rebuild_tensor_v3": (2, 1),  # dtypes without a typed storage (fp8, uint16..)
    "torch._utils._rebuild_parameter_with_state": (2, 0),
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": (2, 6),
}


def _dtype_min_torch() -> dict[str, Version]:
    from .adapters.torch_pickle import DTYPE_MIN_TORCH

    return DTYPE_MIN_TORCH


def parse_version(v: str | Version | None) -> Version | None:
    if v is None or isinstance(v, tuple):
        return v
    try:
        parts = [int(x) for x in str(v).split("+")[0].split(".")[:2]]
    except ValueError:
        raise UsageError(f"'{v}' is not a torch version like 2.6") from None
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def fmt_version(v: Version | None) -> str | None:
    return None if v is None else f"{v[0]}.{v[1]}"


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
class CheckReport:
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
        out = [g for g in self.globals if _py3_name(g) not in allow]
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
    from .tensor import FileHandle
    from .ziputil import member_root, read_member_bytes, read_members

    if ck.info.get("torch_format") in ("zip", "torchscript"):
        handle = FileHandle(path)
        members = read_members(handle)
        root = member_root(members, path)
        prefix = f"{root}/" if root else ""
        return [read_member_bytes(handle, members[f"{prefix}data.pkl"])]
    out = []
    count = 5 if ck.info.get("torch_format") == "legacy" else 1
    with open(path, "rb") as f:
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
    from .tensor import FileHandle
    from .ziputil import read_members

    return list(read_members(FileHandle(path)))


def _writer_hints(path: Path, ck, members: list[str]) -> list[str]:
    """What the archive's records say about the torch that wrote it."""
    root = ck.info.get("archive_root")
    prefix = f"{root}/" if root else ""
    names = {m[len(prefix):] for m in members if m.startswith(prefix)}
    hints = []
    if ".data/serialization_id" in names:
        from .tensor import FileHandle
        from .ziputil import read_member_bytes, read_members

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
    from .tensor import TensorRef
    from .tree import ObjectRecord

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


def _walk(tree, path: tuple = ()) -> Iterator[tuple[str, Any]]:
    """Every node (not only leaves) with its dotted path; records' args/state included."""
    from .tree import ObjectRecord

    yield ".".join(str(p) for p in path) or "<root>", tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, path + (k,))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _walk(v, path + (i,))
    elif isinstance(tree, (set, frozenset)):
        for v in tree:
            yield from _walk(v, path + ("{}",))
    elif isinstance(tree, ObjectRecord):
        if isinstance(tree.state, dict):
            for k, v in tree.state.items():
                yield from _walk(v, path + (k,))
        elif tree.state is not None:
            yield from _walk(tree.state, path + ("__state__",))
        for i, v in enumerate(tree.args or ()):
            yield from _walk(v, path + ("__args__", i))


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
    if name in ck.info.get("records", ()):
        return "a class instance (NEWOBJ) not in torch's allowlist"
    if name.startswith("opcode "):
        return "a pickle opcode torch's weights-only loader does not implement " \
               "(saved with pickle_protocol > 2?)"
    if name.startswith("torch."):
        return "a torch name not in the weights-only allowlist"
    return "a global not in torch's weights-only allowlist"


# --- check ------------------------------------------------------------------------

def check(path: str | os.PathLike) -> CheckReport:
    """What torch a file needs, and whether ``torch.load with weights_only=True`` loads it."""
    from .api import load

    p = Path(path)
    report = CheckReport(str(p))
    try:
        ck = load(p)
    except UnsafePickleError as e:
        report.format = "torch"
        report.unsafe = " ".join(str(e).split())
        return report
    report.format = ck.format
    if ck.format != "torch":
        raise FormatError(f"{p.name}: check is for torch files; this is {ck.format} "
                          f"(`ckptconv convert {p.name} out.pt` writes one)")
    if "shards" in ck.info:
        return _check_shards(p, ck)
    info = ck.info
    report.torch_format = info.get("torch_format")
    report.archive_root = info.get("archive_root")
    report.zip_version = info.get("zip_version")
    streams = _pickle_streams(p, ck)
    report.opcodes = _opcodes(streams)
    report.globals = sorted({_py3_name(g) for g in info.get("pickle_globals", ())})
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
    table = _dtype_min_torch()
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
    for path, node in _walk(ck.tree):
        for g in _value_globals(node, scalar, recon):
            where.setdefault(g, []).append(path)
    for name in names:
        since_v = next((v for v in MATRIX if v >= floor and name not in report.blockers_for(v)),
                       None)
        report.blockers.append(Blocker(name, _blocker_reason(name, ck), where.get(name, []),
                                       fmt_version(since_v)))


def _check_shards(p: Path, ck) -> CheckReport:
    """A sharded ``*.bin.index.json``: every shard checked, the strictest answer kept."""
    parts = [check(p.parent / s) for s in ck.info["shards"]]
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


# --- sanitize ---------------------------------------------------------------------

@dataclass
class SanitizeReport:
    source: str
    target: str
    torch_compat: str | None
    changes: list[dict] = field(default_factory=list)   # {"path", "from", "to"}
    tensors: int = 0
    weights_only_since: str | None = None
    min_torch: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("source", "target", "torch_compat", "changes",
                                              "tensors", "weights_only_since", "min_torch",
                                              "notes")}

    def __str__(self) -> str:
        lines = [f"{self.source} -> {self.target}: {self.tensors} tensors, "
                 f"{len(self.changes)} values changed; loads with torch.load with weights_only=True "
                 f"from torch {self.weights_only_since}"]
        lines += [f"  {c['path']}: {c['from']} -> {c['to']}" for c in self.changes]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# Numpy unsigned arrays become the widest signed dtype that holds them where the
# target torch has no uint16/32/64 (value-preserving; uint64 has none).
_WIDEN = {np.dtype(np.uint16): np.dtype(np.int32), np.dtype(np.uint32): np.dtype(np.int64)}
DEFAULT_SANITIZE_TARGET: Version = (2, 0)


class _Sanitizer:
    """Rebuild a tree with only what the target torch's weights-only loader accepts."""

    def __init__(self, target: Version, floats_as_tensors: bool):
        self.target = target
        self.allow = weights_only_allowlist(target)
        self.floats_as_tensors = floats_as_tensors
        self.changes: list[dict] = []

    def note(self, path: tuple, old: str, new: str) -> None:
        self.changes.append({"path": ".".join(str(p) for p in path) or "<root>",
                             "from": old, "to": new})

    def key(self, k, path):
        if isinstance(k, (str, int, bool, type(None))) and not isinstance(k, np.generic):
            return k
        if isinstance(k, np.generic):
            return self.number(k, path)
        if isinstance(k, tuple):
            return tuple(self.key(x, path) for x in k)
        if isinstance(k, float) and not self.floats_as_tensors:
            return k
        self.note(path, f"key {k!r}", f"key {str(k)!r}")
        return str(k)

    def number(self, v: np.generic, path: tuple):
        if isinstance(v, np.bool_):
            new = bool(v)
        elif isinstance(v, np.integer):
            new = int(v)
        elif isinstance(v, np.complexfloating):
            new = complex(v)
        else:
            new = float(v)  # float16/32/64 and ml_dtypes floats: exact as a double
        self.note(path, f"numpy.{v.dtype.name} scalar", type(new).__name__)
        return self.value(new, path, noted=True)

    def value(self, v, path: tuple = (), noted: bool = False):
        from .tensor import ArrayTensor, TensorRef
        from .tree import ObjectRecord

        if isinstance(v, TensorRef) or v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, np.generic):
            return self.number(v, path)
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            if self.floats_as_tensors:
                if not noted:
                    self.note(path, "float", "0-d float64 tensor")
                return ArrayTensor(np.array(float(v), dtype=np.float64))
            return float(v)
        if isinstance(v, complex):
            if "builtins.complex" in self.allow:
                return v
            self.note(path, "complex", "0-d complex128 tensor")
            return ArrayTensor(np.array(v, dtype=np.complex128))
        if isinstance(v, np.ndarray):
            return self.array(v, path)
        if isinstance(v, np.dtype):
            self.note(path, "numpy.dtype", f"str {str(v)!r}")
            return str(v)
        if isinstance(v, (bytes, bytearray)):
            name = "_codecs.encode" if isinstance(v, bytes) else "builtins.bytearray"
            if name in self.allow:
                return v
            self.note(path, type(v).__name__, "uint8 tensor")
            return ArrayTensor(np.frombuffer(bytes(v), dtype=np.uint8).copy())
        if isinstance(v, (set, frozenset)):
            items = [self.key(x, path) for x in v]
            if isinstance(v, set) and "builtins.set" in self.allow:
                return set(items)
            self.note(path, type(v).__name__, "list")
            return sorted(items, key=repr)
        if isinstance(v, OrderedDict):
            out = OrderedDict((self.key(k, path + (k,)), self.value(x, path + (k,)))
                              for k, x in v.items())
            for attr, x in vars(v).items():  # state dicts' _metadata
                setattr(out, attr, self.value(x, path + (attr,)))
            return out
        if isinstance(v, dict):
            return {self.key(k, path + (k,)): self.value(x, path + (k,)) for k, x in v.items()}
        if isinstance(v, list):
            return [self.value(x, path + (i,)) for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return tuple(self.value(x, path + (i,)) for i, x in enumerate(v))
        if isinstance(v, ObjectRecord):
            return self.record(v, path)
        raise UnsupportedError(f"{'.'.join(map(str, path))}: cannot sanitize a "
                               f"{type(v).__name__}")

    def array(self, a: np.ndarray, path: tuple):
        from . import dtypes as _dt
        from .tensor import ArrayTensor

        if a.dtype.kind in "US":  # strings: a list of str/bytes
            self.note(path, f"numpy array of {a.dtype}", "list")
            return self.value(a.tolist(), path, noted=True)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        a = np.ascontiguousarray(a, dtype=dt)
        try:
            dtype = _dt.from_numpy(a.dtype)
        except FormatError:
            raise UnsupportedError(f"{'.'.join(map(str, path))}: numpy array of {a.dtype} has "
                                   "no torch dtype") from None
        need = _dtype_min_torch().get(dtype.name)
        if need and self.target < need:
            wide = _WIDEN.get(a.dtype)
            if wide is None:
                raise UnsupportedError(f"{'.'.join(map(str, path))}: numpy {a.dtype} array needs "
                                       f"torch {fmt_version(need)}; target is "
                                       f"{fmt_version(self.target)}")
            self.note(path, f"numpy {a.dtype} array {list(a.shape)}",
                      f"{wide} tensor (torch {fmt_version(self.target)} has no {dtype.name})")
            return ArrayTensor(a.astype(wide))
        self.note(path, f"numpy {a.dtype} array {list(a.shape)}", f"{dtype.name} tensor")
        return ArrayTensor(a, dtype)

    def record(self, r, path: tuple):
        from .tree import ObjectRecord

        if r.cls in self.allow and r.kind in ("reduce", "global") and \
                all(not isinstance(x, ObjectRecord) for x in r.args or ()):
            return r  # torch.Size, torch.device, torch.float32 where the target allows them
        if r.kind == "global":
            self.note(path, f"reference to {r.cls}", f"str {r.cls!r}")
            return r.cls
        if r.cls == "torch.device" and r.args:
            new = ":".join(str(a) for a in r.args if a is not None)
            self.note(path, "torch.device", f"str {new!r}")
            return new
        if r.cls == "torch.Size" and r.args:
            self.note(path, "torch.Size", "tuple")
            return tuple(self.value(r.args[0], path))
        out: dict = {"__class__": r.cls}
        if isinstance(r.state, dict) and all(isinstance(k, str) for k in r.state):
            for k, x in r.state.items():
                out[k if k != "__class__" else "__class__state"] = self.value(x, path + (k,))
        elif r.state is not None:
            out["__state__"] = self.value(r.state, path + ("__state__",))
        if r.args:
            out["__args__"] = self.value(list(r.args), path + ("__args__",))
        self.note(path, r.cls, "dict with '__class__'")
        return out


def sanitize(src: str | os.PathLike, dst: str | os.PathLike, force: bool = False,
             torch_compat: str | None = None) -> SanitizeReport:
    """Rewrite ``src`` as a torch zip file that ``torch.load with weights_only=True`` loads.

    numpy scalars become Python numbers, arrays tensors, inert records plain
    dicts noting their class (``{"__class__": "argparse.Namespace", ...}``),
    numpy dtypes and references to other globals strings. The output loads with
    weights_only=True from torch 2.0 on (or from the dtypes' minimum, fp8 2.1...).
    ``torch_compat="1.13"`` also turns Python floats into 0-d float64 tensors:
    torch 1.13's weights-only loader has no float opcode.
    """
    from .adapters.torch_pickle import write_zip_checkpoint
    from .api import load
    from .tree import Checkpoint

    src_p, dst_p = Path(src), Path(dst)
    if src_p.exists() and dst_p.exists() and src_p.resolve() == dst_p.resolve():
        raise UsageError(f"{dst_p}: source and target are the same file")
    want = parse_version(torch_compat)
    target = want or DEFAULT_SANITIZE_TARGET
    ck = load(src_p)
    s = _Sanitizer(target, floats_as_tensors=target < (2, 0))
    tree = s.value(ck.tree)
    out = Checkpoint(tree, dict(ck.metadata), "torch", str(dst_p), {})
    report = SanitizeReport(str(src_p), str(dst_p), fmt_version(want), s.changes,
                            len(out.unique_tensors()))
    if ck.info.get("torch_format") == "torchscript":
        report.notes.append("TorchScript archive: only its weights were kept (a plain state dict)")
    if ck.metadata:
        report.notes.append(f"format metadata not carried into the torch file: {sorted(ck.metadata)}")
    info = write_zip_checkpoint(out, dst_p, force, fmt_version(want))
    report.notes += info.get("notes", [])
    after = check(dst_p)
    floor = max(target, parse_version(after.min_torch) or target)
    anchor = next((v for v in MATRIX if v >= floor), MATRIX[-1])
    bad = after.blockers_for(anchor)
    if bad:  # a sanitizer bug, never a silent one
        dst_p.unlink()
        raise UnsupportedError(f"{dst_p.name}: still blocked under weights_only in torch "
                               f"{fmt_version(anchor)} by {bad}")
    report.weights_only_since = after.weights_only_since
    report.min_torch = after.min_torch
    return report
