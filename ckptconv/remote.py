"""Object storage through fsspec: URLs, storage options, ranged reads, atomic uploads.

Every path ckptconv takes may be an fsspec URL (``s3://``, ``gs://``,
``az://``, ``http(s)://``, ``hf://``, ``memory://``; ``file://`` is a local
path). Local paths never come here: they keep the ``os.pread`` /
``copy_file_range`` fast path, and telling them from URLs (``is_remote``,
``as_path``, ``open_source``) with the storage-option context and the
request counts lives in ``ckptconv.paths``, which needs nothing of this
module: a local load never imports it (re-exported here).

Reading: ``RemoteFile`` is the remote kind of ``tensor.FileHandle``. Each
read is one range request (``fs.cat_file(path, start, end)``); small reads
(headers, zip directories, pickles) fetch a read-ahead block and are served
from a few cached blocks, big ones are fetched exactly, in bounded pieces,
several at once (``fs.cat_ranges``). Nothing is ever downloaded whole.
Requests and bytes are counted (``remote_stats``) for reports and benchmarks.

Writing (``ckptconv.uploads``): writers write a local temp file
(``atomic.atomic_file``), which is then streamed up. On S3, GCS and Azure that is a multipart upload completed
only at the very end and aborted on any error or signal, so a failed
conversion leaves no object at the destination; other backends upload to a
hidden temp name and move it into place.

Storage options: each backend's own configuration (``FSSPEC_<PROTOCOL>_<KEY>``
environment variables such as ``FSSPEC_S3_ENDPOINT_URL``, ``AWS_*``, config
files) plus ``--storage-option KEY=VALUE`` (``storage_options=`` in the API),
which win. Ground truth: fsspec ``spec.py`` (AbstractFileSystem,
AbstractBufferedFile), ``config.py``; s3fs ``core.py`` (S3File.commit/discard).
"""
from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
import threading
from collections import OrderedDict
from typing import Any, Iterator

from .errors import FormatError, MissingDependencyError, UsageError
from .paths import (as_path, count_transfer, current_storage_options, is_remote,  # noqa: F401
                    open_source, path_or_reader, remote_stats, remote_use, stats_since,
                    storage_options, url_protocol)

# protocol -> (module that implements it, pip package), for the install hint
_BACKENDS = {
    "s3": ("s3fs", "s3fs"), "s3a": ("s3fs", "s3fs"),
    "gs": ("gcsfs", "gcsfs"), "gcs": ("gcsfs", "gcsfs"),
    "az": ("adlfs", "adlfs"), "abfs": ("adlfs", "adlfs"), "abfss": ("adlfs", "adlfs"),
    "hf": ("huggingface_hub", "huggingface_hub"),
    "http": ("aiohttp", "aiohttp"), "https": ("aiohttp", "aiohttp"),
}
# Backends whose files commit a multipart upload only when told to
# (``open(..., autocommit=False)`` + ``commit()``); the rest go via temp + move.
MULTIPART_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}

READAHEAD_MIN = 64 << 10  # a small read after a jump fetches this much ...
READAHEAD = 1 << 20       # ... and up to this much while reads run on sequentially
_CACHED_BLOCKS = 8       # read-ahead blocks kept per open file
FETCH_STEP = 8 << 20     # big reads are fetched in pieces of this size ...
FETCH_PARALLEL = 4       # ... this many at a time (what `aws s3 cp` does too)
MERGE_GAP = 64 << 10     # small ranges this close are fetched in one request


# --- storage options ----------------------------------------------------------

def parse_storage_options(items: list[str] | None) -> dict:
    """``KEY=VALUE`` strings -> dict; values are JSON when they parse (true,
    3, {"a": 1}), else strings; ``a.b=VALUE`` nests (client_kwargs.region_name)."""
    out: dict = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--storage-option takes KEY=VALUE, not '{item}'")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.strip().split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--storage-option {item}: '{p}' is not a group of options")
        node[leaf] = value
    return out


