"""``ckptconv ls / pick / prune``: the checkpoints of a training run, in a folder.

A run is what a training script leaves in a folder, e.g. one
``checkpoint_<YYYYmmdd_HHMMSS>.pth`` per epoch holding the epoch, model and
optimizer state and the loss. Each checkpoint is one entry, whatever it is
made of:

- a file of any format ckptconv reads (detected by content);
- a sharded set: a ``*.index.json`` and the shards its ``weight_map`` names;
- a TensorFlow prefix: ``NAME.index`` and its ``NAME.data-*`` files;
- a folder that a format claims (DCP, DeepSpeed ZeRO, SavedModel), or that
  holds model weights (a Hugging Face Trainer ``checkpoint-N/``: its
  ``trainer_state.json`` gives the epoch, step and metrics).

For each entry ``ls`` reports the time (from a timestamp in the name, else
the modification time), epoch, step, loss and other scalar metrics (top-level
scalars, ``metrics.*``, small metadata values, ``trainer_state.json``), the
tensor count, the minimum torch and whether torch's weights-only loader
loads it (torch files), and a status: ``ok``, ``corrupt`` (headers do not
parse, data ranges past the end of the file) or ``unsafe`` (a pickle names
code). Only headers are read, and tensors of one element for their value.

``pick`` chooses among the intact entries (newest, or best by a metric);
``prune`` removes intact entries beyond those kept, a set or a folder as a
unit. Corrupt and unsafe entries, and files that are not checkpoints, are
never removed (a checkpoint still being written looks truncated).
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from ..errors import EXIT_OK, CkptconvError, FormatError, UnsafePickleError, UsageError
from ..remote import as_path, glob_urls, is_remote
from ..reports import Report
from ..tensor import TensorRef, human_bytes

OK, CORRUPT, UNSAFE = "ok", "corrupt", "unsafe"
# Names that are checkpoints even when they do not parse (then they are corrupt).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz", ".npy", ".h5",
                       ".hdf5", ".keras", ".onnx", ".pkl", ".tar", ".distcp")
# Files in a Hugging Face checkpoint folder that hold the model weights.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin", "tf_model.h5", "model.npz")
EPOCH_KEYS = ("epoch", "epochs", "current_epoch")
STEP_KEYS = ("global_step", "step", "steps", "iteration", "iter", "num_updates")
LOSS_KEYS = ("loss", "train_loss", "training_loss")
METRIC_CONTAINERS = ("metrics", "metric", "scores", "stats", "results")
_TIMESTAMPS = (
    re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})[_\-T.]?(\d{2})(\d{2})(\d{2})(?!\d)"),
    re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})[T_ ](\d{2})[:\-_.](\d{2})[:\-_.](\d{2})(?!\d)"),
    re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)"),
)
_COLUMNS = ("path", "format", "size", "time", "epoch", "step", "loss", "metrics", "tensors",
            "min_torch", "weights_only", "status")


@dataclass
class Entry:
    """One checkpoint of a run, and what ``ls`` knows about it."""

    path: str
    files: list[str]                       # everything that belongs to it (removed together)
    format: str | None = None
    size: int = 0
    time: str | None = None                # ISO 8601, local time
    time_from: str = "mtime"               # "name" when the name carries a timestamp
    epoch: float | None = None
    step: int | None = None
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tensors: int | None = None
    min_torch: str | None = None
    weights_only: bool | None = None
    status: str = OK
    reason: str | None = None              # why corrupt or unsafe
    load_path: str | None = None           # what ``ckptconv.load`` opens (a folder's weights)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _COLUMNS}
        d.update(time_from=self.time_from, reason=self.reason, files=self.files)
        return d

    def value(self, key: str):
        """A number recorded under ``key`` (epoch, step, loss or a metric), or None."""
        if key in ("epoch", "step", "loss") and getattr(self, key) is not None:
            return getattr(self, key)
        if key in self.metrics:
            return self.metrics[key]
        ends = [v for k, v in self.metrics.items() if k.rsplit(".", 1)[-1] == key]
        return ends[0] if len(ends) == 1 else None


# --- finding the checkpoints ------------------------------------------------------------

def _expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Each argument as a path (a ``RemotePath`` for a URL); globs expanded, sorted."""
    out = []
    for raw in paths:
        text = str(raw) if is_remote(raw) else os.fspath(raw)
        if any(c in text for c in "*?["):
            hits = glob_urls(text) if is_remote(text) else \
                [Path(h) for h in sorted(glob.glob(text))]
            if not hits:
                raise UsageError(f"{text}: no file matches")
            out += hits
        else:
            p = as_path(text)
            if not p.exists() and not as_path(text + ".index").exists():
                raise UsageError(f"{text}: no such file or folder")
            out.append(p)
    return out


