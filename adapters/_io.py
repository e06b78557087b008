"""Byte-level helpers shared by adapters: crc32c (with TensorFlow/LevelDB
masking), protobuf wire-format decoding and encoding, and raw snappy
decompression. Nothing format-specific lives here.

Sources of truth: RFC 3720 (CRC-32C, Castagnoli polynomial 0x1EDC6F41,
reflected 0x82F63B78); ``tensorflow/core/lib/hash/crc32c.h`` (``Mask``:
rotate right by 15 bits and add 0xa282ead8, so a CRC stored next to the data
it covers does not checksum to a constant); the protobuf encoding guide
(https://protobuf.dev/programming-guides/encoding/); snappy's
``format_description.txt``.

Errors are ``DecodeError`` (a ``ValueError``) without a file name: callers
know the file and re-raise a one-line ``FormatError`` naming it.
"""
from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, TypeVar, Union

from ckptconv._lazy import np, numpy_loaded

from ckptconv.crc import CRC32C_POLY, gf2_compose, shift, zeros_operator
from ckptconv.errors import FormatError

Bytes = Union[bytes, bytearray, memoryview]


class DecodeError(ValueError):
    """Malformed bytes (varint, protobuf field, compressed block)."""


T = TypeVar("T")


def decode_file(path: Path, decode: Callable[[bytes], T], what: str, limit: int) -> T:
    """``decode`` of a whole file of at most ``limit`` bytes (a protobuf a scan
    hook judges); too big, or a ``DecodeError``, is a one-line FormatError
    naming the file."""
    size = path.stat().st_size
    if size > limit:
        raise FormatError(f"{path.name}: {size} bytes is too big to judge")
    try:
        return decode(path.read_bytes())
    except DecodeError as e:
        raise FormatError(f"{path.name}: not {what} ({e})") from None


# --- crc32c ------------------------------------------------------------------
#
# Three implementations, fastest first: the ``crc32c`` or ``google_crc32c`` C
# extensions when importable (not dependencies), else a numpy one. The numpy
# version cuts a buffer into L independent lanes, runs a slicing-by-8 table
# CRC over all lanes at once (one numpy op per table lookup covers L lanes),
# then merges the lane CRCs pairwise with the "append n zero bytes" linear
# operator (zlib's crc32_combine idea). CRC is linear over GF(2), so
# raw(A || B) = shift(raw(A), len(B)) ^ raw(B) when the register starts at 0.

_POLY = CRC32C_POLY
_MASK_DELTA = 0xA282EAD8
_SMALL = 2048            # below this a plain Python byte loop is faster
_NO_IMPORT_MAX = 64 << 10  # below this, without numpy imported yet, the byte loop too
_PIECE = 16 << 20        # bound the transposed copy the lane kernel makes
_MAX_LANES = 16384


def _byte_table() -> list[int]:
    table = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_T0 = _byte_table()


@lru_cache(maxsize=1)
def _lane_tables() -> tuple[np.ndarray, ...]:
    """Slicing-by-8 tables merged pairwise into four 65536-entry tables.

    ``T[k][b]`` is the CRC contribution of byte ``b`` followed by ``k`` zero
    bytes. Processing 8 bytes (two little-endian u32 words w0 ^ crc, w1) is
    ``T7[w0 b0] ^ T6[w0 b1] ^ ... ^ T0[w1 b3]``; pairing tables by 16-bit
    halves halves the number of lookups.
    """
    t = np.zeros((8, 256), dtype=np.uint32)
    t[0] = np.array(_T0, dtype=np.uint32)
    for k in range(1, 8):
        prev = t[k - 1]
        t[k] = (prev >> np.uint32(8)) ^ t[0][prev & np.uint32(0xFF)]
    lo = np.arange(65536, dtype=np.uint32) & np.uint32(0xFF)
    hi = np.arange(65536, dtype=np.uint32) >> np.uint32(8)
    # u16 halves of the 8 bytes, in order: (b0,b1) (b2,b3) (b4,b5) (b6,b7)
    return tuple(np.ascontiguousarray(t[a][lo] ^ t[b][hi])
                 for a, b in ((7, 6), (5, 4), (3, 2), (1, 0)))


try:  # optional C extensions: used when present, never required
    import crc32c as _crc32c_ext  # type: ignore

    def _ext_extend(crc: int, data) -> int:
        return _crc32c_ext.crc32c(data, crc)
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import google_crc32c as _gcrc  # type: ignore

        def _ext_extend(crc: int, data) -> int:
            return _gcrc.extend(crc, bytes(data))
    except ImportError:
        _ext_extend = None


