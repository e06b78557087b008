"""Writing HDF5 files: h5py lays out every dataset (contiguous, allocated at
creation, never filled) and the attributes; after it closes the file the
tensor bytes go straight to their offsets, file-to-file where the source is
a file. A tensor object seen twice becomes a hard link to its first dataset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from ckptconv._lazy import np

from ckptconv import dtypes as _dt
from ckptconv.errors import FormatError, UnsupportedError
from ckptconv.streaming import COPY_STEP, start_writeback
from ckptconv.tensor import TensorRef
from ckptconv.tree import ALIASES_KEY, SOURCE_KEY, TREE_KEY, Checkpoint

from .read import ATTR_TYPES_KEY
from .source import DTYPE_ATTR, lacks_hdf5_type


def _storage_dtype(d: _dt.DType, opaque: bool) -> np.dtype:
    if not lacks_hdf5_type(d):
        return d.numpy
    return np.dtype(f"V{d.itemsize}") if opaque else np.dtype(f"<u{d.itemsize}")


def check_h5_names(names: list[str], display: str) -> None:
    bad = [n for n in names if not n or any(s in ("", ".") for s in n.split("/"))]
    if bad:
        raise UnsupportedError(f"{display}: HDF5 cannot name datasets {', '.join(map(repr, bad[:5]))} "
                               "(empty or '.' path segment)")
    taken = set(names)
    clash = [n for n in names if any("/".join(n.split("/")[:k]) in taken
                                     for k in range(1, n.count("/") + 1))]
    if clash:
        raise UnsupportedError(f"{display}: '{clash[0]}' needs a group where a dataset of the same "
                               "name is; HDF5 cannot hold both")


def _attr_value(key: str, text: str, types: dict[str, dict]):
    """A metadata string back to the attribute it was (str unless typed)."""
    t = types.get(key)
    if not t:
        return text
    try:
        value = json.loads(text)
        if t["dtype"] == "vlen-str":
            import h5py

            return np.array(value, dtype=h5py.string_dtype()).reshape(t["shape"])
        dt = np.dtype(t["dtype"])
        if dt.kind == "S":
            value = np.array(_encode_str(value))
        return np.array(value, dtype=dt).reshape(t["shape"])
    except (ValueError, TypeError, KeyError):
        return text


def _encode_str(v):
    return [_encode_str(x) for x in v] if isinstance(v, list) else str(v).encode("utf-8")


def place_attributes(metadata: dict[str, str], existing: Callable[[str], bool]) -> dict[str, dict]:
    """Metadata -> {object path: {attr: value}}; ``PATH@ATTR`` goes to PATH when
    it exists in the output, anything else to the root (nothing is dropped)."""
    types = {}
    if ATTR_TYPES_KEY in metadata:
        try:
            types = json.loads(metadata[ATTR_TYPES_KEY])
        except ValueError:
            types = {}
    out: dict[str, dict] = {"": {}}
    for key, text in metadata.items():
        if key == ATTR_TYPES_KEY:
            continue
        path, sep, attr = key.rpartition("@")
        value = _attr_value(key, str(text), types)
        if sep and path and attr and existing(path):
            out.setdefault(path, {})[attr] = value
        else:
            out[""][key] = value
    return out


def write_h5(target: Path, datasets: list[tuple[str, TensorRef]], attrs: dict[str, dict],
             opaque_special: bool) -> None:
    """Write ``datasets`` (path, tensor) and ``attrs`` to ``target``.

    h5py lays out every dataset (contiguous, allocated at creation, never
    filled) and the attributes; after it closes the file the tensor bytes go
    straight to their offsets, file-to-file where the source is a file.
    A tensor object seen twice becomes a hard link to its first dataset.
    """
    import h5py

    placed: list[tuple[int, TensorRef]] = []
    first: dict[int, str] = {}
    with h5py.File(target, "w", track_order=True) as f:
        for path, ref in datasets:
            parent = path.rpartition("/")[0]
            if parent and parent not in f:
                f.create_group(parent, track_order=True)
            if id(ref) in first:
                f[path] = f[first[id(ref)]]
                continue
            first[id(ref)] = path
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            ds = f.create_dataset(path, shape=ref.shape, dtype=_storage_dtype(ref.dtype, opaque_special),
                                  dcpl=dcpl, track_times=False)
            if lacks_hdf5_type(ref.dtype):
                ds.attrs[DTYPE_ATTR] = ref.dtype.name
            if ref.nbytes:
                offset = ds.id.get_offset()
                if offset is not None and ds.id.get_storage_size() == ref.nbytes:
                    placed.append((offset, ref))
                else:   # HDF5 allocates scalars lazily whatever we ask: write them now
                    ds[()] = np.ascontiguousarray(ref.numpy()).view(ds.dtype).reshape(ref.shape)
        for path, items in attrs.items():
            # a dataset, a group, or a group without datasets (Keras 3's "vars")
            obj = f if not path else f[path] if path in f else f.create_group(path)
            for k, v in items.items():
                obj.attrs[k] = v
    fd = os.open(target, os.O_WRONLY)
    try:
        for offset, ref in sorted(placed, key=lambda p: p[0]):
            _pwrite_tensor(fd, ref, offset, target)
    finally:
        os.close(fd)


_WRITEBEHIND_MIN = 1 << 20  # smaller pieces are left to the final fsync


def _pwrite_tensor(fd: int, ref: TensorRef, offset: int, target: Path) -> None:
    """Put ``ref``'s bytes at ``offset`` of ``fd`` (copy_file_range when it lies in a file),
    starting their writeback as they land."""
    span = ref.file_span()
    done = 0
    if span is not None:
        handle, src_off, n = span
        if src_off + n > handle.size:
            handle.pread(src_off, n)  # raises the one-line truncation error
        can_copy = hasattr(os, "copy_file_range") and not handle.is_remote
        while done < n:
            k = 0
            if can_copy:
                try:
                    k = os.copy_file_range(handle.fileno(), fd, min(n - done, COPY_STEP),
                                           src_off + done, offset + done)
                except OSError:
                    can_copy = False
            if k == 0:
                chunk = handle.pread(src_off + done, min(n - done, 8 << 20))
                k = os.pwrite(fd, chunk, offset + done)
            if k >= _WRITEBEHIND_MIN:
                start_writeback(fd, offset + done, k)  # the disk works while we copy on
            done += k
    else:
        for chunk in ref.iter_bytes():
            view = memoryview(chunk).cast("B")
            while len(view):
                k = os.pwrite(fd, view, offset + done)
                view = view[k:]
                if k >= _WRITEBEHIND_MIN:
                    start_writeback(fd, offset + done, k)
                done += k
    if done != ref.nbytes:
        raise FormatError(f"{target}: wrote {done} bytes of a {ref.nbytes}-byte tensor")


def metadata_without_ours(ckpt: Checkpoint) -> dict[str, str]:
    return {str(k): str(v) for k, v in ckpt.metadata.items() if k not in (TREE_KEY, ALIASES_KEY, SOURCE_KEY)}


