"""The Python API, and the one facade of ckptconv: every verb is a function
here, and the CLI calls nothing else.

Reading functions take ``allow_globals=`` (more inert record types for this
run, ``MODULE.NAME`` strings) and ``storage_options=`` (fsspec backend
options for remote paths); both reach the reader as read options, and an
option the chosen reader or writer does not take is a ``UsageError`` (exit 2)
naming the option and the formats that take it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import CkptconvError, UsageError
from .paths import as_path, remote_stats, remote_use
from .paths import storage_options as using_storage_options
from .registry import (check_options, declared_options, detect_format, format_for_target,
                       format_info, formats_with_hook, given_options, hook, option_flag,
                       read_checkpoint, resolve_target, write_checkpoint)
from .registry import source_format as registry_source_format
from .tree import Checkpoint

if TYPE_CHECKING:
    from .verbs.convert import ConvertReport


# --- load, save, convert ---------------------------------------------------------------

def load(path: str | os.PathLike, format: str | None = None, *, allow_globals=None,
         storage_options: dict | None = None, **options) -> Checkpoint:
    """Open a checkpoint lazily: headers are parsed, no tensor bytes are read."""
    return read_checkpoint(path, format=format, allow_globals=allow_globals,
                           storage_options=storage_options, **options)


def save(ck: Checkpoint | dict, path: str | os.PathLike, format: str | None = None,
         force: bool = False, *, lossless: bool = False, storage_options: dict | None = None,
         **options) -> dict[str, Any]:
    """Write a checkpoint (or a plain dict of tensors) atomically; ``lossless``:
    anything the format cannot hold is an error (else a note)."""
    if not isinstance(ck, Checkpoint):
        if not isinstance(ck, dict):
            raise UsageError(f"save() takes a Checkpoint or a dict, not {type(ck).__name__}")
        ck = Checkpoint.from_state_dict(ck)
    return write_checkpoint(ck, path, format=format, force=force, lossless=lossless,
                            storage_options=storage_options, **options)


def cast_floats(ck: Checkpoint, dtype: str) -> Checkpoint:
    """Cast every floating-point tensor to ``dtype`` (ints and bools stay)."""
    from . import dtypes
    from .tensor import cast

    target = dtypes.get(dtype)

    def cast_if_float(ref):
        if ref.dtype.name.startswith(("float", "bfloat")):
            return cast(ref, target)
        return ref

    return ck.map_tensors(cast_if_float)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None,
            mapping=None, select: str | None = None, force: bool = False,
            dtype: str | None = None, format: str | None = None, strict: bool = False,
            *, allow_globals=None, storage_options: dict | None = None,
            manifest: bool = False, progress: bool = False, **options) -> ConvertReport:
    """Read ``src``, optionally select/map/cast, write ``dst``; returns a report.

    The report's notes say what an ambiguous extension became (``.ckpt``,
    ``.h5``: the source's family) and what the target cannot hold; with
    ``strict`` the latter (and unmapped keys) is an error, before writing.

    ``options`` are the writer's (``shard_size``, ``template``, ...): each must
    be one the target format's writer takes (see ``formats()``)."""
    with using_storage_options(storage_options):  # lazy reads during the write use them too
        return _convert(src, dst, to, mapping, select, force, dtype, format, strict,
                        allow_globals, manifest, progress, options)


def _convert(src, dst, to, mapping, select, force, dtype, format, strict, allow_globals,
             manifest, progress, options) -> ConvertReport:
    t0 = time.perf_counter()
    before = remote_stats()
    src, dst = as_path(src), as_path(dst)
    if src.resolve() == dst.resolve():
        raise UsageError(f"{dst}: source and target are the same file")
    format_for_target(dst, to)       # no target format at all: a usage error, before reading
    ck = load(src, format=format, allow_globals=allow_globals)
    source_format = ck.format
    # an ambiguous extension (.ckpt, .h5) takes the source's family, and says so
    target_format, target_note = resolve_target(dst, to, registry_source_format(ck))
    # before writing anything: an option the writer does not take is a usage error
    write_options = check_options(target_format, "write", options)
    if select:
        ck = ck.select(select)
    from .verbs.convert import ConvertReport

    report = ConvertReport(str(src), source_format, str(dst), target_format)
    m = _mapping(mapping)
    if m is not None:
        ck = m.apply(ck, strict=strict)
        report.mapping = m.report.to_dict() if hasattr(m.report, "to_dict") else m.report
    if dtype:
        ck = cast_floats(ck, dtype)
    uniq = ck.unique_tensors()
    from .progress import progress as progress_bar

    with progress_bar(sum(r.nbytes for r in uniq.values()), bool(progress),
                      f"{src.name} -> {dst.name}"):
        info = save(ck, dst, format=target_format, force=force, lossless=strict,
                    **write_options)
    report.tensors = len(uniq)
    report.bytes = sum(r.nbytes for r in uniq.values())
    report.files = [str(f) for f in info.get("files", [dst])]
    if manifest:  # <dst>.sha256.json: file and per-tensor SHA-256, for `verify --manifest`
        from .integrity import write_manifest

        report.files.append(str(write_manifest(dst, report.files)))
    report.notes = ([target_note] if target_note else []) + list(info.get("notes", []))
    report.seconds = time.perf_counter() - t0
    report.remote = remote_use(before, src, dst)
    return report


