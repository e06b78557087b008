"""TensorFlow checkpoints (the "tensor bundle" format), read and written
without TensorFlow.

A checkpoint is a *prefix* ``P``: ``P.index`` is a LevelDB-style SSTable
mapping tensor names to ``BundleEntryProto`` records (key ``""`` holds the
``BundleHeaderProto``), and ``P.data-0000K-of-0000N`` hold the raw bytes.
Sources of truth, all in tensorflow/tensorflow:

- ``core/util/tensor_bundle/tensor_bundle.{h,cc}`` and ``tensor_bundle.proto``
  (entries, shards, string tensor layout, masked crc32c of every tensor);
- ``core/lib/io/{table_builder,block_builder,format,block}.cc`` (SSTable:
  prefix-compressed keys with restart points, 5-byte block trailer of
  compression type + masked crc32c, 48-byte footer with the metaindex and
  index block handles and the magic 0xdb4775248b80fb57);
- ``core/util/saved_tensor_slice_util.cc`` + ``core/lib/strings/ordered_code.cc``
  (keys of the slices of partitioned variables);
- ``core/protobuf/trackable_object_graph.proto`` (TF2 object-based
  checkpoints store it serialized as the DT_STRING ``_CHECKPOINTABLE_OBJECT_GRAPH``);
- ``core/framework/types.proto`` (DataType numbers).

The tree of a TF checkpoint is a flat dict: stored name -> TensorRef, and
stored name -> bytes (or nested lists of bytes) for DT_STRING tensors. The
writer keeps ckptconv's tree and metadata in the string tensor
``_CKPTCONV_METADATA`` (TensorFlow ignores tensors nobody asks for).
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ckptconv._lazy import np

from ckptconv import dtypes as _dt
from ckptconv.atomic import atomic_files
from ckptconv.errors import FormatError, IntegrityError, UnsupportedError
from ckptconv.registry import Adapter
from ckptconv.streaming import PARALLEL_CRC_MIN, OutFile, crc_of_span
from ckptconv.tensor import (CHUNK_BYTES, FileHandle, FileSource, StoredTensor, TensorRef,
                             human_bytes)
from ckptconv.tree import (TREE_KEY, Checkpoint, ObjectRecord, iter_tensors,
                           tree_from_metadata, tree_to_metadata)

from .sniffers import FOOTER_SIZE, TABLE_MAGIC, find_prefix
from ._io import (DecodeError, bytes_value, crc32c, encode_varint, field_bytes, field_fixed32,
                  field_varint, fixed32_value, iter_fields, mask_crc, read_varint,
                  snappy_decompress, unmask_crc, varint_value)

# --- TensorFlow DataType numbers (core/framework/types.proto) -------------------

DT_STRING, DT_RESOURCE, DT_VARIANT = 7, 20, 21

#: TF DataType number -> ckptconv canonical dtype name (every numeric TF dtype
#: ckptconv has a name for; TF stores int4/uint4 one element per byte, as ml_dtypes).
TF_DTYPES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
    8: "complex64", 9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16",
    18: "complex128", 19: "float16", 22: "uint32", 23: "uint64",
    24: "float8_e5m2", 25: "float8_e4m3fn", 26: "float8_e4m3fnuz", 28: "float8_e5m2fnuz",
    29: "int4", 30: "uint4",
}
#: Quantized TF types read as their storage integer type; the TF name is kept
#: in ``Checkpoint.info["tf_dtypes"]`` so a TF -> TF conversion restores it.
TF_QUANTIZED: dict[int, tuple[str, str]] = {
    11: ("qint8", "int8"), 12: ("quint8", "uint8"), 13: ("qint32", "int32"),
    15: ("qint16", "int16"), 16: ("quint16", "uint16"),
}
TF_DTYPE_NAMES = {
    0: "invalid", 7: "string", 20: "resource", 21: "variant", 27: "float8_e4m3b11fnuz",
    31: "int2", 32: "uint2", 33: "float4_e2m1fn",
}
_CANON_TO_TF = {v: k for k, v in TF_DTYPES.items()}
_QUANT_BY_NAME = {q: (num, store) for num, (q, store) in TF_QUANTIZED.items()}

HEADER_KEY = b""
METADATA_TENSOR = "_CKPTCONV_METADATA"
OBJECT_GRAPH_TENSOR = "_CHECKPOINTABLE_OBJECT_GRAPH"
RAW_ENTRY_CLASS = "tensorflow.BundleEntry"   # tensors of types ckptconv has no dtype for

# --- SSTable constants (core/lib/io/format.h, table_options.h) ------------------

BLOCK_TRAILER = 5                # compression type byte + masked crc32c
NO_COMPRESSION, SNAPPY = 0, 1
BLOCK_SIZE = 262144              # TF's table::Options default
RESTART_INTERVAL = 16
MAX_STRING_TENSOR = 256 << 20    # DT_STRING tensors are decoded eagerly
MAX_RAW_ENTRY = 64 << 20

def data_filename(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


# --- SSTable reading ----------------------------------------------------------------

def _decode_handle(buf, pos: int, end: int) -> tuple[int, int, int]:
    off, pos = read_varint(buf, pos, end)
    size, pos = read_varint(buf, pos, end)
    return off, size, pos


def _read_block(data: memoryview, off: int, size: int, limit: int, what: str,
                display: str) -> memoryview:
    """A block's contents after its trailer is checked (and snappy undone)."""
    if off + size + BLOCK_TRAILER > limit:
        raise FormatError(f"{display}: bad block handle at offset {off} ({what} of {size} bytes "
                          f"runs past the table end at {limit}; truncated?)")
    body = data[off:off + size + 1]
    stored = struct.unpack_from("<I", data, off + size + 1)[0]
    if crc32c(body) != unmask_crc(stored):
        raise IntegrityError(f"{display}: {what} at offset {off} fails its crc32c "
                             f"(corrupt index)")
    kind = data[off + size]
    if kind == NO_COMPRESSION:
        return data[off:off + size]
    if kind == SNAPPY:
        try:
            return memoryview(snappy_decompress(data[off:off + size], max_size=1 << 30))
        except DecodeError as e:
            raise FormatError(f"{display}: {what} at offset {off}: bad snappy data: {e}") from None
    raise FormatError(f"{display}: {what} at offset {off} has unknown compression type {kind}")


