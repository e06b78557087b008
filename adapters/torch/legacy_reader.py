"""Pickles outside a zip: the legacy torch format (``torch.save`` before 1.6,
or with ``_use_new_zipfile_serialization=False``) and bare ``pickle.dump``
files, read with the same allowlist as the zip format.

Ground truth: ``torch/serialization.py`` (``_legacy_save``, ``_legacy_load``):
five pickles (magic number, protocol version, sys_info, the object, the
storage keys) followed by each storage as an int64 element count and its raw
bytes, in the order of the keys.
"""
from __future__ import annotations

import io
from pathlib import Path

from ckptconv.paths import open_source
from ckptconv._lazy import np

from ckptconv import dtypes as _dt
from ckptconv.errors import FormatError
from ckptconv.tensor import ArrayTensor, BufferSource, ByteSource, FileHandle, FileSource
from ckptconv.tree import Checkpoint
from ckptconv.pickle import RestrictedUnpickler

from ..sniffers import LEGACY_HEAD, LEGACY_MAGIC, is_bare_pickle  # noqa: F401 (re-exported)
from .unpickling import TorchUnpickler, checkpoint_info

LEGACY_PROTOCOL = 1001


def _scan_one_pickle(f: io.BufferedReader, display: str) -> int:
    """Skip one pickle without interpreting it; returns its end offset."""
    import pickletools

    try:
        for op, _, pos in pickletools.genops(f):
            if op.name == "STOP":
                return pos + 1
    except Exception as e:
        raise FormatError(f"{display}: corrupt or truncated pickle ({e})") from None
    raise FormatError(f"{display}: truncated pickle (no STOP opcode)")


def read_legacy_checkpoint(path: Path, allow_globals=()) -> Checkpoint:
    """The pre-1.6 format: magic, protocol, sys_info, main pickle, storage keys, raw storages."""
    handle = FileHandle(path)
    display = handle.display

    def plain(f, what):
        up = RestrictedUnpickler(f"{display} ({what})")
        return up.load(f)

    with open_source(path) as f:
        magic = plain(f, "magic number")
        if magic != LEGACY_MAGIC:
            raise FormatError(f"{display}: not a torch legacy file (bad magic number)")
        protocol = plain(f, "protocol version")
        if protocol != LEGACY_PROTOCOL:
            raise FormatError(f"{display}: unsupported legacy protocol version {protocol!r}")
        sys_info = plain(f, "sys info")
        if not isinstance(sys_info, dict):
            raise FormatError(f"{display}: bad sys info record")
        big = not sys_info.get("little_endian", True)
        main_start = f.tell()
        main_end = _scan_one_pickle(f, f"{display} (main pickle)")
        f.seek(main_end)
        keys = plain(f, "storage keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise FormatError(f"{display}: bad storage key list")
        data_start = f.tell()
        f.seek(main_start)
        main_bytes = f.read(main_end - main_start)

    # First pass: learn each storage's dtype and size; the raw data follows
    # the pickles in the order of `keys`, each as int64 numel + bytes.
    found: dict[str, tuple[_dt.DType, int, bool]] = {}

    def probe(key, dtype, numel, untyped):
        found[key] = (dtype, numel, untyped)
        return BufferSource(b"")

    class _Probe(TorchUnpickler):
        def _rebuild(self, q, args):
            return ArrayTensor(np.zeros(0, np.uint8))

        def persistent_load(self, pid):
            if isinstance(pid, tuple) and len(pid) > 5 and pid[5] is not None:
                pid = pid[:5]
            return super().persistent_load(pid)

    _Probe(display, probe, big, allow_globals).load(main_bytes)
    sources: dict[str, ByteSource] = {}
    offset = data_start
    order = "big" if big else "little"
    for key in keys:
        if key not in found:
            raise FormatError(f"{display}: storage '{key}' listed but never used")
        dtype, numel, untyped = found[key]
        size = 1 if untyped else dtype.itemsize
        header = int.from_bytes(handle.pread(offset, 8, f"storage '{key}' header"), order)
        if header < 0 or offset + 8 + header * size > handle.size:
            raise FormatError(f"{display}: storage '{key}' needs {header * size} bytes at offset "
                              f"{offset + 8}, file ends at {handle.size} (truncated?)")
        src = FileSource(handle, offset + 8, header * size, f"storage '{key}'")
        sources[key] = src
        offset += 8 + header * size

    def storage_source(key, dtype, numel, untyped):
        if key not in sources:
            raise FormatError(f"{display}: storage '{key}' has no data")
        return sources[key]

    up = TorchUnpickler(display, storage_source, big, allow_globals)
    tree = up.load(main_bytes)
    info = checkpoint_info(up, "legacy")
    return Checkpoint(tree, {}, "torch", str(path), info)



def read_bare_pickle(path: Path, allow_globals=()) -> Checkpoint:
    """A plain ``pickle.dump`` file (protocol 2+), e.g. a dict of numpy arrays.

    Not a torch format, but ``torch.load`` runs such a file's pickle (it reads
    it as the legacy magic number), so it is read here, with the same
    allowlist. It has no storages; numpy arrays become the tensors.
    """
    from ckptconv.tree import to_canonical

    handle = FileHandle(path)
    display = handle.display
    if handle.size > 1 << 31:
        raise FormatError(f"{display}: bare pickle of {handle.size} bytes is too big to interpret")

    def storage_source(key, dtype, numel, untyped):
        raise FormatError(f"{display}: a bare pickle cannot hold torch storages (persistent id "
                          f"'{key}'); is it part of a legacy checkpoint?")

    up = TorchUnpickler(display, storage_source, allow_globals=allow_globals)
    tree = to_canonical(up.load(handle.pread(0, handle.size, "pickle")))
    return Checkpoint(tree, {}, "torch", str(path), checkpoint_info(up, "pickle"))