# --- verbs on one checkpoint ---------------------------------------------------------------

def inspect(path: str | os.PathLike, format: str | None = None, show_all: bool = False, *,
            allow_globals=None, storage_options: dict | None = None):
    """Format, tensors, dtypes, shapes, bytes, tree and metadata, from headers only."""
    from .verbs.inspect import inspect_checkpoint

    before = remote_stats()
    ck = load(path, format=format, allow_globals=allow_globals, storage_options=storage_options)
    report = inspect_checkpoint(ck, show_all=show_all)
    if "layout" in format_info(ck.format).hooks:     # the format's own lines (its layout hook)
        report.layout = dict(hook(ck.format, "layout")(ck))
    report.remote = remote_use(before, path)
    return report


def diff(a, b, mapping=None, suggest: bool = False, tensors: bool = True, values: bool = True,
         *, allow_globals=None, storage_options: dict | None = None):
    """Compare two checkpoints (paths or Checkpoints): keys, shapes, dtypes, values of the
    tensors (``tensors``), and the non-tensor values and metadata path by path (``values``).
    ``mapping`` is applied to ``a``; ``suggest`` adds DSL rules mapping A onto B."""
    from .verbs.diff import diff as diff_checkpoints

    if given_options({"allow_globals": allow_globals, "storage_options": storage_options}):
        a, b = (x if isinstance(x, Checkpoint) else
                load(x, allow_globals=allow_globals, storage_options=storage_options)
                for x in (a, b))
    return diff_checkpoints(a, b, mapping=_mapping(mapping), suggest=suggest,
                            tensors=tensors, values=values)


def check(path: str | os.PathLike, *, allow_globals=None, storage_options: dict | None = None):
    """Loadability by the format's own library; for torch files: the minimum
    torch, and what blocks torch's weights-only loader."""
    return _format_verb("check", path, allow_globals=allow_globals,
                        storage_options=storage_options)


def sanitize(src: str | os.PathLike, dst: str | os.PathLike, force: bool = False,
             torch_compat: str | None = None, *, to: str | None = None, allow_globals=None,
             storage_options: dict | None = None, **options):
    """Rewrite ``src`` (any format) so that the target format's own safe loader
    loads it (torch: torch's weights-only loader): the target format's
    ``sanitize`` hook. The target is ``to``, else from ``dst``'s extension, else
    the one format that has the hook. ``options``: the target writer's."""
    with using_storage_options(storage_options):
        src_p, dst_p = as_path(src), as_path(dst)
        if src_p.exists() and dst_p.exists() and src_p.resolve() == dst_p.resolve():
            raise UsageError(f"{dst_p}: source and target are the same file")
        target = _sanitize_target(dst_p, to)
        sanitize_into = hook(target, "sanitize", dst_p)
        options = check_options(target, "write", {"torch_compat": torch_compat, **options})
        ck = load(src_p, allow_globals=allow_globals)
        return sanitize_into(ck, dst_p, force=force, **options)


def _sanitize_target(dst: Path, to: str | None) -> str:
    try:
        return format_for_target(dst, to)
    except UsageError:
        have = formats_with_hook("sanitize")
        if to is None and len(have) == 1:     # an extension that tells nothing (``clean``)
            return have[0]
        raise


def verify(path: str | os.PathLike, manifest: bool = False, *, allow_globals=None,
           storage_options: dict | None = None):
    """Integrity: CRCs, offsets, sizes, checksums (and ``<path>.sha256.json`` with ``manifest``)."""
    return _format_verb("verify", path, "ckptconv.integrity:verify", manifest=manifest,
                        allow_globals=allow_globals, storage_options=storage_options)