def _block_entries(block: memoryview, what: str, display: str) -> Iterator[tuple[bytes, memoryview]]:
    """(key, value) pairs of one block: prefix-compressed keys, restart array."""
    n = len(block)
    if n < 4:
        raise FormatError(f"{display}: {what} is too short ({n} bytes)")
    restarts = struct.unpack_from("<I", block, n - 4)[0]
    end = n - 4 - 4 * restarts
    if restarts == 0 or end < 0:
        raise FormatError(f"{display}: {what} has a bad restart count {restarts}")
    pos, key = 0, b""
    try:
        while pos < end:
            shared, pos = read_varint(block, pos, end)
            unshared, pos = read_varint(block, pos, end)
            vlen, pos = read_varint(block, pos, end)
            if shared > len(key) or pos + unshared + vlen > end:
                raise DecodeError(f"entry at offset {pos} runs past the block")
            key = key[:shared] + bytes(block[pos:pos + unshared])
            pos += unshared
            yield key, block[pos:pos + vlen]
            pos += vlen
    except DecodeError as e:
        raise FormatError(f"{display}: {what}: corrupt entry: {e}") from None


def read_table(handle: FileHandle) -> list[tuple[bytes, memoryview]]:
    """Every (key, value) of an SSTable file, in key order."""
    display = handle.display
    if handle.size < FOOTER_SIZE:
        raise FormatError(f"{display}: truncated index ({handle.size} bytes, a table footer "
                          f"alone is {FOOTER_SIZE})")
    data = memoryview(handle.pread(0, handle.size, "index"))
    limit = handle.size - FOOTER_SIZE
    if struct.unpack_from("<Q", data, handle.size - 8)[0] != TABLE_MAGIC:
        raise FormatError(f"{display}: not a TensorFlow checkpoint index (bad table magic; "
                          f"truncated or not an SSTable)")
    try:
        _, _, pos = _decode_handle(data, limit, handle.size - 8)       # metaindex: unused
        index_off, index_size, _ = _decode_handle(data, pos, handle.size - 8)
    except DecodeError:
        raise FormatError(f"{display}: bad block handle in the table footer at offset {limit}") from None
    index = _read_block(data, index_off, index_size, limit, "index block", display)
    out: list[tuple[bytes, memoryview]] = []
    for _, hv in _block_entries(index, "index block", display):
        try:
            off, size, _ = _decode_handle(hv, 0, len(hv))
        except DecodeError:
            raise FormatError(f"{display}: bad block handle in the index block") from None
        block = _read_block(data, off, size, limit, "data block", display)
        for key, value in _block_entries(block, f"data block at offset {off}", display):
            if out and key <= out[-1][0]:
                raise FormatError(f"{display}: keys out of order at {key[:60]!r} (corrupt index)")
            out.append((key, value))
    return out


