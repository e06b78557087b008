"""The format table: what ckptconv knows about each format without importing
its adapter, plus third-party adapters from the entry-point group
``ckptconv.adapters``.

Each built-in format is one ``FormatInfo`` row in ``FORMATS``: its name,
extensions, a cheap content sniffer (a dotted path into the light module
``ckptconv.adapters.sniffers``), the extra that installs what it needs, the
options its reader and writer take, and the hooks (format-specific verbs) its
adapter has. Choosing a target format reads only this table; detecting a
source imports only the sniffers; a conversion imports the two adapters it
uses. Modelled on fsspec's ``known_implementations`` and xarray's
``list_engines`` (a broken plugin warns, it does not crash).

Sources are detected by content (magic bytes), never by extension alone;
targets by ``--to`` or the extension.
"""
from __future__ import annotations

import importlib
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .errors import FormatError, MissingDependencyError, UnsupportedError, UsageError
from .paths import as_path, open_source, storage_options
from .tree import Checkpoint

HEAD_BYTES = 4096

# Format-specific verbs an adapter may implement as methods of the same name:
#   verify(path, **o) -> Report      integrity (CRCs, offsets, sizes)
#   scan(path, report, **o) -> None  pickle safety, never executes: adds what it finds
#                                    to the ScanReport (ckptconv.safety)
#   check(path, **o) -> Report       loadability by the format's own library
#   sanitize(src, dst, **o) -> Report
#   layout(ckpt) -> dict             format-specific lines for `inspect`
HOOKS = ("verify", "scan", "check", "sanitize", "layout")

# Options every reader and every writer takes (handled by the API or the
# writers' shared code), beyond what each format declares.
COMMON_READ_OPTIONS = frozenset()
COMMON_WRITE_OPTIONS = frozenset({"force"})


class Adapter:
    """One format. Subclasses set the class attributes and implement the methods.

    A third-party adapter declares everything the table row of a built-in
    holds as class attributes (``name``, ``extensions``, ``extra``,
    ``requires``, ``read_options``, ``write_options``) and implements
    ``sniff``; hooks are the methods of ``HOOKS`` it defines.
    """

    name: str = ""
    extensions: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()      # optional modules, imported lazily inside methods
    extra: str | None = None            # pip extra that provides ``requires``
    description: str = ""
    can_read: bool = True
    can_write: bool = True
    read_options: tuple[str, ...] = ()  # keyword options read() takes (beyond the path)
    write_options: tuple[str, ...] = ()  # keyword options write() takes (beyond force)

    def __init_subclass__(cls, **kwargs):
        """A built-in adapter takes what its table row holds: the row is the one
        place for its extensions, description, extra and requirements."""
        super().__init_subclass__(**kwargs)
        info = FORMATS.get(cls.__dict__.get("name", ""))
        if info is not None and cls.__module__.startswith("ckptconv.adapters."):
            cls.extensions, cls.description = info.extensions, info.description
            cls.requires, cls.extra = info.requires, info.extra
            cls.can_read, cls.can_write = info.reads, info.writes

    def sniff(self, head: bytes, path: Path) -> bool:
        """True when the file or folder at ``path`` (first bytes ``head``) is this format.
        Built-ins sniff with the function their table row names."""
        info = FORMATS.get(self.name)
        return bool(info and info.sniffer()(head, path))

    def read(self, path: Path, **options) -> Checkpoint:
        raise NotImplementedError

    def write(self, ckpt: Checkpoint, path: Path, **options) -> Any:
        raise NotImplementedError

    def losses(self, ckpt: Checkpoint, path: Path) -> list[str]:
        """What of ``ckpt`` this format cannot hold, one line each naming the keys
        and why: notes of the write, or its error when nothing may be lost
        (``convert --strict``). Asked before anything is written."""
        return []

    def check_available(self, action: str = "reading") -> None:
        for mod in self.requires:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                hint = f": pip install 'ckptconv[{self.extra}]'" if self.extra else ""
                raise MissingDependencyError(f"{action} {self.name} needs {mod}{hint}") from e

    @classmethod
    def defined_hooks(cls) -> tuple[str, ...]:
        return tuple(h for h in HOOKS if callable(getattr(cls, h, None)))


