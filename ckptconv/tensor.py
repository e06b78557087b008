"""Lazy tensors: ``TensorRef`` knows dtype, shape and where its bytes live.

No tensor bytes are read until a writer or ``.numpy()`` asks. A
``StoredTensor`` is a strided view (element offset + element strides, as in
torch) over a ``ByteSource``: a range of a file or an in-memory buffer.
Writers use ``file_span()`` to copy contiguous bytes file-to-file and
``iter_bytes()`` (bounded chunks) for everything else.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Callable, Iterator

from ._lazy import np

from . import dtypes as _dt
from .dtypes import DType
from .errors import FormatError

CHUNK_BYTES = 8 << 20


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class FileHandle:
    """One opened input file, shared by all the sources that point into it.

    ``FileHandle(url)`` (an fsspec URL or ``remote.RemotePath``) gives the
    remote kind, ``remote.RemoteFile``: the same reads, as range requests."""

    is_remote = False

    def __new__(cls, path, display=None):
        # pathlib paths are os.PathLike; URLs are strings with "://" or RemotePaths
        if not isinstance(path, os.PathLike) and (not isinstance(path, str) or "://" in path):
            from .remote import RemoteFile, is_remote

            if is_remote(path):
                return RemoteFile(path, display)  # (not a FileHandle: __init__ is not run)
        return object.__new__(cls)

    def __init__(self, path: str | os.PathLike, display: str | None = None):
        self.path = os.fspath(path)
        self.display = display or os.path.basename(self.path)
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.size = os.path.getsize(self.path)

    def fileno(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def pread(self, offset: int, length: int, what: str = "data") -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(
                f"{self.display}: {what} needs {human_bytes(length)} at offset {offset}, "
                f"file ends at {self.size}")
        parts = []
        fd = self.fileno()
        while length > 0:
            b = os.pread(fd, min(length, 1 << 30), offset)
            if not b:
                raise FormatError(f"{self.display}: unexpected end of file at offset {offset}")
            parts.append(b)
            offset += len(b)
            length -= len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pread_many(self, ranges: list[tuple[int, int]], what: str = "data") -> list[bytes]:
        """Several small ranges (offset, length); remote files fetch them concurrently."""
        return [self.pread(o, n, what) for o, n in ranges]

    def fetch_many(self, spans: list[tuple[int, int]]) -> Iterator[bytes]:
        """The bytes of ``spans`` in order, in bounded pieces (remote: several in flight)."""
        for off, n in spans:
            for i in range(0, n, CHUNK_BYTES):
                yield self.pread(off + i, min(CHUNK_BYTES, n - i))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"FileHandle({self.path!r})"


class ByteSource:
    """A run of ``nbytes`` bytes somewhere."""

    nbytes: int

    def read(self, offset: int, length: int) -> bytes | memoryview:
        raise NotImplementedError

    def file_range(self) -> tuple[FileHandle, int] | None:
        """(file, absolute offset of byte 0) when the bytes lie in a file."""
        return None


class FileSource(ByteSource):
    def __init__(self, handle: FileHandle, offset: int, nbytes: int, what: str = "data"):
        self.handle, self.offset, self.nbytes, self.what = handle, offset, nbytes, what

    def read(self, offset: int, length: int) -> bytes:
        if offset + length > self.nbytes:
            raise FormatError(f"{self.handle.display}: {self.what}: read past its end")
        return self.handle.pread(self.offset + offset, length, self.what)

    def file_range(self):
        return self.handle, self.offset

    def check(self) -> None:
        """Raise if the range does not fit in the file (cheap, no read)."""
        if self.offset + self.nbytes > self.handle.size:
            raise FormatError(
                f"{self.handle.display}: {self.what} needs {human_bytes(self.nbytes)} at offset "
                f"{self.offset}, file ends at {self.handle.size} (truncated?)")

    def __repr__(self):
        return f"FileSource({self.handle.display}@{self.offset}+{self.nbytes})"


class BufferSource(ByteSource):
    def __init__(self, data: bytes | bytearray | memoryview):
        self.data = memoryview(data).cast("B")
        self.nbytes = len(self.data)

    def read(self, offset: int, length: int) -> memoryview:
        return self.data[offset:offset + length]


def array_bytes(arr: np.ndarray) -> memoryview:
    """The C-order bytes of any array (ml_dtypes, bool, 0-d and empty included)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    return memoryview(flat.view(np.uint8)) if flat.size else memoryview(b"")