# --- protobuf records ---------------------------------------------------------------

@dataclass
class BundleEntry:
    """One ``BundleEntryProto``: where a tensor's bytes are and their checksum."""

    key: bytes
    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0                       # masked, as stored
    slices: list[list[tuple[int, int]]] = field(default_factory=list)  # (start, length|-1)

    @property
    def name(self) -> str:
        return self.key.decode("utf-8", "surrogateescape")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _parse_shape(buf) -> tuple[int, ...]:
    dims = []
    for f, w, v in iter_fields(buf):
        if f == 2:
            size = 0
            for f2, w2, v2 in iter_fields(bytes_value(f, w, v)):
                if f2 == 1:
                    size = varint_value(f2, w2, v2)
            dims.append(size)
        elif f == 3 and varint_value(f, w, v):
            raise DecodeError("tensor shape of unknown rank")
    if any(d < 0 for d in dims):
        raise DecodeError(f"tensor shape {dims} has an unknown or negative dimension")
    return tuple(dims)


def _parse_slice(buf) -> list[tuple[int, int]]:
    extents = []
    for f, w, v in iter_fields(buf):
        if f == 1:
            start, length = 0, -1          # an extent without length covers the whole dim
            for f2, w2, v2 in iter_fields(bytes_value(f, w, v)):
                if f2 == 1:
                    start = varint_value(f2, w2, v2)
                elif f2 == 2:
                    length = varint_value(f2, w2, v2)
            extents.append((start, length))
    return extents


def parse_entry(key: bytes, buf) -> BundleEntry:
    e = BundleEntry(key)
    for f, w, v in iter_fields(buf):
        if f == 1:
            e.dtype = varint_value(f, w, v, signed=False)
        elif f == 2:
            e.shape = _parse_shape(bytes_value(f, w, v))
        elif f == 3:
            e.shard_id = varint_value(f, w, v)
        elif f == 4:
            e.offset = varint_value(f, w, v)
        elif f == 5:
            e.size = varint_value(f, w, v)
        elif f == 6:
            e.crc32c = fixed32_value(f, w, v)
        elif f == 7:
            e.slices.append(_parse_slice(bytes_value(f, w, v)))
    if e.shard_id < 0 or e.offset < 0 or e.size < 0:
        raise DecodeError(f"negative shard, offset or size ({e.shard_id}, {e.offset}, {e.size})")
    return e


def encode_entry(e: BundleEntry) -> bytes:
    shape = b"".join(field_bytes(2, field_varint(1, d) if d else b"") for d in e.shape)
    out = field_varint(1, e.dtype) + field_bytes(2, shape)
    for num, val in ((3, e.shard_id), (4, e.offset), (5, e.size)):
        if val:
            out += field_varint(num, val)
    if e.crc32c:
        out += field_fixed32(6, e.crc32c)
    for sl in e.slices:
        ext = b"".join(field_bytes(1, (field_varint(1, s) if s else b"")
                                   + (field_varint(2, n) if n >= 0 else b"")) for s, n in sl)
        out += field_bytes(7, ext)
    return out


@dataclass
class BundleHeader:
    num_shards: int = 0
    big_endian: bool = False
    producer: int = 0
    min_consumer: int = 0
    bad_consumers: tuple[int, ...] = ()


TENSOR_BUNDLE_VERSION = 1   # kTensorBundleVersion


def parse_header(buf) -> BundleHeader:
    h = BundleHeader()
    bad = []
    for f, w, v in iter_fields(buf):
        if f == 1:
            h.num_shards = varint_value(f, w, v)
        elif f == 2:
            v = varint_value(f, w, v)
            if v not in (0, 1):
                raise DecodeError(f"unknown endianness {v}")
            h.big_endian = v == 1
        elif f == 3:
            for f2, w2, v2 in iter_fields(bytes_value(f, w, v)):
                if f2 == 1:
                    h.producer = varint_value(f2, w2, v2)
                elif f2 == 2:
                    h.min_consumer = varint_value(f2, w2, v2)
                elif f2 == 3 and w2 == 0:
                    bad.append(varint_value(f2, w2, v2))
    h.bad_consumers = tuple(bad)
    return h


# --- ordered-code keys of tensor slices (saved_tensor_slice_util.cc) -----------------