def scan(paths: str | os.PathLike | Iterable[str | os.PathLike], *, allow_globals=None,
         storage_options: dict | None = None):
    """Pickle safety report of a file, or of every file named or under a folder
    named (a list); never executes anything."""
    from .safety import scan as scan_file
    from .safety import scan_paths

    if isinstance(paths, (str, os.PathLike)):
        return _call_passing(scan_file, "scan", [paths], allow_globals=allow_globals,
                             storage_options=storage_options)
    return _call_passing(scan_paths, "scan", [list(paths)], allow_globals=allow_globals,
                         storage_options=storage_options)


def _mapping(mapping):
    """A Mapping from a Mapping, a preset name, a rules file, rules text or a list of those."""
    if mapping is None:
        return None
    from .mapping import resolve_mapping

    return resolve_mapping(mapping)


def _format_verb(verb: str, path, fallback: str | None = None, **options):
    """A format-specific verb: the hook of the file's format (its read options
    checked against the reader's). ``fallback`` ("module:function") serves the
    formats whose adapters have no hook yet; without one, a format lacking the
    hook is a one-line error naming the formats that have it."""
    with using_storage_options(options.pop("storage_options", None)):
        return _format_verb_here(verb, path, fallback, **options)


def _format_verb_here(verb: str, path, fallback: str | None = None, **options):
    if fallback is None:
        fmt = detect_format(path)
    else:
        try:
            fmt = detect_format(path)
        except CkptconvError:
            fmt = None
    if fmt is not None and (fallback is None or verb in format_info(fmt).hooks):
        read_options = check_options(fmt, "read", {"allow_globals": options.pop("allow_globals")})
        return hook(fmt, verb, path)(as_path(path), **given_options(options), **read_options)
    module, _, name = fallback.partition(":")
    import importlib

    return _call_passing(getattr(importlib.import_module(module), name), verb, [path],
                         **options)


def _call_passing(fn: Callable, verb: str, args: list, **options):
    """``fn(*args, **given options)``; an option given that ``fn`` does not
    take is a usage error, never silently dropped."""
    with using_storage_options(options.pop("storage_options", None)):
        return _call_here(fn, verb, args, **options)


def _call_here(fn: Callable, verb: str, args: list, **options):
    from inspect import signature   # not at the top: ~10 ms to import without torch

    given = given_options(options)
    params = signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name in given:
        if name not in params and not takes_any:
            raise UsageError(f"{option_flag(name)} is not an option of {verb}")
    return fn(*args, **given)


# --- many sources: folders, globs, several paths; local processes or a Dask cluster -------------

BATCH_VERBS = ("convert", "inspect", "verify", "scan")


def parse_storage_options(items: list[str] | None) -> dict:
    """``["KEY=VALUE", ...]`` (``--storage-option``) -> ``storage_options=`` dict."""
    from .remote import parse_storage_options as parse

    return parse(items)


def looks_like_many(paths: list[str]) -> bool:
    """Several paths or a glob: run as a batch, one result per source."""
    from .verbs.batch import looks_like_many as many

    return many(paths)


def batch(verb: str, sources: Iterable[str | os.PathLike], out_dir: str | os.PathLike | None = None,
          *, jobs: int | None = None, scheduler: str | None = None, resume: bool = False,
          storage_options: dict | None = None, progress: bool = False,
          on_result: Callable | None = None, **options):
    """Run ``verb`` (convert, inspect, verify, scan) on many sources: paths,
    globs and folders, local or URLs. ``convert`` writes each under ``out_dir``
    with its relative name and the ``to`` format's extension. One task per
    source (per shard for verify/scan of a sharded checkpoint), in this process,
    in ``jobs`` local processes, or on the Dask cluster at ``scheduler`` (or
    ``$CKPTCONV_SCHEDULER``). ``on_result(result)`` is called as each source
    finishes; a failure is that source's. ``resume`` skips a conversion whose
    output exists and verifies. Returns a ``BatchReport``."""
    from .verbs import batch as _batch
    from .progress import batch_progress

    if verb not in BATCH_VERBS:
        raise UsageError(f"'{verb}' takes one source; many sources work with "
                         f"{', '.join(BATCH_VERBS)}")
    with using_storage_options(storage_options):
        found = _batch.expand_sources([os.fspath(s) if isinstance(s, os.PathLike) else s
                                       for s in sources], storage_options)
    if verb in ("verify", "scan"):
        found = _batch.shard_sources(found)
    dsts = None
    if verb == "convert":
        if out_dir is None:
            raise UsageError("converting many sources needs --out-dir DIR|URL")
        to = options.get("to")
        if not to:
            raise UsageError("--out-dir needs --to FMT (the outputs' format and extension)")
        dsts = _batch.plan_outputs(found, os.fspath(out_dir) if isinstance(
            out_dir, os.PathLike) else out_dir, format_info(to).extensions[0])
    elif out_dir is not None or resume:
        raise UsageError(f"--out-dir and --resume are options of convert, not {verb}")
    fn = {"convert": convert, "inspect": inspect, "verify": verify, "scan": scan}[verb]
    report = _batch.BatchReport(verb)
    with batch_progress(len(found), progress) as bar:
        for result in _batch.run_many(fn, [s.path for s in found], dsts, options,
                                      storage_options, jobs=jobs or 1, scheduler=scheduler,
                                      resume=resume, verify_fn=verify if resume else None,
                                      keep_report=verb == "inspect"):
            report.results.append(result)
            if bar is not None:
                bar.finished(result)
            if on_result is not None:
                on_result(result)
    return report


