"""Many sources at once: several paths, globs and folders (local or fsspec
URLs), one task per file, run in this process, in local processes
(``--jobs N``: ``concurrent.futures.ProcessPoolExecutor``) or on an existing
Dask distributed cluster (``--scheduler ADDRESS`` or ``CKPTCONV_SCHEDULER``).

Workers read and write storage themselves; only small result records travel
back, one per source, yielded as each finishes: src, dst, format, status
(ok / error / unsafe / unscanned), error, bytes, seconds, worker, and the
object-storage requests it made. A failure is that source's: the others run
on. ``resume`` skips a source whose output already exists and verifies.

This module knows no verb: the API hands it the function to run on each
source (``api.convert``, ``api.verify``, ...), which must be importable by
name so that process pools and Dask workers can find it.
"""
from __future__ import annotations

import glob as _glob
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNSAFE, CkptconvError, UsageError
from ..remote import as_path, expand_remote, is_remote
from ..reports import Report

SCHEDULER_ENV = "CKPTCONV_SCHEDULER"
_GLOB_CHARS = "*?["


@dataclass
class Source:
    """One input, and its name relative to the folder or glob root it came from."""

    path: str
    relative: str


@dataclass
class SourceResult:
    """What happened to one source (one line of ``--json`` output)."""

    src: str
    dst: str | None = None
    format: str | None = None
    status: str = "ok"            # ok | error | unsafe | unscanned
    error: str | None = None
    bytes: int = 0
    seconds: float = 0.0
    worker: str = ""
    requests: int = 0             # object-storage requests this source took
    skipped: bool = False         # --resume found a good output already there
    report: dict | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["report"] is None:
            del d["report"]
        return d

    def __str__(self) -> str:
        arrow = f" -> {self.dst}" if self.dst else ""
        if self.status == "ok":
            what = "skipped (output exists and verifies)" if self.skipped else \
                f"ok ({self.format}, {_human(self.bytes)} in {self.seconds:.2f} s)"
            return f"{self.src}{arrow}: {what}"
        return f"{self.src}{arrow}: {self.status}: {self.error or ''}".rstrip(": ")


def _human(n: int) -> str:
    from ..tensor import human_bytes

    return human_bytes(n)


# --- expanding sources ----------------------------------------------------------------

def _readable_extensions() -> tuple[str, ...]:
    from ..registry import FORMATS

    exts = {".index.json"}
    for info in FORMATS.values():
        if info.reads:
            exts.update(e for e in info.extensions if e != ".index")
    return tuple(sorted(exts, key=len, reverse=True))


def _is_checkpoint_folder(path) -> bool:
    """A folder that is itself one checkpoint (TF checkpoint/SavedModel, DCP, DeepSpeed)."""
    from ..registry import detect_format

    try:
        detect_format(path)
        return True
    except CkptconvError:
        return False


def _walk_local(root: Path) -> list[Path]:
    exts = _readable_extensions()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(exts):
                files.append(Path(dirpath) / f)
    return _drop_shards(files)


def _drop_shards(files: list) -> list:
    """A sharded checkpoint is its ``*.index.json``: its shard files are not sources too."""
    import json

    shards: set[str] = set()
    for f in files:
        if str(f).endswith(".index.json"):
            try:
                text = f.read_text() if hasattr(f, "read_text") else Path(f).read_text()
                names = set(json.loads(text).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError, CkptconvError):
                continue
            shards.update(str(f.parent / n) for n in names)
    return [f for f in files if str(f) not in shards]


def expand_sources(items: Iterable[str], storage_options: dict | None = None) -> list[Source]:
    """Files named by paths, globs and folders, local or remote, in a stable order."""
    out: list[Source] = []
    seen: set[str] = set()

    def add(path, rel):
        if str(path) not in seen:
            seen.add(str(path))
            out.append(Source(str(path), rel))

    for item in items:
        item = str(item)
        if is_remote(item):
            root = as_path(item, storage_options)
            key = root.url.split("://", 1)[1]
            has_glob = any(c in key for c in _GLOB_CHARS)
            base = _glob_root(root.url) if has_glob else root.url
            found = expand_remote(item, storage_options)
            if not has_glob and len(found) == 1 and found[0].url == root.url:
                add(root, root.name)
                continue
            if not has_glob:
                exts = _readable_extensions()
                found = _drop_shards([f for f in found if f.name.lower().endswith(exts)
                                      and not f.name.startswith(".")])
            if not found:
                raise UsageError(f"{item}: matches no files")
            for f in found:
                add(f, f.relative_to(base))
            continue
        if any(c in item for c in _GLOB_CHARS) and not os.path.exists(item):
            matches = sorted(_glob.glob(item, recursive=True))
            if not matches:
                raise UsageError(f"{item}: matches no files")
            base = _glob_root(item)
            for m in matches:
                add(Path(m), os.path.relpath(m, base) if base else m)
            continue
        p = Path(item)
        if p.is_dir() and not _is_checkpoint_folder(p):
            files = _walk_local(p)
            if not files:
                raise UsageError(f"{item}: folder holds no checkpoint files")
            for f in files:
                add(f, f.relative_to(p).as_posix())
        else:
            add(p, p.name)
    return out


