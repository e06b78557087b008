"""``ckptconv scan``: which files would run code when loaded, and why,
without executing anything. Three verdicts: *safe* (every byte a loader
would deserialize was judged and holds no code), *unsafe* (exit 3, the
first reason named) and *unscanned* (exit 1: bytes we could not judge, with
the reason; never reported safe).

``torch.load`` without ``weights_only`` and ``pickle.load`` run whatever a pickle
names. A file can carry pickles in more places than its ``data.pkl``, so
``scan`` looks at every one of them:

- zip archives (torch zip, TorchScript, ``.npz``, ``.keras``, anything zipped):
  every member is sniffed by its content, whatever its name (a pickle named
  ``data.txt`` is a pickle); pickles are judged whole, data after their STOP
  included; object-dtype ``.npy`` members go through the restricted
  unpickler; encrypted members, other compressions and archives inside the
  archive are *unscanned*; a torch zip's raw storages are data;
- numpy ``.npy`` files of object dtype (their data is a pickle);
- any file that *starts* with a pickle: a loader that unpickles the first
  bytes of every file it does not otherwise recognise (torch.load) runs it,
  so an HDF5 file with a pickle in its user block is a pickle too;
- the layouts of the format whose loader unpickles files (the registry's
  ``pickle_format()``: torch's legacy, tar and zip layouts, bare pickles),
  through that format's ``scan`` hook, which builds on the helpers here;
- code that runs on load outside pickles, through the format's scan hook:
  Keras Lambda layers and functions in a model config, TensorFlow SavedModel
  graphs with Python or file/system ops, ONNX custom-op domains.

Archives we cannot open (7z, rar, gzip, ...) and binary files of no format
we know are *unscanned*.

Each pickle gets a raw listing of the names it mentions
(``ckptconv.pickle.scan_globals``) and a real interpretation by the pickle
format's adapter (``interpret_pickle``: its allowlist over the restricted
engine of ``ckptconv.pickle``), which decides: *safe* (only allowlisted
calls; other classes kept as inert records, listed), *unsafe* (the first
refused callable, named) or *unscanned* (malformed: the reason).

Sources of truth: numpy ``lib/format.py`` (``.npy`` header), APPNOTE.TXT
(zip general purpose flags: bit 0 = encrypted).
"""
from __future__ import annotations

import ast
import io
import mmap
import os
import pickletools
import struct
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import (EXIT_BAD_INPUT, EXIT_OK, EXIT_UNSAFE, CkptconvError, FormatError,
                     UnsafePickleError)
from .pickle import starts_a_pickle
from .remote import as_path, expand_remote, is_remote, open_source
from .reports import Report

SAFE, UNSAFE, UNSCANNED = "safe", "unsafe", "unscanned"
_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_SUFFIXES = (".pkl", ".debug_pkl")
_MAX_PICKLES = 10_000          # concatenated pickles in one file or member
MAX_MEMBER = 1 << 31           # bytes of one pickle member we are willing to interpret
_MAX_PARTIAL = 64 << 20        # bytes of a malformed pickle judged for what it names
SNIFF = 1 << 16                # bytes of a file or member its kind is told from
PICKLE_OPCODES = frozenset(op.code.encode("latin1") for op in pickletools.opcodes)


@dataclass
class PickleReport(Report):
    """One pickle inside a file: where it is, what it names, what we decided."""

    where: str                      # member name, "pickle #N at offset K", ...
    verdict: str
    reason: str | None = None
    names: list[str] = field(default_factory=list)    # every GLOBAL/STACK_GLOBAL/INST name
    calls: list[str] = field(default_factory=list)    # allowlisted calls it makes
    records: list[str] = field(default_factory=list)  # classes kept as inert records