def _env_options(protocol: str) -> dict:
    """``FSSPEC_<PROTOCOL>_<KEY>`` (and ``FSSPEC_<PROTOCOL>`` as JSON) from the
    environment as it is now (fsspec itself reads it once, at import)."""
    from fsspec.config import set_conf_env

    conf: dict = {}
    set_conf_env(conf)
    return dict(conf.get(protocol, {}))


def filesystem(protocol: str, options: dict | None = None):
    """The fsspec file system for ``protocol`` with env + explicit options."""
    module, package = _BACKENDS.get(protocol, (None, None))
    try:
        import fsspec
    except ImportError as e:
        raise MissingDependencyError(
            f"{protocol}:// URLs need fsspec: pip install 'ckptconv[remote]'") from e
    kw = _env_options(protocol)
    if protocol in MULTIPART_PROTOCOLS:
        # other processes (Dask workers, --jobs) write the same prefixes: never
        # answer "no such object" from a listing cached before they did
        kw["use_listings_cache"] = False
    kw.update(current_storage_options() if options is None else options)
    try:
        return fsspec.filesystem(protocol, **kw)
    except ImportError as e:
        hint = f"pip install {package}" if package and package != "s3fs" else \
            "pip install 'ckptconv[remote]'"
        if protocol in ("gs", "gcs", "az", "abfs", "abfss"):
            hint = f"pip install 'ckptconv[remote]' {package}"
        raise MissingDependencyError(f"{protocol}:// URLs need {module or protocol}: {hint}") from e
    except ValueError as e:
        if "Protocol not known" in str(e):
            raise UsageError(f"unknown storage protocol '{protocol}://' (fsspec does not know it)"
                             ) from e
        raise UsageError(f"{protocol}://: bad storage options: {e}") from e
    except TypeError as e:
        raise UsageError(f"{protocol}://: bad storage options: {e}") from e


# --- paths ------------------------------------------------------------------------

class _Stat:
    def __init__(self, size: int, is_dir: bool = False, mtime: float = 0.0):
        self.st_size = size
        self.st_mode = 0o040755 if is_dir else 0o100644
        self.st_mtime = mtime


def _mtime(info: dict) -> float:
    """Seconds since the epoch when the object was last written (0.0 if the
    backend does not say): s3fs ``LastModified``, gcsfs ``updated``, adlfs
    ``last_modified``, local/memory ``mtime``/``created``."""
    import datetime as _dt

    for key in ("LastModified", "last_modified", "updated", "mtime", "created"):
        v = info.get(key)
        if isinstance(v, _dt.datetime):
            return (v if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)).timestamp()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                return _dt.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


_UNKNOWN = object()


