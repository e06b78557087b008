"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` + ``*.distcp``.

Ground truth: ``torch/distributed/checkpoint/metadata.py`` (``Metadata``,
``TensorStorageMetadata``, ``ChunkStorageMetadata``, ``BytesStorageMetadata``,
``MetadataIndex``), ``filesystem.py`` (``_StorageInfo``: relative_path, offset,
length; every item is a ``torch.save`` blob at that range of a ``.distcp``
file), ``default_planner.py`` (``_EmptyStateDictLoadPlanner``: the state dict
is rebuilt from the metadata in its order, nested along ``planner_data``) and
``_traverse.py`` (``set_element``); the oracle is
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``.

``.metadata`` is a pickle of those dataclasses: read by the restricted
unpickler, which records them inertly. A sharded tensor is the union of its
chunks (offsets + sizes): it becomes a ``ConcatTensor`` whose byte ranges are
the chunks' rows in row-major order, so writers copy them file to file and
nothing ever holds the whole tensor. Non-tensor items (epoch, optimizer
param_groups, scheduler state) are small ``torch.save`` blobs of plain values,
read with the torch reader's allowlist.
"""
from __future__ import annotations

import heapq
import itertools
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptconv import dtypes as _dt
from ckptconv.atomic import atomic_dir
from ckptconv.errors import FormatError, UnsupportedError
from ckptconv.pickle import Global, Pending, short_repr
from ckptconv.registry import Adapter
from ckptconv.paths import as_path
from ckptconv.streaming import OutFile
from ckptconv.tensor import (ArrayTensor, BufferSource, ConcatTensor, FileHandle, FileSource,
                             LazyTensor, StoredTensor, TensorRef, array_bytes, contiguous_strides,
                             human_bytes)
from ckptconv.zipstream import ZipWriter
from ckptconv.tree import Checkpoint, ObjectRecord

from .torch import TorchUnpickler, read_torch_blob, write_zip_archive
from .torch.unpickling import int_tuple, torch_dtype
from .torch.writer import PickleWriter

METADATA_FILE = ".metadata"
DISTCP_SUFFIX = ".distcp"

_META = "torch.distributed.checkpoint.metadata."
_OLD_META = "torch.distributed._shard.sharded_tensor.metadata."
# DCP's dataclasses: recorded inertly (``torch.distributed`` is otherwise refused)
DCP_RECORDS = frozenset({
    _META + "Metadata", _META + "TensorStorageMetadata", _META + "BytesStorageMetadata",
    _META + "ChunkStorageMetadata", _META + "TensorProperties", _META + "MetadataIndex",
    _META + "StorageMeta", "torch.distributed.checkpoint.filesystem._StorageInfo",
    _OLD_META + "TensorProperties",
})
# Enums pickled as ``REDUCE(cls, (value,))``
DCP_ENUMS = frozenset({_META + "_MEM_FORMAT_ENCODING", _OLD_META + "MEM_FORMAT_ENCODING"})
# StorageMeta.checkpoint_id is the path given to dcp.save: ``REDUCE(PosixPath, parts)``
_PATHS = frozenset({"pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath",
                    "pathlib.PureWindowsPath", "pathlib.Path"})
_RANK_FILE = re.compile(r"^__(\d+)_(\d+)\.distcp$")


class _IndexKey(Pending):
    """A ``MetadataIndex`` used as a dict key: becomes ``(fqn, offsets or None)``.

    (Recorded as an ``ObjectRecord`` every key would hash alike: building the
    storage map of 100,000 chunks would cost 10**10 comparisons.)"""

    def __init__(self, display: str):
        self.display = display
        self.key = None

    def build(self, state):
        if not isinstance(state, dict) or not isinstance(state.get("fqn"), str):
            raise FormatError(f"{self.display}: bad MetadataIndex {short_repr(state)}")
        offset = state.get("offset")
        self.key = (state["fqn"],
                    None if offset is None else int_tuple(offset, "offset", self.display))

    def value(self):
        if self.key is None:
            raise FormatError(f"{self.display}: MetadataIndex without its fields")
        return self.key


class _MetadataUnpickler(TorchUnpickler):
    """Torch's allowlist plus DCP's dataclasses as inert records."""

    def __init__(self, display: str):
        super().__init__(display, self._no_storages)

    def _no_storages(self, key, dtype, numel, untyped):
        raise FormatError(f"{self.display}: DCP metadata refers to a tensor storage '{key}'")

    def allowed_global(self, qualname: str) -> bool:
        return (qualname in DCP_RECORDS or qualname in DCP_ENUMS or qualname in _PATHS
                or super().allowed_global(qualname))

    def new_object(self, cls: Global, args: tuple, kwargs: dict | None = None):
        q = cls.qualname
        if q not in DCP_RECORDS:
            return super().new_object(cls, args, kwargs)
        if args or kwargs:
            raise FormatError(f"{self.display}: {q} built with arguments {short_repr(args)}")
        self.records.append(q)
        if q == _META + "MetadataIndex":
            return _IndexKey(self.display)
        return ObjectRecord(q, None, ())

    def call(self, func: Global, args: tuple, opcode: str):
        if func.qualname in DCP_ENUMS:
            self._nargs(func.qualname, args, 1)
            return ObjectRecord(func.qualname, None, args, kind="reduce")
        if func.qualname in _PATHS:  # a path is data, never opened
            if not all(isinstance(a, str) for a in args):
                raise FormatError(f"{self.display}: {func.qualname} of {short_repr(args)}")
            return ObjectRecord(func.qualname, None, args, kind="reduce")
        return super().call(func, args, opcode)


@dataclass
class TensorItem:
    """One tensor of the checkpoint: its full shape and the chunks that tile it."""

    fqn: str
    dtype: _dt.DType
    shape: tuple[int, ...]
    chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]   # (offsets, sizes)
    requires_grad: bool = False


@dataclass
class Location:
    relative_path: str
    offset: int
    length: int


@dataclass
class DcpMetadata:
    items: dict[str, TensorItem | None]     # fqn -> tensor, or None for a bytes item
    planner_data: dict[str, tuple] | None
    storage: dict[tuple, Location]          # (fqn, chunk offsets or None) -> range
    version: str | None


def _fields(rec: Any, cls: str, display: str) -> dict:
    if not isinstance(rec, ObjectRecord) or rec.cls.rsplit(".", 1)[-1] != cls:
        raise FormatError(f"{display}: expected a DCP {cls}, found {short_repr(rec)}")
    if rec.state is None:
        return {}
    if not isinstance(rec.state, dict):
        raise FormatError(f"{display}: DCP {cls} with state {short_repr(rec.state)}")
    return rec.state


def _nonneg(v, what: str, display: str) -> int:
    if type(v) is not int or v < 0:
        raise FormatError(f"{display}: {what} {short_repr(v)} is not a non-negative int")
    return v


def _tensor_item(fqn: str, rec, display: str) -> TensorItem:
    f = _fields(rec, "TensorStorageMetadata", display)
    where = f"{display}: tensor '{fqn}'"
    props = f.get("properties")
    if not isinstance(props, ObjectRecord) or props.cls.rsplit(".", 1)[-1] != "TensorProperties":
        raise FormatError(f"{where}: no TensorProperties")
    # __getstate__: (dtype, layout, requires_grad, memory format, pin_memory), torch 2.15
    # adds the saved tensor's strides (values are the same whatever the strides)
    if isinstance(props.state, tuple) and len(props.state) in (5, 6):
        dtype_g, layout, requires_grad = props.state[:3]
    elif isinstance(props.state, dict):
        dtype_g, layout = props.state.get("dtype"), props.state.get("layout")
        requires_grad = props.state.get("requires_grad", False)
    else:
        raise FormatError(f"{where}: bad TensorProperties {short_repr(props.state)}")
    if layout is not None and "strided" not in repr(layout):
        raise UnsupportedError(f"{where}: layout {short_repr(layout)} (only dense tensors)")
    dtype = torch_dtype(dtype_g, where)
    shape = int_tuple(f.get("size"), "size", where)
    chunks = []
    numel = 0
    for c in f.get("chunks") or []:
        cf = _fields(c, "ChunkStorageMetadata", where)
        offsets = int_tuple(cf.get("offsets"), "chunk offsets", where)
        sizes = int_tuple(cf.get("sizes"), "chunk sizes", where)
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise FormatError(f"{where}: chunk at {list(offsets)} of size {list(sizes)} does not "
                              f"fit in its shape {list(shape)}")
        chunks.append((offsets, sizes))
        p = 1
        for s in sizes:
            p *= s
        numel += p
    total = 1
    for s in shape:
        total *= s
    if numel != total:
        raise FormatError(f"{where}: its chunks hold {numel} elements, shape {list(shape)} "
                          f"has {total} (missing or overlapping chunks)")
    return TensorItem(fqn, dtype, shape, chunks, bool(requires_grad))


def read_metadata(folder: Path) -> DcpMetadata:
    """Parse ``folder/.metadata`` (never executing it)."""
    path = folder / METADATA_FILE
    display = f"{folder.name}/{METADATA_FILE}"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{display}: cannot read: {e.strerror}") from None
    root = _MetadataUnpickler(display).load(data)
    f = _fields(root, "Metadata", display)
    sdm = f.get("state_dict_metadata")
    if not isinstance(sdm, dict):
        raise FormatError(f"{display}: no state_dict_metadata")
    items: dict[str, TensorItem | None] = {}
    for fqn, rec in sdm.items():
        if not isinstance(fqn, str):
            raise FormatError(f"{display}: item name {short_repr(fqn)} is not a string")
        if isinstance(rec, ObjectRecord) and rec.cls.endswith(".BytesStorageMetadata"):
            items[fqn] = None
        else:
            items[fqn] = _tensor_item(fqn, rec, display)
    planner = f.get("planner_data")
    if planner is not None:
        if not isinstance(planner, dict) or not all(
                isinstance(p, tuple) and p and all(type(k) in (str, int) for k in p)
                for p in planner.values()):
            raise FormatError(f"{display}: planner_data is not a map of object paths")
    storage: dict[tuple, Location] = {}
    for key, info in (f.get("storage_data") or {}).items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise FormatError(f"{display}: storage key {short_repr(key)} is not a MetadataIndex")
        sf = _fields(info, "_StorageInfo", display)
        if sf.get("transform_descriptors"):
            raise UnsupportedError(f"{display}: item '{key[0]}' is stored through DCP transforms "
                                   f"{short_repr(sf['transform_descriptors'])}, which ckptconv "
                                   "does not read yet")
        rel = sf.get("relative_path")
        if not isinstance(rel, str) or not rel or rel.startswith("/") or \
                ".." in rel.replace("\\", "/").split("/"):
            raise FormatError(f"{display}: item '{key[0]}' is stored at {short_repr(rel)}, "
                              "outside the checkpoint folder")
        storage[key] = Location(rel, _nonneg(sf.get("offset"), "offset", display),
                                _nonneg(sf.get("length"), "length", display))
    version = f.get("version")
    return DcpMetadata(items, planner, storage, version if isinstance(version, str) else None)


def read_item(parent: FileHandle, loc: Location, what: str, allow_globals=()) -> Any:
    """One item: a ``torch.save`` blob at ``loc`` of a ``.distcp`` file."""
    if loc.offset + loc.length > parent.size:
        raise FormatError(f"{parent.display}: {what} needs {human_bytes(loc.length)} at "
                          f"offset {loc.offset}, file ends at {parent.size} (truncated?)")
    try:
        return read_torch_blob(parent, loc.offset, loc.length, allow_globals)[0]
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None


# --- assembling sharded tensors --------------------------------------------------

def chunk_runs(shape: tuple, offsets: tuple, sizes: tuple):
    """(element offset in the tensor, element offset in the chunk, length) of
    each contiguous run of a chunk, in row-major order of the tensor."""
    n = len(shape)
    if n == 0:
        yield 0, 0, 1
        return
    if any(s == 0 for s in sizes):
        return
    k = n - 1
    while k > 0 and sizes[k] == shape[k]:
        k -= 1  # dims after k are whole: a run spans them
    out_strides = contiguous_strides(shape)
    chunk_strides = contiguous_strides(sizes)
    run = sizes[k] * out_strides[k]
    base = sum(offsets[d] * out_strides[d] for d in range(k + 1))
    for index in itertools.product(*(range(sizes[d]) for d in range(k))):
        out = base + sum(i * out_strides[d] for d, i in enumerate(index))
        yield out, sum(i * chunk_strides[d] for d, i in enumerate(index)), run


def plan_tensor(item: TensorItem, chunk_refs: list[TensorRef], display: str) -> list:
    """The byte ranges of ``item`` in row-major order: every element covered
    by exactly one chunk, or a one-line error naming the first gap or overlap."""
    size = item.dtype.itemsize
    sources = []
    for ref in chunk_refs:
        if isinstance(ref, StoredTensor) and ref.is_contiguous and not ref.big_endian:
            sources.append((ref.source, ref.offset * size))
        else:  # a strided chunk (never written by torch itself): its bytes, in memory
            sources.append((BufferSource(array_bytes(ref.numpy())), 0))
    def tagged(i: int, offsets: tuple, sizes: tuple):
        for out, at, n in chunk_runs(item.shape, offsets, sizes):
            yield out, i, at, n

    runs = heapq.merge(*(tagged(i, o, s) for i, (o, s) in enumerate(item.chunks)))
    ranges = []
    pos = 0
    for out, i, at, n in runs:
        if out != pos:
            what = "overlap" if out < pos else f"leave elements {pos}..{out - 1} uncovered"
            raise FormatError(f"{display}: tensor '{item.fqn}': its chunks {what} "
                              f"(chunk {i} at {list(item.chunks[i][0])})")
        source, base = sources[i]
        ranges.append((source, base + at * size, n * size))
        pos += n
    numel = 1
    for s in item.shape:
        numel *= s
    if pos != numel:
        raise FormatError(f"{display}: tensor '{item.fqn}': its chunks cover {pos} of "
                          f"{numel} elements")
    return ranges


def set_element(root: dict, path: tuple, value: Any) -> None:
    """Put ``value`` at ``path`` (str keys make dicts, int keys lists), as
    ``torch.distributed.checkpoint._traverse.set_element`` does."""
    cur: Any = root
    for prev, key in zip(path, path[1:]):
        default: Any = {} if type(key) is str else []
        if isinstance(cur, dict):
            cur = cur.setdefault(prev, default)
        else:
            cur.extend([None] * (prev + 1 - len(cur)))
            if cur[prev] is None:
                cur[prev] = default
            cur = cur[prev]
        if not isinstance(cur, (dict, list)):
            raise FormatError(f"object path {path} runs through a {type(cur).__name__}")
    key = path[-1]
    if type(key) is int:
        if not isinstance(cur, list):
            raise FormatError(f"object path {path} indexes a {type(cur).__name__}")
        cur.extend([None] * (key + 1 - len(cur)))
    elif not isinstance(cur, dict):
        raise FormatError(f"object path {path} names a key of a list")
    cur[key] = value


# --- reading ---------------------------------------------------------------------

def read_dcp(folder: Path, allow_globals=()) -> Checkpoint:
    meta = read_metadata(folder)
    display = folder.name
    handles: dict[str, FileHandle] = {}

    def handle(rel: str) -> FileHandle:
        if rel not in handles:
            p = folder / rel
            if not p.is_file():
                raise FormatError(f"{display}: data file '{rel}' is missing")
            handles[rel] = FileHandle(p, f"{display}/{rel}")
        return handles[rel]

    def location(fqn: str, offsets) -> Location:
        loc = meta.storage.get((fqn, offsets))
        if loc is None:
            where = "" if offsets is None else f" (chunk at {list(offsets)})"
            raise FormatError(f"{display}: item '{fqn}'{where} has no place in any .distcp file")
        return loc

    tree: dict = {}
    chunk_counts: Counter = Counter()
    for fqn, item in meta.items.items():
        if item is None:
            loc = location(fqn, None)
            value = read_item(handle(loc.relative_path), loc, f"item '{fqn}'", allow_globals)
        else:
            refs = []
            for offsets, sizes in item.chunks:
                loc = location(fqn, offsets)
                ref = read_item(handle(loc.relative_path), loc, f"tensor '{fqn}'")
                if not isinstance(ref, TensorRef) or ref.shape != sizes or ref.dtype != item.dtype:
                    raise FormatError(
                        f"{display}: tensor '{fqn}' chunk at {list(offsets)} holds "
                        f"{short_repr(ref)}, expected {item.dtype.name}{list(sizes)}")
                refs.append(ref)
            chunk_counts[len(refs)] += 1
            value = ConcatTensor(item.dtype, item.shape,
                                 lambda item=item, refs=refs: plan_tensor(item, refs, display),
                                 what=f"{display}: tensor '{fqn}'")
        path = meta.planner_data.get(fqn) if meta.planner_data else None
        set_element(tree, path or (fqn,), value)

    ranks = sorted({int(m.group(1)) for m in map(_RANK_FILE.match, handles) if m})
    sharded = sum(n for c, n in chunk_counts.items() if c > 1)
    layout = {"files": sorted(handles), "ranks": len(ranks) or None,
              "tensors": sum(chunk_counts.values()), "sharded_tensors": sharded,
              "chunks_per_tensor": {str(c): n for c, n in sorted(chunk_counts.items())},
              "items": sum(1 for i in meta.items.values() if i is None),
              "version": meta.version}
    info = {
        "layout": (f"DCP, {len(ranks) or '?'} ranks, {len(handles)} files, "
                   f"{layout['tensors']} tensors ({sharded} sharded; chunks per tensor: "
                   + ", ".join(f"{c} x{n}" for c, n in sorted(chunk_counts.items()))
                   + f"), {layout['items']} other items"),
        "dcp": layout,
        "close": lambda: [h.close() for h in handles.values()],
    }
    return Checkpoint(tree, {}, "dcp", str(folder), info)


def verify_dcp(folder: Path, report) -> None:
    """``verify`` hook: every tensor's chunks tile it exactly once and every
    referenced byte range lies in its file (problems go to ``report.problems``,
    one line each)."""
    try:
        ck = read_dcp(folder)
    except FormatError as e:
        report.problems.append(" ".join(str(e).split()))
        return
    try:
        for name, ref in ck.unique_tensors().items():
            try:
                for source, offset, nbytes in ref.ranges:
                    report.count("chunk ranges")
                    if isinstance(source, FileSource) and \
                            source.offset + offset + nbytes > source.handle.size:
                        raise FormatError(
                            f"{source.handle.display}: tensor '{name}' needs "
                            f"{human_bytes(nbytes)} at offset {source.offset + offset}, "
                            f"file ends at {source.handle.size} (truncated?)")
                report.count("tensors tiled by their chunks")
            except FormatError as e:
                report.problems.append(" ".join(str(e).split()))
    finally:
        ck.close()


# --- writing ---------------------------------------------------------------------

DATA_FILE = "__0_0.distcp"


def _terminal(value: Any) -> bool:
    """Saved as one item (``_traverse.traverse_state_dict``): anything but a
    dict, or a list holding no tensor and no non-terminal container."""
    if isinstance(value, dict):
        return False
    if not isinstance(value, list):
        return True
    return not any(isinstance(v, TensorRef) or (isinstance(v, (dict, list)) and not _terminal(v))
                   for v in value)


def flatten_items(tree: Any) -> list[tuple[str, tuple, Any]]:
    """(fqn, object path, value) of every item, in the order DCP saves them."""
    if not isinstance(tree, dict):
        raise UnsupportedError(f"a DCP checkpoint is a dict at the top, not a "
                               f"{type(tree).__name__}")
    items: list[tuple[str, tuple, Any]] = []
    seen: set[str] = set()

    def walk(path: tuple, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(path + (str(k),), v)
        elif isinstance(value, TensorRef) or _terminal(value):
            fqn = ".".join(map(str, path))
            if fqn in seen:
                raise UnsupportedError(f"two items flatten to the DCP name '{fqn}'")
            seen.add(fqn)
            items.append((fqn, path, value))
        else:
            for i, v in enumerate(value):
                walk(path + (i,), v)

    for key, value in tree.items():
        walk((str(key),), value)
    return items


def _alone(ref: TensorRef) -> TensorRef:
    """The tensor as a plain tensor whose storage is just its bytes (DCP saves
    each item on its own: a view must not drag its whole storage along)."""
    if isinstance(ref, StoredTensor) and ref.is_contiguous and not ref.big_endian:
        return ConcatTensor(ref.dtype, ref.shape,
                            [(ref.source, ref.offset * ref.dtype.itemsize, ref.nbytes)])
    if isinstance(ref, ConcatTensor):
        return ConcatTensor(ref.dtype, ref.shape, lambda: ref.ranges)
    if isinstance(ref, ArrayTensor):
        return ConcatTensor(ref.dtype, ref.shape, [(BufferSource(array_bytes(ref.array)), 0,
                                                    ref.nbytes)])
    return LazyTensor(ref.dtype, ref.shape, ref.numpy)


def _record(cls: str, state: Any = None, args: tuple = (), kind: str = "newobj") -> ObjectRecord:
    return ObjectRecord(cls, state, args, kind)


def _size(shape: tuple) -> ObjectRecord:
    return _record("torch.Size", args=(tuple(shape),), kind="reduce")


def _tensor_metadata(ref: TensorRef) -> ObjectRecord:
    properties = _record(_META + "TensorProperties", (
        _record(f"torch.{ref.dtype.name}", kind="global"),
        _record("torch.serialization._get_layout", args=("torch.strided",), kind="reduce"),
        False,
        _record(_META + "_MEM_FORMAT_ENCODING", args=(0,), kind="reduce"),
        False))
    chunk = _record(_META + "ChunkStorageMetadata",
                    {"offsets": _size((0,) * len(ref.shape)), "sizes": _size(ref.shape)})
    return _record(_META + "TensorStorageMetadata",
                   {"properties": properties, "size": _size(ref.shape), "chunks": [chunk]})


def write_dcp(ckpt: Checkpoint, folder: Path, force: bool = False) -> dict:
    """One rank's DCP folder: every item a ``torch.save`` blob in
    ``__0_0.distcp`` (tensors as one chunk each), and ``.metadata`` as
    ``dcp.save`` writes it (``planner_data`` keeps the nesting)."""
    items = flatten_items(ckpt.tree)
    state_dict_metadata: dict = {}
    storage_data: dict = {}
    planner_data: dict = {}
    with atomic_dir(folder, force) as tmp:
        with OutFile(tmp / DATA_FILE) as out:
            for fqn, path, value in items:
                start = out.pos
                zw = ZipWriter(out=out)
                tensor = isinstance(value, TensorRef)
                write_zip_archive(zw, Checkpoint(_alone(value) if tensor else value))
                zw.close()
                state_dict_metadata[fqn] = _tensor_metadata(value) if tensor else \
                    _record(_META + "BytesStorageMetadata")
                index = _record(_META + "MetadataIndex", {
                    "fqn": fqn, "offset": _size((0,) * len(value.shape)) if tensor else None,
                    "index": 0 if tensor else None})
                storage_data[index] = _record(
                    "torch.distributed.checkpoint.filesystem._StorageInfo",
                    {"relative_path": DATA_FILE, "offset": start, "length": out.pos - start})
                planner_data[fqn] = path
        metadata = _record(_META + "Metadata", {
            "state_dict_metadata": state_dict_metadata, "planner_data": planner_data,
            "storage_data": storage_data, "storage_meta": None, "version": "1.0.0"})
        pw = PickleWriter()
        pw.w(b"\x80\x02")
        pw.value(metadata, None)
        pw.w(b".")
        (tmp / METADATA_FILE).write_bytes(pw.buf.getvalue())
    return {"files": [str(folder)], "notes": []}


class DcpAdapter(Adapter):
    name = "dcp"

    def read(self, path: Path, allow_globals=(), **options) -> Checkpoint:
        return read_dcp(as_path(path), allow_globals or ())

    def verify(self, path: Path, **options):
        """``ckptconv verify``: the checks below, then every tensor read in full."""
        from ckptconv.integrity import verify_checkpoint

        return verify_checkpoint(path, self.name, self.check_integrity, **options)

    def check_integrity(self, path: Path, report) -> None:
        verify_dcp(as_path(path), report)

    def layout(self, ckpt: Checkpoint) -> dict:
        return dict(ckpt.info.get("dcp", {}))

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False, **options) -> dict:
        return write_dcp(ckpt, as_path(path), force)
