"""``ckptconv scan``'s hook for torch: the layouts in which ``torch.load``
unpickles, judged without executing anything.

- zip (torch >= 1.6, TorchScript): every member is sniffed by the core
  (``ckptconv.safety.scan_zip``); the raw storages under ``<root>/data/`` are
  data, never unpickled;
- legacy files: magic number, protocol, sys_info, main pickle, storage keys,
  then raw storages (a magic number written with another protocol too);
- the older legacy *tar* layout (``sys_info``, ``pickle``, and the pickles
  between the raw bytes of ``storages`` and ``tensors``);
- bare pickles, judged whole (data after the STOP included).

Anything else the torch reader claims (a ``*.bin.index.json``) is scanned by
the core. Every pickle is judged by ``check_pickle`` (torch's allowlist): the
registry names torch as the format whose loader unpickles files, so the core
judges the pickles it finds elsewhere (``.npz`` members, polyglots) with it too.

Sources of truth: ``torch/serialization.py`` (``_load``, ``_legacy_load`` and
its tar branch ``legacy_load``).
"""
from __future__ import annotations

import struct
import tarfile
from pathlib import Path

from ckptconv import dtypes as _dt
from ckptconv.errors import FormatError
from ckptconv.pickle import starts_a_pickle
from ckptconv.paths import open_source
from ckptconv.safety import (MAX_MEMBER, PICKLE_OPCODES, SAFE, SNIFF, UNSCANNED, ScanReport,
                             is_tar, judge_pickle, one_line, open_buffer, pickle_end,
                             scan_contents, scan_pickle_run, scan_zip)
from ckptconv.tree import ObjectRecord
from ckptconv.ziputil import is_zip

from ..sniffers import LEGACY_HEAD, LEGACY_MAGIC

_TAR_PICKLE_MEMBERS = ("sys_info", "pickle", "storages", "tensors")


def scan_torch(path: Path, rep: ScanReport) -> None:
    """Add the verdict on a file torch.load would unpickle to ``rep``."""
    display = path.name
    with open_buffer(path) as buf:
        head = bytes(buf[:SNIFF])
        if is_zip(head) or head[:4] == b"PK\x05\x06":
            scan_zip(rep, path, _zip_layout)
        elif is_tar(head):
            _scan_tar(rep, path, display)
        elif head.startswith(LEGACY_HEAD):
            _scan_legacy(rep, buf, display)
        elif starts_a_pickle(head) or (head[:1] in PICKLE_OPCODES and pickle_end(buf, 0)[1]):
            _scan_bare_pickle(rep, buf, display)
        else:
            scan_contents(rep, path, buf, display, "torch")


