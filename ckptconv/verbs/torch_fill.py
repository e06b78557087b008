"""Moving checkpoint bytes into torch tensors: the engine under ``load_into``
and ``load_state_dict``.

Both ways are one copy from the page cache, never through an intermediate
array of the whole tensor:

- ``Filler.fill``: the bytes of a ``TensorRef`` go into the memory of an
  existing tensor (a module's parameter). A contiguous range of a file with
  the parameter's dtype is read by ``os.preadv`` straight into the
  parameter's bytes (the ranges of an assembled tensor one after the other),
  in ``PIECE_BYTES`` pieces spread over torch's number of
  threads (the kernel copies from the page cache, and the first touch of
  fresh parameter memory happens there, on every core). A dtype cast reads
  ``STAGING_BYTES`` at a time into one reused buffer and casts with
  ``copy_``; a strided source is viewed through a private map of the file
  and copied a block of rows at a time. A GPU target is filled
  through two pinned staging buffers of ``STAGING_BYTES`` (one is read while
  the other is copied), never through a CPU copy of the tensor. A mapping's
  transpose or permute of a stored tensor is copied from a permuted view of
  the map, a block of rows at a time.
- ``TorchMaterializer``: ``TensorRef`` -> torch tensor backed by a private
  (copy-on-write) map of the file, as torch's loader with ``mmap=True`` and
  safetensors' ``load_file`` make them, or read into fresh memory by
  ``Filler``; tensors sharing a byte source share one torch storage, and one
  ``TensorRef`` at two names is one tensor (ties stay ties).

What is not a local file range (a remote or in-memory source, big-endian
bytes, a mapping's computed tensor) goes through ``TensorRef.torch()``.

Ground truth for the map: ``torch/serialization.py`` (``_load`` with
``mmap=True``: one ``UntypedStorage.from_file(shared=False)`` of the whole
file, each storage a slice of it) and safetensors ``bindings/python/src/lib.rs``.
"""
from __future__ import annotations

import gc
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from ..errors import FormatError, UnsupportedError, UsageError
from ..tensor import StoredTensor, TensorRef

PIECE_BYTES = 16 << 20      # one preadv call: a thread's share of a big tensor
STAGING_BYTES = 32 << 20    # the cast buffer; each of the two pinned buffers of a GPU load
BLOCK_BYTES = 32 << 20      # rows copied at a time from a mapped strided source
MAX_IO = 0x7FFFF000         # Linux moves at most this much per read call


def torch_dtype(name: str):
    import torch

    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise UnsupportedError(f"torch has no dtype {name}")
    return dt


def torch_device(device):
    """``device`` as a ``torch.device``; a device this torch cannot reach is a usage
    error before anything is read (not torch's AssertionError halfway through)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r}: torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, no CUDA device or a CPU-only build)")
    return dev


def byte_view(t) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes (no copy)."""
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def preadv_into(fd: int, buf: memoryview, offset: int, display: str) -> None:
    """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (short reads resumed)."""
    pos, n = 0, len(buf)
    while pos < n:
        got = os.preadv(fd, [buf[pos:pos + min(n - pos, MAX_IO)]], offset + pos)
        if got <= 0:
            raise FormatError(f"{display}: unexpected end of file at offset {offset + pos}")
        pos += got


def file_map(path: str, size: int):
    """A private, copy-on-write map of a whole file as a torch storage."""
    import torch

    return torch.UntypedStorage.from_file(path, shared=False, nbytes=size)


def mapped_view(ref: StoredTensor, whole=None):
    """A torch tensor viewing ``ref``'s bytes in a map of its file (no copy)."""
    import torch

    handle, base = ref.source.file_range()
    if whole is None:
        whole = file_map(handle.path, handle.size)
    size = ref.dtype.itemsize
    lo, hi = ref._span()
    storage = whole[base + lo * size: base + hi * size]
    return torch.empty(0, dtype=torch_dtype(ref.dtype.name)).set_(storage, 0, ref.shape,
                                                                  ref.strides)