@dataclass
class ScanReport(Report):
    """The verdict on one file, with every pickle it holds."""

    dict_properties = ("records", "exit_code")

    path: str
    kind: str = "unknown"
    verdict: str = SAFE
    pickles: list[PickleReport] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {SAFE: EXIT_OK, UNSAFE: EXIT_UNSAFE}.get(self.verdict, EXIT_BAD_INPUT)

    @property
    def records(self) -> list[str]:
        return sorted({r for p in self.pickles for r in p.records})

    def add(self, pr: PickleReport) -> None:
        self.pickles.append(pr)
        if pr.verdict == UNSAFE:
            self.verdict = UNSAFE
        elif pr.verdict == UNSCANNED and self.verdict == SAFE:
            self.verdict = UNSCANNED
        if pr.reason and pr.verdict != SAFE:
            self.reasons.append(pr.reason)

    def fail(self, reason: str) -> None:
        """Bytes we could not judge (the file, a member): never safe."""
        if self.verdict == SAFE:
            self.verdict = UNSCANNED
        self.reasons.append(reason)

    def refuse(self, reason: str) -> None:
        """Code that would run on load, found outside a pickle."""
        self.verdict = UNSAFE
        self.reasons.append(reason)

    def refuse_all(self, reasons: Iterable[str]) -> None:
        """A format's ``scan`` hook: each place that runs code on load."""
        for reason in reasons:
            self.refuse(reason)

    def __str__(self) -> str:
        n = len(self.pickles)
        verdict = SAFE if self.verdict == SAFE else self.verdict.upper()
        detail = f"{self.kind}; {n} pickle{'s' if n != 1 else ''}" if n else self.kind
        lines = [f"{self.path}: {verdict} ({detail})"]
        lines += [f"  reason: {r}" for r in self.reasons]
        if self.records:
            lines.append(f"  inert records (never constructed): {', '.join(self.records)}")
        lines += [f"  note: {x}" for x in self.notes]
        return "\n".join(lines)


@dataclass
class ScanSummary(Report):
    """``scan_paths``: every file under the given paths."""

    files: list[ScanReport] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        out = {SAFE: 0, UNSAFE: 0, UNSCANNED: 0}
        for f in self.files:
            out[f.verdict] = out.get(f.verdict, 0) + 1
        return out

    @property
    def exit_code(self) -> int:
        c = self.counts
        if c[UNSAFE]:
            return EXIT_UNSAFE
        if c[UNSCANNED]:
            return EXIT_BAD_INPUT
        return EXIT_OK

    def to_dict(self) -> dict:
        return {"files": [f.to_dict() for f in self.files], "counts": self.counts,
                "exit_code": self.exit_code}

    def __str__(self) -> str:
        c = self.counts
        lines = [str(f) for f in self.files]
        lines.append(f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}: "
                     f"{c[SAFE]} safe, {c[UNSAFE]} unsafe, {c[UNSCANNED]} unscanned")
        return "\n".join(lines)


# --- one pickle -----------------------------------------------------------------------

def judge_pickle(data: bytes, display: str, where: str) -> tuple[PickleReport, Any]:
    """Raw listing + interpretation of one pickle; (report, value or None)."""
    from .pickle import scan_globals

    listing = scan_globals(data, display)
    names = sorted({n for op, n in listing if op != "ERROR"})
    try:
        judged = _interpret_pickle()(data, display, listing)
    except UnsafePickleError as e:
        return PickleReport(where, UNSAFE, one_line(e), names), None
    except FormatError as e:
        return PickleReport(where, UNSCANNED, one_line(e), names), None
    return PickleReport(where, SAFE, None, names, sorted(judged.calls_seen),
                        sorted(set(judged.records))), judged.result


def _interpret_pickle() -> Callable:
    """``interpret_pickle(data, display, listing)`` of the pickle format's
    adapter: raises UnsafePickleError (the first refused callable) or
    FormatError (malformed), else returns what it judged (``calls_seen``,
    ``records``, ``result``)."""
    from .registry import get_adapter, pickle_format

    return get_adapter(pickle_format()).interpret_pickle


def one_line(e: BaseException) -> str:
    """An error's message on one line (a report's reason)."""
    return " ".join(str(e).split())


def pickle_end(buf, start: int) -> tuple[int, bool]:
    """(offset just past the STOP of the pickle at ``start``, True), or
    (an offset at or past where parsing failed, False)."""
    from .pickle import iter_opcodes

    if isinstance(buf, bytes) and start == 0:  # the common case: the fast tokenizer, no copy
        try:
            for name, _, pos in iter_opcodes(buf):
                if name == "STOP":
                    return pos + 1, True
        except Exception:  # noqa: BLE001 - "does a pickle start here?" has no wrong answer
            pass
        return min(len(buf), _MAX_PARTIAL), False
    stream = _View(buf, start)
    try:
        for op, _, _ in pickletools.genops(stream):
            if op.name == "STOP":
                return stream.pos, True
    except Exception:  # noqa: BLE001
        pass
    return stream.pos, False


class _View(io.RawIOBase):
    """A read-only stream over a buffer (bytes or mmap) that never reads past its end,
    so a hostile length field cannot make ``genops`` allocate more than is there."""

    def __init__(self, buf, start: int = 0):
        self.buf, self.pos = buf, start

    def read(self, n: int = -1) -> bytes:
        end = len(self.buf) if n is None or n < 0 else min(len(self.buf), self.pos + n)
        out = bytes(self.buf[self.pos:end])
        self.pos = end
        return out

    def readline(self, limit: int = -1) -> bytes:
        end = self.buf.find(b"\n", self.pos)
        end = len(self.buf) if end < 0 else end + 1
        out = bytes(self.buf[self.pos:end])
        self.pos = end
        return out

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True


