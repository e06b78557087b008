"""The LevelDB-style SSTable TensorFlow uses for a bundle's ``.index`` file.

Sources of truth, in tensorflow/tensorflow: ``core/lib/io/{table_builder,
block_builder,format,block}.cc`` (prefix-compressed keys with restart
points, 5-byte block trailer of compression type + masked crc32c, 48-byte
footer with the metaindex and index block handles and the magic
0xdb4775248b80fb57). TensorFlow writes the metaindex block empty and never
reads it; ckptconv keeps its own metadata there (see ``adapters/tf``).
"""
from __future__ import annotations

import struct
from typing import Iterator

from ckptconv.errors import FormatError, IntegrityError
from ckptconv.tensor import FileHandle

from .._io import (DecodeError, crc32c, encode_varint, mask_crc, read_varint,
                   snappy_decompress, unmask_crc)
from ..sniffers import FOOTER_SIZE, TABLE_MAGIC

BLOCK_TRAILER = 5                # compression type byte + masked crc32c
NO_COMPRESSION, SNAPPY = 0, 1
BLOCK_SIZE = 262144              # TF's table::Options default
RESTART_INTERVAL = 16
METADATA_KEY = b"ckptconv.metadata"   # metaindex key of ckptconv's own metadata


# --- reading ----------------------------------------------------------------------

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
    return read_table_and_meta(handle)[0]


def read_table_and_meta(handle: FileHandle) -> tuple[list[tuple[bytes, memoryview]],
                                                      dict[bytes, bytes]]:
    """The table's (key, value) pairs in key order, and its metaindex entries."""
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
        meta_off, meta_size, pos = _decode_handle(data, limit, handle.size - 8)
        index_off, index_size, _ = _decode_handle(data, pos, handle.size - 8)
    except DecodeError:
        raise FormatError(f"{display}: bad block handle in the table footer at offset {limit}") from None
    index = _read_block(data, index_off, index_size, limit, "index block", display)
    meta_block = _read_block(data, meta_off, meta_size, limit, "metaindex block", display)
    meta = {k: bytes(v) for k, v in _block_entries(meta_block, "metaindex block", display)}
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
    return out, meta



# --- writing ----------------------------------------------------------------------

class BlockBuilder:
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


def build_table(items: list[tuple[bytes, bytes]], block_size: int = BLOCK_SIZE,
                meta_items: list[tuple[bytes, bytes]] = ()) -> bytes:
    """An SSTable (uncompressed, as TF writes bundles) of sorted (key, value)
    pairs; ``meta_items`` go to the metaindex block (TensorFlow leaves it empty)."""
    out = bytearray()

    def write_block(raw: bytes) -> bytes:
        handle = encode_varint(len(out)) + encode_varint(len(raw))
        trailer = bytes([NO_COMPRESSION])
        out.extend(raw + trailer + struct.pack("<I", mask_crc(crc32c(trailer, crc32c(raw)))))
        return handle

    data, index = BlockBuilder(RESTART_INTERVAL), BlockBuilder(1)
    pending: bytes | None = None
    last = b""
    for n, (key, value) in enumerate(items):
        if n and key <= last:
            raise ValueError(f"table keys not strictly increasing at {key!r}")
        if not data.empty and len(key) + len(value) >= 2 * block_size:
            pending = write_block(data.finish())
            data = BlockBuilder(RESTART_INTERVAL)
        if pending is not None:
            index.add(_shortest_separator(last, key), pending)
            pending = None
        data.add(key, value)
        last = key
        if data.estimate() >= block_size:
            pending = write_block(data.finish())
            data = BlockBuilder(RESTART_INTERVAL)
    if not data.empty:
        pending = write_block(data.finish())
    meta = BlockBuilder(RESTART_INTERVAL)
    for key, value in sorted(meta_items):
        meta.add(key, value)
    meta_handle = write_block(meta.finish())
    if pending is not None:
        index.add(_short_successor(last), pending)
    index_handle = write_block(index.finish())
    footer = (meta_handle + index_handle).ljust(FOOTER_SIZE - 8, b"\0")
    out += footer + struct.pack("<Q", TABLE_MAGIC)
    return bytes(out)

