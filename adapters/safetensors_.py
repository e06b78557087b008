"""safetensors: 8-byte little-endian header length, a JSON header, then the
data block. Spec: https://github.com/huggingface/safetensors (README,
"Format"). ``data_offsets`` are relative to the data block; readers must not
assume any order of entries; writers pad the header with spaces to a multiple
of 8 bytes. ``__metadata__`` is str -> str; ckptconv keeps the non-tensor tree,
ties and source there under ``ckptconv.*`` keys, plus ``format: pt``.

Sharded checkpoints follow the Hugging Face layout: ``NAME-0000K-of-0000N
.safetensors`` shards and ``NAME.safetensors.index.json`` with
``{"metadata": {...}, "weight_map": {tensor: shard}}``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from ckptconv import dtypes as _dt
from ckptconv.errors import FormatError, UnsupportedError, UsageError
from ckptconv.registry import Adapter
from ckptconv.tensor import FileHandle, FileSource, StoredTensor, TensorRef
from ckptconv.tree import Checkpoint, iter_tensors, tree_from_metadata, tree_to_metadata
from ckptconv.views import flat_format_losses

from .sniffers import MAX_HEADER

DEFAULT_SHARD = 5 * 10**9
#: ``__metadata__["format"]`` as transformers writes it -> the framework the file is for
HF_FRAMEWORKS = {"pt": "torch", "tf": "tf"}


def _parse_header(handle: FileHandle, object_pairs_hook=None) -> tuple[dict, int]:
    """(header dict, absolute offset of the data block)."""
    name = handle.display
    if handle.size < 8:
        raise FormatError(f"{name}: too short for safetensors ({handle.size} bytes)")
    (n,) = struct.unpack("<Q", handle.pread(0, 8))
    if n > MAX_HEADER:
        raise FormatError(f"{name}: safetensors header length {n} is absurd (limit {MAX_HEADER})")
    if 8 + n > handle.size:
        raise FormatError(f"{name}: truncated safetensors header (needs {n} bytes, "
                          f"file has {handle.size - 8} after the length)")
    try:
        header = json.loads(handle.pread(8, n), object_pairs_hook=object_pairs_hook)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{name}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{name}: safetensors header is not a JSON object")
    return header, 8 + n


def read_safetensors_file(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Flat tensors (lazy) and ``__metadata__`` of one .safetensors file."""
    handle = FileHandle(path)
    header, data_start = _parse_header(handle)
    data_size = handle.size - data_start
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{handle.display}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorRef] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype = _dt.from_safetensors(info["dtype"])
            shape, offsets = info["shape"], info["data_offsets"]
            # JSON ints only: int() would also take "23" (as [2, 3]), 2.5 or true
            if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2 \
                    or not all(type(x) is int for x in shape + offsets):
                raise TypeError
            begin, end = offsets
        except FormatError as e:
            raise FormatError(f"{handle.display}: tensor '{name}': {e}") from None
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{handle.display}: tensor '{name}' has a malformed header entry") from None
        if any(s < 0 for s in shape):
            raise FormatError(f"{handle.display}: tensor '{name}' has a negative dimension {shape}")
        numel = 1
        for s in shape:
            numel *= s
        if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            raise FormatError(f"{handle.display}: tensor '{name}' {dtype.name}{shape} needs "
                              f"{numel * dtype.itemsize} bytes but data_offsets give {end - begin}")
        if end > data_size:
            raise FormatError(f"{handle.display}: tensor '{name}' ends at data offset {end}, "
                              f"file holds {data_size} data bytes (truncated?)")
        spans.append((begin, end, name))
        tensors[name] = StoredTensor(dtype, shape,
                                     FileSource(handle, data_start + begin, end - begin, f"tensor '{name}'"))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1:
            raise FormatError(f"{handle.display}: tensors '{n0}' and '{n1}' overlap in the data block")
    return tensors, meta