@contextmanager
def gc_paused():
    """No cyclic GC while 10,000s of tensors are made: its passes over every new
    object halve the speed of a 50,000-tensor load (the unpickler does the same)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _mapped(ref) -> bool:
    """Stored little-endian in a local file: a view of a map of it can be made."""
    return isinstance(ref, StoredTensor) and not ref.big_endian and \
        ref.source.file_range() is not None


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_span(span) -> None:
    handle, offset, nbytes = span
    if offset + nbytes > handle.size:
        raise FormatError(f"{handle.display}: tensor needs {nbytes} bytes at offset {offset}, "
                          f"file ends at {handle.size} (truncated?)")


class Filler:
    """Fills (tensor, ref) pairs; reads overlap on threads until ``wait()``/``close()``."""

    def __init__(self, threads: int | None = None):
        import torch

        self.threads = threads or max(1, torch.get_num_threads())
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._pending: list = []
        self._staging = None
        self._pinned = None
        self._events = [None, None]

    def fill(self, dst, ref: TensorRef) -> None:
        """Copy ``ref``'s values into ``dst`` (same shape; dtypes cast as ``copy_`` does)."""
        if dst.numel() == 0:
            return
        spans = ref.file_spans()
        if spans is not None and any(handle.is_remote for handle, _, _ in spans):
            self._fill_from_remote(dst, ref, spans)
            return
        if spans is not None:
            for span in spans:
                _check_span(span)
            same = ref.dtype.name == _dtype_name(dst)
            if dst.device.type == "cpu" and dst.is_contiguous() and same:
                buf, pos = byte_view(dst), 0
                for span in spans:   # one range, or the pieces of an assembled tensor
                    self._read(buf[pos:pos + span[2]], span)
                    pos += span[2]
                return
            if len(spans) == 1 and isinstance(ref, StoredTensor):
                if dst.device.type != "cpu":
                    self._fill_device(dst, ref, spans[0])
                elif not dst.is_contiguous():
                    self._copy_blocks(dst, mapped_view(ref))
                else:
                    self._cast(dst, ref, spans[0])
                return
        if _mapped(ref):
            self._copy_blocks(dst, mapped_view(ref))   # strided stored bytes
            return
        base, axes = getattr(ref, "permuted_from", (None, None))
        if _mapped(base):                               # a mapping's transpose/permute
            self._copy_blocks(dst, mapped_view(base).permute(*axes))
            return
        dst.copy_(ref.torch())                          # computed, remote or in-memory

    @staticmethod
    def _fill_from_remote(dst, ref: TensorRef, spans) -> None:
        """Object storage: range reads in bounded pieces, straight into ``dst``
        when it takes the bytes as they are, else through ``ref.torch()``."""
        if not (dst.device.type == "cpu" and dst.is_contiguous()
                and ref.dtype.name == _dtype_name(dst)):
            dst.copy_(ref.torch())
            return
        buf, pos = byte_view(dst), 0
        for handle, offset, nbytes in spans:
            _check_span((handle, offset, nbytes))
            for piece in handle.fetch_many([(offset, nbytes)]):
                buf[pos:pos + len(piece)] = piece
                pos += len(piece)

    def _read(self, buf: memoryview, span) -> None:
        handle, offset, nbytes = span
        fd = handle.fileno()
        for i in range(0, nbytes, PIECE_BYTES):
            piece = buf[i:i + PIECE_BYTES]
            if self._pool is None or nbytes <= PIECE_BYTES // 4:
                preadv_into(fd, piece, offset + i, handle.display)
            else:
                self._pending.append(self._pool.submit(preadv_into, fd, piece, offset + i,
                                                       handle.display))

    def _cast(self, dst, ref: TensorRef, span) -> None:
        """Read ``STAGING_BYTES`` of the source dtype at a time, cast into ``dst``."""
        import torch

        handle, offset, nbytes = span
        if self._staging is None:
            self._staging = torch.empty(STAGING_BYTES, dtype=torch.uint8)
        size = ref.dtype.itemsize
        per = STAGING_BYTES // size
        out = dst.reshape(-1)
        src_dtype = torch_dtype(ref.dtype.name)
        for start in range(0, ref.numel, per):
            n = min(per, ref.numel - start)
            stage = self._staging[:n * size]
            preadv_into(handle.fileno(), byte_view(stage), offset + start * size, handle.display)
            out[start:start + n].copy_(stage.view(src_dtype))

    @staticmethod
    def _copy_blocks(dst, src) -> None:
        """``dst.copy_(src)`` a block of rows at a time: mapped pages of one block at a time
        are touched (the map is dropped with ``src``)."""
        rows = dst.shape[0] if dst.dim() else 0
        step = max(1, BLOCK_BYTES // max(1, src.element_size() * (src.numel() // max(rows, 1))))
        if rows <= step:
            dst.copy_(src)
            return
        for i in range(0, rows, step):
            dst[i:i + step].copy_(src[i:i + step])

    def _fill_device(self, dst, ref: TensorRef, span) -> None:
        """Through two pinned buffers: read into one while the other goes to the GPU
        (for a CUDA ``dst``; another device, or a CPU ``dst`` in a test, takes the same
        path with plain buffers and synchronous copies)."""
        import torch

        if not dst.is_contiguous():
            self._copy_blocks(dst, mapped_view(ref))
            return
        cuda = dst.device.type == "cuda"
        if self._pinned is None:
            self._pinned = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=cuda)
                            for _ in range(2)]
        handle, offset, nbytes = span
        size = ref.dtype.itemsize
        src_dtype = torch_dtype(ref.dtype.name)
        out = dst.reshape(-1)
        per = STAGING_BYTES // size
        for n, start in enumerate(range(0, ref.numel, per)):
            k = n % 2
            if self._events[k] is not None:
                self._events[k].synchronize()   # the GPU has finished with this buffer
            count = min(per, ref.numel - start)
            stage = self._pinned[k][:count * size]
            preadv_into(handle.fileno(), byte_view(stage), offset + start * size, handle.display)
            out[start:start + count].copy_(stage.view(src_dtype), non_blocking=cuda)
            if cuda:
                ev = self._events[k] = torch.cuda.Event()
                ev.record()

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()
        for ev in self._events:
            if ev is not None:
                ev.synchronize()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
            self._staging = self._pinned = None

    def __enter__(self) -> "Filler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TorchMaterializer:
    """``TensorRef`` -> torch tensor, with one storage per byte source."""

    def __init__(self, mmap: bool = True, device=None):
        import torch

        self.device = torch_device(device) if device is not None else torch.device("cpu")
        self.mmap = mmap and self.device.type == "cpu"
        self._maps: dict = {}        # file path -> storage of the whole file
        self._storages: dict = {}    # id(byte source) -> (source, storage)
        self._tensors: dict = {}     # id(ref) -> (ref, tensor)
        self._filler: Filler | None = None

    def __call__(self, ref: TensorRef):
        hit = self._tensors.get(id(ref))
        if hit is not None:
            return hit[1]
        t = self._make(ref)
        self._tensors[id(ref)] = (ref, t)   # the ref is kept so that its id stays unique
        return t

    def _make(self, ref: TensorRef):
        import torch

        fr = ref.source.file_range() if type(ref) is StoredTensor and not ref.big_endian else None
        if fr is None:
            return ref.torch().to(self.device)
        storage = self._storage(ref.source, fr)
        return torch.empty(0, dtype=torch_dtype(ref.dtype.name), device=self.device).set_(
            storage, ref.offset, ref.shape, ref.strides)

    def _storage(self, source, fr):
        import torch

        hit = self._storages.get(id(source))
        if hit is not None:
            return hit[1]
        handle, base = fr
        _check_span((handle, base, source.nbytes))
        if handle.is_remote:  # no file to map or preadv: range reads, in bounded pieces
            cpu = torch.empty(source.nbytes, dtype=torch.uint8)
            view, done = byte_view(cpu), 0
            for piece in handle.fetch_many([(base, source.nbytes)]):
                view[done:done + len(piece)] = piece
                done += len(piece)
            storage = cpu.to(self.device).untyped_storage()
        elif self.mmap:
            whole = self._maps.get(handle.path)
            if whole is None:
                whole = self._maps[handle.path] = file_map(handle.path, handle.size)
            storage = whole[base:base + source.nbytes]
        else:
            storage = torch.UntypedStorage(source.nbytes, device=self.device)
            if source.nbytes:
                if self._filler is None:
                    self._filler = Filler()
                self._filler.fill(torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage),
                                  StoredTensor("uint8", (source.nbytes,), source))
        self._storages[id(source)] = (source, storage)
        return storage

    def close(self) -> None:
        """Wait for reads in flight (``mmap=False``)."""
        if self._filler is not None:
            self._filler.close()
            self._filler = None