def find_checkpoints(paths) -> list[Entry]:
    """The entries of the runs at ``paths`` (folders, files or globs), not yet examined.

    A folder named here is a run when it holds checkpoint folders (``checkpoint-N/``),
    else one checkpoint when a format claims it or it is a Trainer checkpoint (model
    weights and ``trainer_state.json``), else a run of the files in it. A folder
    inside is one checkpoint when a format claims it or it holds model weights.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    entries: list[Entry] = []
    for p in _expand(paths):
        if not p.is_dir():
            entries += _entries_of_files([p], named=True)
            continue
        inner = [e for e in map(_folder_entry, _subfolders(p)) if e is not None]
        # (a TensorFlow run folder: its `checkpoint` file makes the folder a tf
        # source, but each prefix in it is a checkpoint of the run)
        whole = None if inner or _tf_prefixes(p) else _folder_entry(p, needs_state=True)
        entries += [whole] if whole else inner + _entries_of_files(
            sorted(f for f in p.iterdir() if f.is_file() and not f.is_symlink()), named=False)
    seen: set[str] = set()
    return [e for e in entries if not (e.path in seen or seen.add(e.path))]


def _tf_prefixes(folder: Path) -> list[Path]:
    return [f for f in sorted(folder.glob("*.index"))
            if list(folder.glob(glob.escape(f.name[:-6]) + ".data-*"))]


def _subfolders(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_dir() and not f.is_symlink())


def _folder_entry(folder: Path, needs_state: bool = False) -> Entry | None:
    """A folder that is one checkpoint: claimed by a format, or holding model weights
    (and, with ``needs_state``, a ``trainer_state.json``)."""
    from ..registry import detect_format

    files = sorted(str(f) for f in folder.rglob("*") if f.is_file())
    try:
        fmt = detect_format(folder)
        return Entry(str(folder), files, fmt, load_path=str(folder))
    except CkptconvError:
        pass
    if needs_state and not (folder / "trainer_state.json").is_file():
        return None
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return Entry(str(folder), files, load_path=str(folder / name))
    return None


def _index_members(index: Path) -> list[Path] | None:
    """The shard files of a ``*.index.json`` (None when it is no shard index).
    A shard named outside the index's folder makes it corrupt: prune must not
    reach files elsewhere through it."""
    try:
        names = {str(v) for v in json.loads(index.read_text())["weight_map"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    for name in names:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise FormatError(f"{index.name}: shard '{name}' is not a file beside the index")
    return sorted(index.parent / n for n in names)


def _entries_of_files(files: list[Path], named: bool) -> list[Entry]:
    from ..registry import detect_format

    taken: set[Path] = set()
    entries = []
    tf_prefixes = {t for folder in {f.parent for f in files} for t in _tf_prefixes(folder)}
    for f in files:     # sets first: their parts are not entries of their own
        if f.name.endswith(".index.json"):
            try:
                shards = _index_members(f)
            except FormatError as e:
                taken.add(f)
                entries.append(Entry(str(f), [str(f)], status=CORRUPT, reason=_line(e)))
                continue
            if shards is not None:
                taken.update(shards + [f])
                entries.append(Entry(str(f), [str(f)] + [str(s) for s in shards if s.exists()],
                                     load_path=str(f)))
        elif f in tf_prefixes:
            data = sorted(f.parent.glob(glob.escape(f.name[:-6]) + ".data-*"))
            taken.update(data + [f])
            prefix = str(f)[:-6]
            entries.append(Entry(prefix, [str(f)] + [str(d) for d in data], load_path=prefix))
    entries += _orphan_shards([f for f in files if f not in taken], taken)
    for f in files:
        if f in taken:
            continue
        try:
            fmt = detect_format(f)
        except CkptconvError as e:
            if named or f.name.lower().endswith(CHECKPOINT_SUFFIXES):
                entries.append(Entry(str(f), [str(f)], status=CORRUPT, reason=_line(e)))
            continue
        entries.append(Entry(str(f), [str(f)], fmt, load_path=str(f)))
    return entries


_SHARD = re.compile(r"^(.*)-(\d{5})-of-(\d{5})(\.[^/]+)$")


def _orphan_shards(files: list[Path], taken: set[Path]) -> list[Entry]:
    """Shards (``NAME-0000K-of-0000N.EXT``) whose index is gone: one entry per set,
    never loadable alone, so never picked nor removed."""
    groups: dict[tuple, list[Path]] = {}
    for f in files:
        m = _SHARD.match(f.name)
        if m:
            groups.setdefault((m.group(1), m.group(3), m.group(4)), []).append(f)
    entries = []
    for (stem, total, ext), shards in groups.items():
        taken.update(shards)
        entries.append(Entry(str(shards[0].parent / f"{stem}-*-of-{total}{ext}"),
                             [str(s) for s in shards], status=CORRUPT,
                             reason=f"{len(shards)} of {int(total)} shards without their index"))
    return entries


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())


# --- what each checkpoint says about itself ------------------------------------------------

def name_time(name: str) -> datetime | None:
    """The timestamp in a checkpoint's name (``checkpoint_20261130_142501.pth``), if any."""
    for pattern in _TIMESTAMPS:
        for m in pattern.finditer(name):
            parts = [int(x) for x in m.groups()] + [0, 0, 0]
            try:
                t = datetime(*parts[:6])
            except ValueError:
                continue
            if 1990 <= t.year <= 2200:
                return t
    return None


