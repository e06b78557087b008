"""Where an HDF5 image's bytes are: a whole file (after an optional user
block), or the ``model.weights.h5`` member of a ``.keras`` zip; h5py opened
once over them; h5py's errors as one line.

Sources of truth: the HDF5 file format specification (superblock signature
``\\x89HDF\\r\\n\\x1a\\n`` at offset 0, 512, 1024, 2048, ...), h5py, and
``keras/src/saving/saving_lib.py`` (a ``.keras`` file is a zip holding
``metadata.json``, ``config.json`` and ``model.weights.h5``, stored).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import zipfile
from pathlib import Path

from ckptconv._lazy import np

from ckptconv import dtypes as _dt
from ckptconv.errors import CkptconvError, FormatError
from ckptconv.paths import open_source
from ckptconv.tensor import FileHandle
from ckptconv.ziputil import read_member_bytes, read_members

from ..sniffers import KERAS_WEIGHTS_MEMBER

KERAS_ARCHIVE_JSON = ("metadata.json", "config.json")
DTYPE_ATTR = "dtype"                    # Keras 3's attribute for bfloat16, used for all such


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
            data = self.handle.pread(self.base + self.pos, n)
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
                if self.whole_file and not self.handle.is_remote:
                    self._file = h5py.File(self.handle.path, "r")
                else:
                    self._file = h5py.File(_Window(self.handle, self.base, self.size), "r")
            except (OSError, ValueError, RuntimeError) as e:
                raise FormatError(f"{self.display}: not a readable HDF5 file ({h5_message(e)})") from None
        return self._file

    def read_dataset(self, path: str, dtype: _dt.DType) -> np.ndarray:
        try:
            arr = np.ascontiguousarray(self.file[path][()])
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise FormatError(f"{self.display}: dataset '{path}': {h5_message(e)}") from None
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if lacks_hdf5_type(dtype):     # bits stored as uint or opaque: reinterpret
            return arr.view(_dt.numpy_dtype(dtype))
        return arr.astype(_dt.numpy_dtype(dtype), copy=False)


def h5_message(e: BaseException) -> str:
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
        with os.fdopen(fd, "wb") as out, open_source(path) as raw, zipfile.ZipFile(raw) as zf, \
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



@contextlib.contextmanager
def h5_errors(path: Path):
    """h5py reports damaged files with many exception types: one line each."""
    try:
        yield
    except CkptconvError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError,
            OverflowError) as e:
        raise FormatError(f"{path.name}: damaged HDF5 file ({h5_message(e)})") from None




# The element types HDF5 (and h5py) have; everything else is stored as bits.
HDF5_NATIVE = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                         "uint16", "uint32", "uint64", "bool", "complex64", "complex128"})


def lacks_hdf5_type(d: _dt.DType) -> bool:
    """HDF5 has no such element type: the bits are stored in a same-width
    integer or opaque dataset with the attribute ``dtype = "<name>"``."""
    return d.name not in HDF5_NATIVE