class FormatInfo(NamedTuple):
    """One row of the format table (a named tuple, not a dataclass: the table
    is built on every import of ckptconv, a dataclass costs ~2 ms to create)."""

    name: str
    extensions: tuple[str, ...]
    adapter: str                          # "module:Class", imported on first use
    sniff: str | Callable | None = None   # "module:function" (head, path) -> bool
    extra: str | None = None
    requires: tuple[str, ...] = ()
    description: str = ""
    reads: bool = True
    writes: bool = True
    read_options: frozenset[str] = frozenset()
    write_options: frozenset[str] = frozenset()
    hooks: frozenset[str] = frozenset()
    builtin: bool = True
    # the framework a format belongs to (target choice for ambiguous extensions);
    # "" means the format's own name
    family: str = ""
    # extensions this format writes when the source is of its family, though
    # another format is the default for them (".ckpt": TF bundle, or Lightning's torch file)
    shared_extensions: tuple[str, ...] = ()
    # its loader unpickles files it does not otherwise recognise (torch.load):
    # ``scan`` gives it bare pickles and tars, and judges every pickle it finds
    # with its adapter's ``interpret_pickle(data, display, listing)``
    reads_pickles: bool = False

    def sniffer(self) -> Callable[[bytes, Path], bool]:
        if callable(self.sniff):
            return self.sniff
        if not self.sniff:
            return lambda head, path: False
        return _resolve(self.sniff)

    def takes(self, kind: str) -> frozenset[str]:
        """The options the reader (``kind="read"``) or writer (``"write"``) takes."""
        if kind == "read":
            return self.read_options | COMMON_READ_OPTIONS
        return self.write_options | COMMON_WRITE_OPTIONS


def _sniffer(name: str) -> str:
    return f"ckptconv.adapters.sniffers:{name}"


def _formats(*rows: FormatInfo) -> dict[str, FormatInfo]:
    return {r.name: r for r in rows}


# Order is the sniffing order (most specific first).
FORMATS: dict[str, FormatInfo] = _formats(
    FormatInfo("torch", (".pt", ".pth", ".bin", ".ckpt.pt", ".tar"),
               "ckptconv.adapters.torch:TorchAdapter", _sniffer("sniff_torch"),
               description="PyTorch torch.save (zip and legacy), TorchScript weights",
               read_options=frozenset({"allow_globals"}),
               write_options=frozenset({"torch_compat"}),
               hooks=frozenset({"check", "sanitize", "verify", "scan"}),
               shared_extensions=(".ckpt",), reads_pickles=True),
    FormatInfo("safetensors", (".safetensors", ".safetensors.index.json"),
               "ckptconv.adapters.safetensors_:SafetensorsAdapter", _sniffer("sniff_safetensors"),
               description="safetensors (single file or sharded *.index.json)",
               write_options=frozenset({"shard_size", "dedupe_tied", "jobs"}),
               hooks=frozenset({"verify"})),
    FormatInfo("tf", (".ckpt", ".index"),
               "ckptconv.adapters.tf:TFBundleAdapter", _sniffer("sniff_tf"),
               description="TensorFlow checkpoint (prefix.index + prefix.data-*; TF1 and TF2; "
                           "SavedModel variables/)",
               read_options=frozenset({"verify"}),
               write_options=frozenset({"shard_size", "jobs"}),
               hooks=frozenset({"verify", "scan"})),
    FormatInfo("keras-h5", (".weights.h5", ".keras"),
               "ckptconv.adapters.hdf5.keras:KerasH5Adapter", _sniffer("sniff_keras_h5"),
               extra="hdf5", requires=("h5py",),
               description="Keras weights: Keras 2 .h5 (weights or full model), "
                           "Keras 3 .weights.h5 / .keras",
               hooks=frozenset({"verify", "scan"}), family="keras", shared_extensions=(".h5", ".hdf5")),
    FormatInfo("hdf5", (".h5", ".hdf5", ".hdf", ".he5"),
               "ckptconv.adapters.hdf5:HDF5Adapter", _sniffer("sniff_hdf5"),
               extra="hdf5", requires=("h5py",),
               description="plain HDF5 (numeric datasets, nested groups as '/' names, attributes)",
               hooks=frozenset({"scan"})),
    FormatInfo("onnx", (".onnx",),
               "ckptconv.adapters.onnx:OnnxAdapter", _sniffer("sniff_onnx"),
               extra="onnx", requires=("onnx",),
               description="ONNX (initializers, Constant nodes, subgraphs, external data)",
               write_options=frozenset({"template", "external_data", "dedupe_tied"}),
               hooks=frozenset({"scan"})),
    FormatInfo("npy", (".npy",),
               "ckptconv.adapters.numpy_:NpyAdapter", _sniffer("sniff_npy"),
               description="NumPy .npy (one array; np.save)",
               read_options=frozenset({"allow_globals"})),
    FormatInfo("npz", (".npz",),
               "ckptconv.adapters.numpy_:NpzAdapter", _sniffer("sniff_npz"),
               description="NumPy .npz (zip of .npy; np.savez, np.savez_compressed)",
               read_options=frozenset({"allow_globals"})),
    FormatInfo("dcp", (), "ckptconv.adapters.dcp:DcpAdapter", _sniffer("sniff_dcp"),
               description="torch.distributed.checkpoint folder (.metadata + *.distcp)",
               read_options=frozenset({"allow_globals"}), hooks=frozenset({"verify", "layout"}),
               family="torch"),
    FormatInfo("deepspeed", (), "ckptconv.adapters.deepspeed:DeepSpeedAdapter",
               _sniffer("sniff_deepspeed"),
               description="DeepSpeed ZeRO 1/2/3 folder, consolidated to fp32 (read)",
               writes=False, read_options=frozenset({"allow_globals"}),
               hooks=frozenset({"layout"}), family="torch"),
)

