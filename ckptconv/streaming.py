"""Moving tensor bytes into an output file with memory flat in file size.

Contiguous bytes that already lie in a file are copied file-to-file with
``os.copy_file_range`` (``sendfile``, then bounded ``pread`` as fallbacks);
everything else (strided views, casts, transforms) arrives from
``TensorRef.iter_bytes`` in bounded chunks. Small writes are coalesced.

Writeback of what has been written is started every few MiB
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``, asynchronous), so the disk
works while we copy and the final ``fsync`` finds little left to do:
without it, a 2 GiB output spends about as long in ``fsync`` as in copying.
"""
from __future__ import annotations

import os
import zlib

from .errors import FormatError
from .progress import advance
from .tensor import FileHandle, TensorRef

_BUF_LIMIT = 4 << 20
_DIRECT_MIN = 256 << 10  # below this a pread + buffered write is cheaper
# One copy_file_range call moves at most this much: the kernel copies one
# huge range slower than many moderate ones, and writeback starts between.
COPY_STEP = 32 << 20
_WRITEBEHIND = 8 << 20  # start writeback whenever this much is newly written
_SYNC_FILE_RANGE_WRITE = 2

_sync_range = None  # libc sync_file_range, looked up on first use; False if absent


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` to disk, without waiting."""
    global _sync_range
    if _sync_range is None:
        _sync_range = False
        if hasattr(os, "copy_file_range"):  # Linux
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_range = fn
            except (OSError, AttributeError, ImportError):
                pass
    if _sync_range:
        _sync_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # advisory: errors ignored


# A local span at least this big gets its checksum from ``crc_of_span`` in a
# thread while the kernel copies it; smaller ones are checksummed as they are
# written, and so are remote ones (``OutFile.copy_from(checksum=)``: the bytes
# pass through us anyway, and a second range read would double the transfer).
PARALLEL_CRC_MIN = 1 << 20


def crc_of_span(handle: FileHandle, offset: int, nbytes: int, update=zlib.crc32,
                chunk: int = 4 << 20) -> int:
    """A running checksum (``update(data, crc)``: zlib.crc32 by default, or
    crc32c) of a file range. zlib and crc32c release the GIL, so this runs
    in a thread beside the copy of the same bytes.

    Read into one reused buffer: a fresh multi-MiB ``bytes`` per read costs
    page faults on every chunk."""
    if offset + nbytes > handle.size:
        handle.pread(offset, nbytes)  # raises the one-line truncation error
    if handle.is_remote:
        crc = 0
        for piece in handle.fetch_many([(offset, nbytes)]):
            crc = update(piece, crc)
        return crc
    buf = bytearray(min(chunk, nbytes))
    view = memoryview(buf)
    fd = handle.fileno()
    crc = 0
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[:min(len(buf), nbytes - done)]], offset + done)
        if got <= 0:
            raise FormatError(f"{handle.display}: file shrank while being read")
        crc = update(view[:got], crc)
        done += got
    return crc


class OutFile:
    """A write-only output with coalesced small writes and zero-copy big ones.

    Small pieces are gathered in one reused buffer (small tensors are read
    straight into it with ``preadv``), so writing many tensors costs neither
    an allocation nor an extra copy per tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        # (readable too: ``copy_within`` copies bytes already written)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self.fd).st_size:
            # (not O_TRUNC: ext4 flushes a file truncated-then-rewritten at
            # close; our targets are fresh temp files, so this rarely runs)
            os.ftruncate(self.fd, 0)
        self.buf = bytearray(_BUF_LIMIT)
        self.view = memoryview(self.buf)
        self.fill = 0
        self.pos = 0  # bytes handed to us so far (logical end of file)
        self.written = 0  # bytes in the file (pos minus what the buffer holds)
        self.synced = 0   # writeback started up to here
        self._can_copy_range = hasattr(os, "copy_file_range")
        self._can_sendfile = hasattr(os, "sendfile")

    def write(self, data) -> None:
        n = len(data)
        if n >= _BUF_LIMIT:
            self.flush()
            self._write_all(memoryview(data).cast("B"))
        else:
            if self.fill + n > _BUF_LIMIT:
                self.flush()
            self.view[self.fill:self.fill + n] = memoryview(data).cast("B")
            self.fill += n
        self.pos += n

    def _write_all(self, view) -> None:
        while len(view):
            k = os.write(self.fd, view)
            view = view[k:]
            self._wrote(k)

    def _wrote(self, n: int) -> None:
        self.written += n
        if self.written - self.synced >= _WRITEBEHIND:
            start_writeback(self.fd, self.synced, self.written - self.synced)
            self.synced = self.written

    def flush(self) -> None:
        if self.fill:
            self._write_all(self.view[:self.fill])
            self.fill = 0

    def copy_from(self, handle: FileHandle, offset: int, nbytes: int, checksum=None) -> int | None:
        """Append ``nbytes`` of ``handle`` starting at ``offset``. With
        ``checksum`` (``update(data, crc)``: zlib.crc32, crc32c) on a remote
        handle, also return the checksum of those bytes, computed as they pass
        through (one read of the source; local bytes are copied in the kernel
        and never pass through us: ``crc_of_span`` reads them beside the copy)."""
        if handle.is_remote:  # range requests, a few in flight, bounded pieces
            crc = 0
            for piece in handle.fetch_many([(offset, nbytes)]):
                if checksum is not None:
                    crc = checksum(piece, crc)
                self.write(piece)
            return crc if checksum is not None else None
        if checksum is not None:
            raise ValueError("copy_from(checksum=) is for remote sources (local bytes are "
                             "copied in the kernel)")
        if nbytes < _DIRECT_MIN:
            if offset + nbytes > handle.size:
                handle.pread(offset, nbytes)  # raises the one-line truncation error
            if self.fill + nbytes > _BUF_LIMIT:
                self.flush()
            got = os.preadv(handle.fileno(), [self.view[self.fill:self.fill + nbytes]], offset)
            if got != nbytes:  # the file shrank under us
                handle.pread(offset, nbytes)
                raise OSError(f"short read from {handle.display}")
            self.fill += nbytes
            self.pos += nbytes
            return
        if offset + nbytes > handle.size:
            handle.pread(offset, nbytes)  # raises the one-line truncation error
        self.flush()
        self._copy_fd(handle.fileno(), offset, nbytes, handle.pread)

    def copy_within(self, offset: int, nbytes: int) -> None:
        """Append ``nbytes`` this file already holds at ``offset`` (a tied
        tensor's second name: its source is not read, nor its view computed,
        again; the bytes come from our own output, still in the page cache)."""
        if offset + nbytes > self.pos:
            raise ValueError(f"copy_within({offset}, {nbytes}) past what was written ({self.pos})")
        self.flush()
        # same file, ranges never overlap: copy_file_range allows it since Linux 5.3
        self._copy_fd(self.fd, offset, nbytes, lambda off, n: os.pread(self.fd, n, off))
        advance(nbytes)

    def _copy_fd(self, src: int, offset: int, nbytes: int, read) -> None:
        """Append ``nbytes`` of the file ``src`` from ``offset``: copied in the
        kernel (``copy_file_range``, then ``sendfile``), else ``read(offset, n)``
        in bounded pieces and written."""
        done = 0
        while done < nbytes:
            want = min(nbytes - done, COPY_STEP)
            k = 0
            if self._can_copy_range:
                try:
                    k = os.copy_file_range(src, self.fd, want, offset + done)
                except OSError:
                    self._can_copy_range = False
                    k = 0
            if k == 0 and self._can_sendfile:
                try:
                    k = os.sendfile(self.fd, src, offset + done, want)
                except OSError:
                    self._can_sendfile = False
                    k = 0
            if k == 0:
                chunk = read(offset + done, min(want, 8 << 20))
                if not chunk:
                    raise OSError(f"short read while copying into {self.path}")
                self._write_all(memoryview(chunk))
                k = len(chunk)
            else:
                self._wrote(k)
            done += k
        self.pos += nbytes

    def write_tensor(self, ref: TensorRef) -> None:
        spans = ref.file_spans()
        if spans is not None:
            for handle, off, n in spans:
                self.copy_from(handle, off, n)
                advance(n)
            return
        for chunk in ref.iter_bytes():
            self.write(chunk)
            advance(len(chunk))

    def pad_to(self, multiple: int) -> None:
        rem = self.pos % multiple
        if rem:
            self.write(b"\0" * (multiple - rem))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
