"""Reading HDF5 files: datasets as lazy tensors (file ranges where the
dataset is contiguous and unfiltered), attributes as metadata.

Source of truth: h5py (``Dataset.id.get_offset`` / ``get_storage_size``: the
absolute file offset and size of a contiguous dataset's raw bytes).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from ckptconv._lazy import np

from ckptconv import dtypes as _dt
from ckptconv.errors import FormatError
from ckptconv.tensor import ArrayTensor, FileSource, LazyTensor, StoredTensor, TensorRef
from ckptconv.tree import TREE_KEY, Checkpoint, tree_from_metadata

from .source import DTYPE_ATTR, H5Source, h5_message, lacks_hdf5_type

ATTR_TYPES_KEY = "ckptconv.hdf5.attrs"  # metadata key: dtypes of non-string attributes


def _attr_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "SOU":
        return _attr_text(value[()])
    return None


def tensor_dtype(ds) -> tuple[_dt.DType, bool] | str:
    """(dtype, big_endian) of a dataset, or the reason it is not a tensor."""
    dt = ds.dtype
    tag = _attr_text(ds.attrs.get(DTYPE_ATTR)) if DTYPE_ATTR in ds.attrs else None
    if tag is not None and dt.kind in "uV" and not dt.fields:
        try:
            special = _dt.get(tag)
        except FormatError:
            special = None
        if special is not None and lacks_hdf5_type(special) and dt.itemsize == special.itemsize:
            return special, dt.byteorder == ">"
    if dt.fields or dt.subdtype:
        return "compound" if dt.fields else "array element type"
    if dt.kind in "SUO":
        return "string"
    if dt.kind == "V":
        return "opaque"
    try:
        return _dt.from_numpy(dt), dt.byteorder == ">"
    except FormatError:
        return f"element type {dt}"



def _dataset_ref(ds, path: str, src: H5Source, dtype: _dt.DType, big_endian: bool) -> TensorRef:
    import h5py

    shape = tuple(int(s) for s in ds.shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return ArrayTensor(np.empty(shape, dtype=_dt.numpy_dtype(dtype)), dtype)
    dcpl = ds.id.get_create_plist()
    direct = (dcpl.get_layout() == h5py.h5d.CONTIGUOUS and dcpl.get_nfilters() == 0
              and dcpl.get_external_count() == 0)
    offset = ds.id.get_offset() if direct else None
    if offset is not None and ds.id.get_storage_size() == nbytes:
        tid = ds.id.get_type()
        # Only when the file's element type is exactly the one we claim (an
        # odd float layout h5py converts would otherwise be misread).
        same = tid.get_class() == h5py.h5t.OPAQUE or tid.equal(h5py.h5t.py_create(ds.dtype))
        if same and tid.get_size() == dtype.itemsize:
            source = FileSource(src.handle, src.base + offset, nbytes, f"dataset '{path}'")
            source.check()
            return StoredTensor(dtype, shape, source, big_endian=big_endian)
    return LazyTensor(dtype, shape, lambda: src.read_dataset(path, dtype),
                      what=f"{src.display}: dataset '{path}'")


class H5Contents:
    """Everything an HDF5 file holds that ckptconv keeps, in reading order."""

    def __init__(self):
        self.entries: dict[str, Any] = {}       # name -> TensorRef or plain value
        self.metadata: dict[str, str] = {}
        self.attr_types: dict[str, dict] = {}
        self.skipped: list[str] = []

    def tensors(self) -> dict[str, TensorRef]:
        return {k: v for k, v in self.entries.items() if isinstance(v, TensorRef)}


def read_h5(src: H5Source, order: list[str] | None = None, skip_attr: Callable[[str], bool] = None,
            numeric_vars: bool = False) -> H5Contents:
    """Walk the file: datasets (``order`` first), attributes into metadata."""
    import h5py

    f = src.file
    out = H5Contents()
    by_object: dict[int, list] = {}     # hash(ObjectID) -> [(ObjectID, ref)]
    seen_groups: dict[int, list] = {}

    def keys_of(group) -> list[str]:
        keys = list(group.keys())
        if numeric_vars and group.name.rsplit("/", 1)[-1] == "vars" and all(k.isdigit() for k in keys):
            keys.sort(key=int)
        return keys

    def add_attrs(obj, path: str) -> None:
        for name in obj.attrs:
            if skip_attr and skip_attr(name):
                continue
            ref = out.entries.get(path) if path else None
            if name == DTYPE_ATTR and isinstance(ref, TensorRef) and lacks_hdf5_type(ref.dtype):
                continue  # consumed: it named the dtype
            key = f"{path}@{name}" if path else name
            try:
                value = obj.attrs[name]
            except (OSError, TypeError, ValueError) as e:
                out.skipped.append(f"attribute {key} ({h5_message(e)})")
                continue
            text = _attr_text(value)
            if text is not None:
                out.metadata[key] = text
                continue
            if isinstance(value, h5py.Empty):
                out.skipped.append(f"attribute {key} (empty)")
                continue
            arr = np.asarray(value)
            if arr.dtype.kind not in "biufSUO" or arr.dtype.fields:
                out.skipped.append(f"attribute {key} (type {arr.dtype})")
                continue
            items = arr.tolist()
            items = _decode_bytes(items)
            out.metadata[key] = json.dumps(items)
            out.attr_types[key] = {"dtype": arr.dtype.str if arr.dtype.kind != "O" else "vlen-str",
                                   "shape": list(arr.shape)}

    def visit_dataset(ds, path: str) -> None:
        if path in out.entries:
            return
        same = [ref for oid, ref in by_object.get(hash(ds.id), ()) if oid == ds.id]
        if same:                        # a second hard (or soft) link to one dataset: tied
            out.entries[path] = same[0]
            return
        if ds.shape is None:
            out.skipped.append(f"{path} (null dataspace)")
            return
        kind = tensor_dtype(ds)
        if isinstance(kind, str):
            if kind == "string":
                try:
                    val = ds.asstr()[()]
                    out.entries[path] = val.tolist() if isinstance(val, np.ndarray) else val
                    return
                except (OSError, TypeError, ValueError, UnicodeDecodeError):
                    pass
            out.skipped.append(f"{path} ({kind})")
            return
        dtype, be = kind
        try:
            ref = _dataset_ref(ds, path, src, dtype, be)
        except (OSError, ValueError, RuntimeError) as e:
            raise FormatError(f"{src.display}: dataset '{path}': {h5_message(e)}") from None
        by_object.setdefault(_object_key(ds), []).append((ds.id, ref))
        out.entries[path] = ref

    def walk(group, prefix: str) -> None:
        visited = seen_groups.setdefault(_object_key(group), [])
        if any(oid == group.id for oid in visited):     # a soft link back up the tree
            return
        visited.append(group.id)
        add_attrs(group, prefix.rstrip("/"))
        for name in keys_of(group):
            path = prefix + name
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                out.skipped.append(f"{path} (external link to {link.filename}, not followed)")
                continue
            try:
                obj = group[name]
            except (KeyError, OSError, ValueError) as e:
                out.skipped.append(f"{path} ({h5_message(e)})")
                continue
            if isinstance(obj, h5py.Dataset):
                visit_dataset(obj, path)
                add_attrs(obj, path)
            elif isinstance(obj, h5py.Group):
                walk(obj, path + "/")
            else:
                out.skipped.append(f"{path} (named datatype)")

    try:
        for path in order or ():
            if path in f and isinstance(f[path], h5py.Dataset):
                visit_dataset(f[path], path)
        walk(f, "")
    except (OSError, RuntimeError) as e:
        raise FormatError(f"{src.display}: {h5_message(e)}") from None
    return out


def _object_key(obj):
    """A hashable key for an HDF5 object (a corrupt file can hand out a FileID,
    which h5py refuses to hash)."""
    try:
        return hash(obj.id)
    except TypeError:
        return ("name", obj.name)


def _decode_bytes(items):
    if isinstance(items, bytes):
        return items.decode("utf-8", "replace")
    if isinstance(items, list):
        return [_decode_bytes(x) for x in items]
    return items


def as_checkpoint(contents: H5Contents, src: H5Source, fmt: str, path: Path,
                extra_meta: dict[str, str] | None = None, info: dict | None = None) -> Checkpoint:
    meta = dict(extra_meta or {})
    meta.update(contents.metadata)
    if contents.attr_types:
        meta[ATTR_TYPES_KEY] = json.dumps(contents.attr_types, separators=(",", ":"))
    tensors = contents.tensors()
    info = dict(info or {})
    tree, meta = tree_from_metadata(tensors, meta, src.display, info)
    if TREE_KEY not in contents.metadata:
        # keep string datasets and the file's order (tensors as rebuilt: views, ties)
        tree = {k: tree.get(k, v) for k, v in contents.entries.items()}
    if contents.skipped:
        info["skipped"] = f"{len(contents.skipped)} not read: " + "; ".join(contents.skipped[:20])
    return Checkpoint(tree, meta, fmt, str(path), info)