def examine(entry: Entry) -> Entry:
    """Fill in ``entry`` from its name, its headers and a quick verify."""
    from ..registry import read_checkpoint

    paths = [as_path(f) for f in entry.files]
    entry.size = sum(p.stat().st_size for p in paths if p.exists())
    stamp = name_time(as_path(entry.path).name)
    if stamp is not None:
        entry.time, entry.time_from = stamp.isoformat(), "name"
    else:
        mtime = max((p.stat().st_mtime for p in paths if p.exists()), default=0)
        entry.time = datetime.fromtimestamp(mtime).isoformat(timespec="seconds")
    folder = as_path(entry.path)
    if folder.is_dir() and (folder / "trainer_state.json").is_file():
        _trainer_state(entry, folder / "trainer_state.json")
    if entry.status != OK or entry.load_path is None:
        return entry
    try:
        ck = read_checkpoint(entry.load_path)
        entry.format = entry.format or ck.format
        tensors = ck.unique_tensors()
        entry.tensors = len(tensors)
        _quick_verify(tensors)
        _scalars(entry, ck)
        _torch_checks(entry)
    except UnsafePickleError as e:
        entry.status, entry.reason = UNSAFE, _line(e)
    except (CkptconvError, OSError) as e:
        entry.status, entry.reason = CORRUPT, _line(e)
    return entry


def _quick_verify(tensors: dict[str, TensorRef]) -> None:
    """Every tensor's bytes lie inside its file (no byte of them is read)."""
    for ref in tensors.values():
        check = getattr(getattr(ref, "source", None), "check", None)
        if check is not None:
            check()


def _torch_checks(entry: Entry) -> None:
    """Minimum torch and weights_only (the format's ``check`` hook), unsafe content
    anywhere in the file (``scan``)."""
    from ..registry import format_info, hook
    from ..safety import scan

    load_path = as_path(entry.load_path)
    if "check" not in format_info(entry.format).hooks or load_path.is_dir():
        return
    report = hook(entry.format, "check", entry.load_path)(load_path)
    if getattr(report, "unsafe", None):
        raise UnsafePickleError(report.unsafe)
    entry.min_torch = report.min_torch
    entry.weights_only = report.weights_only
    for f in entry.files:   # every pickle of every shard, not only what loading reaches
        if not f.endswith(".json"):
            verdict = scan(f)
            if verdict.verdict == UNSAFE:
                raise UnsafePickleError("; ".join(verdict.reasons) or f"{f}: unsafe")