class _once:
    """A property computed on first access and stored in the instance, so later
    reads are plain attribute reads (``functools.cached_property`` takes a
    lock on every first access in Python 3.11; writers read ``nbytes`` of
    100,000s of tensors several times)."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


class TensorRef:
    """A lazy tensor. Subclasses say where the bytes come from."""

    dtype: DType
    shape: tuple[int, ...]
    requires_grad: bool = False
    is_parameter: bool = False

    # shape and dtype never change after construction: computed on first use
    # and then plain instance attributes (see ``_once``)
    @_once
    def numel(self) -> int:
        return math.prod(self.shape)

    @_once
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        raise NotImplementedError

    def tobytes(self) -> bytes:
        return b"".join(bytes(c) for c in self.iter_bytes())

    def iter_bytes(self, chunk: int = CHUNK_BYTES) -> Iterator[bytes | memoryview]:
        """Row-major little-endian bytes, in pieces of about ``chunk`` bytes."""
        data = array_bytes(self.numpy())
        for i in range(0, len(data), chunk):
            yield data[i:i + chunk]

    def file_span(self) -> tuple[FileHandle, int, int] | None:
        """(file, offset, nbytes) when the bytes are contiguous in a file."""
        return None

    def file_spans(self) -> list[tuple[FileHandle, int, int]] | None:
        """The bytes as file ranges, in order, when they all lie in files
        (one range for a contiguous tensor, several for an assembled one)."""
        span = self.file_span()
        return None if span is None else [span]

    def torch(self):
        import torch

        arr = self.numpy()
        if self.dtype.name in ("bfloat16",) or self.dtype.name.startswith("float8") or \
                self.dtype.name in ("uint16", "uint32", "uint64", "complex32"):
            raw = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
            t = torch.frombuffer(bytearray(raw.tobytes()), dtype=torch.uint8) if raw.size else \
                torch.empty(0, dtype=torch.uint8)
            return t.view(getattr(torch, self.dtype.name)).reshape(self.shape).clone()
        return torch.from_numpy(np.array(arr, copy=True)).reshape(self.shape)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.dtype.name}{list(self.shape)}>"


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


class StoredTensor(TensorRef):
    """A strided view over a byte source (torch's storage + offset + strides)."""

    def __init__(self, dtype, shape, source: ByteSource, offset: int = 0,
                 strides: tuple[int, ...] | None = None, big_endian: bool = False,
                 requires_grad: bool = False, is_parameter: bool = False):
        # readers build tens of thousands of these: keep the common path cheap
        self.dtype = dtype if type(dtype) is DType else _dt.get(dtype)
        if type(shape) is not tuple or not all(type(n) is int for n in shape):
            shape = tuple(map(int, shape))
        self.shape = shape
        self.source = source
        self.offset = offset if type(offset) is int else int(offset)
        if strides is None:
            strides = contiguous_strides(shape)
        elif type(strides) is not tuple or not all(type(n) is int for n in strides):
            strides = tuple(map(int, strides))
        self.strides = strides
        self.big_endian = big_endian
        self.requires_grad = requires_grad
        self.is_parameter = is_parameter
        if len(self.strides) != len(shape):
            raise FormatError(f"tensor shape {shape} and strides {self.strides} differ in rank")
        if (shape and min(shape) < 0) or (self.strides and min(self.strides) < 0) or self.offset < 0:
            raise FormatError(f"tensor with negative shape, stride or offset: {shape}")
        lo, hi = self._span()
        if hi > lo and hi * self.dtype.itemsize > source.nbytes:
            raise FormatError(
                f"tensor {self.dtype.name}{list(self.shape)} at element {self.offset} needs "
                f"{hi * self.dtype.itemsize} bytes of a storage holding {source.nbytes}")

    def _span(self) -> tuple[int, int]:
        """Element range [lo, hi) of the storage this view touches."""
        if self.numel == 0:
            return self.offset, self.offset
        last = self.offset + sum((n - 1) * st for n, st in zip(self.shape, self.strides))
        return self.offset, last + 1

    @_once
    def is_contiguous(self) -> bool:
        return self.numel <= 1 or all(st == c for n, st, c in zip(
            self.shape, self.strides, contiguous_strides(self.shape)) if n != 1)

    def file_span(self):
        if self.big_endian or not self.is_contiguous:
            return None
        fr = self.source.file_range()
        if fr is None:
            return None
        handle, base = fr
        return handle, base + self.offset * self.dtype.itemsize, self.nbytes

    def _np_dtype(self) -> np.dtype:
        dt = _dt.numpy_dtype(self.dtype)
        return dt.newbyteorder(">") if self.big_endian and dt.itemsize > 1 else dt

    def numpy(self) -> np.ndarray:
        size = self.dtype.itemsize
        lo, hi = self._span()
        npdt = self._np_dtype()
        if self.numel == 0:
            return np.empty(self.shape, dtype=_dt.numpy_dtype(self.dtype))
        raw = self.source.read(lo * size, (hi - lo) * size)
        # as_strided goes through __array_interface__, whose typestr ('<f1')
        # numpy cannot parse for ml_dtypes' float8: stride over same-size uints.
        carrier = np.dtype(f"u{size}") if size in (1, 2, 4, 8) else npdt
        flat = np.frombuffer(raw, dtype=carrier)
        arr = np.lib.stride_tricks.as_strided(
            flat, shape=self.shape, strides=tuple(s * size for s in self.strides), writeable=False)
        out = np.array(arr, copy=True, order="C").view(npdt)
        if self.big_endian and npdt.itemsize > 1:
            out = out.astype(npdt.newbyteorder("<"))
        return out

    def iter_bytes(self, chunk: int = CHUNK_BYTES):
        if self.is_contiguous and not self.big_endian:
            start = self.offset * self.dtype.itemsize
            total = self.nbytes
            for i in range(0, total, chunk):
                yield self.source.read(start + i, min(chunk, total - i))
            return
        # Strided view: go along the first dimension in blocks of rows so that
        # memory stays bounded for the common (sliced, row-major) case.
        if self.shape and self.shape[0] > 1 and self.nbytes > chunk:
            row_bytes = self.nbytes // self.shape[0]
            step = max(1, chunk // max(row_bytes, 1))
            for i in range(0, self.shape[0], step):
                n = min(step, self.shape[0] - i)
                sub = StoredTensor(self.dtype, (n,) + self.shape[1:], self.source,
                                   self.offset + i * self.strides[0], self.strides,
                                   self.big_endian)
                yield array_bytes(sub.numpy())
            return
        yield from super().iter_bytes(chunk)

    def __repr__(self):
        return f"<StoredTensor {self.dtype.name}{list(self.shape)} {self.source!r}+{self.offset}>"


class ArrayTensor(TensorRef):
    """A tensor held in memory as a numpy array (small constants, computed results)."""

    def __init__(self, array: np.ndarray, dtype: str | DType | None = None,
                 requires_grad: bool = False, is_parameter: bool = False):
        self.array = np.asarray(array)
        self.dtype = _dt.get(dtype) if dtype is not None else _dt.from_numpy(self.array.dtype)
        self.shape = tuple(self.array.shape)
        self.requires_grad = requires_grad
        self.is_parameter = is_parameter

    def numpy(self) -> np.ndarray:
        return self.array


class LazyTensor(TensorRef):
    """A tensor computed on demand from other tensors (casts, mapping transforms)."""

    def __init__(self, dtype, shape, compute: Callable[[], np.ndarray], inputs=(),
                 requires_grad: bool = False, is_parameter: bool = False, what: str = ""):
        self.dtype = _dt.get(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.compute = compute
        self.inputs = tuple(inputs)
        self.requires_grad = requires_grad
        self.is_parameter = is_parameter
        self.what = what  # "file: tensor 'name'", for errors

    def numpy(self) -> np.ndarray:
        arr = np.asarray(self.compute())
        if tuple(arr.shape) != self.shape:
            raise FormatError(f"{self.what or 'computed tensor'}: has shape {arr.shape}, "
                              f"expected {self.shape}")
        return arr


class ConcatTensor(TensorRef):
    """A tensor whose row-major bytes are byte ranges of other sources, one
    after another: a sharded tensor assembled from its chunks (DCP), a
    parameter gathered from its ZeRO partitions (DeepSpeed).

    ``plan`` is the list of ``(source, offset, nbytes)`` ranges, or a function
    returning it, called on first use (a column-sharded tensor has a range
    per row: planned only when a writer asks). Writers copy the ranges file
    to file (``file_spans``); nothing holds the whole tensor.
    """

    def __init__(self, dtype, shape, plan, requires_grad: bool = False,
                 is_parameter: bool = False, what: str = ""):
        self.dtype = _dt.get(dtype)
        self.shape = tuple(int(s) for s in shape)
        self._plan = plan
        self.requires_grad = requires_grad
        self.is_parameter = is_parameter
        self.what = what  # "file: tensor 'name'", for errors

    @_once
    def ranges(self) -> list[tuple[ByteSource, int, int]]:
        ranges = list(self._plan() if callable(self._plan) else self._plan)
        total = sum(n for _, _, n in ranges)
        if total != self.nbytes:
            raise FormatError(f"{self.what or 'assembled tensor'}: its pieces hold {total} bytes, "
                              f"{self.dtype.name}{list(self.shape)} needs {self.nbytes}")
        return ranges

    def file_spans(self):
        spans: list[list] = []
        for source, offset, nbytes in self.ranges:
            fr = source.file_range()
            if fr is None:
                return None
            if not nbytes:
                continue
            handle, start = fr[0], fr[1] + offset
            last = spans[-1] if spans else None
            if last is not None and last[0] is handle and last[1] + last[2] == start:
                last[2] += nbytes  # neighbouring ranges of one file: one copy
            else:
                spans.append([handle, start, nbytes])
        return [tuple(s) for s in spans]

    def iter_bytes(self, chunk: int = CHUNK_BYTES):
        for source, offset, nbytes in self.ranges:
            for i in range(0, nbytes, chunk):
                yield source.read(offset + i, min(chunk, nbytes - i))

    def numpy(self) -> np.ndarray:
        npdt = _dt.numpy_dtype(self.dtype)
        if self.numel == 0:
            return np.empty(self.shape, dtype=npdt)
        raw = bytearray(self.nbytes)
        pos = 0
        for piece in self.iter_bytes():
            raw[pos:pos + len(piece)] = piece
            pos += len(piece)
        return np.frombuffer(raw, dtype=npdt).reshape(self.shape)

    def __repr__(self):
        return f"<ConcatTensor {self.dtype.name}{list(self.shape)} of {len(self.ranges)} ranges>"


def cast(ref: TensorRef, dtype) -> TensorRef:
    """A lazy cast of ``ref`` to ``dtype`` (numpy/ml_dtypes conversion rules)."""
    target = _dt.get(dtype)
    if target == ref.dtype:
        return ref
    npdt = _dt.numpy_dtype(target)
    return LazyTensor(target, ref.shape, lambda: ref.numpy().astype(npdt), (ref,),
                      ref.requires_grad, ref.is_parameter)


def from_numpy(array, dtype=None) -> ArrayTensor:
    return ArrayTensor(np.asarray(array), dtype)


def from_torch(t) -> ArrayTensor:
    """Wrap a torch tensor (used by ``save`` of in-memory state dicts)."""
    import torch

    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    d = _dt.get(name)
    if d.numpy is None:
        raise FormatError(f"torch dtype {t.dtype} is not supported")
    if t.numel() == 0:
        arr = np.empty(tuple(t.shape), dtype=d.numpy)
    else:
        arr = t.reshape(-1).view(torch.uint8).numpy().view(d.numpy).reshape(tuple(t.shape))
    return ArrayTensor(arr.copy(), d, bool(t.requires_grad),
                       isinstance(t, torch.nn.Parameter))
