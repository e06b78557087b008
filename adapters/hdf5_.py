"""HDF5 files: plain HDF5 (``hdf5``) and Keras weight files (``keras-h5``).

Sources of truth:

- The HDF5 file format specification (superblock signature
  ``\\x89HDF\\r\\n\\x1a\\n`` at offset 0, 512, 1024, 2048, ... when a user block
  precedes it) and h5py (``Dataset.id.get_offset`` / ``get_storage_size``:
  the absolute file offset and size of a contiguous dataset's raw bytes).
- Keras 2 layout: ``tf_keras/src/saving/legacy/hdf5_format.py``
  (``save_weights_to_hdf5_group``: root attribute ``layer_names``, one group
  per layer with attribute ``weight_names``, datasets at
  ``<layer>/<weight name>`` such as ``dense/dense/kernel:0``; a full model puts
  that under ``model_weights`` and the optimizer under ``optimizer_weights``;
  attributes above 64512 bytes are split into ``layer_names0``,
  ``layer_names1``, ...).
- Keras 3 layout: ``keras/src/saving/saving_lib.py`` (``H5IOStore``:
  ``layers/<path>/vars/<i>`` per object, ``vars/<i>`` for the model itself,
  ``optimizer/vars/<i>``; bfloat16 stored as 2-byte opaque with attribute
  ``dtype = "bfloat16"``; a ``.keras`` file is a zip holding
  ``metadata.json``, ``config.json`` and ``model.weights.h5``, stored).

Names. A tensor's name is its dataset path from the file root joined by "/"
(``dense/dense/kernel:0``, ``layers/dense/vars/0``,
``model_weights/d1/d1/kernel:0``), so what h5py shows is what ckptconv shows.
Keras files list tensors in Keras order (``layer_names`` / ``weight_names``,
``vars`` numerically); plain HDF5 in the file's link order. Attributes become
metadata: root attributes under their own name, others as ``PATH@ATTR``;
non-string attributes are JSON with their dtype kept in
``ckptconv.hdf5.attrs`` so a write restores them. Keras' own structural
attributes (``layer_names``, ``weight_names``) are regenerated, not copied.

Dtypes HDF5 lacks (bfloat16, float8_*, int4/uint4, complex32) are stored
bit-exact: the ``hdf5`` writer uses an unsigned integer dataset of the same
width, the ``keras-h5`` writer a same-width opaque dataset (what Keras 3 does
and reads back); both carry the attribute ``dtype = "<name>"``, which the
reader honours for either storage.

Laziness. Contiguous, unfiltered datasets become ``StoredTensor`` over the
file (bytes stream file-to-file); chunked, compressed or compact datasets are
``LazyTensor`` reading through h5py. A ``.keras`` member stored uncompressed is
read in place; a compressed one is inflated to an unlinked temporary file.

Writing plans the whole file with h5py (datasets allocated early, no fill),
closes it, then moves the tensor bytes to their offsets. ``hdf5`` keeps the
non-tensor tree in the root attribute ``ckptconv.tree``; ``keras-h5`` holds
weights only and says in its notes what it left out. Which Keras layout the
``keras-h5`` writer uses is decided by the names (see ``KerasH5Adapter``).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

from ckptconv._lazy import np

from ckptconv import dtypes as _dt
from ckptconv.atomic import atomic_file
from ckptconv.errors import CkptconvError, FormatError, UnsupportedError
from ckptconv.registry import Adapter
from ckptconv.streaming import COPY_STEP, start_writeback
from ckptconv.tensor import (ArrayTensor, FileHandle, FileSource, LazyTensor, StoredTensor,
                             TensorRef)
from ckptconv.tree import (ALIASES_KEY, SOURCE_KEY, TREE_KEY, Checkpoint, iter_leaves,
                           iter_tensors, join_path, tree_from_metadata, tree_to_metadata)
from ckptconv.ziputil import ZipWriter, is_zip, read_member_bytes, read_members

from .sniffers import KERAS_WEIGHTS_MEMBER, keras_layout, keras_list_attr

KERAS_ARCHIVE_JSON = ("metadata.json", "config.json")
DTYPE_ATTR = "dtype"                    # Keras 3's attribute for bfloat16, used for all such
ATTR_TYPES_KEY = "ckptconv.hdf5.attrs"  # metadata key: dtypes of non-string attributes
KERAS_STRUCTURAL = re.compile(r"^(layer_names|weight_names)\d*$")
KERAS_HEADER_LIMIT = 64512              # tf_keras HDF5_OBJECT_HEADER_LIMIT
DEFAULT_KERAS2_VERSION = "2.15.0"       # keras_version "1" (absent) would trigger Keras 1 fixes


# --- where the HDF5 bytes are -------------------------------------------------

class _Window(io.RawIOBase):
    """A read-only file object over ``size`` bytes of ``handle`` from ``base``
    (h5py opens a zip member through it; dataset offsets are then member-relative)."""

    def __init__(self, handle: FileHandle, base: int, size: int):
        self.handle, self.base, self.size, self.pos = handle, base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        if n:
            data = os.pread(self.handle.fileno(), n, self.base + self.pos)
            buf[:len(data)] = data
            n = len(data)
        self.pos += n
        return n


class H5Source:
    """An HDF5 image: a whole file, or a byte range of one (a ``.keras`` member).

    The h5py file is opened once, on first use, and shared by the lazy readers.
    """

    def __init__(self, handle: FileHandle, base: int = 0, size: int | None = None,
                 whole_file: bool = True):
        self.handle = handle
        self.base = base
        self.size = handle.size - base if size is None else size
        self.whole_file = whole_file
        self._file = None

    @property
    def display(self) -> str:
        return self.handle.display

    @property
    def file(self):
        if self._file is None:
            import h5py

            try:
                if self.whole_file:
                    self._file = h5py.File(self.handle.path, "r")
                else:
                    self._file = h5py.File(_Window(self.handle, self.base, self.size), "r")
            except (OSError, ValueError, RuntimeError) as e:
                raise FormatError(f"{self.display}: not a readable HDF5 file ({_h5_message(e)})") from None
        return self._file

    def read_dataset(self, path: str, dtype: _dt.DType) -> np.ndarray:
        try:
            arr = np.ascontiguousarray(self.file[path][()])
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise FormatError(f"{self.display}: dataset '{path}': {_h5_message(e)}") from None
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if _lacks_hdf5_type(dtype):     # bits stored as uint or opaque: reinterpret
            return arr.view(_dt.numpy_dtype(dtype))
        return arr.astype(_dt.numpy_dtype(dtype), copy=False)


def _h5_message(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    # h5py wraps the library's message: "Unable to synchronously open file (truncated file: ...)"
    m = re.search(r"\((.+)\)\s*$", msg)
    return m.group(1) if m else msg or type(e).__name__


def open_keras_archive(path: Path) -> tuple[H5Source, dict[str, str]]:
    """The weights member of a ``.keras`` zip, plus its JSON members as metadata."""
    handle = FileHandle(path)
    members = read_members(handle)
    member = members.get(KERAS_WEIGHTS_MEMBER)
    if member is None:
        raise FormatError(f"{handle.display}: .keras archive has no {KERAS_WEIGHTS_MEMBER} "
                          f"(members: {', '.join(list(members)[:8])})")
    meta = {name: read_member_bytes(handle, members[name], 64 << 20).decode("utf-8", "replace")
            for name in KERAS_ARCHIVE_JSON if name in members}
    if member.compress_type == zipfile.ZIP_STORED:
        return H5Source(handle, member.data_offset, member.size, whole_file=False), meta
    # Compressed member (Keras stores; a re-zipped archive may not): inflate it
    # once, streaming, into a temporary file that is unlinked at once.
    fd, tmp = tempfile.mkstemp(prefix="ckptconv-", suffix=".weights.h5")
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(path) as zf, \
                zf.open(KERAS_WEIGHTS_MEMBER) as src:
            while True:
                chunk = src.read(8 << 20)
                if not chunk:
                    break
                out.write(chunk)
        inner = FileHandle(tmp, f"{handle.display}:{KERAS_WEIGHTS_MEMBER}")
        inner.fileno()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
        raise FormatError(f"{handle.display}: cannot inflate {KERAS_WEIGHTS_MEMBER} ({e})") from None
    finally:
        os.unlink(tmp)
    return H5Source(inner, 0, inner.size, whole_file=False), meta


# --- reading ------------------------------------------------------------------

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
        if special is not None and _lacks_hdf5_type(special) and dt.itemsize == special.itemsize:
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


# The element types HDF5 (and h5py) have; everything else is stored as bits.
HDF5_NATIVE = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                         "uint16", "uint32", "uint64", "bool", "complex64", "complex128"})


def _lacks_hdf5_type(d: _dt.DType) -> bool:
    return d.name not in HDF5_NATIVE


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
            if name == DTYPE_ATTR and isinstance(ref, TensorRef) and _lacks_hdf5_type(ref.dtype):
                continue  # consumed: it named the dtype
            key = f"{path}@{name}" if path else name
            try:
                value = obj.attrs[name]
            except (OSError, TypeError, ValueError) as e:
                out.skipped.append(f"attribute {key} ({_h5_message(e)})")
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
            raise FormatError(f"{src.display}: dataset '{path}': {_h5_message(e)}") from None
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
                out.skipped.append(f"{path} ({_h5_message(e)})")
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
        raise FormatError(f"{src.display}: {_h5_message(e)}") from None
    return out


def _object_key(obj):
    """A hashable key for an HDF5 object (a corrupt file can hand out a FileID,
    which h5py refuses to hash)."""
    try:
        return hash(obj.id)
    except TypeError:
        return ("name", obj.name)


@contextlib.contextmanager
def _h5_errors(path: Path):
    """h5py reports damaged files with many exception types: one line each."""
    try:
        yield
    except CkptconvError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError,
            OverflowError) as e:
        raise FormatError(f"{path.name}: damaged HDF5 file ({_h5_message(e)})") from None


def _decode_bytes(items):
    if isinstance(items, bytes):
        return items.decode("utf-8", "replace")
    if isinstance(items, list):
        return [_decode_bytes(x) for x in items]
    return items


def _checkpoint(contents: H5Contents, src: H5Source, fmt: str, path: Path,
                extra_meta: dict[str, str] | None = None, info: dict | None = None) -> Checkpoint:
    meta = dict(extra_meta or {})
    meta.update(contents.metadata)
    if contents.attr_types:
        meta[ATTR_TYPES_KEY] = json.dumps(contents.attr_types, separators=(",", ":"))
    tensors = contents.tensors()
    tree, meta = tree_from_metadata(tensors, meta, src.display)
    if TREE_KEY not in contents.metadata:
        tree = dict(contents.entries)   # keep string datasets and the file's order
    info = dict(info or {})
    if contents.skipped:
        info["skipped"] = f"{len(contents.skipped)} not read: " + "; ".join(contents.skipped[:20])
    return Checkpoint(tree, meta, fmt, str(path), info)


# --- Keras layouts ------------------------------------------------------------

def _keras2_order(f, layout: str) -> list[str]:
    """Dataset paths in Keras' own order: layers, their weights, then the optimizer's."""
    import h5py

    root_name = "model_weights" if layout == "keras2-model" else ""
    root = f[root_name] if root_name else f
    prefix = f"{root_name}/" if root_name else ""
    order = []
    for layer in (keras_list_attr(root, "layer_names") or []) + ["top_level_model_weights"]:
        g = root.get(layer)
        if isinstance(g, h5py.Group):
            order += [f"{prefix}{layer}/{w}" for w in keras_list_attr(g, "weight_names") or []]
    opt = f.get("optimizer_weights")
    if isinstance(opt, h5py.Group):
        order += [f"optimizer_weights/{w}" for w in keras_list_attr(opt, "weight_names") or []]
    return order


# --- writing ------------------------------------------------------------------

def _storage_dtype(d: _dt.DType, opaque: bool) -> np.dtype:
    if not _lacks_hdf5_type(d):
        return d.numpy
    return np.dtype(f"V{d.itemsize}") if opaque else np.dtype(f"<u{d.itemsize}")


def _check_h5_names(names: list[str], display: str) -> None:
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
            if _lacks_hdf5_type(ref.dtype):
                ds.attrs[DTYPE_ATTR] = ref.dtype.name
            if ref.nbytes:
                offset = ds.id.get_offset()
                if offset is not None and ds.id.get_storage_size() == ref.nbytes:
                    placed.append((offset, ref))
                else:   # HDF5 allocates scalars lazily whatever we ask: write them now
                    ds[()] = np.ascontiguousarray(ref.numpy()).view(ds.dtype).reshape(ref.shape)
        for path, items in attrs.items():
            obj = f[path] if path else f
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
        can_copy = hasattr(os, "copy_file_range")
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


def _metadata_without_ours(ckpt: Checkpoint) -> dict[str, str]:
    return {str(k): str(v) for k, v in ckpt.metadata.items() if k not in (TREE_KEY, ALIASES_KEY, SOURCE_KEY)}


# --- the adapters -------------------------------------------------------------

class HDF5Adapter(Adapter):
    """Plain HDF5: every numeric dataset is a tensor named by its "/" path."""

    name = "hdf5"
    extensions = (".h5", ".hdf5", ".hdf", ".he5")
    requires = ("h5py",)
    extra = "hdf5"
    description = "plain HDF5 (numeric datasets, nested groups as '/' names, attributes)"

    def read(self, path: Path, **options) -> Checkpoint:
        with _h5_errors(path):
            src = H5Source(FileHandle(path))
            contents = read_h5(src)
            return _checkpoint(contents, src, self.name, path)

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False, **options) -> dict:
        entries = list(iter_tensors(ckpt.tree))
        _check_h5_names([n for n, _ in entries], path.name)
        names = {}
        for n, ref in entries:
            names.setdefault(id(ref), n)
        meta = _metadata_without_ours(ckpt)
        meta.update(tree_to_metadata(ckpt, names))
        existing = {n for n, _ in entries}
        existing |= {"/".join(n.split("/")[:k]) for n in existing for k in range(1, n.count("/") + 1)}
        attrs = place_attributes(meta, existing.__contains__)
        with atomic_file(path, force) as tmp:
            write_h5(tmp, entries, attrs, opaque_special=False)
        notes = []
        if not ckpt.is_flat:
            notes.append(f"non-tensor entries kept in the root attribute '{TREE_KEY}'")
        if ckpt.aliases:
            notes.append(f"{len(ckpt.aliases)} tied tensors written as hard links")
        return {"files": [str(path)], "notes": notes}


_KERAS3_NAME = re.compile(r"(^|.*/)vars/\d+$")


class KerasH5Adapter(Adapter):
    """Keras weight files: Keras 2 ``.h5`` (weights or full model), Keras 3
    ``.weights.h5`` and ``.keras`` archives.

    The writer picks the layout from the names:

    - every name ends in ``vars/<i>`` (``layers/dense/vars/0``): Keras 3, for
      ``model.load_weights('x.weights.h5')``; a ``.keras`` target becomes the
      archive (with ``config.json``/``metadata.json`` when the source had them).
    - otherwise Keras 2 (``tf_keras`` ``load_weights``, which matches layers by
      order, or by name with ``by_name=True``). The name is the dataset path:
      its first segment is the layer group, the rest the weight name listed
      in ``weight_names`` (``d1/d1/kernel:0``: layer ``d1``, weight
      ``d1/kernel:0``, as Keras writes it; ``d1/kernel`` gives weight
      ``kernel``). A name without "/" is split at its last "."
      (``fc.weight`` -> ``fc/weight``; ``x`` -> ``x/x``). Names under
      ``model_weights/`` and ``optimizer_weights/`` give the full-model
      layout. Layers keep the order of first appearance.
    """

    name = "keras-h5"
    extensions = (".weights.h5", ".keras")
    requires = ("h5py",)
    extra = "hdf5"
    description = "Keras weights: Keras 2 .h5 (weights or full model), Keras 3 .weights.h5 / .keras"

    def read(self, path: Path, **options) -> Checkpoint:
        with _h5_errors(path):
            return self._read(path)

    def _read(self, path: Path) -> Checkpoint:
        extra_meta: dict[str, str] = {}
        if is_zip(_head4(path)):
            src, extra_meta = open_keras_archive(path)
            container = "keras archive"
        else:
            src = H5Source(FileHandle(path))
            container = "h5"
        layout = keras_layout(src.file)
        if layout is None:
            raise FormatError(f"{src.display}: HDF5 file without a Keras weight layout "
                              "(no layer_names, model_weights or layers/*/vars); read it as hdf5")
        order = _keras2_order(src.file, layout) if layout.startswith("keras2") else None
        contents = read_h5(src, order, skip_attr=KERAS_STRUCTURAL.match,
                           numeric_vars=layout == "keras3")
        return _checkpoint(contents, src, self.name, path, extra_meta,
                           {"layout": layout, "container": container})

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False, **options) -> dict:
        entries = list(iter_tensors(ckpt.tree))
        if not entries:
            raise UnsupportedError(f"{path.name}: no tensors to write")
        # Keras' structural attributes are regenerated from the names (an hdf5
        # read of a Keras file carries stale copies in its metadata)
        meta = {k: v for k, v in _metadata_without_ours(ckpt).items()
                if not KERAS_STRUCTURAL.match(k.rpartition("@")[2])}
        archive = path.name.endswith(".keras")
        keras3 = all(_KERAS3_NAME.match(n) for n, _ in entries)
        if archive and not keras3:
            raise UnsupportedError(f"{path.name}: a .keras archive needs Keras 3 names "
                                   f"(layers/<name>/vars/<i>), e.g. not '{entries[0][0]}'")
        notes = self._unkept(ckpt)
        if keras3:
            datasets, attrs = self._keras3_plan(entries, meta, archive)
        else:
            datasets, attrs = self._keras2_plan(entries, meta)
        _check_h5_names([p for p, _ in datasets], path.name)
        if archive:
            notes += self._write_archive(path, datasets, attrs, meta, force)
        else:
            with atomic_file(path, force) as tmp:
                write_h5(tmp, datasets, attrs, opaque_special=True)
        notes.append(f"Keras {'3' if keras3 else '2'} layout")
        return {"files": [str(path)], "notes": notes}

    @staticmethod
    def _unkept(ckpt: Checkpoint) -> list[str]:
        notes = []
        values = [join_path(p) or "(root)" for p, v in iter_leaves(ckpt.tree) if not isinstance(v, TensorRef)]
        if values:
            notes.append(f"keras-h5 holds weights only; not written: {', '.join(values[:10])}"
                         + (f" and {len(values) - 10} more" if len(values) > 10 else ""))
        if not ckpt.is_flat and not values:
            notes.append("keras-h5 holds flat weights only; the tree structure is not kept")
        return notes

    @staticmethod
    def _keras3_plan(entries, meta: dict[str, str], archive: bool):
        datasets = list(entries)
        if archive:
            meta = {k: v for k, v in meta.items() if k not in KERAS_ARCHIVE_JSON}
        existing = {p.rsplit("/", 1)[0] for p, _ in datasets}
        existing |= {"/".join(p.split("/")[:k]) for p in existing for k in range(1, p.count("/") + 1)}
        return datasets, place_attributes(meta, existing.__contains__)

    @staticmethod
    def _keras2_plan(entries, meta: dict[str, str]):
        layers: dict[tuple[str, str], list[str]] = {}   # (root, layer) -> weight names
        datasets: list[tuple[str, TensorRef]] = []
        optimizer: list[str] = []
        full = any(n.startswith(("model_weights/", "optimizer_weights/")) for n, _ in entries)
        for name, ref in entries:
            if name.startswith("optimizer_weights/"):
                w = name[len("optimizer_weights/"):]
                optimizer.append(w)
                datasets.append((name, ref))
                continue
            root = "model_weights" if full else ""
            rel = name[len("model_weights/"):] if name.startswith("model_weights/") else name
            if "/" not in rel:          # fc.weight -> layer fc, weight "weight"
                layer, _, last = rel.rpartition(".")
                rel = f"{layer}/{last}" if layer else f"{rel}/{rel}"
            layer, _, weight = rel.partition("/")
            layers.setdefault((root, layer), []).append(weight)
            datasets.append((f"{root}/{layer}/{weight}" if root else f"{layer}/{weight}", ref))
        attrs: dict[str, dict] = {}
        roots = ["model_weights"] if full else [""]
        for root in roots:
            names = [layer for (r, layer) in layers if r == root and layer != "top_level_model_weights"]
            group = attrs.setdefault(root, {})
            group.update(_keras_chunked("layer_names", names))
            group.setdefault("backend", meta.get(f"{root}@backend" if root else "backend", "tensorflow"))
            group.setdefault("keras_version", meta.get(f"{root}@keras_version" if root else "keras_version",
                                                       DEFAULT_KERAS2_VERSION))
        for (root, layer), weights in layers.items():
            attrs.setdefault(f"{root}/{layer}" if root else layer, {}).update(
                _keras_chunked("weight_names", weights))
        if optimizer:
            attrs.setdefault("optimizer_weights", {}).update(_keras_chunked("weight_names", optimizer))
        existing = set(attrs) | {p for p, _ in datasets}
        rest = place_attributes(meta, existing.__contains__)
        for path, items in rest.items():
            for k, v in items.items():
                attrs.setdefault(path, {}).setdefault(k, v)
        return datasets, attrs

    def _write_archive(self, path: Path, datasets, attrs, meta: dict[str, str], force: bool) -> list[str]:
        notes = []
        members = {}
        for name in KERAS_ARCHIVE_JSON:
            if name in meta:
                members[name] = meta[name]
        if "metadata.json" not in members:
            members["metadata.json"] = json.dumps({"keras_version": "3", "date_saved": "",
                                                   "saved_by": "ckptconv"})
        if "config.json" not in members:
            notes.append("no config.json in the source: the archive loads with "
                         "model.load_weights(), not keras.saving.load_model()")
        with atomic_file(path, force) as tmp:
            h5_tmp = tmp.with_name(tmp.name + ".weights.h5")
            try:
                write_h5(h5_tmp, datasets, attrs, opaque_special=True)
                size = h5_tmp.stat().st_size
                h5_bytes = StoredTensor("uint8", (size,), FileSource(FileHandle(h5_tmp), 0, size))
                zw = ZipWriter(tmp)     # stored, 64-byte aligned: read in place afterwards
                try:
                    for name, text in members.items():
                        zw.add_bytes(name, text.encode("utf-8"))
                    zw.add_tensor_bytes(KERAS_WEIGHTS_MEMBER, size, [h5_bytes])
                finally:
                    zw.close()
            finally:
                if h5_tmp.exists():
                    h5_tmp.unlink()
        return notes


def _head4(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _keras_chunked(name: str, values: list[str]) -> dict[str, np.ndarray]:
    """tf_keras ``save_attributes_to_hdf5_group``: fixed-length byte strings,
    split into ``name0``, ``name1``, ... above the object-header limit."""
    data = np.asarray([v.encode("utf-8") for v in values]) if values else np.asarray([], dtype="S1")
    chunks = 1
    parts = [data]
    while any(p.nbytes > KERAS_HEADER_LIMIT for p in parts):
        chunks += 1
        parts = np.array_split(data, chunks)
    if chunks == 1:
        return {name: data}
    return {f"{name}{k}": p for k, p in enumerate(parts)}

