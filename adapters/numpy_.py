"""NumPy ``.npy`` and ``.npz``: numpy's own layout, read and written.

``.npy`` (numpy/lib/format.py, NEP 1): the magic ``\\x93NUMPY``, a version
byte pair (1.0, 2.0 or 3.0), the header length (``<u2`` for 1.0, ``<u4``
after), then a Python dict literal ``{'descr': ..., 'fortran_order': ...,
'shape': ...}`` padded with spaces and a newline so that the array data
starts at a multiple of 64 bytes; the data follow raw, in C or Fortran
order. Object arrays (``descr '|O'``) hold a pickle of the array instead:
they are interpreted by the restricted unpickler (``ckptconv.pickle``),
never by ``pickle``, and refused (exit 3) when the pickle names code.

``.npz`` (``np.savez``, ``np.savez_compressed``) is a zip of ``NAME.npy``
members, stored or deflated. A stored member's tensor is a plain range of
the archive; a deflated one is inflated as it is read.

numpy has no bfloat16 or float8: ``np.save`` writes ml_dtypes arrays as
raw bytes (``'<V2'``, ``'<V1'``), and so do we; ``np.load`` returns them as
void arrays (``.view(ml_dtypes.bfloat16)`` restores them). In an ``.npz``
we write, a ``__ckptconv__.npy`` member (a 0-d unicode array of JSON)
records those dtypes and, like safetensors' metadata, the non-tensor tree,
ties and metadata, so a training checkpoint round-trips whole. A bare
``.npy`` of raw bytes reads as unsigned integers of the same width.
"""
from __future__ import annotations

import ast
import json
import math
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ckptconv import dtypes as _dt
from ckptconv._lazy import np
from ckptconv.atomic import atomic_file
from ckptconv.errors import FormatError, UnsafePickleError, UnsupportedError
from ckptconv.registry import Adapter
from ckptconv.streaming import OutFile
from ckptconv.tensor import (ByteSource, FileHandle, FileSource, StoredTensor, TensorRef,
                             contiguous_strides, human_bytes)
from ckptconv.tree import (Checkpoint, ObjectRecord, iter_tensors, to_canonical,
                           tree_from_metadata, tree_to_metadata)
from ckptconv.pickle import (Global, Pending, RestrictedUnpickler, checked_allow_globals,
                             python3_name, short_repr)
from ckptconv.zipstream import ZipWriter
from ckptconv.ziputil import DEFLATED, STORED, read_member_bytes, read_members

from .sniffers import NPY_MAGIC as MAGIC
ALIGN = 64                    # numpy's ARRAY_ALIGN: data start at a multiple of 64
GROWTH_AXIS_MAX_DIGITS = 21   # numpy leaves room to grow the shape in place
MAX_HEADER = 1 << 20
MAX_PICKLE = 1 << 31
MAX_TEXT_ARRAY = 16 << 20     # string arrays are read into the tree, so keep them small
SIDE_MEMBER = "__ckptconv__"  # npz member with our JSON (dtypes, tree, ties, metadata)
SINGLE_NAME = "arr_0"         # the name np.savez gives an unnamed array


# --- the .npy header -------------------------------------------------------------------

@dataclass
class NpyHeader:
    descr: Any
    fortran_order: bool
    shape: tuple[int, ...]
    data_offset: int            # where the array data start, from the start of the .npy


def parse_npy_header(read: Callable[[int, int], bytes], size: int, display: str) -> NpyHeader:
    """The header of a ``.npy`` whose bytes ``read(offset, n)`` gives (``size`` in all)."""
    if size < 10:
        raise FormatError(f"{display}: truncated .npy header ({size} bytes)")
    head = bytes(read(0, min(size, 12)))
    if head[:6] != MAGIC:
        raise FormatError(f"{display}: not a .npy array (magic {head[:6]!r})")
    major, minor = head[6], head[7]
    if (major, minor) == (1, 0):
        (hlen,), start = struct.unpack("<H", head[8:10]), 10
    elif (major, minor) in ((2, 0), (3, 0)) and len(head) >= 12:
        (hlen,), start = struct.unpack("<I", head[8:12]), 12
    else:
        raise FormatError(f"{display}: unknown .npy version {major}.{minor}")
    if hlen > MAX_HEADER or start + hlen > size:
        raise FormatError(f"{display}: .npy header of {hlen} bytes does not fit the file "
                          f"({size} bytes; truncated?)")
    raw = bytes(read(start, hlen))
    try:
        text = raw.decode("utf-8" if major == 3 else "latin1")
        # numpy reads the header with ast.literal_eval too: literals only, nothing runs
        d = ast.literal_eval(text)
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError) as e:
        raise FormatError(f"{display}: .npy header is not a dict literal "
                          f"({type(e).__name__})") from None
    if not isinstance(d, dict) or sorted(d) != ["descr", "fortran_order", "shape"]:
        raise FormatError(f"{display}: .npy header needs exactly the keys descr, fortran_order "
                          f"and shape, not {short_repr(d)}")
    shape = d["shape"]
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape) \
            or len(shape) > 64:
        raise FormatError(f"{display}: .npy shape {short_repr(shape)} is not a tuple of sizes")
    if not isinstance(d["fortran_order"], bool):
        raise FormatError(f"{display}: .npy fortran_order {short_repr(d['fortran_order'])} "
                          "is not a bool")
    return NpyHeader(d["descr"], d["fortran_order"], shape, start + hlen)


