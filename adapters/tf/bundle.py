"""Reading a tensor bundle: locating the prefix, the index, lazy tensors
(checked against their crc32c on request), partitioned variables, and
``verify_bundle``.

Source of truth: ``tensorflow/core/util/tensor_bundle/tensor_bundle.{h,cc}``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from ckptconv._lazy import np

from ckptconv import dtypes as _dt
from ckptconv.errors import FormatError, IntegrityError, UnsupportedError
from ckptconv.tensor import (CHUNK_BYTES, FileHandle, FileSource, StoredTensor, TensorRef,
                             human_bytes)
from ckptconv.tree import Checkpoint, ObjectRecord, tree_from_metadata
from ckptconv.paths import as_path

from .._io import DecodeError, crc32c, unmask_crc
from ..sniffers import find_prefix
from .object_graph import OBJECT_GRAPH_TENSOR, object_paths
from .records import (DT_STRING, DT_VARIANT, HEADER_KEY, TENSOR_BUNDLE_VERSION,
                      TF_DTYPE_NAMES, TF_DTYPES, TF_QUANTIZED, BundleEntry, data_filename,
                      parse_entry, parse_header, slice_key, strings_from, variant_crc)
from .table import METADATA_KEY, read_table_and_meta

LEGACY_METADATA_TENSOR = "_CKPTCONV_METADATA"   # where ckptconv 0.1 kept its metadata

RAW_ENTRY_CLASS = "tensorflow.BundleEntry"   # tensors of types ckptconv has no dtype for

MAX_STRING_TENSOR = 256 << 20    # DT_STRING tensors are decoded eagerly
MAX_RAW_ENTRY = 64 << 20


# --- tensors ----------------------------------------------------------------------

class CheckedTensor(StoredTensor):
    """A stored tensor whose bytes are checked against the bundle's crc32c as
    they are read (``read(..., verify=True)``); never copied blind."""

    def __init__(self, *args, crc: int, name: str, **kw):
        super().__init__(*args, **kw)
        self.expected_crc = crc
        self.name = name
        self._ok = False

    def file_span(self):
        return None if not self._ok else super().file_span()

    def _fail(self, got: int) -> None:
        h = self.source.handle
        raise IntegrityError(f"{h.display}: tensor '{self.name}' fails its crc32c at offset "
                             f"{self.source.offset} (stored {self.expected_crc:08x}, "
                             f"computed {got:08x})")

    def _check(self) -> None:
        if not self._ok:
            got = _crc_of_range(self.source.handle, self.source.offset, self.source.nbytes)
            if got != self.expected_crc:
                self._fail(got)
            self._ok = True

    def numpy(self) -> np.ndarray:
        self._check()
        return super().numpy()

    def iter_bytes(self, chunk: int = CHUNK_BYTES):
        if self._ok or self.big_endian:
            self._check()
            yield from super().iter_bytes(chunk)
            return
        crc = 0
        for piece in super().iter_bytes(chunk):     # contiguous: exactly the file bytes
            crc = crc32c(piece, crc)
            yield piece
        if crc != self.expected_crc:
            self._fail(crc)
        self._ok = True


class SlicedTensor(TensorRef):
    """A partitioned variable: the full tensor assembled from its stored slices."""

    def __init__(self, dtype, shape, parts: list[tuple[list[tuple[int, int]], TensorRef]]):
        self.dtype = _dt.get(dtype)
        self.shape = tuple(shape)
        self.parts = parts

    def _row_parts(self):
        """The parts in order when they split dim 0 only (then bytes just concatenate)."""
        if not self.shape:
            return None
        rows = []
        for ext, ref in self.parts:
            if any(length != -1 and not (s == 0 and length == dim)
                   for (s, length), dim in zip(ext[1:], self.shape[1:])):
                return None
            s, length = ext[0]
            rows.append((s, self.shape[0] if length == -1 else length, ref))
        rows.sort(key=lambda r: r[0])
        pos = 0
        for s, length, _ in rows:
            if s != pos:
                return None
            pos += length
        return [r[2] for r in rows] if pos == self.shape[0] else None

    def numpy(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=_dt.numpy_dtype(self.dtype))
        for ext, ref in self.parts:
            idx = tuple(slice(s, dim if n == -1 else s + n)
                        for (s, n), dim in zip(ext, self.shape))
            out[idx] = ref.numpy()
        return out

    def iter_bytes(self, chunk: int = CHUNK_BYTES):
        rows = self._row_parts()
        if rows is None:
            yield from super().iter_bytes(chunk)
            return
        for ref in rows:
            yield from ref.iter_bytes(chunk)


def _crc_of_range(handle: FileHandle, offset: int, size: int) -> int:
    crc = 0
    for pos in range(offset, offset + size, CHUNK_BYTES):
        crc = crc32c(handle.pread(pos, min(CHUNK_BYTES, offset + size - pos)), crc)
    return crc


def _nest(items: list, shape: tuple[int, ...]):
    """Flat C-order list -> nested lists of ``shape`` (a scalar for shape ())."""
    if not shape:
        return items[0]
    if len(shape) == 1:
        return list(items)
    step = len(items) // shape[0] if shape[0] else 0
    return [_nest(items[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


class Bundle:
    """A parsed index: header, entries by key, and handles to the data shards."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.index = FileHandle(prefix + ".index")
        self.display = self.index.display
        pairs, meta = read_table_and_meta(self.index)
        self.metadata_json = meta.get(METADATA_KEY)
        if not pairs or pairs[0][0] != HEADER_KEY:
            raise FormatError(f"{self.display}: no bundle header entry (key \"\")")
        try:
            self.header = parse_header(pairs[0][1])
        except DecodeError as e:
            raise FormatError(f"{self.display}: bad bundle header: {e}") from None
        h = self.header
        if h.min_consumer > TENSOR_BUNDLE_VERSION or TENSOR_BUNDLE_VERSION in h.bad_consumers:
            raise FormatError(f"{self.display}: written by a newer TensorFlow (bundle version "
                              f"{h.producer}, needs a reader >= {h.min_consumer})")
        if h.num_shards < 1 and len(pairs) > 1:
            raise FormatError(f"{self.display}: header says {h.num_shards} data shards")
        self.entries: dict[bytes, BundleEntry] = {}
        for key, value in pairs[1:]:
            try:
                self.entries[key] = parse_entry(key, value)
            except DecodeError as e:
                raise FormatError(f"{self.display}: entry {key[:80]!r}: {e}") from None
        self._shards: dict[int, FileHandle] = {}

    def shard(self, k: int, name: str) -> FileHandle:
        if k >= self.header.num_shards:
            raise FormatError(f"{self.display}: tensor '{name}' is in shard {k}, header says "
                              f"{self.header.num_shards} shards")
        if k not in self._shards:
            path = data_filename(self.prefix, k, self.header.num_shards)
            if not as_path(path).is_file():
                raise FormatError(f"{os.path.basename(path)}: data shard is missing "
                                  f"(tensor '{name}' lives there)")
            self._shards[k] = FileHandle(path)
        return self._shards[k]

    def source(self, e: BundleEntry) -> FileSource:
        handle = self.shard(e.shard_id, e.name)
        src = FileSource(handle, e.offset, e.size, f"tensor '{e.name}'")
        src.check()
        return src

    def raw(self, e: BundleEntry, limit: int) -> bytes:
        if e.size > limit:
            raise UnsupportedError(f"{self.display}: tensor '{e.name}' "
                                   f"({TF_DTYPE_NAMES.get(e.dtype, e.dtype)}) holds "
                                   f"{human_bytes(e.size)}, more than ckptconv decodes eagerly")
        src = self.source(e)
        return src.read(0, e.size) if e.size else b""

    def full_entries(self) -> list[BundleEntry]:
        """Entries a user names: not the header, not the stored slices."""
        return [e for k, e in self.entries.items() if not k.startswith(b"\x00")]

    def strings(self, e: BundleEntry) -> list[bytes]:
        where = f"{self.display}: tensor '{e.name}'"
        if e.size < e.numel:
            raise FormatError(f"{where}: {e.size} bytes cannot hold {e.numel} strings")
        values, crc = strings_from(self.raw(e, MAX_STRING_TENSOR), e.numel,
                                    self.header.big_endian, where)
        if crc != unmask_crc(e.crc32c):
            raise IntegrityError(f"{where}: fails its crc32c (stored {unmask_crc(e.crc32c):08x}, "
                                 f"computed {crc:08x})")
        if len(values) != e.numel:
            raise FormatError(f"{where}: holds {len(values)} strings, shape {list(e.shape)} "
                              f"needs {e.numel}")
        return values

    def tensor(self, e: BundleEntry, verify: bool = False) -> TensorRef:
        dtype = _entry_dtype(e)
        if e.slices:
            return self._sliced(e, dtype, verify)
        expected = e.numel * _dt.get(dtype).itemsize
        if e.size != expected:
            raise FormatError(f"{self.display}: tensor '{e.name}' {dtype}{list(e.shape)} needs "
                              f"{expected} bytes, its entry says {e.size}")
        src = self.source(e)
        if verify:
            return CheckedTensor(dtype, e.shape, src, big_endian=self.header.big_endian,
                                 crc=unmask_crc(e.crc32c), name=e.name)
        return StoredTensor(dtype, e.shape, src, big_endian=self.header.big_endian)

    def _sliced(self, e: BundleEntry, dtype: str, verify: bool) -> SlicedTensor:
        parts, volume = [], 0
        for ext in e.slices:
            if len(ext) != len(e.shape):
                raise FormatError(f"{self.display}: tensor '{e.name}': slice rank {len(ext)} "
                                  f"does not match shape {list(e.shape)}")
            for (s, n), dim in zip(ext, e.shape):
                if s < 0 or (n != -1 and (n < 0 or s + n > dim)) or (n == -1 and s != 0):
                    raise FormatError(f"{self.display}: tensor '{e.name}': slice {ext} is outside "
                                      f"shape {list(e.shape)}")
            key = slice_key(e.key, ext)
            part = self.entries.get(key)
            if part is None:
                raise FormatError(f"{self.display}: tensor '{e.name}': stored slice {ext} is missing")
            if part.dtype != e.dtype:
                raise FormatError(f"{self.display}: tensor '{e.name}': slice has another dtype")
            want = tuple(dim if n == -1 else n for (_, n), dim in zip(ext, e.shape))
            if part.shape != want:
                raise FormatError(f"{self.display}: tensor '{e.name}': slice {ext} stored with "
                                  f"shape {list(part.shape)}")
            ref = self.tensor(BundleEntry(e.key + b" (slice)", part.dtype, part.shape,
                                          part.shard_id, part.offset, part.size, part.crc32c),
                              verify)
            parts.append((ext, ref))
            volume += math.prod(want)
        if volume != e.numel:
            raise FormatError(f"{self.display}: tensor '{e.name}': its slices cover {volume} of "
                              f"{e.numel} elements")
        return SlicedTensor(dtype, e.shape, parts)


