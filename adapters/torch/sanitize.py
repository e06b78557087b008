"""``sanitize``: rewrite a checkpoint as a torch zip file that
``torch.load with weights_only=True`` loads, changing only what the target
torch's weights-only loader refuses, and reporting every change.

The allowlists come from ``weights_only.py``; the result is checked with
``check`` before it is kept (a sanitizer bug fails loudly, never silently).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

import numpy as np

from ckptconv import dtypes as _dt
from ckptconv.errors import FormatError, UnsupportedError
from ckptconv.paths import as_path
from ckptconv.reports import Report
from ckptconv.tensor import ArrayTensor, TensorRef
from ckptconv.tree import Checkpoint, ObjectRecord

from .check import check_torch_file
from .known_globals import DICT, ENUM, KNOWN_GLOBALS, OMEGACONF_CONTAINERS, PARENT_LINKED, PATH
from .weights_only import (DTYPE_MIN_TORCH, MATRIX, Version, fmt_version, parse_version,
                           weights_only_allowlist)
from .writer import write_zip_checkpoint
from .zip_reader import read_zip_checkpoint


@dataclass
class SanitizeReport(Report):
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
        need = DTYPE_MIN_TORCH.get(dtype.name)
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
        plain = self.framework_object(r, path)
        if plain is not _NOT_KNOWN:
            return plain
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


    def framework_object(self, r, path: tuple):
        """A known framework object (known_globals) as the plain value it stands for:
        an Enum member its value, a path its string, an OmegaConf config its
        content, a dict subclass a dict; ``_NOT_KNOWN`` for anything else."""
        role = KNOWN_GLOBALS.get(r.cls)
        if r.kind == "parent":  # an OmegaConf back-reference whose container was kept as a record
            self.note(path, f"reference to the enclosing {r.cls}", "None")
            return None
        if role == ENUM and r.kind == "reduce" and len(r.args) == 1:
            self.note(path, f"Enum {r.cls}", f"its value {r.args[0]!r}")
            return self.value(r.args[0], path, noted=True)
        if role == PATH and r.kind == "reduce" and all(isinstance(a, str) for a in r.args):
            pure = PureWindowsPath if "Windows" in r.cls else PurePosixPath
            new = str(pure(*r.args))
            self.note(path, r.cls, f"str {new!r}")
            return new
        if role == DICT and isinstance(r.state, dict):
            self.note(path, r.cls, "dict")
            return {self.key(k, path + (k,)): self.value(x, path + (k,))
                    for k, x in r.state.items()}
        if r.cls in PARENT_LINKED and isinstance(r.state, dict):
            content = _omegaconf_content(r)
            if content is not _NOT_KNOWN:
                self.note(path, r.cls, type(content).__name__)
                return self.value(content, path, noted=True)
        return _NOT_KNOWN


_NOT_KNOWN = object()


def _omegaconf_content(node):
    """The plain content of an OmegaConf DictConfig/ListConfig/value node record
    (what ``OmegaConf.to_container`` returns, interpolations left as strings)."""
    state = node.state
    if node.cls not in OMEGACONF_CONTAINERS:
        return state.get("_val", _NOT_KNOWN)
    content = state.get("_content")
    if isinstance(content, dict):
        out = {}
        for k, child in content.items():
            out[k] = _omegaconf_content(child) if isinstance(child, ObjectRecord) and \
                child.cls in PARENT_LINKED and isinstance(child.state, dict) else child
            if out[k] is _NOT_KNOWN:
                return _NOT_KNOWN
        return out
    if isinstance(content, list):
        out = [_omegaconf_content(c) if isinstance(c, ObjectRecord) and c.cls in PARENT_LINKED
               and isinstance(c.state, dict) else c for c in content]
        return _NOT_KNOWN if any(x is _NOT_KNOWN for x in out) else out
    return content  # None, or a string: "???" (missing) or an interpolation


def sanitize_checkpoint(ck: Checkpoint, dst: str | os.PathLike, force: bool = False,
                        torch_compat: str | None = None) -> SanitizeReport:
    """Write ``ck`` as a torch zip file that ``torch.load with weights_only=True`` loads.

    numpy scalars become Python numbers, arrays tensors, inert records plain
    dicts noting their class (``{"__class__": "argparse.Namespace", ...}``),
    numpy dtypes and references to other globals strings. The output loads with
    weights_only=True from torch 2.0 on (or from the dtypes' minimum, fp8 2.1...).
    ``torch_compat="1.13"`` also turns Python floats into 0-d float64 tensors:
    torch 1.13's weights-only loader has no float opcode.
    """
    dst_p = as_path(dst)  # a local Path, or a RemotePath for a URL (uploaded atomically)
    want = parse_version(torch_compat)
    target = want or DEFAULT_SANITIZE_TARGET
    s = _Sanitizer(target, floats_as_tensors=target < (2, 0))
    tree = s.value(ck.tree)
    out = Checkpoint(tree, dict(ck.metadata), "torch", str(dst_p), {})
    report = SanitizeReport(str(ck.path), str(dst_p), fmt_version(want), s.changes,
                            len(out.unique_tensors()))
    if ck.info.get("torch_format") == "torchscript":
        report.notes.append("TorchScript archive: only its weights were kept (a plain state dict)")
    if ck.metadata:
        report.notes.append(f"format metadata not carried into the torch file: {sorted(ck.metadata)}")
    info = write_zip_checkpoint(out, dst_p, force, fmt_version(want))
    report.notes += info.get("notes", [])
    after = check_torch_file(dst_p, read_zip_checkpoint)
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