_adapters: dict[str, Adapter] = {}
_plugin_infos: dict[str, FormatInfo] = {}


def _resolve(dotted: str) -> Any:
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


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
    """Built-ins in sniffing order, then plugins (listed without importing them)."""
    return list(FORMATS) + [n for n in _entry_points() if n not in FORMATS]


def get_adapter(name: str) -> Adapter:
    if name in _adapters:
        return _adapters[name]
    if name in FORMATS:
        try:
            adapter = _resolve(FORMATS[name].adapter)()
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
    _adapters[name] = adapter
    return adapter


def format_info(name: str) -> FormatInfo:
    """The table row of a format; a plugin's row is built from its Adapter class."""
    if name in FORMATS:
        return FORMATS[name]
    if name not in _plugin_infos:
        a = get_adapter(name)
        _plugin_infos[name] = FormatInfo(
            name=name, extensions=tuple(a.extensions),
            adapter=f"{type(a).__module__}:{type(a).__qualname__}", sniff=a.sniff,
            extra=a.extra, requires=tuple(a.requires), description=a.description,
            reads=a.can_read, writes=a.can_write, read_options=frozenset(a.read_options),
            write_options=frozenset(a.write_options), hooks=frozenset(a.defined_hooks()),
            builtin=False)
    return _plugin_infos[name]


def _infos_quietly():
    # built-ins first; plugins (an entry-point scan, ~10 ms) only if none claims the file
    yield from FORMATS.values()
    yield from _plugin_infos_quietly()


def _plugin_infos_quietly():
    for name in _entry_points():
        if name in FORMATS:
            continue
        try:
            yield format_info(name)
        except Exception as e:
            warnings.warn(f"ckptconv: adapter plugin '{name}' is broken: {e}")


def read_head(path: Path) -> bytes:
    if path.is_dir():
        return b""
    with open_source(path) as f:
        return f.read(HEAD_BYTES)


def detect_format(path: str | os.PathLike) -> str:
    """The format of an existing file or folder (or URL), from its content."""
    p = as_path(path)
    if not p.exists() and not as_path(str(p) + ".index", getattr(p, "options", None)).exists():
        raise FormatError(f"{p}: no such file or folder")
    if p.is_file() and p.stat().st_size == 0:
        raise FormatError(f"{p.name}: file is empty (0 bytes)")
    head = read_head(p) if p.exists() else b""
    for info in _infos_quietly():
        try:
            if info.reads and info.sniffer()(head, p):
                return info.name
        except Exception:  # noqa: BLE001 - a sniffer that chokes on the bytes does not claim them
            continue
    raise FormatError(f"{p.name}: not a checkpoint format ckptconv knows "
                      f"(first bytes {head[:8]!r}); known: {', '.join(available_formats())}")


def format_for_target(path: str | os.PathLike, to: str | None = None) -> str:
    """The format to write: ``to`` if given, else from the extension (the table only)."""
    if to:
        if to not in FORMATS:
            format_info(to)      # a plugin, or the "unknown format" usage error
        return to
    p = str(path).lower()
    if p.endswith(".index.json"):
        return "safetensors"
    best = _longest_extension_match(p, FORMATS.values())
    if best is None:   # the plugins' extensions (this loads them)
        best = _longest_extension_match(p, _plugin_infos_quietly())
    if best is None:
        raise UsageError(f"{as_path(path).name}: cannot tell the target format from the extension; "
                         f"use --to ({', '.join(available_formats())})")
    return best


