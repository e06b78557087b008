"""``ckptconv verify``: check a checkpoint's integrity without changing it.

What each format lets us check:

- torch zip (and TorchScript): the CRC-32 of every member against the
  central directory (PKWARE APPNOTE 4.4.7; torch writes them, stored);
- TensorFlow bundles: the masked crc32c of every tensor and the sizes,
  shards and slices of the index (``adapters.tf_bundle.verify_bundle``;
  ``tensorflow/core/util/tensor_bundle``);
- safetensors: the header's offsets and sizes: every tensor's byte range
  inside the data block, no overlaps, no holes, no trailing bytes, no
  duplicate names (the format carries no checksums);
- every format: the checkpoint opens, and every tensor's bytes can be read
  in full (ONNX external data present and long enough, HDF5 datasets
  readable, legacy torch storages inside the file);
- ``--manifest``: ``<SRC>.sha256.json`` as written by ``convert --manifest``
  (``write_manifest``): size and SHA-256 of every file and SHA-256 of every
  tensor's bytes, so any flipped bit is caught, in any format.

``VerifyReport.exit_code`` is 0 when nothing is wrong, 1 otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNSAFE, CkptconvError, FormatError, UnsafePickleError

MANIFEST_SUFFIX = ".sha256.json"
MANIFEST_KIND = "ckptconv-manifest"
_CHUNK = 8 << 20


@dataclass
class VerifyReport:
    path: str
    format: str | None = None
    checked: dict[str, int] = field(default_factory=dict)   # what was checked, how many
    problems: list[str] = field(default_factory=list)       # one line each
    notes: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)         # content refused as unsafe

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["exit_code"] = self.exit_code
        return d

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


# --- format checks ---------------------------------------------------------------------

def _member_crc(handle, m) -> int:
    """CRC-32 of a member's *uncompressed* bytes, read in bounded chunks."""
    from .streaming import crc_of_span

    if m.compress_type == 0:
        return crc_of_span(handle, m.data_offset, m.compressed_size, chunk=_CHUNK)
    if m.compress_type != 8:
        raise FormatError(f"{handle.display}: zip member '{m.name}' uses compression "
                          f"{m.compress_type}")
    d = zlib.decompressobj(-15)
    crc = produced = 0
    step = 1 << 20  # output per call: memory stays flat whatever the ratio

    def take(out: bytes) -> None:
        nonlocal crc, produced
        produced += len(out)
        if produced > m.size:
            raise FormatError(f"{handle.display}: zip member '{m.name}' inflates past its "
                              f"{m.size} bytes (zip bomb or corrupt)")
        crc = zlib.crc32(out, crc)

    try:
        for off in range(0, m.compressed_size, step):
            buf = handle.pread(m.data_offset + off, min(step, m.compressed_size - off))
            while True:
                out = d.decompress(buf, step)
                take(out)
                buf = d.unconsumed_tail
                if not buf and len(out) < step:
                    break
        take(d.flush())
    except zlib.error as e:
        raise FormatError(f"{handle.display}: zip member '{m.name}' does not inflate ({e})") from None
    return crc


def check_zip_crcs(path: Path, report: VerifyReport) -> None:
    from .tensor import FileHandle
    from .ziputil import read_members

    handle = FileHandle(path)
    members = read_members(handle)
    for name, m in members.items():
        got = _member_crc(handle, m)
        report.count("zip members (crc32)")
        if got != m.crc:
            report.problems.append(f"{handle.display}: zip member '{name}' fails its CRC-32 "
                                   f"(stored {m.crc:08x}, computed {got:08x})")


def check_safetensors_layout(path: Path, report: VerifyReport) -> None:
    """Header offsets against the data block: in range, no overlap, no hole, no tail."""
    from .tensor import FileHandle

    handle = FileHandle(path)
    name = handle.display
    if handle.size < 8:
        report.problems.append(f"{name}: too short for safetensors ({handle.size} bytes)")
        return
    (n,) = struct.unpack("<Q", handle.pread(0, 8))
    if n > 100 << 20 or 8 + n > handle.size:
        report.problems.append(f"{name}: header length {n} does not fit the file")
        return
    dupes: list[str] = []

    def pairs(items):
        seen = {}
        for k, v in items:
            if k in seen:
                dupes.append(k)
            seen[k] = v
        return seen

    try:
        header = json.loads(handle.pread(8, n), object_pairs_hook=pairs)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        report.problems.append(f"{name}: header is not valid JSON ({_line(e)[:120]})")
        return
    for k in dupes:
        report.problems.append(f"{name}: header names '{k}' twice (readers disagree which counts)")
    if not isinstance(header, dict):
        report.problems.append(f"{name}: header is not a JSON object")
        return
    data_size = handle.size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            report.problems.append(f"{name}: tensor '{key}' has no valid data_offsets")
            continue
        if not 0 <= begin <= end <= data_size:
            report.problems.append(f"{name}: tensor '{key}' spans bytes {begin}..{end} of a "
                                   f"{data_size}-byte data block")
            continue
        spans.append((begin, end, key))
        report.count("safetensors offsets")
    spans.sort()
    pos, prev = 0, None
    for begin, end, key in spans:
        if begin < pos and end > begin:
            report.problems.append(f"{name}: tensors '{prev}' and '{key}' overlap at data offset {begin}")
        elif begin > pos:
            report.problems.append(f"{name}: {begin - pos} bytes at data offset {pos} belong to no "
                                   f"tensor (hole before '{key}')")
        pos, prev = max(pos, end), key
    if spans and pos < data_size:
        report.problems.append(f"{name}: {data_size - pos} bytes after the last tensor belong to "
                               "no tensor")