# --- verbs on many checkpoints, on models, and listings ----------------------------------------

def load_into(module, path, mapping=None, strict: bool = False, device=None, select=None, *,
              pick: str | None = None, allow_globals=None, storage_options: dict | None = None):
    """Load what fits of ``path`` (a file or a ``Checkpoint``) into a torch module:
    bytes straight into the parameters, modules' hooks run; returns a
    ``LoadReport`` (loaded, missing, unexpected, mismatched). ``pick="latest"`` /
    ``"best:loss"`` / ``"best:acc:max"``: ``path`` is a run's folder, and the
    checkpoint ``ckptconv pick`` chooses is loaded."""
    from .verbs.load_into import load_into as load_into_module

    if pick is not None:
        from .verbs.runs import resolve_pick

        path = resolve_pick(path, pick)
    if not isinstance(path, Checkpoint):
        path = load(path, allow_globals=allow_globals, storage_options=storage_options)
    return load_into_module(module, path, mapping=_mapping(mapping), strict=strict,
                            device=device, select=select)


def load_state_dict(path, device="cpu", mmap: bool = True, select: str | None = None,
                    mapping=None, *, allow_globals=None, storage_options: dict | None = None):
    """``{name: torch.Tensor}`` of a checkpoint of any format (safetensors' ``load_file``
    shape): tied tensors shared; ``mmap`` tensors view a private map of the file."""
    from .verbs.load_state_dict import load_state_dict as load_state_dict_of

    if not isinstance(path, Checkpoint):
        path = load(path, allow_globals=allow_globals, storage_options=storage_options)
    return load_state_dict_of(path, device=device, mmap=mmap, select=select,
                              mapping=_mapping(mapping))


def declared_flags(kind: str, with_hook: str | None = None) -> dict[str, tuple[str, list[str]]]:
    """Option -> (its CLI flag, the built-in formats whose reader (``kind="read"``)
    or writer (``"write"``) takes it), from the format table: the CLI's flags."""
    return {o: (option_flag(o), fs) for o, fs in declared_options(kind, with_hook).items()}


def formats():
    """Every format: extensions, availability, reader/writer options, hooks."""
    from .verbs.formats import formats_report

    return formats_report()


def presets(name: str | None = None):
    """The mapping presets with their descriptions, or one preset's rules."""
    from .mapping import presets_report

    return presets_report(name)


# --- verbs on a run of checkpoints -----------------------------------------------------------

def ls(paths, sort: str = "time", *, storage_options: dict | None = None):
    """The checkpoints of a run (folders, files, globs; local or URLs): time,
    epoch, step, loss, status."""
    from .verbs.runs import ls as list_run

    with using_storage_options(storage_options):
        return list_run(paths, sort=sort)


def pick(path, latest: bool = True, best: str | None = None, maximize: bool = False, *,
         storage_options: dict | None = None) -> str:
    """The path of the newest intact checkpoint at ``path``, or the best by ``best``."""
    from .verbs.runs import pick as pick_checkpoint

    with using_storage_options(storage_options):
        return pick_checkpoint(path, latest=latest, best=best, maximize=maximize)


def prune(path, keep_last: int = 3, keep_best: str | None = None, maximize: bool = False,
          dry_run: bool = False, *, storage_options: dict | None = None):
    """Remove the intact checkpoints of a run beyond the newest ``keep_last`` and the best."""
    from .verbs.runs import prune as prune_run

    with using_storage_options(storage_options):
        return prune_run(path, keep_last=keep_last, keep_best=keep_best, maximize=maximize,
                         dry_run=dry_run)
