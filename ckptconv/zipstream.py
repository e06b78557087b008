"""Zip work that streams bytes: writing archives as torch writes them
(stored members, data aligned to 64 bytes with padding in the local
header's extra field, zip64 past 4 GiB) and checking members' CRC-32s.

Member data is streamed (copy_file_range when possible) and each CRC-32
patched into its local header afterwards. Reading an archive's directory is
``ckptconv.ziputil``. Ground truth: PKWARE APPNOTE.TXT; torch's
``caffe2/serialize/inline_container.cc``.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from .crc import CRC32_POLY, crc_combine
from .errors import FormatError
from .progress import advance
from .streaming import PARALLEL_CRC_MIN, OutFile, crc_of_span
from .tensor import FileHandle, TensorRef
from .ziputil import CENTRAL_HEADER, DEFLATED, LOCAL_HEADER, STORED, Member, read_members

ALIGN = 64


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc(A), crc(B) and len(B) (zlib's crc32_combine)."""
    return crc_combine(CRC32_POLY, crc1, crc2, len2)


class ZipWriter:
    """Stored members, 64-byte aligned data, CRCs patched in after streaming.

    ``out``: write the archive into an open output at its current end (a
    ``torch.save`` blob inside a DCP ``.distcp`` file): its offsets are then
    relative to its first byte, and ``close`` leaves ``out`` open."""

    def __init__(self, path: str | os.PathLike | None = None, out: OutFile | None = None):
        self.own = out is None
        self.out = OutFile(path) if out is None else out
        self.base = self.out.pos  # the archive's first byte in the file
        self.entries: list[tuple[bytes, int, int, int]] = []  # name, header offset, size, crc
        self._pool = None

    def _local_header(self, name: bytes, size: int, zip64: bool) -> tuple[bytes, int]:
        extra = b""
        if zip64:
            extra = struct.pack("<HHQQ", 1, 16, size, size)
        start = self.out.pos - self.base + 30 + len(name) + len(extra)
        pad = -start % ALIGN
        if pad:
            pad = pad if pad >= 4 else pad + ALIGN
            extra += struct.pack("<HH", 0x4246, pad - 4) + b"Z" * (pad - 4)  # torch's "FB" padding
        fields = (0x04034B50, 45 if zip64 else 20, 0, 0, 0, 0x21, 0,
                  0xFFFFFFFF if zip64 else size, 0xFFFFFFFF if zip64 else size, len(name), len(extra))
        return LOCAL_HEADER.pack(*fields) + name + extra, pad

    def add_bytes(self, name: str, data: bytes) -> None:
        self._add(name, len(data), [data], crc=zlib.crc32(data))

    def add_tensor_bytes(self, name: str, nbytes: int, refs: list[TensorRef], crc: int | None = None):
        """A member made of the bytes of ``refs`` in order (one storage)."""
        self._add(name, nbytes, refs, crc)

    def _add(self, name: str, size: int, parts, crc: int | None):
        bname = name.encode()
        zip64 = size >= 0xFFFFFFFF
        offset = self.out.pos - self.base
        header, _ = self._local_header(bname, size, zip64)
        self.out.write(header)
        written = 0
        # CRC pieces: (crc or a future computing it in a thread while the
        # kernel copies the same bytes, length); combined at the end.
        pieces: list = []
        for part in parts:
            if isinstance(part, (bytes, bytearray, memoryview)):
                pieces.append((zlib.crc32(part), len(part)))
                self.out.write(part)
                written += len(part)
                continue
            spans = part.file_spans()
            if spans is not None and (crc is not None or
                                      sum(n for _, _, n in spans) >= PARALLEL_CRC_MIN):
                for span in spans:
                    if crc is None and span[0].is_remote:  # checksummed as it passes: one read
                        pieces.append((self.out.copy_from(*span, checksum=zlib.crc32), span[2]))
                    elif crc is None:
                        pieces.append((self._crc_pool().submit(crc_of_span, *span), span[2]))
                        self.out.copy_from(*span)
                    else:
                        self.out.copy_from(*span)
                    advance(span[2])
                    written += span[2]
                continue
            running, n = 0, 0
            for chunk in part.iter_bytes():
                running = zlib.crc32(chunk, running)
                self.out.write(chunk)
                advance(len(chunk))
                n += len(chunk)
            pieces.append((running, n))
            written += n
        if written != size:
            raise FormatError(f"zip member '{name}': wrote {written} bytes, planned {size}")
        if crc is None:
            crc = 0
            for piece, n in pieces:
                crc = crc32_combine(crc, piece if isinstance(piece, int) else piece.result(), n)
        self.entries.append((bname, offset, size, crc))

    def _crc_pool(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1)
        return self._pool

    def close(self) -> None:
        try:
            if self._pool is not None:
                self._pool.shutdown()
            out = self.out
            out.flush()
            # patch CRCs into the local headers
            for bname, offset, size, crc in self.entries:
                os.pwrite(out.fd, struct.pack("<I", crc), self.base + offset + 14)
            cd_start = out.pos - self.base
            for bname, offset, size, crc in self.entries:
                extra = b""
                big = size >= 0xFFFFFFFF or offset >= 0xFFFFFFFF
                if big:
                    extra = struct.pack("<HHQQQ", 1, 24, size, size, offset)
                out.write(CENTRAL_HEADER.pack(
                    0x02014B50, 45 if big else 20, 45 if big else 20, 0, 0, 0, 0x21, crc,
                    0xFFFFFFFF if big else size, 0xFFFFFFFF if big else size, len(bname), len(extra),
                    0, 0, 0, 0, 0xFFFFFFFF if big else offset) + bname + extra)
            cd_size = out.pos - self.base - cd_start
            n = len(self.entries)
            if n >= 0xFFFF or cd_start >= 0xFFFFFFFF or cd_size >= 0xFFFFFFFF:
                z64_start = out.pos - self.base
                out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_start))
                out.write(struct.pack("<IIQI", 0x07064B50, 0, z64_start, 1))
                out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF,
                                      0xFFFFFFFF, 0xFFFFFFFF, 0))
            else:
                out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_start, 0))
        finally:  # the descriptor is released even when a write fails
            if self.own:
                self.out.close()