def _data_files(path: Path) -> list[Path]:
    """The files holding the data: the file itself, or the shards of a
    ``*.index.json`` (Hugging Face layout, safetensors or torch)."""
    if not path.name.endswith(".index.json"):
        return [path] if path.is_file() else []
    try:
        index = json.loads(path.read_text())
        shards = dict.fromkeys(index["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError):
        return []   # the reader reports this one properly
    base = path.parent.resolve()
    out = []
    for s in shards:
        p = (path.parent / s) if isinstance(s, str) else None
        if p is not None and p.is_file() and base in p.resolve().parents:
            out.append(p)
    return out


def _is_zip_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def check_tf_bundle(path: Path, report: VerifyReport) -> None:
    try:
        from .adapters.tf_bundle import verify_bundle
    except ImportError:
        report.notes.append("TensorFlow bundle checksums not checked (tf_bundle adapter missing)")
        return
    problems = verify_bundle(path)
    report.problems.extend(problems)
    report.count("tf entries (crc32c)", _tf_entry_count(path))


def _tf_entry_count(path: Path) -> int:
    try:
        from .adapters.tf_bundle import Bundle, find_prefix

        return len(Bundle(find_prefix(path)).entries)
    except Exception:  # noqa: BLE001 - only a count for the report
        return 0


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
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
    return {"size": size, "sha256": h.hexdigest()}


# --- manifests ----------------------------------------------------------------------------

def manifest_path(target: str | os.PathLike) -> Path:
    """``<target>.sha256.json`` next to the target (a TF prefix or a folder too)."""
    t = Path(target)
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

    out = Path(out_path)
    base = out.parent
    entries = {}
    for f in files:
        fp = Path(f)
        if fp.is_dir():
            for root, _, names in os.walk(fp):
                for n in sorted(names):
                    p = Path(root) / n
                    entries[os.path.relpath(p, base)] = file_digest(p)
        elif fp.is_file():
            entries[os.path.relpath(fp, base)] = file_digest(fp)
    # what to read back: the target, or the index of a sharded target
    readable = out if out.exists() or Path(str(out) + ".index").exists() else next(
        (Path(f) for f in files if str(f).endswith(".index.json")), out)
    ck = read_checkpoint(readable)
    manifest = {"kind": MANIFEST_KIND, "version": 1, "target": out.name, "format": ck.format,
                "files": entries, "tensors": tensor_digests(ck)}
    target = manifest_path(out)
    # the manifest belongs to the output just written (which needed --force
    # if it existed), so it replaces any stale manifest of that name
    with atomic_file(target, force=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return target


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

def verify(path: str | os.PathLike, manifest: bool = False) -> VerifyReport:
    """Every integrity check the format allows (see the module docstring)."""
    from .registry import read_checkpoint
    from .registry import detect_format

    src = Path(path)
    report = VerifyReport(str(src))
    try:
        fmt = detect_format(src)
    except CkptconvError as e:
        report.problems.append(_line(e))
        return report
    report.format = fmt
    try:
        if fmt == "tf":
            check_tf_bundle(src, report)
        for f in _data_files(src):
            if _is_zip_file(f):          # torch zip, TorchScript, .keras
                check_zip_crcs(f, report)
            elif fmt == "safetensors":
                check_safetensors_layout(f, report)
            elif fmt == "torch":
                report.notes.append(f"{f.name}: legacy/pickle torch files carry no checksums; "
                                    "use convert --manifest for end-to-end checks")
        if fmt == "safetensors":
            report.notes.append("safetensors carries no checksums: a flipped bit inside a tensor "
                                "is only caught with a manifest (convert --manifest)")
    except (CkptconvError, OSError) as e:
        report.problems.append(_line(e))
    ck = digests = None
    try:
        ck = read_checkpoint(src, format=fmt)
        digests = tensor_digests(ck, report)
    except UnsafePickleError as e:  # intact or not, its content would run code
        report.unsafe.append(_line(e))
    except CkptconvError as e:
        report.problems.append(_line(e))
    if manifest:
        check_manifest(src, ck, digests, report)
    report.problems = list(dict.fromkeys(report.problems))  # one line per problem
    return report