def _number(v) -> float | int | None:
    if isinstance(v, TensorRef):
        if v.numel != 1 or v.dtype.numpy is None or v.dtype.numpy.kind not in "biuf":
            return None
        v = v.numpy().reshape(-1)[0].item()   # one element: a loss kept as a tensor
    elif type(v).__module__ == "numpy" and getattr(v, "ndim", 1) == 0:
        v = v.item()
    elif isinstance(v, str):
        try:
            v = float(v) if any(c in v for c in ".eE") else int(v)
        except ValueError:
            return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _scalars(entry: Entry, ck) -> None:
    """Epoch, step, loss and metrics from the top of the tree and its metadata."""
    found: dict[str, Any] = {}
    tree = ck.tree if isinstance(ck.tree, dict) else {}
    for k, v in tree.items():
        if not isinstance(k, str):
            continue
        if k in METRIC_CONTAINERS and isinstance(v, dict):
            for mk, mv in v.items():
                n = _number(mv)
                if n is not None:
                    found[f"{k}.{mk}"] = n
        else:
            n = _number(v)
            if n is not None:
                found[k] = n
    for k in EPOCH_KEYS + STEP_KEYS + LOSS_KEYS:   # formats that keep them as metadata
        if k in ck.metadata and k not in found:
            n = _number(ck.metadata[k])
            if n is not None:
                found[k] = n
    _record(entry, found)


def _record(entry: Entry, found: dict[str, Any]) -> None:
    for keys, attr in ((EPOCH_KEYS, "epoch"), (STEP_KEYS, "step"), (LOSS_KEYS, "loss")):
        for k in keys:
            if k in found and getattr(entry, attr) is None:
                value = found.pop(k)
                setattr(entry, attr, int(value) if attr == "step" else value)
                break
    for k, v in found.items():
        entry.metrics.setdefault(k, v)


def _trainer_state(entry: Entry, path: Path) -> None:
    """Hugging Face Trainer's ``trainer_state.json``: epoch, global_step, best_metric
    and the latest value of each logged number."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        entry.status, entry.reason = CORRUPT, f"{path.name}: {_line(e)}"
        return
    if not isinstance(state, dict):
        return
    found: dict[str, Any] = {}
    for k in ("epoch", "global_step", "best_metric"):
        n = _number(state.get(k))
        if n is not None:
            found[k] = n
    for log in state.get("log_history") or []:
        if isinstance(log, dict):
            for k, v in log.items():
                n = _number(v)
                if n is not None and k not in ("epoch", "step"):
                    found[k] = n
    _record(entry, found)


def ls(paths, sort: str = "time") -> "RunReport":
    """``ckptconv ls``: every checkpoint of the runs at ``paths``, examined."""
    entries = [examine(e) for e in find_checkpoints(paths)]
    return RunReport(sort_entries(entries, sort))


def _natural(path: str) -> tuple:
    """``checkpoint-500`` before ``checkpoint-1000``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


def _tiebreak(e: Entry) -> tuple:
    return (e.time or "", e.step if e.step is not None else -1, _natural(e.path))


def newest_last(entries: list[Entry]) -> list[Entry]:
    """Oldest to newest: by the timestamps in the names when all have one, else by step
    (or epoch) when all record it (copies and downloads reset file times), else by mtime."""
    if entries and all(e.time_from == "name" for e in entries):
        return sorted(entries, key=lambda e: (e.time, _tiebreak(e)))
    if entries and all(e.step is not None for e in entries):
        return sorted(entries, key=lambda e: (e.step, e.epoch or 0, _tiebreak(e)))
    if entries and all(e.epoch is not None for e in entries):
        return sorted(entries, key=lambda e: (e.epoch, _tiebreak(e)))
    return sorted(entries, key=_tiebreak)