def is_object_descr(descr) -> bool:
    """Whether a header's dtype holds pickled Python objects, as numpy reads it
    (``ckptconv.dtypes.numpy_descr_holds_objects``; a descr numpy refuses does not)."""
    return _dt.numpy_descr_holds_objects(descr, undecided=False)


def npy_header_bytes(descr: str, fortran_order: bool, shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes (numpy ``_write_array_header`` + ``_wrap_header``),
    byte for byte."""
    text = "{" + "".join(f"'{k}': {v!r}, " for k, v in sorted(
        {"descr": descr, "fortran_order": fortran_order, "shape": tuple(shape)}.items())) + "}"
    if shape:
        text += " " * (GROWTH_AXIS_MAX_DIGITS - len(repr(shape[-1 if fortran_order else 0])))
    body = text.encode("latin1")
    for version, fmt in (((1, 0), "<H"), ((2, 0), "<I")):
        hlen = len(body) + 1
        pad = ALIGN - ((len(MAGIC) + 2 + struct.calcsize(fmt) + hlen) % ALIGN)
        if hlen + pad < 1 << (8 * struct.calcsize(fmt)):
            return (MAGIC + bytes(version) + struct.pack(fmt, hlen + pad) + body
                    + b" " * pad + b"\n")
    raise UnsupportedError(f".npy header of {len(body)} bytes is too long")  # pragma: no cover


# --- arrays as lazy tensors ------------------------------------------------------------

def _tensor_dtype(npdt, display: str):
    """(canonical dtype, note or None) for a plain numeric numpy dtype."""
    if npdt.kind == "V" and npdt.fields is None and npdt.subdtype is None \
            and npdt.itemsize in (1, 2, 4, 8):
        # what np.save makes of ml_dtypes (bfloat16, float8, int4): raw bits
        return _dt.get(f"uint{8 * npdt.itemsize}"), (
            f"raw '{npdt.str}' bytes (np.save of an ml_dtypes array?) read as "
            f"uint{8 * npdt.itemsize}")
    try:
        return _dt.from_numpy(npdt), None
    except FormatError:
        raise FormatError(f"{display}: numpy dtype '{npdt.str}' has no tensor equivalent "
                          "(structured, datetime or text arrays are not supported)") from None


def _fortran_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(contiguous_strides(tuple(reversed(shape)))))


def _read_array(header: NpyHeader, source_at: Callable[[int], ByteSource], read, size: int,
                display: str, notes: list[str], allow_globals=()):
    """The tree value of one array: a lazy tensor, a text list or an object-array value."""
    descr = header.descr
    if is_object_descr(descr):
        nbytes = size - header.data_offset
        if nbytes > MAX_PICKLE:
            raise FormatError(f"{display}: object array pickle of {human_bytes(nbytes)} is too big")
        return read_object_array(bytes(read(header.data_offset, nbytes)), display, allow_globals)
    if not isinstance(descr, str):
        raise FormatError(f"{display}: structured numpy arrays ({short_repr(descr)}) are not "
                          "supported")
    try:
        npdt = np.dtype(descr)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{display}: bad .npy dtype {descr!r} ({e})") from None
    numel = math.prod(header.shape)
    nbytes = numel * npdt.itemsize
    if header.data_offset + nbytes > size:
        raise FormatError(f"{display}: array {npdt.str}{list(header.shape)} needs "
                          f"{human_bytes(nbytes)} at offset {header.data_offset}, "
                          f"{human_bytes(size - header.data_offset)} are there (truncated?)")
    if npdt.kind in "US":   # labels, class names: small values of the tree
        if nbytes > MAX_TEXT_ARRAY:
            raise FormatError(f"{display}: text array of {human_bytes(nbytes)} is too big to read")
        arr = np.frombuffer(bytes(read(header.data_offset, nbytes)), dtype=npdt)
        return arr.reshape(header.shape, order="F" if header.fortran_order else "C").tolist()
    dtype, note = _tensor_dtype(npdt, display)
    if note:
        notes.append(f"{display}: {note}")
    strides = _fortran_strides(header.shape) if header.fortran_order else None
    return StoredTensor(dtype, header.shape, source_at(nbytes), 0, strides,
                        big_endian=npdt.byteorder == ">" and npdt.itemsize > 1)


class InflatedSource(ByteSource):
    """The bytes of a deflated zip member from ``skip`` on, inflated as read.

    Reads in order (what writers and ``iter_bytes`` do) continue one
    decompressor; a read behind the current position starts again.
    """

    def __init__(self, handle: FileHandle, member, skip: int, nbytes: int):
        self.handle, self.member, self.skip, self.nbytes = handle, member, skip, nbytes
        self._lock = threading.Lock()
        self._restart()

    def _restart(self) -> None:
        self._inflater = zlib.decompressobj(-15)
        self._in_pos = 0               # compressed bytes fed so far
        self._out_pos = -self.skip     # position (in our bytes) of the next byte out
        self._pending = b""

    def _take(self, n: int) -> bytes:
        """The next ``n`` inflated bytes (fewer only at the end of the member)."""
        parts, have = [], 0
        m = self.member
        while have < n:
            if not self._pending:
                if self._inflater.unconsumed_tail:
                    chunk = self._inflater.unconsumed_tail
                else:
                    left = m.compressed_size - self._in_pos
                    if left <= 0:
                        break
                    chunk = self.handle.pread(m.data_offset + self._in_pos, min(left, 1 << 20),
                                              f"zip member '{m.name}'")
                    self._in_pos += len(chunk)
                try:
                    self._pending = self._inflater.decompress(chunk, 8 << 20)
                except zlib.error as e:
                    raise FormatError(f"{self.handle.display}: zip member '{m.name}' does not "
                                      f"inflate ({e})") from None
                if not self._pending and self._inflater.eof:
                    break
            piece, self._pending = self._pending[:n - have], self._pending[n - have:]
            parts.append(piece)
            have += len(piece)
        self._out_pos += have
        return b"".join(parts)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.nbytes:
            raise FormatError(f"{self.handle.display}: zip member '{self.member.name}': read "
                              "past its end")
        with self._lock:
            if offset < self._out_pos:
                self._restart()
            while self._out_pos < offset:
                if not self._take(min(offset - self._out_pos, 8 << 20)):
                    break
            out = self._take(length)
        if len(out) != length:
            raise FormatError(f"{self.handle.display}: zip member '{self.member.name}' inflates "
                              f"to fewer bytes than its header says (truncated or corrupt)")
        return out


# --- object arrays through the restricted unpickler ---------------------------------------

_RECONSTRUCT = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
_SCALAR = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
_NAMED = frozenset(_RECONSTRUCT + _SCALAR + (
    "numpy.ndarray", "numpy.dtype", "_codecs.encode", "collections.OrderedDict",
    "builtins.set", "builtins.frozenset", "builtins.complex"))


def _numpy_dtype(value, display: str, objects: bool):
    dtype = value.value() if isinstance(value, Pending) else value
    if not isinstance(dtype, np.dtype):
        raise FormatError(f"{display}: numpy dtype {short_repr(dtype)} is not a dtype")
    if dtype.fields is not None or dtype.subdtype is not None or \
            (dtype.hasobject and not (objects and dtype.kind == "O")):
        raise UnsafePickleError(f"{display}: numpy dtype '{dtype}' in an object array pickle "
                                "(only plain and object dtypes; refused, nothing was executed)")
    return dtype


class _DtypeCall(Pending):
    """``numpy.dtype(spec, align, copy)`` then BUILD (version, byte order, ...)."""

    def __init__(self, spec, display: str):
        if not isinstance(spec, str) or len(spec) > 16:
            raise FormatError(f"{display}: numpy dtype spec {short_repr(spec)} is not a short string")
        try:
            self.dtype = np.dtype(spec)
        except (TypeError, ValueError) as e:
            raise FormatError(f"{display}: bad numpy dtype {spec!r} ({e})") from None

    def build(self, state) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] == ">":
            self.dtype = self.dtype.newbyteorder(">")

    def value(self):
        return self.dtype


class _ArrayCall(Pending):
    """``_reconstruct(ndarray, (0,), b'b')`` then BUILD (version, shape, dtype, fortran, data):
    data are bytes for plain dtypes, a list of values for object arrays."""

    def __init__(self, display: str):
        self.display, self.result, self.built = display, None, False

    def build(self, state) -> None:
        d = self.display
        if not isinstance(state, tuple) or len(state) != 5:
            raise FormatError(f"{d}: bad numpy array state {short_repr(state)}")
        _, shape, dtype, fortran, data = state
        dtype = _numpy_dtype(dtype, d, objects=True)
        if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
            raise FormatError(f"{d}: numpy array shape {short_repr(shape)} is not a tuple of sizes")
        numel, order = math.prod(shape), "F" if fortran else "C"
        if dtype.kind == "O":
            if not isinstance(data, list) or len(data) != numel:
                raise FormatError(f"{d}: object array of {numel} elements with "
                                  f"{short_repr(data)} as data")
            # elements are values the unpickler built, listed in C order whatever the
            # fortran flag (numpy's _getlist_pkl walks the array logically)
            self.result = data[0] if not shape else _nested(data, shape)
        else:
            if not isinstance(data, (bytes, bytearray)) or len(data) != numel * dtype.itemsize:
                raise FormatError(f"{d}: numpy array data do not fit {dtype}{list(shape)}")
            self.result = np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order=order).copy()
        self.built = True

    def value(self):
        if not self.built:
            raise FormatError(f"{self.display}: numpy array without data")
        return self.result


def _nested(flat: list, shape: tuple[int, ...]) -> list:
    holder = np.empty(len(flat), dtype=object)
    for i, v in enumerate(flat):  # (assigning a list would let numpy look into the values)
        holder[i] = v
    return holder.reshape(shape).tolist()


class NumpyPickleReader(RestrictedUnpickler):
    """The pickle of an object array: numpy arrays, dtypes and scalars are rebuilt
    by us; other classes become inert records; anything that can run code is refused.
    ``allow_globals``: this run's extra names (``--allow-global``), whose calls
    (an Enum member, a class with its own ``__reduce__``) are recorded, never made."""

    def __init__(self, display: str = "pickle", allow_globals=()):
        super().__init__(display)
        self.allowed_calls = frozenset(python3_name(n) for n in checked_allow_globals(allow_globals))

    def allowed_global(self, qualname: str) -> bool:
        return qualname in _NAMED

    def call(self, func: Global, args: tuple, opcode: str):
        q, d = func.qualname, self.display
        if python3_name(q) in self.allowed_calls:
            self.records.append(q)
            return ObjectRecord(python3_name(q), None, args, kind="reduce")
        if q in _RECONSTRUCT and len(args) == 3 and args[0] == Global("numpy", "ndarray"):
            return _ArrayCall(d)
        if q == "numpy.dtype" and 1 <= len(args) <= 3:
            return _DtypeCall(args[0], d)
        if q in _SCALAR and len(args) == 2:
            dtype = _numpy_dtype(args[0], d, objects=False)
            data = args[1].encode("latin1") if isinstance(args[1], str) else args[1]
            if not isinstance(data, bytes) or len(data) != dtype.itemsize:
                raise FormatError(f"{d}: numpy scalar of {dtype} with {short_repr(data)} as data")
            return np.frombuffer(data, dtype=dtype)[0]
        if q == "_codecs.encode" and len(args) == 2 and isinstance(args[0], str) \
                and args[1] in ("latin1", "latin-1"):
            return args[0].encode("latin1")
        if q == "collections.OrderedDict" and not args:
            return OrderedDict()
        if q in ("builtins.set", "builtins.frozenset") and len(args) <= 1:
            items = list(args[0]) if args else []
            return (set if q.endswith(".set") else frozenset)(self._hashable(x) for x in items)
        if q == "builtins.complex" and len(args) == 2 and all(type(x) is float for x in args):
            return complex(*args)
        return super().call(func, args, opcode)


def read_object_array(data: bytes, display: str, allow_globals=()):
    """The value an object array's pickle describes (a dict for ``np.save(dict)``)."""
    return to_canonical(NumpyPickleReader(f"{display} (object array)", allow_globals).load(data))


# --- reading -----------------------------------------------------------------------------

def read_npy(path: Path, allow_globals=()) -> Checkpoint:
    handle = FileHandle(path)
    notes: list[str] = []
    header = parse_npy_header(handle.pread, handle.size, handle.display)
    value = _read_array(header, lambda n: FileSource(handle, header.data_offset, n, "array data"),
                        handle.pread, handle.size, handle.display, notes, allow_globals)
    tree = value if is_object_descr(header.descr) and isinstance(value, dict) \
        else {SINGLE_NAME: value}
    return Checkpoint(tree, {}, "npy", str(path), {"notes": notes} if notes else {})


def _member_source(handle: FileHandle, m, skip: int, nbytes: int) -> ByteSource:
    if m.compress_type == STORED:
        return FileSource(handle, m.data_offset + skip, nbytes, f"zip member '{m.name}'")
    return InflatedSource(handle, m, skip, nbytes)


def read_npz(path: Path, allow_globals=()) -> Checkpoint:
    handle = FileHandle(path)
    notes: list[str] = []
    values: dict[str, Any] = {}
    side = None
    for name, m in read_members(handle).items():
        if not name.endswith(".npy"):
            notes.append(f"member '{name}' is not an array (skipped)")
            continue
        if m.compress_type not in (STORED, DEFLATED):
            raise FormatError(f"{handle.display}: zip member '{name}' uses compression "
                              f"{m.compress_type} (np.savez writes stored or deflated members)")
        display = f"{handle.display}:{name}"
        read = _member_source(handle, m, 0, m.size).read
        header = parse_npy_header(read, m.size, display)
        if is_object_descr(header.descr):  # a pickle, read whole (bounded, zip-bomb checked)
            whole = read_member_bytes(handle, m, MAX_PICKLE)
            read = lambda offset, n: whole[offset:offset + n]  # noqa: E731
        key = name[:-4]
        value = _read_array(header, lambda n: _member_source(handle, m, header.data_offset, n),
                            read, m.size, display, notes, allow_globals)
        if key == SIDE_MEMBER and isinstance(value, str):
            side = value
        else:
            values[key] = value
    meta: dict[str, str] = {}
    if side is not None:
        values, meta = _apply_side(values, side, handle.display)
    return Checkpoint(values, meta, "npz", str(path), {"notes": notes} if notes else {})


def _apply_side(values: dict, text: str, display: str) -> tuple[Any, dict]:
    try:
        side = json.loads(text)
        dtypes = side.get("dtypes", {})
        metadata = side.get("metadata", {})
        if not isinstance(dtypes, dict) or not isinstance(metadata, dict) or \
                not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("dtypes and metadata must be objects of strings")
    except (ValueError, AttributeError) as e:
        raise FormatError(f"{display}: bad {SIDE_MEMBER}.npy ({e})") from None
    for name, dtype in dtypes.items():
        ref = values.get(name)
        want = _dt.get(dtype)
        if not isinstance(ref, StoredTensor) or ref.dtype.itemsize != want.itemsize:
            raise FormatError(f"{display}: {SIDE_MEMBER}.npy gives '{name}' the dtype {dtype}, "
                              "which does not fit the array")
        values[name] = StoredTensor(want, ref.shape, ref.source, ref.offset, ref.strides)
    tensors = {k: v for k, v in values.items() if isinstance(v, TensorRef)}
    if any(not isinstance(v, TensorRef) for v in values.values()) and "ckptconv.tree" in metadata:
        raise FormatError(f"{display}: object arrays beside a ckptconv tree")
    has_tree = "ckptconv.tree" in metadata
    tree, meta = tree_from_metadata(tensors, metadata, display)
    if not has_tree:  # a flat archive: ties applied, object arrays kept in their places
        tree = {k: tree.get(k, v) for k, v in values.items()}
    return tree, meta


# --- writing -----------------------------------------------------------------------------

def _descr(ref: TensorRef) -> str:
    npdt = _dt.numpy_dtype(ref.dtype)
    return np.lib.format.dtype_to_descr(npdt)


def _is_fortran_span(ref: TensorRef):
    """A 1-D contiguous view of ``ref``'s bytes when they lie in Fortran order in a
    file (numpy's F-ordered arrays): written as they are, with fortran_order."""
    if not isinstance(ref, StoredTensor) or ref.big_endian or len(ref.shape) < 2 \
            or ref.is_contiguous or ref.strides != _fortran_strides(ref.shape):
        return None
    return StoredTensor(ref.dtype, (ref.numel,), ref.source, ref.offset)


def npy_parts(ref: TensorRef) -> list:
    """The pieces of one ``.npy``: its header, then the tensor (or its raw F-ordered bytes)."""
    raw = _is_fortran_span(ref)
    return [npy_header_bytes(_descr(ref), raw is not None, ref.shape), raw or ref]


def _dtype_note(refs) -> list[str]:
    odd = sorted({r.dtype.name for r in refs if r.dtype.numpy is not None
                  and r.dtype.numpy.kind == "V"})
    if not odd:
        return []
    return [f"{', '.join(odd)} stored as numpy stores ml_dtypes ('<V..' raw bytes): np.load "
            "returns void arrays; .view(ml_dtypes.<type>) restores them"]


class NpyAdapter(Adapter):
    name = "npy"

    def read(self, path: Path, allow_globals=None, **options) -> Checkpoint:
        """``allow_globals``: ``MODULE.NAME``s an object array may call, read as inert records."""
        return read_npy(path, tuple(allow_globals or ()))

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False, **options) -> dict:
        tensors = list(iter_tensors(ckpt.tree))
        leaves = ckpt.leaves()
        if len(tensors) != 1 or len(leaves) != 1:
            raise UnsupportedError(
                f"{path.name}: .npy holds one array; this checkpoint has {len(tensors)} tensors "
                f"and {len(leaves) - len(tensors)} other values (write .npz instead)")
        ref = tensors[0][1]
        if ref.dtype.numpy is None:
            raise UnsupportedError(f"{path.name}: numpy has no dtype for {ref.dtype.name}")
        notes = _dtype_note([ref])
        if ckpt.metadata:
            notes.append(f"metadata not kept (.npy has no place for it): {', '.join(ckpt.metadata)}")
        with atomic_file(path, force) as tmp, OutFile(tmp) as out:
            for part in npy_parts(ref):
                if isinstance(part, bytes):
                    out.write(part)
                else:
                    out.write_tensor(part)
        return {"files": [str(path)], "notes": notes}


