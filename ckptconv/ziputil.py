"""Zip archives as torch writes them: stored (uncompressed) members, data
aligned to 64 bytes with padding in the local header's extra field, zip64
when sizes or offsets pass 4 GiB.

Reading gives each member's absolute data offset so tensors can be lazy
file ranges (this module: what loading a .pt needs, nothing more); writing
and CRC checks stream bytes and live in ``ckptconv.zipstream``. Ground truth:
PKWARE APPNOTE.TXT; torch's ``caffe2/serialize/inline_container.cc``.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

from .errors import FormatError
from .tensor import FileHandle, human_bytes

# A deflated member may inflate at most this much beyond _BOMB_MIN bytes
# (pickles compress 3-10x; deflate's own ceiling is about 1032x).
_BOMB_RATIO = 50
_BOMB_MIN = 64 << 20
STORED, DEFLATED = 0, 8   # compression methods (APPNOTE 4.4.5; zipfile.ZIP_STORED, ZIP_DEFLATED)


LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")


class Member(NamedTuple):
    """One archive member: where its data starts and its sizes."""

    name: str
    data_offset: int
    compressed_size: int
    size: int
    crc: int
    compress_type: int


def _find_eocd(handle: FileHandle, start: int, size: int, name: str) -> tuple[int, int, int]:
    """(entry count, central directory size, central directory offset)."""
    base = max(0, size - (0xFFFF + 22 + 20))
    tail = handle.pread(start + base, size - base, "zip end record")
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0:
        raise FormatError(f"{name}: truncated or corrupt zip archive "
                          "(no end-of-central-directory record)")
    if pos + 22 > size:
        raise FormatError(f"{name}: truncated zip archive (end record cut off)")
    _, disk, _, _, count, cd_size, cd_offset, _ = struct.unpack_from("<IHHHHIIH", tail, pos)
    if disk != 0:
        raise FormatError(f"{name}: multi-disk zip archives are not supported")
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        loc = pos - 20
        if loc < 0 or tail[loc:loc + 4] != b"PK\x06\x07":
            raise FormatError(f"{name}: corrupt zip64 archive (no zip64 locator)")
        (z64,) = struct.unpack_from("<Q", tail, loc + 8)
        rec = handle.pread(start + z64, 56, "zip64 end record") if z64 + 56 <= size else b""
        if rec[:4] != b"PK\x06\x06":
            raise FormatError(f"{name}: corrupt zip64 archive (bad zip64 end record)")
        count, cd_size, cd_offset = struct.unpack_from("<QQQ", rec, 32)
    if cd_offset + cd_size > size:
        raise FormatError(f"{name}: truncated zip archive (central directory needs "
                          f"{cd_offset + cd_size} bytes, file has {size})")
    return count, cd_size, cd_offset


def read_members(handle: FileHandle, start: int = 0, size: int | None = None) -> dict[str, Member]:
    """Central directory of a zip: name -> Member with absolute data offsets.

    ``start``/``size``: a zip stored inside a bigger file (a ``torch.save``
    blob in a DCP ``.distcp`` file), its own offsets relative to ``start``.
    Parsed with struct from one read of the central directory and one small
    read per local header: much faster than ``zipfile`` for archives of tens
    of thousands of storages, and no mmap (which would count as memory).
    """
    name = handle.display
    size = handle.size - start if size is None else size
    if start < 0 or size < 0 or start + size > handle.size:
        raise FormatError(f"{name}: zip archive of {size} bytes at offset {start} is past the "
                          f"end of the file ({handle.size} bytes)")
    if size < 22:
        raise FormatError(f"{name}: truncated zip archive ({size} bytes)")
    count, cd_size, cd_offset = _find_eocd(handle, start, size, name)
    cd = handle.pread(start + cd_offset, cd_size, "zip central directory")
    if count > cd_size // 46 + 1:
        raise FormatError(f"{name}: corrupt zip: {count} entries cannot fit in "
                          f"a {cd_size}-byte central directory")
    members: dict[str, Member] = {}
    pos = 0
    end = cd_size
    fd = None if handle.is_remote else handle.fileno()
    entries = []
    for _ in range(count):
        if pos + 46 > end:
            raise FormatError(f"{name}: corrupt zip central directory (entry past its end)")
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen, _, _, _,
         hoff) = CENTRAL_HEADER.unpack_from(cd, pos)
        if sig != 0x02014B50:
            raise FormatError(f"{name}: corrupt zip central directory at offset {cd_offset + pos}")
        raw_name = cd[pos + 46:pos + 46 + nlen]
        extra = cd[pos + 46 + nlen:pos + 46 + nlen + xlen]
        pos += 46 + nlen + xlen + clen
        if pos > end:
            raise FormatError(f"{name}: corrupt zip central directory (entry past its end)")
        if usize == 0xFFFFFFFF or csize == 0xFFFFFFFF or hoff == 0xFFFFFFFF:
            usize, csize, hoff = _zip64_fields(extra, usize, csize, hoff, name)
        try:
            mname = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            raise FormatError(f"{name}: corrupt zip: member name {raw_name[:40]!r} is not "
                              "valid UTF-8") from None
        if flags & 1:  # APPNOTE.TXT general purpose bit 0: a reader would see ciphertext
            raise FormatError(f"{name}: zip member '{mname}' is encrypted; ckptconv reads "
                              "no encrypted archives")
        if mname in members:
            # two members of one name: readers disagree on which one counts
            # (a scanner could check one while torch loads the other)
            raise FormatError(f"{name}: zip has two members named '{mname}'")
        if mname.startswith("/") or (".." in mname and ".." in mname.replace("\\", "/").split("/")):
            raise FormatError(f"{name}: zip member '{mname}' escapes the archive")
        if hoff + 30 > size:
            raise FormatError(f"{name}: zip member '{mname}' starts past the end of the file")
        if fd is None:
            entries.append((mname, hoff, csize, usize, crc, method))
            members[mname] = None
            continue
        members[mname] = _member(os.pread(fd, 30, start + hoff), mname, hoff, csize, usize, crc,
                                 method, name, start, size)
    if fd is None:  # remote: all the local headers in one batch of concurrent range requests
        heads = handle.pread_many([(start + e[1], 30) for e in entries], "zip local header")
        for head, e in zip(heads, entries):
            members[e[0]] = _member(head, *e, name, start, size)
    return members


def _member(head: bytes, mname: str, hoff: int, csize: int, usize: int, crc: int, method: int,
            name: str, start: int, size: int) -> Member:
    lsig, _, _, _, _, _, _, _, _, lnlen, lxlen = LOCAL_HEADER.unpack(head)
    if lsig != 0x04034B50:
        raise FormatError(f"{name}: corrupt zip: bad local header for '{mname}'")
    data_start = hoff + 30 + lnlen + lxlen
    if data_start + csize > size:
        raise FormatError(
            f"{name}: truncated zip archive (member '{mname}' needs "
            f"{human_bytes(csize)} at offset {start + data_start}, file ends at "
            f"{start + size})")
    return Member(mname, start + data_start, csize, usize, crc, method)


def _zip64_fields(extra: bytes, usize: int, csize: int, hoff: int, name: str):
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4:pos + 4 + n]
        if tag == 1:
            vals = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if hoff == 0xFFFFFFFF and vals:
                hoff = vals.pop(0)
            return usize, csize, hoff
        pos += 4 + n
    raise FormatError(f"{name}: corrupt zip64 entry (no zip64 extra field)")


def read_member_bytes(handle: FileHandle, m: Member, limit: int = 1 << 31) -> bytes:
    """A whole member's bytes (for small members: pickles, version files)."""
    if m.size > limit:
        raise FormatError(f"{handle.display}: zip member '{m.name}' is {human_bytes(m.size)}, too big")
    raw = handle.pread(m.data_offset, m.compressed_size, f"zip member '{m.name}'")
    if m.compress_type == STORED:
        return raw
    if m.compress_type == DEFLATED:
        if m.size > max(_BOMB_MIN, _BOMB_RATIO * m.compressed_size):
            raise FormatError(f"{handle.display}: zip member '{m.name}' claims to inflate "
                              f"{human_bytes(m.compressed_size)} to {human_bytes(m.size)} "
                              "(zip bomb?); refused")
        d = zlib.decompressobj(-15)
        out = d.decompress(raw, m.size + 1)
        if len(out) != m.size:
            raise FormatError(f"{handle.display}: zip member '{m.name}' inflates to "
                              f"{len(out)} bytes, header says {m.size} (zip bomb or corrupt)")
        return out
    raise FormatError(f"{handle.display}: zip member '{m.name}' uses compression "
                      f"{m.compress_type}, which checkpoints never use")


def is_zip(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04"


def member_root(names, path: Path) -> str:
    """The archive's root folder (torch uses the file stem; any name is fine)."""
    for n in names:
        if n.endswith("/data.pkl") and n.count("/") == 1:
            return n.split("/", 1)[0]
    if "data.pkl" in names:
        return ""
    raise FormatError(f"{path.name}: zip archive has no data.pkl: not a torch checkpoint")