def _read_index(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    from ckptconv.sharding import read_sharded

    tensors, index_meta, shard_meta = read_sharded(path, read_safetensors_file)
    meta = {k: v for m in shard_meta for k, v in m.items() if not k.startswith("ckptconv.")}
    meta.update({k: v for k, v in index_meta.items() if isinstance(v, str)})
    return tensors, meta


class SafetensorsAdapter(Adapter):
    name = "safetensors"

    def read(self, path: Path, **options) -> Checkpoint:
        if path.name.endswith(".index.json"):
            tensors, meta = _read_index(path)
        else:
            tensors, meta = read_safetensors_file(path)
        info: dict = {}
        if meta.get("format") in HF_FRAMEWORKS:   # transformers' save_pretrained says whose
            info["origin"] = HF_FRAMEWORKS[meta["format"]]
        tree, meta = tree_from_metadata(tensors, meta, path.name, info)
        return Checkpoint(tree, meta, self.name, str(path), info)

    def verify(self, path: Path, **options):
        """``ckptconv verify``: the checks below, then every tensor read in full."""
        from ckptconv.integrity import verify_checkpoint

        return verify_checkpoint(path, self.name, self.check_integrity, **options)

    def check_integrity(self, path: Path, report) -> None:
        """The header's offsets against the data block of every file (the format
        carries no checksums: a flipped bit inside a tensor needs a manifest)."""
        from ckptconv.sharding import shard_files

        for f in shard_files(path):
            check_layout(f, report)
        report.notes.append("safetensors carries no checksums: a flipped bit inside a tensor "
                            "is only caught with a manifest (convert --manifest)")

    def losses(self, ckpt: Checkpoint, path: Path) -> list[str]:
        return flat_format_losses(ckpt)

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False, shard_size: int | None = None,
              dedupe_tied: bool = False, jobs: int = 1, **options) -> dict:
        entries: list[tuple[str, TensorRef]] = []
        names: dict[int, str] = {}
        for name, ref in iter_tensors(ckpt.tree):
            if name == "__metadata__":
                raise UnsupportedError("safetensors cannot hold a tensor named '__metadata__'")
            first = names.setdefault(id(ref), name)
            if dedupe_tied and first != name:
                continue
            entries.append((name, ref))
        for _, ref in entries:
            if ref.dtype.safetensors is None:
                raise UnsupportedError(f"{path.name}: safetensors has no dtype for {ref.dtype.name}")
        metadata = {"format": "pt"}
        metadata.update({k: str(v) for k, v in ckpt.metadata.items() if k != "format"})
        if "format" in ckpt.metadata:
            metadata["format"] = str(ckpt.metadata["format"])
        metadata.update(tree_to_metadata(ckpt, names))
        notes = []
        if not ckpt.is_flat:
            notes.append("non-tensor entries kept in __metadata__['ckptconv.tree']")
        sharded = path.name.endswith(".index.json")
        if sharded and not shard_size:
            shard_size = DEFAULT_SHARD
        total = sum(ref.nbytes for _, ref in entries)
        if shard_size and (total > shard_size or sharded):
            files = self._write_sharded(entries, metadata, path, shard_size, force, jobs)
        else:
            if sharded:
                raise UsageError(f"{path}: give --shard-size to write a sharded index")
            from ckptconv.atomic import atomic_file   # writing only: reading does without it

            with atomic_file(path, force) as tmp:
                _write_one(tmp, entries, metadata)
            files = [str(path)]
        return {"files": files, "notes": notes}

    def _write_sharded(self, entries, metadata, path: Path, shard_size: int, force: bool, jobs: int):
        shards: list[list[tuple[str, TensorRef]]] = [[]]
        size = 0
        for name, ref in entries:
            if shards[-1] and size + ref.nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, ref))
            size += ref.nbytes
        stem = path.name
        for suffix in (".safetensors.index.json", ".index.json", ".safetensors"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        n = len(shards)
        shard_names = [f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        index_path = path.parent / f"{stem}.safetensors.index.json"
        targets = [path.parent / s for s in shard_names] + [index_path]
        shard_md = {k: v for k, v in metadata.items() if not k.startswith("ckptconv.")}
        # total_size describes these shards: a value carried over from a
        # source index (its metadata) must not replace it
        # an int, as transformers writes it (and reads it: from_pretrained sums shards)
        index = {"metadata": {"total_size": sum(r.nbytes for _, r in entries),
                              **{k: v for k, v in metadata.items()
                                 if k not in ("format", "total_size")}},
                 "weight_map": {name: shard_names[k] for k, sh in enumerate(shards) for name, _ in sh}}
        from ckptconv.atomic import atomic_files

        with atomic_files(targets, force) as tmps:
            work = [(tmps[k], shards[k], shard_md) for k in range(n)]
            if jobs > 1 and n > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=jobs) as ex:
                    list(ex.map(lambda w: _write_one(*w), work))
            else:
                for w in work:
                    _write_one(*w)
            tmps[-1].write_text(json.dumps(index, indent=2) + "\n")
        return [str(t) for t in targets]


def _write_one(path: Path, entries, metadata: dict[str, str]) -> None:
    # data by element size (each tensor aligned to its own), header entries in
    # the checkpoint's order: readers that keep the header's order (ckptconv,
    # json) give the names back as they were
    order = sorted(range(len(entries)), key=lambda i: -entries[i][1].dtype.itemsize)
    spans: dict[int, list[int]] = {}
    offset = 0
    for i in order:
        spans[i] = [offset, offset + entries[i][1].nbytes]
        offset += entries[i][1].nbytes
    header: dict = {"__metadata__": metadata}
    for i, (name, ref) in enumerate(entries):
        header[name] = {"dtype": ref.dtype.safetensors, "shape": list(ref.shape),
                        "data_offsets": spans[i]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    from ckptconv.streaming import OutFile

    with OutFile(path) as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        written: dict[int, int] = {}  # id(ref) -> where its bytes start in this file
        for i in order:
            ref = entries[i][1]
            at = written.get(id(ref))
            if at is not None and ref.nbytes:
                out.copy_within(at, ref.nbytes)  # tied: read (or computed) once
                continue
            written[id(ref)] = out.pos
            out.write_tensor(ref)
        if out.pos != 8 + len(raw) + offset:
            raise FormatError(f"{path}: wrote {out.pos} bytes, planned {8 + len(raw) + offset}")


# --- verify ----------------------------------------------------------------------

def check_layout(path: Path, report) -> None:
    """Header offsets against the data block: in range, no overlap, no hole, no
    tail, no name given twice (readers would disagree which one counts)."""
    handle = FileHandle(path)
    name = handle.display
    dupes: list[str] = []

    def pairs(items):
        seen = {}
        for k, v in items:
            if k in seen:
                dupes.append(k)
            seen[k] = v
        return seen

    try:
        header, data_start = _parse_header(handle, pairs)
    except FormatError as e:
        report.problems.append(str(e))
        return
    for k in dupes:
        report.problems.append(f"{name}: header names '{k}' twice (readers disagree which counts)")
    data_size = handle.size - data_start
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