# --- integrity -------------------------------------------------------------------

def _member_crc(handle: FileHandle, m: Member, chunk: int = 8 << 20) -> int:
    """CRC-32 of a member's *uncompressed* bytes, read in bounded chunks."""
    if m.compress_type == STORED:
        return crc_of_span(handle, m.data_offset, m.compressed_size, chunk=chunk)
    if m.compress_type != DEFLATED:
        raise FormatError(f"{handle.display}: zip member '{m.name}' uses compression "
                          f"{m.compress_type}")
    d = zlib.decompressobj(-15)
    crc = produced = 0
    step = 1 << 20  # output per call: memory stays flat whatever the ratio

    def take(out: bytes) -> None:
        nonlocal crc, produced
        produced += len(out)
        if produced > m.size:
            raise FormatError(f"{handle.display}: zip member '{m.name}' inflates past its "
                              f"{m.size} bytes (zip bomb or corrupt)")
        crc = zlib.crc32(out, crc)

    try:
        for off in range(0, m.compressed_size, step):
            buf = handle.pread(m.data_offset + off, min(step, m.compressed_size - off))
            while True:
                out = d.decompress(buf, step)
                take(out)
                buf = d.unconsumed_tail
                if not buf and len(out) < step:
                    break
        take(d.flush())
    except zlib.error as e:
        raise FormatError(f"{handle.display}: zip member '{m.name}' does not inflate ({e})") from None
    return crc


def check_member_crcs(path: Path) -> tuple[list[str], int]:
    """Every member's CRC-32 against the central directory (APPNOTE 4.4.7):
    one line per mismatch, and the number of members checked."""
    handle = FileHandle(path)
    members = read_members(handle)
    problems = []
    for name, m in members.items():
        got = _member_crc(handle, m)
        if got != m.crc:
            problems.append(f"{handle.display}: zip member '{name}' fails its CRC-32 "
                            f"(stored {m.crc:08x}, computed {got:08x})")
    return problems, len(members)