def scan_pickle_run(rep: ScanReport, buf, start: int, display: str, label: str,
                    limit: int | None = None) -> tuple[int, list]:
    """Pickles one after another from ``start`` (up to ``limit`` of them), as
    formats made of pickles in a row hold them (torch legacy files). A pickle
    that does not parse is reported (unscanned, or unsafe if it names
    dangerous callables). Returns the offset after the last pickle and the
    decoded values (None where refused)."""
    values: list = []
    pos = start
    count = 0
    while pos < len(buf) and count < (limit or _MAX_PICKLES):
        end, complete = pickle_end(buf, pos)
        where = f"{label} #{count + 1} at offset {pos}" if label else f"pickle at offset {pos}"
        pr, value = judge_pickle(bytes(buf[pos:end]), display, where)
        if not complete:
            # judge the part that parses: pickle.load would run it before failing
            if pr.verdict == SAFE:  # parses alone but not here: still malformed
                pr.verdict, pr.reason = UNSCANNED, f"{display}: pickle at offset {pos} is malformed"
            rep.add(pr)
            return pos, values
        rep.add(pr)
        values.append(value)
        count += 1
        pos = end
        if pr.verdict != SAFE:
            break
    return pos, values


# --- containers ---------------------------------------------------------------------------

# a format's zip layout: member names -> (kind of archive, which members are raw data)
ZipLayout = Callable[[list], "tuple[str, Callable[[str], bool]]"]


def _plain_zip(names: list[str]) -> tuple[str, Callable[[str], bool]]:
    return "zip archive", lambda name: False


def scan_zip(rep: ScanReport, path: Path, layout: ZipLayout = _plain_zip) -> None:
    """Every member of a zip archive, sniffed by its content whatever its name
    (a pickle named ``data.txt`` is a pickle), but those ``layout`` says are
    raw data."""
    from .tensor import FileHandle
    from .ziputil import DEFLATED, STORED, is_zip, read_member_bytes, read_members

    handle = FileHandle(path)
    members = read_members(handle)
    names = list(members)
    rep.kind, is_raw_data = layout(names)
    for name in names:
        m = members[name]
        display = f"{handle.display}:{name}"
        if is_raw_data(name) or name.endswith("/") and not m.size:
            continue
        if m.compress_type not in (STORED, DEFLATED):
            rep.fail(f"{display}: zip member compressed with method {m.compress_type}; not scanned")
            continue
        head = _member_head(handle, m)
        if name.endswith(_PICKLE_SUFFIXES) or starts_a_pickle(head):
            data = read_member_bytes(handle, m, MAX_MEMBER)
            rep.add(judge_pickle(data, display, name)[0])
        elif head.startswith(_NPY_MAGIC):
            if _is_object_npy(head, display):
                _scan_npy(rep, read_member_bytes(handle, m, MAX_MEMBER), display, name)
        elif is_zip(head) or archive_kind(head) or is_tar(head):
            kind = archive_kind(head) or ("tar" if is_tar(head) else "zip")
            rep.fail(f"{display}: a {kind} archive inside the archive; not scanned")
    if not rep.pickles and rep.verdict == SAFE:
        rep.notes.append("no pickle members")