def _entry_dtype(e: BundleEntry) -> str:
    if e.dtype in TF_DTYPES:
        return TF_DTYPES[e.dtype]
    if e.dtype in TF_QUANTIZED:
        return TF_QUANTIZED[e.dtype][1]
    raise UnsupportedError(f"tensor '{e.name}' has TF dtype "
                           f"{TF_DTYPE_NAMES.get(e.dtype, e.dtype)}, which ckptconv cannot hold")


def _metadata(raw: bytes | None, display: str, where: str) -> dict:
    if raw is None:
        return {}
    try:
        metadata = json.loads(raw.decode("utf-8"))
        if not isinstance(metadata, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise FormatError(f"{display}: bad {where}: {err}") from None
    return metadata


def read_bundle(path: str | os.PathLike, verify: bool = False) -> Checkpoint:
    """A lazy Checkpoint of the bundle at ``path`` (prefix, file or folder)."""
    prefix = find_prefix(path)
    b = Bundle(prefix)
    flat: dict[str, Any] = {}
    info: dict[str, Any] = {"tf_prefix": os.path.basename(prefix),
                            "data_shards": b.header.num_shards}
    if b.header.big_endian:
        info["byte_order"] = "big-endian"
    metadata = _metadata(b.metadata_json, b.display, "metaindex entry 'ckptconv.metadata'")
    quantized: dict[str, str] = {}
    partitioned: dict[str, int] = {}
    for e in b.full_entries():
        name = e.name
        if e.dtype == DT_STRING:
            values = b.strings(e)
            if name == LEGACY_METADATA_TENSOR and not e.shape:   # ckptconv 0.1 wrote it here
                metadata.update(_metadata(values[0], b.display, LEGACY_METADATA_TENSOR))
                continue
            flat[name] = _nest(values, e.shape) if (values or not e.shape) else []
            continue
        if e.dtype in TF_DTYPES or e.dtype in TF_QUANTIZED:
            flat[name] = b.tensor(e, verify)
            if e.dtype in TF_QUANTIZED:
                quantized[name] = TF_QUANTIZED[e.dtype][0]
            if e.slices:
                partitioned[name] = len(e.slices)
            continue
        # resource/variant/types without a ckptconv dtype: recorded, bytes kept
        raw = b.raw(e, MAX_RAW_ENTRY)
        if e.dtype == DT_VARIANT:
            got = variant_crc(raw, e.numel, f"{b.display}: tensor '{name}'")
        else:
            got = crc32c(raw)
        if got != unmask_crc(e.crc32c):
            raise IntegrityError(f"{b.display}: tensor '{name}' fails its crc32c")
        flat[name] = ObjectRecord(RAW_ENTRY_CLASS, {
            "dtype": TF_DTYPE_NAMES.get(e.dtype, str(e.dtype)), "dtype_enum": e.dtype,
            "shape": list(e.shape), "crc32c": e.crc32c, "data": raw})
    if quantized:
        info["tf_dtypes"] = quantized
    if partitioned:
        info["partitioned"] = partitioned
    graph = flat.get(OBJECT_GRAPH_TENSOR)
    if isinstance(graph, bytes):
        info["checkpoint_kind"] = "TF2 object-based (tf.train.Checkpoint)"
        try:
            paths, var_names = object_paths(graph)
        except DecodeError as err:
            raise FormatError(f"{b.display}: bad {OBJECT_GRAPH_TENSOR}: {err}") from None
        info["object_paths"] = paths
        if var_names:
            info["variable_names"] = var_names
    else:
        info["checkpoint_kind"] = "name-based (TF1 Saver style)"
    md = {str(k): str(v) for k, v in metadata.items()}
    tree, md = tree_from_metadata(flat, md, b.display, info)
    return Checkpoint(tree, md, "tf", prefix, info)


# --- verification ---------------------------------------------------------------------

def verify_bundle(path: str | os.PathLike) -> list[str]:
    """Check every tensor's bytes against its crc32c (and sizes, shards,
    slices). Returns one line per problem; an empty list means all is well."""
    return check_bundle(path)[0]


def check_bundle(path: str | os.PathLike) -> tuple[list[str], int]:
    """``verify_bundle``'s problems and the number of entries checked."""
    try:
        b = Bundle(find_prefix(path))
    except (FormatError, IntegrityError) as e:
        return [str(e)], 0
    problems = []
    for e in b.entries.values():
        name = e.name if not e.key.startswith(b"\x00") else f"slice {e.key[:60]!r}"
        if e.slices:
            try:
                b.tensor(e)
            except (FormatError, UnsupportedError) as err:
                problems.append(str(err))
            continue
        try:
            handle = b.shard(e.shard_id, name)
            FileSource(handle, e.offset, e.size, f"tensor '{name}'").check()
            if e.dtype == DT_STRING:
                b.strings(e)
                continue
            if e.dtype == DT_VARIANT:
                got = variant_crc(b.raw(e, MAX_RAW_ENTRY), e.numel, f"tensor '{name}'")
            else:
                if e.dtype in TF_DTYPES or e.dtype in TF_QUANTIZED:
                    b.tensor(e)                       # size agrees with dtype and shape
                got = _crc_of_range(handle, e.offset, e.size)
            if got != unmask_crc(e.crc32c):
                problems.append(f"{handle.display}: tensor '{name}' fails its crc32c at offset "
                                f"{e.offset} (stored {unmask_crc(e.crc32c):08x}, computed {got:08x})")
        except (FormatError, IntegrityError, UnsupportedError) as err:
            problems.append(str(err))
    return problems, len(b.entries)