def looks_like_many(paths: list[str]) -> bool:
    """More than one path, or a glob (a folder may be one checkpoint: not by itself)."""
    return len(paths) > 1 or any(any(c in str(p) for c in _GLOB_CHARS) and
                                 not os.path.exists(str(p)) for p in paths)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard."""
    head = pattern
    for i, c in enumerate(pattern):
        if c in _GLOB_CHARS:
            head = pattern[:i]
            break
    return head.rsplit("/", 1)[0] if "/" in head else ""


def output_name(relative: str, extension: str) -> str:
    """``sub/model.pt`` -> ``sub/model.safetensors``: the relative name with the
    target's extension (a sharded ``x.safetensors.index.json`` is ``x``)."""
    folder, _, name = relative.rpartition("/")
    lowered = name.lower()
    for multi in (".safetensors.index.json", ".bin.index.json", ".index.json"):
        if lowered.endswith(multi):
            name = name[: -len(multi)]
            break
    else:
        stem, dot, _ = name.rpartition(".")
        name = stem if dot and stem else name
    return f"{folder}/{name}{extension}" if folder else f"{name}{extension}"


def plan_outputs(sources: list[Source], out_dir: str, extension: str) -> list[str]:
    dsts = []
    for s in sources:
        rel = output_name(s.relative, extension)
        dsts.append(f"{out_dir.rstrip('/')}/{rel}" if is_remote(out_dir) else
                    str(Path(out_dir) / rel))
    if len(set(dsts)) != len(dsts):
        dup = next(d for d in dsts if dsts.count(d) > 1)
        raise UsageError(f"two sources would both write {dup}; convert them in separate runs")
    return dsts


# --- running one source ---------------------------------------------------------------------

def _worker_name() -> str:
    try:
        from distributed import get_worker

        w = get_worker()
        return str(w.name if w.name is not None else w.address)
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def _status_of(report: Any) -> tuple[str, str | None]:
    code = getattr(report, "exit_code", EXIT_OK)
    if code == EXIT_OK:
        return "ok", None
    reasons = getattr(report, "reasons", None) or getattr(report, "problems", None) or []
    msg = "; ".join(str(r) for r in reasons[:3]) or str(report).splitlines()[0]
    if code == EXIT_UNSAFE:
        return "unsafe", msg
    if getattr(report, "verdict", "") not in ("", "safe", "unsafe"):
        return "unscanned", msg
    return "error", msg


def run_one(fn: Callable, src: str, dst: str | None, options: dict, storage_options: dict | None,
            resume: bool = False, verify_fn: Callable | None = None,
            keep_report: bool = False) -> SourceResult:
    """Run ``fn(src[, dst], **options)`` and describe the outcome; never raises
    for a bad source (a worker's failure is its result)."""
    from ..paths import remote_stats, stats_since, storage_options as using

    t0 = time.perf_counter()
    before = remote_stats()
    res = SourceResult(src, dst, worker=_worker_name())
    try:
        with using(storage_options):
            if resume and dst is not None and verify_fn is not None and as_path(dst).exists():
                if _verifies(verify_fn, dst):
                    res.skipped = True
                    return res
                options = dict(options, force=True)  # a damaged output is replaced
            report = fn(src, dst, **options) if dst is not None else fn(src, **options)
        res.status, res.error = _status_of(report)
        res.format = getattr(report, "source_format", None) or getattr(report, "format", None) \
            or getattr(report, "kind", None)
        res.bytes = int(getattr(report, "bytes", 0) or getattr(report, "total_bytes", 0) or 0)
        if keep_report and hasattr(report, "to_dict"):
            res.report = report.to_dict()
    except CkptconvError as e:
        res.status = "unsafe" if e.exit_code == EXIT_UNSAFE else "error"
        res.error = " ".join(str(e).split())
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: that source's error
        res.status = "error"
        res.error = f"{type(e).__name__}: {' '.join(str(e).split())}"
    finally:
        res.seconds = round(time.perf_counter() - t0, 4)
        res.requests = stats_since(before)["requests"]
    return res


