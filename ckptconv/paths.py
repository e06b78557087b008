"""Paths and URLs, told apart without importing the object-storage layer.

Every path ckptconv takes may be an fsspec URL (``s3://bucket/model.pt``);
most are local. The helpers here answer "is it a URL?" and open local paths
with nothing but the standard library, so that loading a local file (the
first call of ``load_state_dict``) never imports ``ckptconv.remote``: that
module, and fsspec behind it, are imported when a URL is first met (by
name, ``REMOTE_PATH``: it imports this module). A ``RemotePath`` can only
exist once ``ckptconv.remote`` is imported, which is how ``is_remote``
recognises one without importing it.

The storage options given to the API (``storage_options=``) live here too,
in a context variable that ``ckptconv.remote`` reads when it opens a URL.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

# the characters of a URL scheme (RFC 3986: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ))
_ALPHA = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_SCHEME = _ALPHA | frozenset("0123456789+-.")
_LOCAL_PROTOCOLS = ("file", "local")


# The class of URL paths, named as the format table names adapters: the
# module is imported by the first URL, not by this one (it imports this one).
REMOTE_PATH = "ckptconv.remote:RemotePath"


def _remote_path_class(load: bool = False):
    """The URL path class; None when its module is not imported yet and ``load``
    is false (then no object is one)."""
    module_name, _, attr = REMOTE_PATH.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        if not load:
            return None
        module = importlib.import_module(module_name)
    return getattr(module, attr)


def url_protocol(path: Any) -> str | None:
    """The protocol of a URL string (``s3``), or None for local paths."""
    if not isinstance(path, str):
        cls = _remote_path_class()
        return path.protocol if cls is not None and isinstance(path, cls) else None
    end = path.find(":")
    if end < 1 or not path.startswith("://", end) or path[0] not in _ALPHA \
            or not all(c in _SCHEME for c in path[1:end]):
        return None
    return path[:end].lower()


def is_remote(path: Any) -> bool:
    """True for a RemotePath or a URL string other than ``file://``."""
    proto = url_protocol(path)
    return proto is not None and proto not in _LOCAL_PROTOCOLS


def as_path(path: Any, storage_options: dict | None = None):
    """A ``RemotePath`` for a URL, a ``pathlib.Path`` for a local path or ``file://`` URL."""
    proto = url_protocol(path)
    if proto is None:
        return path if isinstance(path, Path) else Path(path)
    if proto in _LOCAL_PROTOCOLS:
        return Path(path.split("://", 1)[1])
    RemotePath = _remote_path_class(load=True)
    if isinstance(path, RemotePath):
        return path.with_options(storage_options) if storage_options else path
    return RemotePath(path, storage_options)


def open_source(path):
    """A binary file object for reading ``path`` (local: the built-in ``open``)."""
    if is_remote(path):
        return as_path(path).open("rb")
    return open(path, "rb")


@contextlib.contextmanager
def path_or_reader(path) -> Iterator[Any]:
    """What a library that opens files itself (h5py) is handed: a local path
    as it is, a URL as a seekable file object read by range requests."""
    if not is_remote(path):
        yield path
        return
    with as_path(path).open("rb") as f:
        yield f


# --- storage options ----------------------------------------------------------

_options: contextvars.ContextVar[dict] = contextvars.ContextVar("ckptconv_storage_options",
                                                                default={})


@contextlib.contextmanager
def storage_options(options: dict | None) -> Iterator[None]:
    """Use ``options`` for every URL opened inside the block (the API's ``storage_options=``)."""
    if not options:
        yield
        return
    token = _options.set({**_options.get(), **options})
    try:
        yield
    finally:
        _options.reset(token)


def current_storage_options() -> dict:
    return dict(_options.get())


# --- request accounting ---------------------------------------------------------

_stats_lock = threading.Lock()
_stats = {"requests": 0, "bytes_read": 0, "bytes_written": 0}


def count_transfer(requests: int = 0, read: int = 0, written: int = 0) -> None:
    """Add requests made and bytes moved to this process's counts (remote_stats)."""
    with _stats_lock:
        _stats["requests"] += requests
        _stats["bytes_read"] += read
        _stats["bytes_written"] += written


def remote_stats() -> dict[str, int]:
    """Requests made and bytes moved to/from object storage by this process so far."""
    with _stats_lock:
        return dict(_stats)


def stats_since(before: dict[str, int]) -> dict[str, int]:
    now = remote_stats()
    return {k: now[k] - before.get(k, 0) for k in now}


def remote_use(before: dict[str, int], *paths) -> dict[str, int] | None:
    """What reports show: the requests and bytes since ``before``, when any of
    ``paths`` is remote (None for local work)."""
    return stats_since(before) if any(is_remote(p) for p in paths) else None