def _ordered_num(v: int) -> bytes:
    """OrderedCode::WriteNumIncreasing: length byte then big-endian value."""
    body = v.to_bytes((v.bit_length() + 7) // 8, "big") if v else b""
    return bytes([len(body)]) + body


def _ordered_signed(v: int) -> bytes:
    """OrderedCode::WriteSignedNumIncreasing."""
    x = ~v if v < 0 else v
    if x < 64:
        return bytes([(0x80 ^ v) & 0xFF])
    n = x.bit_length() // 7 + 1                     # kBitsToLength
    buf = bytearray((v & ((1 << 80) - 1)).to_bytes(10, "big"))[10 - n:]
    header = {2: (0xC0, 0), 3: (0xE0, 0), 4: (0xF0, 0), 5: (0xF8, 0), 6: (0xFC, 0),
              7: (0xFE, 0), 8: (0xFF, 0), 9: (0xFF, 0x80), 10: (0xFF, 0xC0)}[n]
    buf[0] ^= header[0]
    buf[1] ^= header[1]
    return bytes(buf)


def _escape_ordered(b: bytes) -> bytearray:
    out = bytearray()
    for c in b:
        if c == 0:
            out += b"\x00\xff"
        elif c == 0xFF:
            out += b"\xff\x00"
        else:
            out.append(c)
    return out


def slice_key(name: bytes, extents: list[tuple[int, int]]) -> bytes:
    """checkpoint::EncodeTensorNameSlice: the key a stored slice lives under."""
    out = _ordered_num(0) + bytes(_escape_ordered(name)) + b"\x00\x01" + _ordered_num(len(extents))
    for start, length in extents:
        out += _ordered_signed(start) + _ordered_signed(length)
    return out


# --- reading ------------------------------------------------------------------------

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


def _strings_from(raw: bytes, numel: int, big_endian: bool, where: str) -> tuple[list[bytes], int]:
    """Decode a DT_STRING tensor's bytes; returns (strings, unmasked crc32c).

    Layout: ``[varint64 len]*N [u32 masked crc of the lengths] [bytes]*N``; the
    crc covers each length as u32 (u64 when it does not fit), the raw length
    checksum, then the string bytes.
    """
    if not raw:
        return [], 0
    mv = memoryview(raw)
    pos, crc, lengths = 0, 0, []
    order = ">" if big_endian else "<"
    try:
        for _ in range(numel):
            n, pos = read_varint(mv, pos)
            lengths.append(n)
            crc = crc32c(struct.pack(order + ("I" if n <= 0xFFFFFFFF else "Q"), n), crc)
    except DecodeError as e:
        raise FormatError(f"{where}: bad string lengths: {e}") from None
    if pos + 4 > len(mv):
        raise FormatError(f"{where}: string tensor lengths run past its {len(mv)} bytes")
    raw_ck = bytes(mv[pos:pos + 4])
    stored = struct.unpack(order + "I", raw_ck)[0]
    if unmask_crc(stored) != crc:
        raise IntegrityError(f"{where}: string lengths fail their crc32c")
    crc = crc32c(raw_ck, crc)
    pos += 4
    if pos + sum(lengths) > len(mv):
        raise FormatError(f"{where}: strings need {sum(lengths)} bytes, entry has {len(mv) - pos}")
    out = []
    for n in lengths:
        out.append(bytes(mv[pos:pos + n]))
        crc = crc32c(mv[pos:pos + n], crc)
        pos += n
    return out, crc


def _variant_crc(raw: bytes, numel: int, where: str) -> int:
    """crc32c of a DT_VARIANT tensor as TF computes it (u64 lengths, element bytes
    and per-element masked checksums)."""
    mv, pos, crc = memoryview(raw), 0, 0
    for i in range(numel if raw else 0):
        try:
            n, pos = read_varint(mv, pos)
        except DecodeError as e:
            raise FormatError(f"{where}: bad variant element {i}: {e}") from None
        if pos + n + 4 > len(mv):
            raise FormatError(f"{where}: variant element {i} runs past the entry")
        crc = crc32c(struct.pack("<Q", n), crc)
        crc = crc32c(mv[pos:pos + n], crc)
        crc = crc32c(mv[pos + n:pos + n + 4], crc)
        pos += n + 4
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
        pairs = read_table(self.index)
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
            if not os.path.isfile(path):
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
        values, crc = _strings_from(self.raw(e, MAX_STRING_TENSOR), e.numel,
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


def read_bundle(path: str | os.PathLike, verify: bool = False) -> Checkpoint:
    """A lazy Checkpoint of the bundle at ``path`` (prefix, file or folder)."""
    prefix = find_prefix(path)
    b = Bundle(prefix)
    flat: dict[str, Any] = {}
    info: dict[str, Any] = {"tf_prefix": os.path.basename(prefix),
                            "data_shards": b.header.num_shards}
    if b.header.big_endian:
        info["byte_order"] = "big-endian"
    metadata: dict[str, str] = {}
    quantized: dict[str, str] = {}
    partitioned: dict[str, int] = {}
    for e in b.full_entries():
        name = e.name
        if e.dtype == DT_STRING:
            values = b.strings(e)
            if name == METADATA_TENSOR and not e.shape:
                try:
                    metadata = json.loads(values[0].decode("utf-8"))
                    if not isinstance(metadata, dict):
                        raise ValueError("not a JSON object")
                except ValueError as err:
                    raise FormatError(f"{b.display}: bad {METADATA_TENSOR}: {err}") from None
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
            got = _variant_crc(raw, e.numel, f"{b.display}: tensor '{name}'")
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
    tree, md = tree_from_metadata(flat, md, b.display)
    return Checkpoint(tree, md, "tf", prefix, info)


def object_paths(graph: bytes) -> tuple[dict[str, str], dict[str, str]]:
    """From a serialized TrackableObjectGraph: checkpoint key -> readable object
    path (``model.layer_with_weights-0.kernel``; optimizer slots read
    ``optimizer.m[model.dense.kernel]``), and checkpoint key -> the variable's
    own name (``dense/kernel``) where TF recorded one."""
    def record(buf, ints: tuple[int, ...], texts: tuple[int, ...]) -> dict[int, Any]:
        """The int and string fields of a small message (defaults 0 and "")."""
        out: dict[int, Any] = {k: 0 for k in ints}
        out.update({k: "" for k in texts})
        for f, w, v in iter_fields(buf):
            if f in ints:
                out[f] = varint_value(f, w, v)
            elif f in texts:
                out[f] = bytes(bytes_value(f, w, v)).decode("utf-8", "replace")
        return out

    nodes = []
    for f, w, v in iter_fields(graph):
        if f != 1:                       # TrackableObjectGraph.nodes
            continue
        node: dict[str, list] = {"children": [], "attributes": [], "slots": []}
        for f2, w2, v2 in iter_fields(bytes_value(f, w, v)):
            if f2 == 1:                  # ObjectReference{node_id, local_name}
                r = record(bytes_value(f2, w2, v2), (1,), (2,))
                node["children"].append((r[1], r[2]))
            elif f2 == 2:                # SerializedTensor{name, full_name, checkpoint_key}
                r = record(bytes_value(f2, w2, v2), (), (1, 2, 3))
                node["attributes"].append((r[1], r[2], r[3]))
            elif f2 == 3:                # SlotVariableReference{original, slot_name, slot}
                r = record(bytes_value(f2, w2, v2), (1, 3), (2,))
                node["slots"].append((r[1], r[2], r[3]))
        nodes.append(node)
    path: dict[int, str] = {0: ""} if nodes else {}
    queue = deque([0] if nodes else [])
    while queue:                         # breadth first: the shortest path names a node
        i = queue.popleft()
        for child, local in nodes[i]["children"]:
            if 0 <= child < len(nodes) and child not in path:
                path[child] = f"{path[i]}.{local}" if path[i] else local
                queue.append(child)
    for i, node in enumerate(nodes):
        for orig, slot, slot_node in node["slots"]:
            if i in path and orig in path and 0 <= slot_node < len(nodes) and slot_node not in path:
                path[slot_node] = f"{path[i] or 'optimizer'}.{slot}[{path[orig]}]"
    out, names = {}, {}
    for i, node in enumerate(nodes):
        for attr, full_name, key in node["attributes"]:
            if not key:
                continue
            base = path.get(i, f"<node {i}>")
            out[key] = base if attr == "VARIABLE_VALUE" else f"{base}.{attr}"
            if full_name and full_name != key:
                names[key] = full_name
    return out, names


# --- verification ---------------------------------------------------------------------

def verify_bundle(path: str | os.PathLike) -> list[str]:
    """Check every tensor's bytes against its crc32c (and sizes, shards,
    slices). Returns one line per problem; an empty list means all is well."""
    try:
        b = Bundle(find_prefix(path))
    except (FormatError, IntegrityError) as e:
        return [str(e)]
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
                got = _variant_crc(b.raw(e, MAX_RAW_ENTRY), e.numel, f"tensor '{name}'")
            else:
                if e.dtype in TF_DTYPES or e.dtype in TF_QUANTIZED:
                    b.tensor(e)                       # size agrees with dtype and shape
                got = _crc_of_range(handle, e.offset, e.size)
            if got != unmask_crc(e.crc32c):
                problems.append(f"{handle.display}: tensor '{name}' fails its crc32c at offset "
                                f"{e.offset} (stored {unmask_crc(e.crc32c):08x}, computed {got:08x})")
        except (FormatError, IntegrityError, UnsupportedError) as err:
            problems.append(str(err))
    return problems


# --- writing --------------------------------------------------------------------------

class _BlockBuilder:
    """core/lib/io/block_builder.cc: prefix-compressed keys, restarts every N keys."""

    def __init__(self, interval: int):
        self.interval = interval
        self.buf = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last = b""

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.interval:
            limit = min(len(key), len(self.last))
            while shared < limit and key[shared] == self.last[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buf))
            self.counter = 0
        self.buf += (encode_varint(shared) + encode_varint(len(key) - shared)
                     + encode_varint(len(value)) + key[shared:] + value)
        self.last = key
        self.counter += 1

    def estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    @property
    def empty(self) -> bool:
        return not self.buf

    def finish(self) -> bytes:
        return bytes(self.buf) + struct.pack(f"<{len(self.restarts)}I", *self.restarts) + \
            struct.pack("<I", len(self.restarts))


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    for i, c in enumerate(key):
        if c != 0xFF:
            return key[:i] + bytes([c + 1])
    return key


def build_table(items: list[tuple[bytes, bytes]], block_size: int = BLOCK_SIZE) -> bytes:
    """An SSTable (uncompressed, as TF writes bundles) of sorted (key, value) pairs."""
    out = bytearray()

    def write_block(raw: bytes) -> bytes:
        handle = encode_varint(len(out)) + encode_varint(len(raw))
        trailer = bytes([NO_COMPRESSION])
        out.extend(raw + trailer + struct.pack("<I", mask_crc(crc32c(trailer, crc32c(raw)))))
        return handle

    data, index = _BlockBuilder(RESTART_INTERVAL), _BlockBuilder(1)
    pending: bytes | None = None
    last = b""
    for n, (key, value) in enumerate(items):
        if n and key <= last:
            raise ValueError(f"table keys not strictly increasing at {key!r}")
        if not data.empty and len(key) + len(value) >= 2 * block_size:
            pending = write_block(data.finish())
            data = _BlockBuilder(RESTART_INTERVAL)
        if pending is not None:
            index.add(_shortest_separator(last, key), pending)
            pending = None
        data.add(key, value)
        last = key
        if data.estimate() >= block_size:
            pending = write_block(data.finish())
            data = _BlockBuilder(RESTART_INTERVAL)
    if not data.empty:
        pending = write_block(data.finish())
    meta_handle = write_block(_BlockBuilder(RESTART_INTERVAL).finish())
    if pending is not None:
        index.add(_short_successor(last), pending)
    index_handle = write_block(index.finish())
    footer = (meta_handle + index_handle).ljust(FOOTER_SIZE - 8, b"\0")
    out += footer + struct.pack("<Q", TABLE_MAGIC)
    return bytes(out)


def encode_header(num_shards: int) -> bytes:
    version = field_varint(1, TENSOR_BUNDLE_VERSION)          # producer; min_consumer 0
    return field_varint(1, num_shards) + field_bytes(3, version)   # endianness LITTLE = 0


def _string_tensor_bytes(values: list[bytes]) -> tuple[bytes, int]:
    """TF's WriteStringTensor layout and its (unmasked) crc32c."""
    lengths = b"".join(encode_varint(len(v)) for v in values)
    crc = 0
    for v in values:
        crc = crc32c(struct.pack("<I" if len(v) <= 0xFFFFFFFF else "<Q", len(v)), crc)
    ck = struct.pack("<I", mask_crc(crc))
    crc = crc32c(ck, crc)
    for v in values:
        crc = crc32c(v, crc)
    return lengths + ck + b"".join(values), crc


def _string_array(value) -> tuple[tuple[int, ...], list[bytes]] | None:
    """(shape, flat values) when ``value`` is bytes or a rectangular nested list of bytes."""
    if isinstance(value, bytes):
        return (), [value]
    if not isinstance(value, list) or not value:
        return None
    subs = [_string_array(v) for v in value]
    if any(s is None for s in subs) or len({s[0] for s in subs}) != 1:
        return None
    return (len(value),) + subs[0][0], [x for s in subs for x in s[1]]


@dataclass
class _Planned:
    entry: BundleEntry
    ref: TensorRef | None = None          # numeric tensor, streamed
    payload: bytes | None = None          # strings / raw entries, in memory
    crc: int | None = None                # unmasked crc32c of payload
    nbytes: int = 0
    alias_of: str | None = None


def _target_prefix(path: Path) -> Path:
    s = str(path)
    if s.endswith(".index"):
        return Path(s[: -len(".index")])
    if path.is_dir():
        return path / "model.ckpt"
    return path


def _is_raw_record(v) -> bool:
    """A tensor the reader kept as raw bundle bytes (variant, resource, ...)."""
    st = v.state if isinstance(v, ObjectRecord) and v.cls == RAW_ENTRY_CLASS else None
    return (isinstance(st, dict) and isinstance(st.get("data"), bytes)
            and type(st.get("dtype_enum")) is int and type(st.get("crc32c")) is int
            and isinstance(st.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in st["shape"]))


def _plan(ckpt: Checkpoint, display: str) -> tuple[list[_Planned], list[str]]:
    notes: list[str] = []
    planned: list[_Planned] = []
    first: dict[int, str] = {}
    tf_dtypes = ckpt.info.get("tf_dtypes") if isinstance(ckpt.info.get("tf_dtypes"), dict) else {}
    bad_dtype = []
    for name, ref in iter_tensors(ckpt.tree):
        if not name:
            raise UnsupportedError(f"{display}: a TF checkpoint cannot hold an unnamed tensor "
                                   f"(the checkpoint is a single tensor)")
        key = name.encode("utf-8", "surrogateescape")
        if key.startswith(b"\x00"):
            raise UnsupportedError(f"{display}: tensor name {name!r} starts with NUL, which TF "
                                   f"reserves for partitioned-variable slices")
        dtype = ref.dtype.name
        enum = _CANON_TO_TF.get(dtype)
        q = tf_dtypes.get(name)
        if q in _QUANT_BY_NAME and _QUANT_BY_NAME[q][1] == dtype:
            enum = _QUANT_BY_NAME[q][0]
        if enum is None:
            bad_dtype.append(f"{name} ({dtype})")
            continue
        e = BundleEntry(key, enum, tuple(ref.shape))
        if id(ref) in first:
            planned.append(_Planned(e, alias_of=first[id(ref)]))
            continue
        first[id(ref)] = name
        planned.append(_Planned(e, ref=ref, nbytes=ref.nbytes))
    if bad_dtype:
        raise UnsupportedError(f"{display}: TensorFlow has no dtype for "
                               f"{', '.join(bad_dtype[:5])}" + (" ..." if len(bad_dtype) > 5 else ""))

    # Top-level string values and raw records become real TF entries, so TF sees them.
    tf_flat = isinstance(ckpt.tree, dict) and all(isinstance(k, str) for k in ckpt.tree)
    if isinstance(ckpt.tree, dict):
        for k, v in ckpt.tree.items():
            if isinstance(v, TensorRef):
                continue
            arr = _string_array(v) if isinstance(k, str) and k else None
            if arr is not None:
                shape, values = arr
                payload, crc = _string_tensor_bytes(values)
                planned.append(_Planned(BundleEntry(k.encode("utf-8", "surrogateescape"),
                                                    DT_STRING, shape),
                                        payload=payload, crc=crc, nbytes=len(payload)))
            elif isinstance(k, str) and k and _is_raw_record(v):
                st = v.state
                planned.append(_Planned(BundleEntry(k.encode("utf-8", "surrogateescape"),
                                                    st["dtype_enum"], tuple(st["shape"])),
                                        payload=st["data"], crc=unmask_crc(st["crc32c"]),
                                        nbytes=len(st["data"])))
            else:
                tf_flat = False
    md = {k: str(v) for k, v in ckpt.metadata.items()}
    extra = tree_to_metadata(ckpt)
    if tf_flat:
        extra.pop(TREE_KEY, None)      # the stored names and strings already are the tree
    elif TREE_KEY in extra:
        notes.append(f"non-tensor entries kept in the string tensor '{METADATA_TENSOR}'")
    md.update(extra)
    names = [p.entry.key for p in planned]
    if METADATA_TENSOR.encode() in names:
        raise UnsupportedError(f"{display}: a tensor is named '{METADATA_TENSOR}', which "
                               f"ckptconv reserves")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UnsupportedError(f"{display}: two entries flatten to the name {dup.decode()!r}")
    if md:
        payload, crc = _string_tensor_bytes([json.dumps(md, separators=(",", ":")).encode()])
        planned.append(_Planned(BundleEntry(METADATA_TENSOR.encode(), DT_STRING, ()),
                                payload=payload, crc=crc, nbytes=len(payload)))
    return planned, notes


def _shard_plan(planned: list[_Planned], shard_size: int | None) -> int:
    """Assign shard ids greedily in order; returns the number of shards."""
    shard, size = 0, 0
    for p in planned:
        if p.alias_of is not None:
            continue
        if shard_size and size and size + p.nbytes > shard_size:
            shard, size = shard + 1, 0
        p.entry.shard_id = shard
        size += p.nbytes
    return shard + 1


def _write_shard(path: Path, planned: list[_Planned], display: str) -> None:
    pool = None
    pending: list[tuple[_Planned, Any]] = []
    try:
        with OutFile(path) as out:
            for p in planned:
                p.entry.offset = out.pos
                span = p.ref.file_span() if p.ref is not None else None
                if p.ref is None:
                    out.write(p.payload)
                    crc = p.crc
                elif span is not None and span[2] >= PARALLEL_CRC_MIN:
                    # bytes copied in the kernel; their checksum read beside the copy
                    if pool is None:
                        pool = ThreadPoolExecutor(max_workers=1)
                    crc = None
                    pending.append((p, pool.submit(crc_of_span, *span, crc32c)))
                    out.copy_from(*span)
                else:
                    crc = 0
                    for chunk in p.ref.iter_bytes():   # checksum exactly the bytes written
                        crc = crc32c(chunk, crc)
                        out.write(chunk)
                p.entry.size = out.pos - p.entry.offset
                if p.entry.size != p.nbytes:
                    raise FormatError(f"{display}: tensor '{p.entry.name}' gave {p.entry.size} "
                                      f"bytes, expected {p.nbytes}")
                if crc is not None:
                    p.entry.crc32c = mask_crc(crc)
            for p, future in pending:
                p.entry.crc32c = mask_crc(future.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


class TFBundleAdapter(Adapter):
    name = "tf"
    extensions = (".ckpt", ".index")
    description = "TensorFlow checkpoint (prefix.index + prefix.data-*; TF1 and TF2; SavedModel variables/)"

    def read(self, path: Path, verify: bool = False, **options) -> Checkpoint:
        return read_bundle(path, verify=verify)

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False,
              shard_size: int | None = None, jobs: int = 1, **options) -> dict:
        prefix = _target_prefix(Path(path))
        display = prefix.name
        planned, notes = _plan(ckpt, display)
        n = _shard_plan(planned, shard_size)
        data_paths = [Path(data_filename(str(prefix), k, n)) for k in range(n)]
        index_path = Path(str(prefix) + ".index")
        state = prefix.parent / "checkpoint"
        targets = data_paths + [index_path]
        write_state = force or not state.exists()
        if write_state:
            targets.append(state)
        else:
            notes.append(f"left the existing '{state}' state file as it was")
        with atomic_files(targets, force) as tmps:
            work = [(tmps[k], [p for p in planned if p.alias_of is None and p.entry.shard_id == k],
                     display) for k in range(n)]
            if jobs > 1 and n > 1:       # numpy's crc32c and the file writes release the GIL
                with ThreadPoolExecutor(max_workers=jobs) as pool:
                    list(pool.map(lambda w: _write_shard(*w), work))
            else:
                for w in work:
                    _write_shard(*w)
            by_name = {p.entry.name: p.entry for p in planned if p.alias_of is None}
            for p in planned:
                if p.alias_of is not None:     # tied names share one copy of the bytes
                    src = by_name[p.alias_of]
                    p.entry.shard_id, p.entry.offset = src.shard_id, src.offset
                    p.entry.size, p.entry.crc32c = src.size, src.crc32c
            items = [(HEADER_KEY, encode_header(n))]
            items += sorted((p.entry.key, encode_entry(p.entry)) for p in planned)
            tmps[n].write_bytes(build_table(items))
            if write_state:
                q = json.dumps(prefix.name, ensure_ascii=False)   # also a text-proto string
                tmps[n + 1].write_text(f"model_checkpoint_path: {q}\n"
                                       f"all_model_checkpoint_paths: {q}\n")
        return {"files": [str(t) for t in targets], "notes": notes}
