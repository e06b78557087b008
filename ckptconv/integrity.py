"""``ckptconv verify``: check a checkpoint's integrity without changing it.

The core knows no format. ``verify`` detects the format, then:

- runs the adapter's ``verify(path, report)`` hook, where the format has
  something of its own to check (torch zip CRC-32s, TF crc32c of every
  tensor, safetensors header offsets, ``.keras`` member CRCs); a format
  without one gets a one-line note;
- opens the checkpoint and reads every tensor's bytes in full (ONNX external
  data present and long enough, HDF5 datasets readable, ...);
- with ``--manifest``, checks ``<SRC>.sha256.json`` as written by
  ``convert --manifest`` (``write_manifest``): size and SHA-256 of every file
  and SHA-256 of every tensor's bytes, so any flipped bit is caught, in any
  format.

``VerifyReport.exit_code`` is 0 when nothing is wrong, 1 otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNSAFE, CkptconvError, UnsafePickleError
from .paths import as_path, is_remote, open_source
from .reports import Report

MANIFEST_SUFFIX = ".sha256.json"
MANIFEST_KIND = "ckptconv-manifest"
_CHUNK = 8 << 20


@dataclass
class VerifyReport(Report):
    path: str
    format: str | None = None
    checked: dict[str, int] = field(default_factory=dict)   # what was checked, how many
    problems: list[str] = field(default_factory=list)       # one line each
    notes: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)         # content refused as unsafe
    dict_properties = ("ok", "exit_code")

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unsafe

    @property
    def exit_code(self) -> int:
        if self.unsafe:
            return EXIT_UNSAFE
        return EXIT_OK if self.ok else EXIT_BAD_INPUT

    def count(self, what: str, n: int = 1) -> None:
        self.checked[what] = self.checked.get(what, 0) + n

    def __str__(self) -> str:
        what = ", ".join(f"{n} {k}" for k, n in self.checked.items()) or "nothing"
        head = f"{self.path} ({self.format or 'unknown format'}): "
        if self.unsafe:
            head += f"UNSAFE ({what} checked)"
        else:
            head += f"OK: {what}" if self.ok else f"FAILED: {len(self.problems)} problem" \
                f"{'s' if len(self.problems) != 1 else ''} ({what} checked)"
        lines = [head] + [f"  unsafe: {u}" for u in self.unsafe]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())


# --- reading every tensor ---------------------------------------------------------------

def tensor_digests(ck, report: VerifyReport | None = None) -> dict[str, dict]:
    """SHA-256 of every tensor's bytes (row-major, little-endian), tied names
    sharing one computation; unreadable tensors are reported, not raised."""
    out: dict[str, dict] = {}
    done: dict[int, dict] = {}
    for name, ref in ck.tensors().items():
        rec = done.get(id(ref))
        if rec is None:
            h = hashlib.sha256()
            try:
                for chunk in ref.iter_bytes():
                    h.update(chunk)
            except (CkptconvError, OSError) as e:
                if report is None:
                    raise
                report.problems.append(_line(e) if isinstance(e, CkptconvError) else
                                       f"tensor '{name}': cannot read: {_line(e)}")
                continue
            rec = {"dtype": ref.dtype.name, "shape": list(ref.shape), "sha256": h.hexdigest()}
            done[id(ref)] = rec
            if report is not None:
                report.count("tensors read")
        out[name] = rec
    return out


def file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    size = 0
    with open_source(path) as f:  # local, or a URL read by range requests
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            size += len(chunk)
            h.update(chunk)
    return {"size": size, "sha256": h.hexdigest()}


# --- manifests ----------------------------------------------------------------------------

def manifest_path(target: str | os.PathLike) -> Path:
    """``<target>.sha256.json`` next to the target (a TF prefix or a folder too)."""
    t = as_path(target)
    return t.with_name(t.name + MANIFEST_SUFFIX)


def find_manifest(src: Path) -> Path | None:
    candidates = [manifest_path(src)]
    for suffix in (".index.json", ".index"):  # a sharded index, a TF index: the convert target
        if src.name.endswith(suffix):
            candidates.append(manifest_path(src.with_name(src.name[: -len(suffix)])))
            break
    return next((c for c in candidates if c.is_file()), None)


def write_manifest(out_path: str | os.PathLike, files: Iterable[str | os.PathLike]) -> Path:
    """Write ``<out_path>.sha256.json``: every file's size and SHA-256 and every
    tensor's SHA-256 (read back through ckptconv from what was written)."""
    from .registry import read_checkpoint
    from .atomic import atomic_file

    out = as_path(out_path)  # a local Path, or a RemotePath for a URL
    base = out.parent
    entries = {}
    for f in files:
        fp = as_path(f)
        if fp.is_dir():
            for p in _files_under(fp):
                entries[_relative(p, base)] = file_digest(p)
        elif fp.is_file():
            entries[_relative(fp, base)] = file_digest(fp)
    # what to read back: the target, or the index of a sharded target
    readable = out if out.exists() or as_path(str(out) + ".index").exists() else next(
        (as_path(f) for f in files if str(f).endswith(".index.json")), out)
    ck = read_checkpoint(readable)
    manifest = {"kind": MANIFEST_KIND, "version": 1, "target": out.name, "format": ck.format,
                "files": entries, "tensors": tensor_digests(ck)}
    target = manifest_path(out)
    # the manifest belongs to the output just written (which needed --force
    # if it existed), so it replaces any stale manifest of that name
    with atomic_file(target, force=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return target


def _files_under(folder) -> list:
    """Every file below ``folder`` (an object store's prefix: its objects)."""
    if is_remote(folder):
        return folder.rglob("*")
    return [Path(root) / n for root, _, names in sorted(os.walk(folder)) for n in sorted(names)]


def _relative(p, base) -> str:
    return p.relative_to(base) if is_remote(p) else os.path.relpath(p, base)


def check_manifest(src: Path, ck, digests: dict[str, dict] | None, report: VerifyReport) -> None:
    mp = find_manifest(src)
    if mp is None:
        report.problems.append(f"{src.name}: no manifest {manifest_path(src).name} "
                               "(write one with convert --manifest)")
        return
    try:
        manifest = json.loads(mp.read_text())
        files, tensors = manifest["files"], manifest["tensors"]
        if manifest.get("kind") != MANIFEST_KIND or not isinstance(files, dict) or \
                not isinstance(tensors, dict):
            raise ValueError("not a ckptconv manifest")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        report.problems.append(f"{mp.name}: unreadable manifest ({_line(e)[:120]})")
        return
    base = mp.parent
    for rel, want in files.items():
        fp = (base / rel)
        if not fp.is_file():
            report.problems.append(f"{rel}: listed in {mp.name} but missing")
            continue
        got = file_digest(fp)
        report.count("manifest files")
        if got["size"] != want.get("size"):
            report.problems.append(f"{rel}: {got['size']} bytes, manifest says {want.get('size')}")
        elif got["sha256"] != want.get("sha256"):
            report.problems.append(f"{rel}: SHA-256 differs from {mp.name} (file changed or "
                                   "corrupted)")
    if digests is None:
        return  # the checkpoint did not open; its problem is already reported
    present = set(ck.tensors())
    for name, want in tensors.items():
        got = digests.get(name)
        report.count("manifest tensors")
        if got is None:
            if name not in present:
                report.problems.append(f"tensor '{name}' is in {mp.name} but not in the checkpoint")
            continue
        if got["dtype"] != want.get("dtype") or got["shape"] != want.get("shape"):
            report.problems.append(f"tensor '{name}' is {got['dtype']}{got['shape']}, manifest says "
                                   f"{want.get('dtype')}{want.get('shape')}")
        elif got["sha256"] != want.get("sha256"):
            report.problems.append(f"tensor '{name}': SHA-256 differs from {mp.name}")
    for name in digests:
        if name not in tensors:
            report.problems.append(f"tensor '{name}' is not in {mp.name}")


# --- the verb ---------------------------------------------------------------------------

def verify(path: str | os.PathLike, manifest: bool = False, **read_options) -> VerifyReport:
    """The format-neutral checks alone: the ``verify`` verb of formats whose
    adapter has no hook (``api.verify`` picks the hook where there is one), and
    what a hook adds its own checks to."""
    return verify_checkpoint(path, manifest=manifest, **read_options)


def verify_checkpoint(path: str | os.PathLike, format: str | None = None,
                      format_checks: Callable[[Path, VerifyReport], None] | None = None,
                      manifest: bool = False, **read_options) -> VerifyReport:
    """The format's own checks (``format_checks(path, report)``, what an
    adapter's ``verify`` hook passes), then every tensor read in full, then
    the manifest if asked. An intact file whose content the reader refuses as
    unsafe is reported unsafe (exit 3), not corrupt."""
    from .registry import detect_format, read_checkpoint

    src = as_path(path)  # a local Path, or a RemotePath for a URL
    report = VerifyReport(str(src))
    try:
        fmt = format or detect_format(src)
    except CkptconvError as e:
        report.problems.append(_line(e))
        return report
    report.format = fmt
    try:
        if format_checks is not None:
            format_checks(src, report)
        else:
            report.notes.append(f"{fmt} has no format-level checks of its own (no verify hook); "
                                "every tensor is read in full")
    except (CkptconvError, OSError) as e:
        report.problems.append(_line(e))
    ck = digests = None
    try:
        ck = read_checkpoint(src, format=fmt, **read_options)
        digests = tensor_digests(ck, report)
    except UnsafePickleError as e:  # intact or not, its content would run code
        report.unsafe.append(_line(e))
    except CkptconvError as e:
        report.problems.append(_line(e))
    if manifest:
        check_manifest(src, ck, digests, report)
    report.problems = list(dict.fromkeys(report.problems))  # one line per problem
    return report