def _longest_extension_match(path: str, infos) -> str | None:
    best = None
    for info in infos:
        for ext in info.extensions:
            if path.endswith(ext) and (best is None or len(ext) > best[1]):
                best = (info.name, len(ext))
    return best and best[0]


# extensions more than one framework uses (the contract's list)
AMBIGUOUS_EXTENSIONS = (".ckpt", ".bin", ".h5", ".hdf5")
# families that are frameworks of their own (a source of one is not neutral)
FRAMEWORKS = ("torch", "tf", "keras")


def format_family(name: str | None) -> str | None:
    """The framework a format belongs to (``keras-h5`` -> ``keras``); its name
    when the table says nothing (plugins)."""
    if not name:
        return None
    info = FORMATS.get(name)
    return (info.family or info.name) if info else name


def resolve_target(path: str | os.PathLike, to: str | None = None,
                   source_format: str | None = None) -> tuple[str, str | None]:
    """(format to write, a note saying what was chosen when the extension is
    ambiguous). ``.ckpt``, ``.h5``: the format of the source's family
    (``source_format``: the format the checkpoint came from, or first came
    from through a conversion chain), else the extension's default."""
    fmt = format_for_target(path, to)
    if to:
        return fmt, None
    p = str(path).lower()
    own = max((len(e) for e in format_info(fmt).extensions if p.endswith(e)), default=0)
    rivals = {name: ext for name, info in FORMATS.items() if name != fmt
              for ext in info.shared_extensions if p.endswith(ext) and len(ext) >= own}
    family = format_family(source_format)
    if not rivals:
        # ".bin" is torch's only: say so when the source is of another framework
        ext = next((e for e in AMBIGUOUS_EXTENSIONS if p.endswith(e)), None)
        if ext and family in FRAMEWORKS and format_family(fmt) != family:
            return fmt, (f"'{ext}' is written as {fmt} (the only {ext} writer), though the source "
                         f"is {source_format}; --to chooses another format")
        return fmt, None
    chosen = next((n for n in rivals if format_family(n) == family), fmt)
    ext = rivals.get(chosen) or next(iter(rivals.values()))
    why = (f"the source is {source_format}" if format_family(chosen) == family
           else f"the default for {ext}; the source is {source_format or 'not of a family'}")
    note = (f"'{ext}' can be {', '.join([fmt, *rivals])}: wrote {chosen} ({why}); "
            f"--to chooses")
    return chosen, note


# --- declared options and hooks ----------------------------------------------------

# options whose CLI flag is not the option's name with dashes (repeatable flags)
FLAGS = {"allow_globals": "--allow-global", "storage_options": "--storage-option"}


def option_flag(option: str) -> str:
    """How the CLI spells an option: ``template`` -> ``--template``."""
    return FLAGS.get(option) or "--" + option.replace("_", "-")