# Archives and compressed streams ckptconv cannot look inside: what they hold
# is not judged (a pickle in a .7z is still a pickle once extracted).
_ARCHIVES = ((b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!\x1a\x07", "rar"), (b"\x1f\x8b", "gzip"),
             (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
             (b"\x04\x22\x4d\x18", "lz4"), (b"MSCF", "cab"), (b"!<arch>\n", "ar"),
             (b"\x60\xea", "arj"), (b"LZIP", "lzip"))


def archive_kind(head: bytes) -> str | None:
    """The kind of archive or compressed stream ``head`` starts, if any we cannot open."""
    for magic, kind in _ARCHIVES:
        if head.startswith(magic):
            return kind
    return None


def _is_text(head: bytes) -> bool:
    """UTF-8 text without NULs (JSON, YAML, README...): no loader unpickles it."""
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a character cut off at the end of the head
    return True


def _member_head(handle, m, n: int = 1 << 16) -> bytes:
    """The first ``n`` bytes of a zip member, inflating only that much."""
    import zlib

    from .ziputil import STORED

    raw = handle.pread(m.data_offset, min(m.compressed_size, n if m.compress_type == STORED else
                                          max(n, m.compressed_size)), f"zip member '{m.name}'")
    if m.compress_type == STORED:
        return raw
    try:
        return zlib.decompressobj(-15).decompress(raw, n)
    except zlib.error as e:
        raise FormatError(f"{handle.display}: zip member '{m.name}' does not inflate ({e})") from None


def _is_object_npy(head: bytes, display: str) -> bool:
    if not head.startswith(_NPY_MAGIC):
        return False
    try:
        header, _ = _npy_header(head, display)
    except FormatError:
        return True  # cannot tell from the head: read it all
    return _npy_is_object(header.get("descr"))


def _npy_is_object(descr) -> bool:
    # numpy's reading of the descr (every spelling of an object dtype); one numpy
    # refuses is judged as a pickle all the same: a scanner does not guess
    from .dtypes import numpy_descr_holds_objects

    return numpy_descr_holds_objects(descr, undecided=True)


def is_tar(head: bytes) -> bool:
    """A valid tar header block (tarfile accepts checksummed V7 headers without
    the "ustar" magic, and so does torch's legacy loader)."""
    if len(head) < 512:
        return False
    try:
        tarfile.TarInfo.frombuf(head[:512], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _npy_header(buf, display: str) -> tuple[dict, int]:
    """numpy lib/format.py: magic, version, little-endian header length, a dict literal."""
    if len(buf) < 10:
        raise FormatError(f"{display}: truncated .npy header")
    major = buf[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", bytes(buf[8:10]))
        start = 10
    elif major in (2, 3):
        if len(buf) < 12:
            raise FormatError(f"{display}: truncated .npy header")
        (hlen,) = struct.unpack("<I", bytes(buf[8:12]))
        start = 12
    else:
        raise FormatError(f"{display}: unknown .npy version {major}")
    if hlen > 1 << 20 or start + hlen > len(buf):
        raise FormatError(f"{display}: .npy header length {hlen} does not fit the file")
    try:
        # numpy decodes a version 3 header as UTF-8, earlier ones as latin-1
        header = ast.literal_eval(bytes(buf[start:start + hlen]).decode(
            "utf-8" if major == 3 else "latin1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise FormatError(f"{display}: .npy header is not a dict literal ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{display}: .npy header is not a dict")
    return header, start + hlen


def _scan_npy(rep: ScanReport, buf, display: str, where: str) -> None:
    try:
        header, data_start = _npy_header(buf, display)
    except FormatError as e:
        rep.fail(str(e))
        return
    descr = header.get("descr")
    # object arrays are written as a pickle of the array after the header
    if _npy_is_object(descr):
        rep.add(judge_pickle(bytes(buf[data_start:]), display, f"{where} (object array)")[0])
    elif rep.kind == "numpy .npy":
        rep.notes.append(f"plain {descr} array, no pickle")


# --- one file -------------------------------------------------------------------------

_IN_MEMORY = 256 << 20  # smaller files are scanned from bytes (faster), bigger ones mapped


@contextmanager
def open_buffer(path: Path) -> Iterator:
    """The file's bytes as the scanners index them (closed after): bytes (small
    local files), a map (big ones), or, for a URL, a view read by range
    requests (only the ranges judged are fetched: a torch zip's storages never are)."""
    if is_remote(path):
        from .remote import RemoteBuffer
        from .tensor import FileHandle

        buf = RemoteBuffer(FileHandle(path))
        try:
            yield buf
        finally:
            buf.close()
        return
    size = path.stat().st_size
    if size == 0:
        yield b""
        return
    with open(path, "rb") as f:
        if size <= _IN_MEMORY:
            yield f.read()
            return
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield buf
    finally:
        buf.close()


def scan(path: str | os.PathLike) -> ScanReport:
    """The safety verdict on one file (see the module docstring)."""
    p = as_path(path)  # a local Path, or a RemotePath for a URL
    rep = ScanReport(str(p))
    display = p.name
    try:
        if not p.exists():
            rep.fail(f"{p}: no such file or folder")
            return rep
        if p.is_dir():
            rep.fail(f"{p}: is a folder (scan_paths walks folders)")
            return rep
        _scan_file(rep, p, display)
    except UnsafePickleError as e:
        rep.verdict = UNSAFE
        rep.reasons.append(one_line(e))
    except (CkptconvError, OSError, tarfile.TarError, EOFError) as e:
        rep.fail(one_line(e) if isinstance(e, CkptconvError) else f"{display}: {type(e).__name__}: "
                 f"{one_line(e)}")
    return rep


def _scan_file(rep: ScanReport, p: Path, display: str) -> None:
    from .registry import folder_member, hook, pickle_format

    with open_source(p) as f:
        head = f.read(SNIFF)
    if not head:
        rep.kind = "empty file"
        rep.notes.append("0 bytes, no pickle")
        return
    member = folder_member(p)
    fmt = member[0] if member is not None else _known_format(p)
    if fmt is not None and fmt == pickle_format():
        hook(fmt, "scan", p)(p, rep)   # the loader that unpickles: its layouts, all of the file
        return
    with open_buffer(p) as buf:
        scan_contents(rep, p, buf, display, fmt)
    if fmt is not None and rep.verdict != UNSAFE:
        _scan_format(rep, p, fmt)


def scan_contents(rep: ScanReport, p: Path, buf, display: str, fmt: str | None) -> None:
    """What any file holds, told by its first bytes: a zip's members, a tar
    (given to the pickle format's loader, which reads tars), a numpy array, a
    pickle at the start, an archive we cannot open, text."""
    from .registry import folder_member
    from .ziputil import is_zip

    head = bytes(buf[:SNIFF])
    if is_zip(head) or head[:4] == b"PK\x05\x06":
        scan_zip(rep, p)
    elif is_tar(head):
        from .registry import hook, pickle_format

        hook(pickle_format(), "scan", p)(p, rep)
    elif head.startswith(_NPY_MAGIC):
        rep.kind = "numpy .npy"
        _scan_npy(rep, buf, display, display)
        if not rep.pickles and not rep.reasons:
            rep.kind = "numpy .npy (no pickle)"
    elif archive_kind(head):
        rep.kind = f"{archive_kind(head)} archive"
        rep.fail(f"{display}: a {archive_kind(head)} archive: ckptconv cannot look inside it; "
                 "not scanned")
    elif starts_a_pickle(head) or (head[:1] in PICKLE_OPCODES and pickle_end(buf, 0)[1]):
        _scan_pickle_prefix(rep, buf, display, fmt)
    elif fmt is not None:
        rep.kind = f"{fmt}, no pickles"
    elif (member := folder_member(p)) is not None:
        rep.kind = member[1]
    elif _is_text(head):
        rep.kind = "text, no pickle"
    else:
        rep.kind = "unknown"
        rep.fail(f"{display}: not a format ckptconv judges (first bytes {head[:8]!r}); not scanned")


def _scan_pickle_prefix(rep: ScanReport, buf, display: str, fmt: str | None) -> None:
    """A file that starts with a pickle. Alone (a bare pickle no format
    claims), it is judged whole: data after its STOP too. In front of another
    format (an HDF5 user block), the pickle is what a pickle loader runs; the
    rest is that format."""
    end, complete = pickle_end(buf, 0)
    rep.kind = "pickle" if fmt is None else f"{fmt} file that starts with a pickle"
    whole = fmt is None or not complete
    rep.add(judge_pickle(bytes(buf if whole else buf[:end]), display, "pickle at offset 0")[0])




def _scan_format(rep: ScanReport, p: Path, fmt: str) -> None:
    """The format's ``scan`` hook, if it has one: code that runs on load
    outside pickles (a Keras Lambda layer, a SavedModel's Python ops ...)."""
    from .registry import available_formats, format_info, hook

    if fmt not in available_formats() or "scan" not in format_info(fmt).hooks:
        return
    try:
        hook(fmt, "scan", p)(p, rep)
    except CkptconvError as e:
        rep.fail(one_line(e))
    except ImportError as e:
        rep.fail(f"{p.name}: judging {fmt} content needs {e.name}; not scanned")


def _known_format(p: Path) -> str | None:
    from .registry import detect_format

    try:
        return detect_format(p)
    except Exception:  # noqa: BLE001 - only a label for the report
        return None


# --- many files -------------------------------------------------------------------------

def iter_files(paths: Iterable[str | os.PathLike]) -> Iterable[Path]:
    """Files named, and every file under folders named (sorted, links not followed)."""
    for raw in paths:
        if is_remote(raw):  # a URL: the object, everything under the prefix, or a glob's matches
            yield from expand_remote(str(raw))
            continue
        p = Path(raw)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for f in sorted(files):
                    fp = Path(root) / f
                    if fp.is_file() and not fp.is_symlink():
                        yield fp
        else:
            yield p


def scan_paths(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> ScanSummary:
    """``ckptconv scan SRC...``: every file named or under a folder named."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    summary = ScanSummary()
    for f in iter_files(paths):
        summary.files.append(scan(f))
    return summary