def _verifies(verify_fn: Callable, path: str) -> bool:
    try:
        return getattr(verify_fn(path), "exit_code", EXIT_OK) == EXIT_OK
    except CkptconvError:
        return False


# --- executors ------------------------------------------------------------------------------------

def scheduler_address(scheduler: str | None) -> str | None:
    return scheduler or os.environ.get(SCHEDULER_ENV) or None


def run_many(fn: Callable, sources: list[str], dsts: list[str | None] | None = None,
             options: dict | None = None, storage_options: dict | None = None, jobs: int = 1,
             scheduler: str | None = None, resume: bool = False,
             verify_fn: Callable | None = None, keep_report: bool = False,
             ) -> Iterator[SourceResult]:
    """One task per source; results in the order they finish."""
    dsts = dsts if dsts is not None else [None] * len(sources)
    args = [(fn, s, d, options or {}, storage_options, resume, verify_fn, keep_report)
            for s, d in zip(sources, dsts)]
    address = scheduler_address(scheduler)
    if address:
        yield from _run_dask(address, args)
    elif jobs > 1 and len(args) > 1:
        yield from _run_processes(jobs, args)
    else:
        for a in args:
            yield run_one(*a)


def _run_processes(jobs: int, args: list[tuple]) -> Iterator[SourceResult]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: workers start clean (no copied locks or event-loop threads of
    # fsspec's async backends), importing only what a task needs
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(args)), mp_context=ctx) as pool:
        futures = {pool.submit(run_one, *a): a for a in args}
        try:
            for fut in as_completed(futures):
                yield _result_or_crash(fut, futures[fut])
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _result_or_crash(fut, a: tuple) -> SourceResult:
    try:
        return fut.result()
    except Exception as e:  # noqa: BLE001 - the worker process died (killed, out of memory)
        return SourceResult(a[1], a[2], status="error",
                            error=f"worker failed: {type(e).__name__}: {' '.join(str(e).split())}")


def _run_dask(address: str, args: list[tuple]) -> Iterator[SourceResult]:
    try:
        from distributed import Client, as_completed
    except ImportError as e:
        from ..errors import MissingDependencyError

        raise MissingDependencyError("--scheduler needs Dask: pip install 'ckptconv[dask]'") from e
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise UsageError(f"cannot reach the Dask scheduler at {address}: "
                         f"{' '.join(str(e).split())}") from e
    try:
        # pure=False: two identical calls are still two tasks (the files may have changed)
        futures = {client.submit(run_one, *a, pure=False, key=f"ckptconv-{i}-{os.urandom(4).hex()}"):
                   a for i, a in enumerate(args)}
        try:
            for fut in as_completed(futures):
                yield _result_or_crash(fut, futures[fut])
        except BaseException:
            client.cancel(list(futures))
            raise
    finally:
        client.close()


class BatchReport(Report):
    """Every source's result; exit 1 if any failed, 3 if any was unsafe (and none failed)."""

    def __init__(self, verb: str):
        self.verb = verb
        self.results: list[SourceResult] = []

    @property
    def exit_code(self) -> int:
        return batch_exit_code(self.results)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            key = "skipped" if r.skipped else r.status
            out[key] = out.get(key, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"verb": self.verb, "sources": len(self.results), "counts": self.counts(),
                "results": [r.to_dict() for r in self.results], "exit_code": self.exit_code}

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        return f"{self.verb}: {len(self.results)} sources: {counts or 'none'}"


def shard_sources(sources: list[Source]) -> list[Source]:
    """A sharded checkpoint's ``*.index.json`` replaced by its shard files (one
    task each, for the verbs that look at files one by one: verify, scan)."""
    import json

    out = []
    for s in sources:
        if not s.path.endswith(".index.json"):
            out.append(s)
            continue
        index = as_path(s.path)
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (OSError, ValueError, AttributeError, CkptconvError):
            out.append(s)  # the verb reports what is wrong with it
            continue
        folder = s.relative.rpartition("/")[0]
        out += [Source(str(index.parent / n), f"{folder}/{n}" if folder else n) for n in shards]
    return out


def batch_exit_code(results: Iterable[SourceResult]) -> int:
    """1 if any source failed (error, unscanned), else 3 if any was unsafe, else 0."""
    statuses = {r.status for r in results}
    if statuses & {"error", "unscanned"}:
        return EXIT_BAD_INPUT
    if "unsafe" in statuses:
        return EXIT_UNSAFE
    return EXIT_OK