def given_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options actually given: None, False and empty collections are not."""
    return {k: v for k, v in options.items()
            if v is not None and v is not False and not (isinstance(v, (list, tuple, dict,
                                                                      set, frozenset)) and not v)}


def declared_options(kind: str, with_hook: str | None = None) -> dict[str, list[str]]:
    """Option -> the built-in formats whose reader (``kind="read"``) or writer
    (``"write"``) declares it, in table order; only formats with the hook
    ``with_hook`` if given. The CLI makes its flags from this (plugins are not
    loaded for it)."""
    out: dict[str, list[str]] = {}
    for info in FORMATS.values():
        if with_hook is None or with_hook in info.hooks:
            for option in sorted(info.read_options if kind == "read" else info.write_options):
                out.setdefault(option, []).append(info.name)
    return out


def check_options(fmt: str, kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """The given options, once each is known to be taken by ``fmt``'s reader or
    writer (``kind`` "read" or "write"); otherwise a usage error naming the
    option and the formats that take it."""
    given = given_options(options)
    takes = format_info(fmt).takes(kind)
    for option in given:
        if option not in takes:
            others = [n for n in available_formats() if _takes_quietly(n, kind, option)]
            where = (f"; formats that take it: {', '.join(others)}" if others
                     else "; no format's " + ("reader" if kind == "read" else "writer") + " takes it")
            role = "reader" if kind == "read" else "writer"
            raise UsageError(f"{option_flag(option)} is not an option of the {fmt} {role}{where}")
    return given


def _takes_quietly(name: str, kind: str, option: str) -> bool:
    try:
        return option in format_info(name).takes(kind)
    except Exception:  # noqa: BLE001 - a broken plugin takes nothing
        return False


def folder_member(path) -> tuple[str | None, str] | None:
    """A file that a folder format finds by its name (a SavedModel's
    ``saved_model.pb`` ...): (the format whose ``scan`` judges it, or None;
    what the file is). None for any other file. The names are the adapters'
    (``adapters/sniffers.py``)."""
    return _resolve(_sniffer("saved_model_member"))(path)


def pickle_format() -> str:
    """The format whose loader unpickles files (the first row that says so)."""
    for info in FORMATS.values():
        if info.reads_pickles:
            return info.name
    raise UnsupportedError("no format reads pickles")


def formats_with_hook(hook: str) -> list[str]:
    return [n for n in available_formats() if _has_hook_quietly(n, hook)]


def _has_hook_quietly(name: str, hook: str) -> bool:
    try:
        return hook in format_info(name).hooks
    except Exception:  # noqa: BLE001 - a broken plugin has no hooks
        return False


def hook(fmt: str, name: str, path: str | os.PathLike | None = None) -> Callable:
    """The adapter method implementing the verb ``name`` for ``fmt``, or a
    one-line error naming the format and the formats that have it."""
    if name not in format_info(fmt).hooks:
        have = formats_with_hook(name)
        where = as_path(path).name + ": " if path is not None else ""
        offer = f"{name} is for {', '.join(have)} files" if have else f"no format has {name}"
        raise UnsupportedError(f"{where}{offer}; this is {fmt}")
    adapter = get_adapter(fmt)
    adapter.check_available(name)
    return getattr(adapter, name)


# --- reading and writing through the table -------------------------------------------

def read_checkpoint(path: str | os.PathLike, format: str | None = None,
                    **options) -> Checkpoint:
    """Open a checkpoint lazily with the adapter of its format (detected from
    the content unless ``format`` is given); options are checked against the
    reader's declared options."""
    with storage_options(options.pop("storage_options", None)):
        p = as_path(path)
        fmt = format or detect_format(p)
        given = check_options(fmt, "read", options)
        info = format_info(fmt)
        if not info.reads:
            raise UsageError(f"format '{fmt}' can be written but not read")
        adapter = get_adapter(fmt)
        adapter.check_available("reading")
        ck = adapter.read(p, **given)
    ck.format = ck.format or fmt
    ck.path = ck.path or str(p)
    return ck


def write_checkpoint(ck: Checkpoint, path: str | os.PathLike, format: str | None = None,
                     force: bool = False, lossless: bool = False, **options) -> dict[str, Any]:
    """Write atomically with the adapter of ``format`` (else from the
    extension and the checkpoint's family, see ``resolve_target``); options
    are checked against the writer's declared options. What the format cannot
    hold is named in the notes, or, with ``lossless``, an error before
    anything is written."""
    options = dict(options)
    with storage_options(options.pop("storage_options", None)):
        return _write_checkpoint(ck, as_path(path), format, force, lossless, options)


def _write_checkpoint(ck, path, format, force, lossless, options) -> dict[str, Any]:
    fmt, chosen = resolve_target(path, format, source_format(ck))
    given = check_options(fmt, "write", options)
    if not format_info(fmt).writes:
        raise UsageError(f"format '{fmt}' can be read but not written")
    adapter = get_adapter(fmt)
    if not adapter.can_write:
        raise UsageError(f"format '{fmt}' can be read but not written")
    adapter.check_available("writing")
    lost = adapter.losses(ck, path)
    if lost and lossless:
        raise UnsupportedError(f"{path.name}: {fmt} cannot hold " + "; ".join(lost)
                               + " (strict: nothing may be lost)")
    info = dict(adapter.write(ck, path, force=force, **given) or {})
    info["notes"] = ([chosen] if chosen else []) + [f"not kept: {x}" for x in lost] \
        + list(info.get("notes", []))
    return info


def source_format(ck: Checkpoint) -> str | None:
    """The format a checkpoint came from: through a chain of conversions, the
    first one (``Checkpoint.info["origin"]``, kept in flat formats' metadata)."""
    return ck.info.get("origin") or ck.format