def sort_entries(entries: list[Entry], key: str = "time") -> list[Entry]:
    """Sorted by ``key`` (time, path, size, format, status, epoch, step, loss or a metric);
    entries without it last; ties by time, then step, then path."""
    tiebreak = _tiebreak

    if key in ("time", "path", "format", "status", "size"):
        return sorted(entries, key=lambda e: ((getattr(e, key) or "") if key != "size" else e.size,
                                              tiebreak(e)))
    have = [e for e in entries if e.value(key) is not None]
    if not have and entries:
        raise UsageError(f"--sort {key}: no checkpoint records it; sort by time, path, size, "
                         f"format, status or one of: {', '.join(_known_keys(entries)) or '(none)'}")
    rest = [e for e in entries if e.value(key) is None]
    return sorted(have, key=lambda e: (e.value(key), tiebreak(e))) + sorted(rest, key=tiebreak)


def _known_keys(entries: list[Entry]) -> list[str]:
    keys = {k for e in entries for k in ("epoch", "step", "loss") if getattr(e, k) is not None}
    keys |= {k for e in entries for k in e.metrics}
    return sorted(keys)


# --- pick and prune -------------------------------------------------------------------------

def _intact(entries: list[Entry], where: str) -> list[Entry]:
    intact = [e for e in entries if e.status == OK]
    if not intact:
        bad = ", ".join(f"{as_path(e.path).name} ({e.status})" for e in entries[:4])
        raise FormatError(f"{where}: no intact checkpoint" + (f" ({bad})" if bad else ""))
    return intact


def choose(entries: list[Entry], latest: bool = True, best: str | None = None,
           maximize: bool = False, where: str = "run") -> Entry:
    """The newest intact entry, or the best intact one by ``best``."""
    intact = _intact(entries, where)
    if best is None:
        if not latest:
            raise UsageError("pick: say --latest or --best KEY")
        return newest_last(intact)[-1]
    scored = [e for e in intact if e.value(best) is not None]
    if not scored:
        raise UsageError(f"{where}: no intact checkpoint records '{best}'; known: "
                         f"{', '.join(_known_keys(intact)) or '(none)'}")
    ordered = sort_entries(scored, best)     # ascending, ties broken by time
    if maximize:
        top = ordered[-1].value(best)
        return [e for e in ordered if e.value(best) == top][-1]
    low = ordered[0].value(best)
    return [e for e in ordered if e.value(best) == low][-1]   # the newest of equals


def pick_entry(path, latest: bool = True, best: str | None = None, maximize: bool = False) -> Entry:
    entries = [examine(e) for e in find_checkpoints(path)]
    return choose(entries, latest, best, maximize, where=os.fspath(path))


def parse_pick(spec: str) -> dict:
    """``"latest"`` / ``"best:loss"`` / ``"best:accuracy:max"`` -> pick_entry() arguments."""
    parts = str(spec).split(":")
    if parts == ["latest"]:
        return {"latest": True}
    if parts[0] == "best" and len(parts) in (2, 3) and parts[1] and \
            (len(parts) == 2 or parts[2] in ("max", "min")):
        return {"best": parts[1], "maximize": len(parts) == 3 and parts[2] == "max"}
    raise UsageError(f"pick={spec!r}: say 'latest', 'best:KEY' or 'best:KEY:max'")


def pick(path, latest: bool = True, best: str | None = None, maximize: bool = False) -> str:
    """``ckptconv pick``: the path of the newest (or best) intact checkpoint at ``path``."""
    return pick_entry(path, latest, best, maximize).path


def resolve_pick(path, spec: str) -> str:
    """What ``load_into(..., pick=spec)`` opens: the chosen checkpoint's loadable path."""
    e = pick_entry(path, **parse_pick(spec))
    return e.load_path or e.path