def _zip_layout(names: list[str]):
    """(kind, which members are raw data): torch zips hold ``<root>/data.pkl``
    and raw storages in ``<root>/data/`` (never unpickled)."""
    roots = [n[:-len("data.pkl")] for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    kind = "torch zip" if roots else "zip archive"
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        kind = "TorchScript archive"
    return kind, lambda name: any(name.startswith(f"{r}data/") for r in roots)


def _scan_bare_pickle(rep: ScanReport, buf, display: str) -> None:
    """A file that starts with a pickle, judged whole: data after its STOP too."""
    end, complete = pickle_end(buf, 0)
    rep.kind = "pickle"
    pr, value = judge_pickle(bytes(buf), display, "pickle at offset 0")
    if pr.verdict == UNSCANNED and value is None and complete and _is_legacy_magic_at_start(buf):
        rep.kind = "torch legacy"
        _scan_legacy(rep, buf, display)
        return
    rep.add(pr)


def _is_legacy_magic_at_start(buf) -> bool:
    """A torch legacy file written with another pickle protocol: its first
    pickle is the magic number, data after it is the rest of the format."""
    end, complete = pickle_end(buf, 0)
    if not complete:
        return False
    pr, value = judge_pickle(bytes(buf[:end]), "magic", "magic")
    return type(value) is int and value == LEGACY_MAGIC


def _scan_legacy(rep: ScanReport, buf, display: str) -> None:
    """magic, protocol, sys_info, main pickle, storage keys; raw storages follow."""
    rep.kind = "torch legacy"
    pos, values = scan_pickle_run(rep, buf, 0, display, "legacy pickle", limit=5)
    if rep.verdict == SAFE and len(values) < 5:
        rep.fail(f"{display}: truncated legacy checkpoint ({len(values)} of 5 pickles)")


def _scan_tar(rep: ScanReport, path: Path, display: str) -> None:
    """torch < 0.4's tar layout (``legacy_load`` in torch/serialization.py);
    in any other tar, every member that starts with a pickle."""
    rep.kind = "tar archive"
    with open_source(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        if {m.name for m in members} >= set(_TAR_PICKLE_MEMBERS):
            rep.kind = "torch legacy tar"
        for m in members:
            if m.size > MAX_MEMBER:
                rep.notes.append(f"member {m.name} ({m.size} bytes) not scanned: too big")
                continue
            fh = tar.extractfile(m)
            data = fh.read() if fh is not None else b""
            mdisplay = f"{display}:{m.name}"
            if m.name == "storages":
                _scan_tar_records(rep, data, mdisplay, _skip_storage)
            elif m.name == "tensors":
                _scan_tar_records(rep, data, mdisplay, _skip_tensor)
            elif m.name in _TAR_PICKLE_MEMBERS or starts_a_pickle(data[:SNIFF]):
                rep.add(judge_pickle(data, mdisplay, m.name)[0])


def _skip_storage(args, data: bytes, pos: int, display: str) -> int:
    # (key, location, storage_type) then int64 element count and the raw bytes
    if not (isinstance(args, tuple) and len(args) == 3):
        raise FormatError(f"{display}: bad storage record {args!r:.80}")
    stype = args[2]
    name = stype.cls.rsplit(".", 1)[-1] if isinstance(stype, ObjectRecord) else None
    if not name:
        raise FormatError(f"{display}: storage type is not a torch storage class")
    itemsize = _dt.from_storage_class(name).itemsize
    if pos + 8 > len(data):
        raise FormatError(f"{display}: truncated storage")
    (numel,) = struct.unpack_from("<q", data, pos)
    end = pos + 8 + numel * itemsize
    if numel < 0 or end > len(data):
        raise FormatError(f"{display}: storage of {numel} elements past the member's end")
    return end


def _skip_tensor(args, data: bytes, pos: int, display: str) -> int:
    # (key, storage_id, type) then int32 ndim, 4 padding bytes, sizes, strides, offset
    if pos + 8 > len(data):
        raise FormatError(f"{display}: truncated tensor record")
    (ndim,) = struct.unpack_from("<i", data, pos)
    end = pos + 8 + 16 * ndim + 8
    if ndim < 0 or end > len(data):
        raise FormatError(f"{display}: tensor record of {ndim} dims past the member's end")
    return end


def _scan_tar_records(rep: ScanReport, data: bytes, display: str, skip) -> None:
    """count pickle, then count x (record pickle + raw bytes), for storages also
    a final storage-views pickle."""
    pos, values = scan_pickle_run(rep, data, 0, display, "count", limit=1)
    if rep.verdict != SAFE:
        return
    count = values[0] if values else None
    if not isinstance(count, int) or count < 0 or count > len(data):
        rep.fail(f"{display}: bad record count {count!r:.40}")
        return
    try:
        for i in range(count):
            pos, vals = scan_pickle_run(rep, data, pos, display, f"record {i}", limit=1)
            if rep.verdict != SAFE or not vals:
                return
            pos = skip(vals[0], data, pos, display)
    except FormatError as e:
        rep.fail(one_line(e))
        return
    if pos < len(data):
        scan_pickle_run(rep, data, pos, display, "views", limit=1)