class _ReadCache:
    """Read-ahead blocks of one object, shared by every handle opened on the
    same RemotePath (the sniffer's head read serves the reader after it)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.blocks: OrderedDict[int, bytes] = OrderedDict()
        self.ahead, self.next = READAHEAD_MIN, -1
        self.window: tuple[int, bytes] | None = None   # the last FETCH_STEP window read

    def window_read(self, offset: int, length: int, size: int, fetch) -> bytes:
        """``length`` (< FETCH_STEP) bytes at ``offset`` from the current window,
        or from a new one starting there."""
        with self.lock:
            w = self.window
            if w is not None and w[0] <= offset and offset + length <= w[0] + len(w[1]):
                return w[1][offset - w[0]:offset - w[0] + length]
        data = fetch(offset, min(size, offset + FETCH_STEP))
        with self.lock:
            self.window = (offset, data)
        return data[:length]

    def read(self, offset: int, length: int, size: int, fetch) -> bytes:
        with self.lock:
            for start, block in reversed(self.blocks.items()):
                if start <= offset and offset + length <= start + len(block):
                    self.blocks.move_to_end(start)
                    return block[offset - start:offset - start + length]
            # read-ahead as the kernel does it: small after a jump (sniffers
            # probe scattered offsets), growing while reads run on sequentially
            self.ahead = min(self.ahead * 4, READAHEAD) if offset == self.next else READAHEAD_MIN
            end = min(size, offset + max(length, self.ahead))
            self.next = end
        block = fetch(offset, end)
        with self.lock:
            self.blocks[offset] = block
            while len(self.blocks) > _CACHED_BLOCKS:
                self.blocks.popitem(last=False)
        return block[:length]


class RemotePath:
    """The part of ``pathlib.Path`` readers and writers use, over an fsspec URL.

    Deliberately no ``__fspath__``: handing one to ``open()`` or ``os.*`` is a
    TypeError rather than a silent read of a local file of a similar name.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        proto = url_protocol(url)
        if proto is None:
            raise UsageError(f"{url}: not a URL")
        self.protocol = proto
        self.url = url.rstrip("/") if not url.endswith("://") else url
        self.options = dict(storage_options) if storage_options else None
        self._fs = None
        self._info: Any = _UNKNOWN
        self._cache: _ReadCache | None = None

    # pure path arithmetic (URL strings, '/'-separated) ------------------------
    def _key(self) -> str:
        return self.url.split("://", 1)[1]

    @property
    def name(self) -> str:
        return posixpath.basename(self._key())

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def suffixes(self) -> list[str]:
        name = self.name.lstrip(".")
        return ["." + s for s in name.split(".")[1:]]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> "RemotePath":
        head = posixpath.dirname(self._key())
        return self._new(f"{self.protocol}://{head}" if head else f"{self.protocol}://")

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in self._key().split("/") if p)

    def _new(self, url: str, info: dict | None = None) -> "RemotePath":
        p = RemotePath(url, self.options)
        p._fs = self._fs
        if info is not None:  # a listing already said what it is: no request to ask again
            p._info = info
        return p

    def __truediv__(self, other) -> "RemotePath":
        other = str(other)
        if is_remote(other):
            return RemotePath(other, self.options)
        base = self.url if self.url.endswith("/") else self.url + "/"
        return self._new(base + other.lstrip("/"))

    def joinpath(self, *others) -> "RemotePath":
        p = self
        for o in others:
            p = p / o
        return p

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def with_suffix(self, suffix: str) -> "RemotePath":
        return self.parent / (self.stem + suffix)

    def with_options(self, options: dict | None) -> "RemotePath":
        return RemotePath(self.url, {**(self.options or {}), **(options or {})})

    def relative_to(self, other) -> str:
        base = str(other).rstrip("/") + "/"
        if not self.url.startswith(base):
            raise ValueError(f"{self.url} is not under {other}")
        return self.url[len(base):]

    @property
    def parents(self) -> tuple["RemotePath", ...]:
        out, p = [], self
        while p.parts:
            p = p.parent
            out.append(p)
        return tuple(out)

    def resolve(self, strict: bool = False) -> "RemotePath":
        """'..' and '.' segments folded (external data may not escape its folder)."""
        key = self._key()
        norm = posixpath.normpath("/" + key).lstrip("/") if key else key
        return self if norm == key else self._new(f"{self.protocol}://{norm}")

    absolute = expanduser = resolve

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    # storage ------------------------------------------------------------------
    @property
    def fs(self):
        if self._fs is None:
            self._fs = filesystem(self.protocol, self._merged_options())
        return self._fs

    def _merged_options(self) -> dict:
        return {**current_storage_options(), **(self.options or {})}

    @property
    def fs_path(self) -> str:
        """The path as the file system names it (protocol stripped)."""
        return self.fs._strip_protocol(self.url)

    def info(self) -> dict | None:
        """The object's metadata (size, type), or None if there is none; asked
        once per RemotePath (sniffing asks exists/is_file/stat in a row)."""
        if self._info is not _UNKNOWN:
            return self._info
        count_transfer(requests=1)
        try:
            self._info = self.fs.info(self.fs_path)
        except (FileNotFoundError, NotADirectoryError):
            self._info = None
        except OSError as e:  # permissions, bad endpoint: one line, exit 1
            raise FormatError(f"{self.url}: {_describe(e)}") from e
        return self._info

    def forget(self) -> None:
        """Drop the remembered metadata and bytes (after writing the object)."""
        self._info = _UNKNOWN
        self._cache = None

    def read_cache(self) -> _ReadCache:
        if self._cache is None:
            self._cache = _ReadCache()
        return self._cache

    def exists(self) -> bool:
        return self.info() is not None

    def is_file(self) -> bool:
        i = self.info()
        return i is not None and i.get("type") != "directory"

    def is_dir(self) -> bool:
        i = self.info()
        return i is not None and i.get("type") == "directory"

    def stat(self) -> _Stat:
        i = self.info()
        if i is None:
            raise FileNotFoundError(self.url)
        return _Stat(int(i.get("size") or 0), i.get("type") == "directory", _mtime(i))

    def is_symlink(self) -> bool:
        return False

    def iterdir(self) -> Iterator["RemotePath"]:
        count_transfer(requests=1)
        for info in self.fs.ls(self.fs_path, detail=True):
            name = posixpath.basename(info["name"].rstrip("/"))
            if name:
                yield self._new((self / name).url, info)

    def glob(self, pattern: str) -> list["RemotePath"]:
        """Objects and prefixes under this one matching ``pattern`` (``*.index``)."""
        return glob_urls(posixpath.join(self.url, pattern), self.options, self._fs)

    def rglob(self, pattern: str) -> list["RemotePath"]:
        """Every object below this prefix whose name matches ``pattern`` (object
        stores list files, not folders)."""
        import fnmatch

        count_transfer(requests=1)
        found = self.fs.find(self.fs_path, detail=True)
        return [self._new(self.fs.unstrip_protocol(f), info) for f, info in sorted(found.items())
                if fnmatch.fnmatchcase(posixpath.basename(f), pattern)]

    def open(self, mode: str = "rb", **_):
        if mode not in ("rb", "r"):
            raise UsageError(f"{self.url}: remote files are written through atomic_file, "
                             f"not open({mode!r})")
        f = RemoteReader(RemoteFile(self))
        return f if mode == "rb" else io.TextIOWrapper(f, encoding="utf-8")

    def read_bytes(self) -> bytes:
        h = RemoteFile(self)
        return h.pread(0, h.size, "file")

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders to make; other backends get them made."""
        if self.protocol not in MULTIPART_PROTOCOLS:
            with contextlib.suppress(OSError):
                self.fs.makedirs(self.fs_path, exist_ok=True)

    def unlink(self, missing_ok: bool = False) -> None:
        count_transfer(requests=1)
        try:
            self.fs.rm_file(self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


# --- reading ----------------------------------------------------------------------

class RemoteFile:
    """A remote file read by range requests: the remote kind of
    ``tensor.FileHandle`` (``FileHandle(url)`` returns one), with the same
    ``size``/``pread``/``pread_many``/``fetch_many``."""

    is_remote = True

    def __init__(self, path, display: str | None = None):
        rp = path if isinstance(path, RemotePath) else as_path(str(path))
        self.rpath = rp
        self.path = str(rp)
        self.display = display or rp.name or rp.url
        self._fd = None
        self._cache = rp.read_cache()
        info = rp.info()
        if info is None:
            raise FormatError(f"{rp.url}: no such file or object")
        if info.get("type") == "directory":
            raise FormatError(f"{rp.url}: is a folder, not a file")
        self.size = int(info.get("size") or 0)
        self._fs, self._fs_path = rp.fs, rp.fs_path

    def fileno(self) -> int:
        raise FormatError(f"{self.display}: this reader needs a local file, "
                          "not an object-storage URL")

    def close(self) -> None:
        """Nothing to close: the read-ahead blocks belong to the RemotePath."""

    def _fetch(self, start: int, end: int) -> bytes:
        try:
            data = self._fs.cat_file(self._fs_path, start=start, end=end)
        except FileNotFoundError as e:
            raise FormatError(f"{self.path}: object disappeared while being read") from e
        except OSError as e:
            raise FormatError(f"{self.path}: read failed at offset {start}: "
                              f"{_describe(e)}") from e
        count_transfer(requests=1, read=len(data))
        if len(data) != end - start:
            raise FormatError(f"{self.display}: object changed while being read "
                              f"(asked {end - start} bytes at {start}, got {len(data)})")
        return data

    def _check(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FormatError(
                f"{self.display}: {what} needs {length} bytes at offset {offset}, "
                f"file ends at {self.size}")

    def pread(self, offset: int, length: int, what: str = "data") -> bytes:
        self._check(offset, length, what)
        if length == 0:
            return b""
        if length >= READAHEAD:  # exactly these bytes (a sniffer's 1 MiB read stays 1 MiB)
            return b"".join(self._pieces([(offset, length)]))
        return self._cache.read(offset, length, self.size, self._fetch)

    def pread_many(self, ranges: list[tuple[int, int]], what: str = "data") -> list[bytes]:
        """Many small exact ranges (zip local headers) in concurrent requests;
        ranges less than MERGE_GAP apart share one request (up to FETCH_STEP):
        a round trip costs more than the bytes between them (a torch zip of
        small tensors: one request for all its local headers, not one each)."""
        for off, n in ranges:
            self._check(off, n, what)
        if not ranges:
            return []
        groups: list[list] = []  # [start, end, indices of the ranges it serves]
        for i in sorted(range(len(ranges)), key=lambda i: ranges[i][0]):
            off, n = ranges[i]
            g = groups[-1] if groups else None
            if g is not None and off - g[1] <= MERGE_GAP and max(g[1], off + n) - g[0] <= FETCH_STEP:
                g[1] = max(g[1], off + n)
                g[2].append(i)
            else:
                groups.append([off, off + n, [i]])
        try:
            got = self._fs.cat_ranges([self._fs_path] * len(groups), [g[0] for g in groups],
                                      [g[1] for g in groups], on_error="raise")
        except OSError as e:
            raise FormatError(f"{self.path}: read failed: {_describe(e)}") from e
        count_transfer(requests=len(groups), read=sum(len(d) for d in got))
        out: list[bytes] = [b""] * len(ranges)
        for (start, end, served), data in zip(groups, got):
            if len(data) != end - start:
                raise FormatError(f"{self.display}: object changed while being read")
            for i in served:
                off, n = ranges[i]
                out[i] = data[off - start:off - start + n] if len(served) > 1 else data
        return out

    def fetch_many(self, spans: list[tuple[int, int]]) -> Iterator[bytes]:
        """The bytes of ``spans`` (offset, length) in order, in pieces of at
        most FETCH_STEP, FETCH_PARALLEL requests in flight: bounded memory."""
        if all(n < FETCH_STEP for _, n in spans):
            # tensors of a few MiB, stored one after the other: one request per
            # FETCH_STEP window serves several of them (as `aws s3 cp` reads in parts)
            for o, n in spans:
                yield self._cache.window_read(o, n, self.size, self._fetch)
            return
        yield from self._pieces(spans)

    def _pieces(self, spans: list[tuple[int, int]]) -> Iterator[bytes]:
        pieces = [(o + i, min(FETCH_STEP, n - i)) for o, n in spans for i in range(0, n, FETCH_STEP)]
        for i in range(0, len(pieces), FETCH_PARALLEL):
            batch = pieces[i:i + FETCH_PARALLEL]
            if len(batch) == 1:
                yield self._fetch(batch[0][0], batch[0][0] + batch[0][1])
            else:
                yield from self.pread_many(batch)

    def __repr__(self) -> str:
        return f"RemoteFile({self.path!r})"


class RemoteReader(io.RawIOBase):
    """A read-only, seekable binary file over a ``RemoteFile`` (for readers
    that want a file object: sniffing, h5py)."""

    def __init__(self, handle):
        self.handle = handle
        self.pos = 0
        self.name = handle.path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self.pos, self.handle.size)[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.handle.size - self.pos))
        if n:
            b[:n] = self.handle.pread(self.pos, n)
            self.pos += n
        return n

    def readall(self) -> bytes:
        n = max(0, self.handle.size - self.pos)
        data = self.handle.pread(self.pos, n) if n else b""
        self.pos += n
        return data


class RemoteBuffer:
    """A read-only, indexable view of a remote object for parsers written over
    an in-memory or mmap'ed buffer (the ONNX protobuf scan): ``buf[i]`` and
    ``buf[a:b]`` are served from one current block, refilled by range reads."""

    BLOCK = 64 << 10

    def __init__(self, handle):
        self.handle, self.start, self.block = handle, 0, b""

    def __len__(self) -> int:
        return self.handle.size

    def _load(self, start: int, n: int) -> None:
        self.block = self.handle.pread(start, min(self.handle.size - start, max(n, self.BLOCK)))
        self.start = start

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.handle.size)
            if step != 1:
                raise ValueError("RemoteBuffer slices take no step")
            if stop <= start:
                return b""
            if not (self.start <= start and stop <= self.start + len(self.block)):
                if stop - start >= READAHEAD:
                    return self.handle.pread(start, stop - start)
                self._load(start, stop - start)
            return self.block[start - self.start:stop - self.start]
        i = key + self.handle.size if key < 0 else key
        if not self.start <= i < self.start + len(self.block):
            if not 0 <= i < self.handle.size:
                raise IndexError(key)
            self._load(i, 1)
        return self.block[i - self.start]

    def find(self, sub: bytes, start: int = 0) -> int:
        """``bytes.find`` over the object, a block at a time (a pickle's text
        opcodes end at a newline; the scanner looks for it)."""
        pos, size, overlap = max(0, start), self.handle.size, max(0, len(sub) - 1)
        while pos < size:
            chunk = self[pos:min(size, pos + self.BLOCK)]
            i = chunk.find(sub)
            if i >= 0:
                return pos + i
            if pos + len(chunk) >= size:
                break
            pos += max(1, len(chunk) - overlap)
        return -1

    def __bytes__(self) -> bytes:
        """The whole object (a bare pickle is judged whole)."""
        return self.handle.pread(0, self.handle.size) if self.handle.size else b""

    def close(self) -> None:
        self.block = b""


# --- many sources -----------------------------------------------------------------------

_GLOB_CHARS = re.compile(r"[*?\[]")


def glob_urls(pattern: str, storage_options: dict | None = None, fs=None) -> list[RemotePath]:
    """The objects and prefixes a URL glob (``s3://bucket/run/*.pth``) matches, sorted."""
    root = as_path(pattern, storage_options)
    if fs is not None:
        root._fs = fs
    count_transfer(requests=1)
    found = root.fs.glob(root.fs_path, detail=True)
    return [root._new(root.fs.unstrip_protocol(f), info) for f, info in sorted(found.items())]


def expand_remote(pattern: str, storage_options: dict | None = None) -> list[RemotePath]:
    """The objects a URL names: itself, everything under a prefix, or a glob's matches."""
    root = as_path(pattern, storage_options)
    fs = root.fs
    count_transfer(requests=1)
    if _GLOB_CHARS.search(root._key()):
        found = fs.glob(root.fs_path)
        files = [f for f in found if fs.isfile(f)]
    elif fs.isdir(root.fs_path):
        files = fs.find(root.fs_path)
    else:
        return [root]
    return [RemotePath(fs.unstrip_protocol(f), storage_options) for f in sorted(files)]