class NpzAdapter(Adapter):
    name = "npz"

    def read(self, path: Path, allow_globals=None, **options) -> Checkpoint:
        """``allow_globals``: ``MODULE.NAME``s an object array may call, read as inert records."""
        return read_npz(path, tuple(allow_globals or ()))

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False, **options) -> dict:
        entries = list(iter_tensors(ckpt.tree))
        for name, ref in entries:
            if ref.dtype.numpy is None:
                raise UnsupportedError(f"{path.name}: numpy has no dtype for {ref.dtype.name} "
                                       f"('{name}')")
            if name == SIDE_MEMBER:
                raise UnsupportedError(f"{path.name}: '{SIDE_MEMBER}' is the name of our own member")
        side: dict[str, Any] = {}
        odd = {n: r.dtype.name for n, r in entries if r.dtype.numpy.kind == "V"}
        if odd:
            side["dtypes"] = odd
        names: dict[int, str] = {}
        for n, r in entries:
            names.setdefault(id(r), n)
        metadata = {k: str(v) for k, v in ckpt.metadata.items()}
        metadata.update({k: v for k, v in tree_to_metadata(ckpt, names).items()
                         if k != "ckptconv.source"})
        if metadata:
            side["metadata"] = metadata
        notes = _dtype_note([r for _, r in entries])
        if not ckpt.is_flat:
            notes.append(f"non-tensor entries kept in the {SIDE_MEMBER}.npy member")
        with atomic_file(path, force) as tmp:
            zw = ZipWriter(tmp)
            try:
                for name, ref in entries:
                    parts = npy_parts(ref)
                    zw.add_tensor_bytes(f"{name}.npy", len(parts[0]) + ref.nbytes, parts)
                if side:
                    text = np.array(json.dumps(side, separators=(",", ":"), ensure_ascii=False))
                    data = text.tobytes() if text.dtype.byteorder != ">" else \
                        text.astype(text.dtype.newbyteorder("<")).tobytes()
                    zw.add_bytes(f"{SIDE_MEMBER}.npy",
                                 npy_header_bytes(np.lib.format.dtype_to_descr(
                                     text.dtype.newbyteorder("<")), False, ()) + data)
            finally:
                zw.close()
        return {"files": [str(path)], "notes": notes}