@dataclass
class PruneReport(Report):
    path: str
    dry_run: bool
    kept: list[dict] = field(default_factory=list)       # {"path", "why"}
    removed: list[dict] = field(default_factory=list)    # {"path", "files", "size"}
    left: list[dict] = field(default_factory=list)       # corrupt/unsafe: {"path", "status", "reason"}
    exit_code: int = EXIT_OK

    def to_dict(self) -> dict:
        return {"path": self.path, "dry_run": self.dry_run, "kept": self.kept,
                "removed": self.removed, "left": self.left}

    def __str__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {r['path']} ({human_bytes(r['size'])}"
                 + (f", {len(r['files'])} files)" if len(r["files"]) > 1 else ")")
                 for r in self.removed]
        lines += [f"kept {k['path']} ({k['why']})" for k in self.kept]
        lines += [f"left {x['path']} ({x['status']}: not removed)" for x in self.left]
        freed = sum(r["size"] for r in self.removed)
        done = "would be removed" if self.dry_run else "removed"
        lines.append(f"{len(self.removed)} checkpoints {done}, {human_bytes(freed)}; "
                     f"{len(self.kept)} kept" + (f", {len(self.left)} left alone" if self.left else ""))
        return "\n".join(lines)


def prune(path, keep_last: int = 3, keep_best: str | None = None, maximize: bool = False,
          dry_run: bool = False) -> PruneReport:
    """``ckptconv prune``: remove the intact checkpoints of a run beyond the ``keep_last``
    newest and the best by ``keep_best``; never the only intact one, never anything else."""
    if keep_last < 0:
        raise UsageError(f"--keep-last {keep_last}: must be 0 or more")
    entries = [examine(e) for e in find_checkpoints(path)]
    where = os.fspath(path)
    intact = newest_last(_intact(entries, where))
    why: dict[str, str] = {}
    for e in intact[len(intact) - keep_last:] if keep_last else []:
        why[e.path] = f"one of the {keep_last} newest"
    if keep_best:
        b = choose(intact, best=keep_best, maximize=maximize, where=where)
        why[b.path] = (why[b.path] + ", " if b.path in why else "") + f"best {keep_best}"
    if not why:
        why[intact[-1].path] = "the newest intact checkpoint is never removed"
    report = PruneReport(where, dry_run)
    for e in entries:
        if e.status != OK:
            report.left.append({"path": e.path, "status": e.status, "reason": e.reason})
        elif e.path in why:
            report.kept.append({"path": e.path, "why": why[e.path]})
        else:
            report.removed.append({"path": e.path, "files": e.files, "size": e.size})
            if not dry_run:
                _remove(e)
    return report


def _remove(e: Entry) -> None:
    p = as_path(e.path)
    if not is_remote(p) and p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
        return
    for f in e.files:  # (an object store's "folder" is its objects: each removed)
        as_path(f).unlink(missing_ok=True)


# --- the ls report --------------------------------------------------------------------------

@dataclass
class RunReport(Report):
    entries: list[Entry]
    exit_code: int = EXIT_OK

    def to_dict(self) -> list[dict]:
        return [e.to_dict() for e in self.entries]

    def rows(self) -> list[list[str]]:
        out = []
        for e in self.entries:
            metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in e.metrics.items())
            out.append([e.path, e.format or "?", human_bytes(e.size), (e.time or "") +
                        ("" if e.time_from == "name" else " (mtime)"), _fmt(e.epoch), _fmt(e.step),
                        _fmt(e.loss), metrics, _fmt(e.tensors), e.min_torch or "",
                        {True: "yes", False: "no", None: ""}[e.weights_only], e.status])
        return out

    def __str__(self) -> str:
        if not self.entries:
            return "no checkpoints"
        headers = [c.replace("_", " ") for c in _COLUMNS]
        return plain_table(headers, self.rows())

    def print_table(self, stream, width: int | None = None) -> None:
        """A rich table on a terminal (``width``: its columns, else the terminal's);
        plain columns otherwise or without rich."""
        try:
            if not stream.isatty():
                raise ImportError
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(str(self), file=stream)
            return
        table = Table(box=None, header_style="bold")
        for c in _COLUMNS:
            table.add_column(c.replace("_", " "), overflow="fold", no_wrap=c not in (
                "path", "metrics"))
        colour = {OK: "green", CORRUPT: "red", UNSAFE: "bold red"}
        for e, row in zip(self.entries, self.rows()):
            row[-1] = f"[{colour[e.status]}]{row[-1]}[/]"
            table.add_row(*row)
        Console(file=stream, width=width).print(table)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def plain_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
             for r in [headers] + rows]
    return "\n".join(lines)
