"""The protobuf records of a tensor bundle and the byte layouts of its entries.

Sources of truth, in tensorflow/tensorflow: ``core/protobuf/tensor_bundle.proto``
(``BundleHeaderProto``, ``BundleEntryProto``), ``core/framework/types.proto``
(DataType numbers), ``core/util/tensor_bundle/tensor_bundle.cc`` (string and
variant tensor layouts and their crc32c), ``core/util/saved_tensor_slice_util.cc``
+ ``core/lib/strings/ordered_code.cc`` (keys of the slices of partitioned
variables). Protobufs are decoded by hand (``adapters/_io``): no TF protos.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

from ckptconv.errors import FormatError, IntegrityError

from .._io import (DecodeError, bytes_value, crc32c, encode_varint, field_bytes, field_fixed32,
                   field_varint, fixed32_value, iter_fields, mask_crc, read_varint, unmask_crc,
                   varint_value)

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
CANON_TO_TF = {v: k for k, v in TF_DTYPES.items()}
QUANTIZED_BY_NAME = {q: (num, store) for num, (q, store) in TF_QUANTIZED.items()}

HEADER_KEY = b""



def data_filename(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"



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



def encode_header(num_shards: int) -> bytes:
    version = field_varint(1, TENSOR_BUNDLE_VERSION)          # producer; min_consumer 0
    return field_varint(1, num_shards) + field_bytes(3, version)   # endianness LITTLE = 0



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



# --- string and variant tensors --------------------------------------------------

def strings_from(raw: bytes, numel: int, big_endian: bool, where: str) -> tuple[list[bytes], int]:
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


def variant_crc(raw: bytes, numel: int, where: str) -> int:
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



def string_tensor_bytes(values: list[bytes]) -> tuple[bytes, int]:
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