def _zeros_pow2(k: int) -> tuple[int, ...]:
    """Operator: raw CRC-32C register after appending 2**k zero bytes."""
    return zeros_operator(_POLY, k)


def _shift(crc: int, nbytes: int) -> int:
    """Raw register ``crc`` advanced over ``nbytes`` zero bytes."""
    return shift(_POLY, crc, nbytes)


@lru_cache(maxsize=64)
def _shift_tables(nbytes: int) -> np.ndarray:
    """(4, 256) byte tables for the zero-append operator over ``nbytes``."""
    mat = None
    k, n = 0, nbytes
    while n:
        if n & 1:
            p = _zeros_pow2(k)
            mat = p if mat is None else gf2_compose(p, mat)
        n >>= 1
        k += 1
    cols = np.array(mat, dtype=np.uint32)                    # image of bit i
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1      # (256, 8)
    out = np.zeros((4, 256), dtype=np.uint32)
    for byte in range(4):
        sel = np.where(bits.astype(bool), cols[byte * 8:(byte + 1) * 8][None, :], 0)
        out[byte] = np.bitwise_xor.reduce(sel.astype(np.uint32), axis=1)
    return out


def _raw_small(crc: int, data) -> int:
    t = _T0
    for b in bytes(data):
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _raw_lanes(u8: np.ndarray) -> tuple[int, int]:
    """Raw CRC (register starting at 0) of a prefix of ``u8``; returns
    (crc, bytes consumed). Uses L lanes of m bytes, L a power of two."""
    n = len(u8)
    lanes = 1 << min((n // 256).bit_length() - 1, _MAX_LANES.bit_length() - 1)
    m = (n // lanes) & ~7
    body = lanes * m
    words = u8[:body].view("<u2").reshape(lanes, m // 2)
    cols = np.ascontiguousarray(words.T)                      # (m/2, lanes)
    p0, p1, p2, p3 = _lane_tables()
    c = np.zeros(lanes, dtype=np.uint32)
    lo16, sh16 = np.uint32(0xFFFF), np.uint32(16)
    for s in range(0, m // 2, 4):
        a = cols[s] ^ (c & lo16)
        b = cols[s + 1] ^ (c >> sh16)
        c = p0[a] ^ p1[b] ^ p2[cols[s + 2]] ^ p3[cols[s + 3]]
    # merge lanes pairwise: left lane advanced over the right lane's bytes
    span = m
    while len(c) > 1:
        t = _shift_tables(span)
        left, right = c[0::2], c[1::2]
        c = (t[0][left & 0xFF] ^ t[1][(left >> 8) & 0xFF] ^ t[2][(left >> 16) & 0xFF]
             ^ t[3][left >> 24] ^ right)
        span *= 2
    return int(c[0]), body


def _raw_extend(state: int, data) -> int:
    """Advance the raw (un-inverted) register ``state`` over ``data``."""
    mv = memoryview(data).cast("B")
    pos, n = 0, len(mv)
    if n < _NO_IMPORT_MAX and not numpy_loaded():
        return _raw_small(state, mv)  # a few ms, where importing numpy would cost 60
    while n - pos >= _SMALL:
        piece = np.frombuffer(mv[pos:pos + min(_PIECE, n - pos)], dtype=np.uint8)
        part, used = _raw_lanes(piece)
        state = _shift(state, used) ^ part
        pos += used
    return _raw_small(state, mv[pos:])


def crc32c(data: Bytes, crc: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``crc`` (a finished CRC value, as
    TensorFlow's ``crc32c::Extend``); ``crc32c(a + b) == crc32c(b, crc32c(a))``."""
    if _ext_extend is not None:
        return _ext_extend(crc, data)
    return _raw_extend(crc ^ 0xFFFFFFFF, data) ^ 0xFFFFFFFF


def crc32c_pure(data: Bytes, crc: int = 0) -> int:
    """The numpy implementation even when a C extension is present (tests)."""
    return _raw_extend(crc ^ 0xFFFFFFFF, data) ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """TensorFlow/LevelDB masked CRC: rotate right 15, add a constant."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --- protobuf wire format ------------------------------------------------------

WIRE_VARINT, WIRE_FIXED64, WIRE_BYTES, WIRE_FIXED32 = 0, 1, 2, 5


def read_varint(buf: Bytes, pos: int = 0, limit: int | None = None) -> tuple[int, int]:
    """(value, next position) of the unsigned LEB128 varint at ``pos``."""
    end = len(buf) if limit is None else limit
    result = shift = 0
    while True:
        if pos >= end:
            raise DecodeError(f"varint runs past the end at offset {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError(f"varint longer than 10 bytes at offset {pos}")


def encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64             # int32/int64 negatives: 10-byte two's complement
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def as_int64(value: int) -> int:
    """A varint read as protobuf ``int64``/``int32`` (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def varint_value(field: int, wire: int, value, signed: bool = True) -> int:
    """A field's value that must be a varint (``int32``/``int64``/enum/bool)."""
    if wire != WIRE_VARINT:
        raise DecodeError(f"field {field} should be a varint, has wire type {wire}")
    return as_int64(value) if signed else value


def bytes_value(field: int, wire: int, value) -> memoryview:
    """A field's value that must be length-delimited (message, string, bytes)."""
    if wire != WIRE_BYTES:
        raise DecodeError(f"field {field} should be length-delimited, has wire type {wire}")
    return value


def fixed32_value(field: int, wire: int, value) -> int:
    if wire != WIRE_FIXED32:
        raise DecodeError(f"field {field} should be fixed32, has wire type {wire}")
    return value


def iter_fields(buf: Bytes) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) for each field of a serialized message.

    Varints and fixed-width values come back as ints, length-delimited ones
    as memoryviews into ``buf``. Groups (wire types 3/4) are refused.
    """
    mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
    pos, n = 0, len(mv)
    while pos < n:
        key, pos = read_varint(mv, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise DecodeError(f"protobuf field number 0 at offset {pos}")
        if wire == WIRE_VARINT:
            value, pos = read_varint(mv, pos)
        elif wire == WIRE_FIXED64:
            if pos + 8 > n:
                raise DecodeError(f"fixed64 field {field} runs past the end")
            value = struct.unpack_from("<Q", mv, pos)[0]
            pos += 8
        elif wire == WIRE_FIXED32:
            if pos + 4 > n:
                raise DecodeError(f"fixed32 field {field} runs past the end")
            value = struct.unpack_from("<I", mv, pos)[0]
            pos += 4
        elif wire == WIRE_BYTES:
            length, pos = read_varint(mv, pos)
            if pos + length > n:
                raise DecodeError(f"field {field} needs {length} bytes at offset {pos}, "
                                  f"message has {n - pos}")
            value = mv[pos:pos + length]
            pos += length
        else:
            raise DecodeError(f"unsupported protobuf wire type {wire} (field {field})")
        yield field, wire, value


def field_varint(field: int, value: int) -> bytes:
    return encode_varint(field << 3 | WIRE_VARINT) + encode_varint(value)


def field_bytes(field: int, value: Bytes) -> bytes:
    return encode_varint(field << 3 | WIRE_BYTES) + encode_varint(len(value)) + bytes(value)


def field_fixed32(field: int, value: int) -> bytes:
    return encode_varint(field << 3 | WIRE_FIXED32) + struct.pack("<I", value & 0xFFFFFFFF)


# --- snappy (raw block format, no framing) ------------------------------------

def snappy_decompress(data: Bytes, max_size: int = 1 << 30) -> bytes:
    """Decompress one raw snappy block (LevelDB's kSnappyCompression)."""
    mv = memoryview(data).cast("B")
    size, pos = read_varint(mv, 0)
    if size > max_size:
        raise DecodeError(f"snappy block claims {size} bytes (limit {max_size})")
    out = bytearray()
    n = len(mv)
    while pos < n:
        tag = mv[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:                                   # literal
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                if pos + extra > n:
                    raise DecodeError("snappy literal length runs past the end")
                length = int.from_bytes(mv[pos:pos + extra], "little")
                pos += extra
            length += 1
            if pos + length > n:
                raise DecodeError("snappy literal runs past the end")
            out += mv[pos:pos + length]
            pos += length
            continue
        if kind == 1:
            if pos >= n:
                raise DecodeError("snappy copy runs past the end")
            length = ((tag >> 2) & 7) + 4
            offset = ((tag >> 5) << 8) | mv[pos]
            pos += 1
        else:
            width = 2 if kind == 2 else 4
            if pos + width > n:
                raise DecodeError("snappy copy runs past the end")
            length = (tag >> 2) + 1
            offset = int.from_bytes(mv[pos:pos + width], "little")
            pos += width
        if offset == 0 or offset > len(out):
            raise DecodeError(f"snappy copy offset {offset} outside the output")
        if len(out) + length > size:
            raise DecodeError("snappy output larger than announced")
        start = len(out) - offset
        for i in range(length):                         # copies may overlap
            out.append(out[start + i])
    if len(out) != size:
        raise DecodeError(f"snappy block decodes to {len(out)} bytes, header says {size}")
    return bytes(out)
