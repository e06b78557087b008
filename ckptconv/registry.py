"""Adapter registry: built-ins by dotted path (imported on first use), plus
third-party adapters from the entry-point group ``ckptconv.adapters``.

Sources are detected by content (magic bytes), never by extension alone;
targets by ``--to`` or the extension. Modelled on fsspec's
``known_implementations`` and xarray's ``list_engines``.
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import FormatError, MissingDependencyError, UsageError
from .tree import Checkpoint

HEAD_BYTES = 4096


class Adapter:
    """One format. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    extensions: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()      # optional modules, imported lazily inside methods
    extra: str | None = None            # pip extra that provides ``requires``
    description: str = ""
    can_read: bool = True
    can_write: bool = True

    def sniff(self, head: bytes, path: Path) -> bool:
        """True when the file or folder at ``path`` (first bytes ``head``) is this format."""
        return False

    def read(self, path: Path, **options) -> Checkpoint:
        raise NotImplementedError

    def write(self, ckpt: Checkpoint, path: Path, **options) -> Any:
        raise NotImplementedError

    def check_available(self, action: str = "reading") -> None:
        for mod in self.requires:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                hint = f": pip install 'ckptconv[{self.extra}]'" if self.extra else ""
                raise MissingDependencyError(f"{action} {self.name} needs {mod}{hint}") from e


# name -> "module:Class"; order is the sniffing order (most specific first).
BUILTINS: dict[str, str] = {
    "torch": "ckptconv.adapters.torch:TorchAdapter",
    "safetensors": "ckptconv.adapters.safetensors_:SafetensorsAdapter",
    "tf": "ckptconv.adapters.tf_bundle:TFBundleAdapter",
    "keras-h5": "ckptconv.adapters.hdf5_:KerasH5Adapter",
    "hdf5": "ckptconv.adapters.hdf5_:HDF5Adapter",
    "onnx": "ckptconv.adapters.onnx_:OnnxAdapter",
}

_cache: dict[str, Adapter] = {}


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    found = {}
    try:
        for ep in entry_points(group="ckptconv.adapters"):
            found[ep.name] = ep
    except Exception as e:  # a broken environment warns, it does not crash
        warnings.warn(f"ckptconv: could not list adapter plugins: {e}")
    return found


def available_formats() -> list[str]:
    names = list(BUILTINS)
    names += [n for n in _entry_points() if n not in BUILTINS]
    return names


def get_adapter(name: str) -> Adapter:
    if name in _cache:
        return _cache[name]
    if name in BUILTINS:
        mod, _, cls = BUILTINS[name].partition(":")
        try:
            adapter = getattr(importlib.import_module(mod), cls)()
        except ImportError as e:
            raise MissingDependencyError(f"format '{name}' could not be loaded: {e}") from e
    elif name in _entry_points():
        try:
            obj = _entry_points()[name].load()
            adapter = obj() if isinstance(obj, type) else obj
        except Exception as e:
            raise MissingDependencyError(f"adapter plugin '{name}' failed to load: {e}") from e
    else:
        raise UsageError(f"unknown format '{name}'; pick one of: {', '.join(available_formats())}")
    _cache[name] = adapter
    return adapter


def _adapters_quietly():
    # built-ins first; plugins (an entry-point scan, ~10 ms) only if none claims the file
    names = list(BUILTINS)
    yield from _quietly(names)
    yield from _quietly([n for n in _entry_points() if n not in BUILTINS])


def _quietly(names):
    for name in names:
        try:
            yield get_adapter(name)
        except Exception as e:
            if name not in BUILTINS:
                warnings.warn(f"ckptconv: adapter plugin '{name}' is broken: {e}")


def read_head(path: Path) -> bytes:
    if path.is_dir():
        return b""
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def detect_format(path: str | os.PathLike) -> str:
    """The format of an existing file or folder, from its content."""
    p = Path(path)
    if not p.exists() and not Path(str(p) + ".index").exists():
        raise FormatError(f"{p}: no such file or folder")
    if p.is_file() and p.stat().st_size == 0:
        raise FormatError(f"{p.name}: file is empty (0 bytes)")
    head = read_head(p) if p.exists() else b""
    for adapter in _adapters_quietly():
        try:
            if adapter.can_read and adapter.sniff(head, p):
                return adapter.name
        except Exception:  # noqa: BLE001 - a sniffer that chokes on the bytes does not claim them
            continue
    raise FormatError(f"{p.name}: not a checkpoint format ckptconv knows "
                      f"(first bytes {head[:8]!r}); known: {', '.join(available_formats())}")


def format_for_target(path: str | os.PathLike, to: str | None = None) -> str:
    """The format to write: ``to`` if given, else from the extension."""
    if to:
        get_adapter(to)
        return to
    p = str(path).lower()
    if p.endswith(".index.json"):
        return "safetensors"
    best = None
    for name in BUILTINS:
        try:
            adapter = get_adapter(name)
        except Exception:
            continue
        for ext in adapter.extensions:
            if p.endswith(ext) and (best is None or len(ext) > best[1]):
                best = (name, len(ext))
    if best is None:
        raise UsageError(f"{Path(path).name}: cannot tell the target format from the extension; "
                         f"use --to ({', '.join(available_formats())})")
    return best[0]
