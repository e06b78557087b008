"""Writing a tensor bundle: plan the entries, stream the data shards (crc32c
computed on the bytes written), then the index table and the ``checkpoint``
state file. Source of truth: ``tensorflow/core/util/tensor_bundle``
(``BundleWriter``).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptconv.atomic import atomic_files
from ckptconv.errors import FormatError, UnsupportedError
from ckptconv.streaming import PARALLEL_CRC_MIN, OutFile, crc_of_span
from ckptconv.tensor import TensorRef
from ckptconv.tree import TREE_KEY, Checkpoint, ObjectRecord, iter_tensors, tree_to_metadata
from ckptconv.paths import as_path

from .._io import crc32c, mask_crc, unmask_crc
from .bundle import RAW_ENTRY_CLASS
from .records import (CANON_TO_TF, QUANTIZED_BY_NAME, DT_STRING, HEADER_KEY, BundleEntry,
                      data_filename, encode_entry, encode_header, string_tensor_bytes)
from .table import METADATA_KEY, build_table

def _string_array(value) -> tuple[tuple[int, ...], list[bytes]] | None:
    """(shape, flat values) when ``value`` is bytes or a rectangular nested list of bytes."""
    if isinstance(value, bytes):
        return (), [value]
    if not isinstance(value, list) or not value:
        return None
    subs = [_string_array(v) for v in value]
    if any(s is None for s in subs) or len({s[0] for s in subs}) != 1:
        return None
    return (len(value),) + subs[0][0], [x for s in subs for x in s[1]]


@dataclass
class _Planned:
    entry: BundleEntry
    ref: TensorRef | None = None          # numeric tensor, streamed
    payload: bytes | None = None          # strings / raw entries, in memory
    crc: int | None = None                # unmasked crc32c of payload
    nbytes: int = 0
    alias_of: str | None = None


def _target_prefix(path: Path) -> Path:
    s = str(path)
    if s.endswith(".index"):
        return as_path(s[: -len(".index")])
    if path.is_dir():
        return path / "model.ckpt"
    return path


def _is_raw_record(v) -> bool:
    """A tensor the reader kept as raw bundle bytes (variant, resource, ...)."""
    st = v.state if isinstance(v, ObjectRecord) and v.cls == RAW_ENTRY_CLASS else None
    return (isinstance(st, dict) and isinstance(st.get("data"), bytes)
            and type(st.get("dtype_enum")) is int and type(st.get("crc32c")) is int
            and isinstance(st.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in st["shape"]))


def _plan(ckpt: Checkpoint, display: str) -> tuple[list[_Planned], dict[str, str], list[str]]:
    """The entries to write, ckptconv's metadata for the index, notes."""
    notes: list[str] = []
    planned: list[_Planned] = []
    first: dict[int, str] = {}
    tf_dtypes = ckpt.info.get("tf_dtypes") if isinstance(ckpt.info.get("tf_dtypes"), dict) else {}
    bad_dtype = []
    for name, ref in iter_tensors(ckpt.tree):
        if not name:
            raise UnsupportedError(f"{display}: a TF checkpoint cannot hold an unnamed tensor "
                                   f"(the checkpoint is a single tensor)")
        key = name.encode("utf-8", "surrogateescape")
        if key.startswith(b"\x00"):
            raise UnsupportedError(f"{display}: tensor name {name!r} starts with NUL, which TF "
                                   f"reserves for partitioned-variable slices")
        dtype = ref.dtype.name
        enum = CANON_TO_TF.get(dtype)
        q = tf_dtypes.get(name)
        if q in QUANTIZED_BY_NAME and QUANTIZED_BY_NAME[q][1] == dtype:
            enum = QUANTIZED_BY_NAME[q][0]
        if enum is None:
            bad_dtype.append(f"{name} ({dtype})")
            continue
        e = BundleEntry(key, enum, tuple(ref.shape))
        if id(ref) in first:
            planned.append(_Planned(e, alias_of=first[id(ref)]))
            continue
        first[id(ref)] = name
        planned.append(_Planned(e, ref=ref, nbytes=ref.nbytes))
    if bad_dtype:
        raise UnsupportedError(f"{display}: TensorFlow has no dtype for "
                               f"{', '.join(bad_dtype[:5])}" + (" ..." if len(bad_dtype) > 5 else ""))

    # Top-level string values and raw records become real TF entries, so TF sees them.
    tf_flat = isinstance(ckpt.tree, dict) and all(isinstance(k, str) for k in ckpt.tree)
    if isinstance(ckpt.tree, dict):
        for k, v in ckpt.tree.items():
            if isinstance(v, TensorRef):
                continue
            arr = _string_array(v) if isinstance(k, str) and k else None
            if arr is not None:
                shape, values = arr
                payload, crc = string_tensor_bytes(values)
                planned.append(_Planned(BundleEntry(k.encode("utf-8", "surrogateescape"),
                                                    DT_STRING, shape),
                                        payload=payload, crc=crc, nbytes=len(payload)))
            elif isinstance(k, str) and k and _is_raw_record(v):
                st = v.state
                planned.append(_Planned(BundleEntry(k.encode("utf-8", "surrogateescape"),
                                                    st["dtype_enum"], tuple(st["shape"])),
                                        payload=st["data"], crc=unmask_crc(st["crc32c"]),
                                        nbytes=len(st["data"])))
            else:
                tf_flat = False
    md = {k: str(v) for k, v in ckpt.metadata.items()}
    extra = tree_to_metadata(ckpt, keeps_order=False)    # the index sorts its keys
    if tf_flat and not ckpt.is_flat:
        extra.pop(TREE_KEY, None)      # the stored names and strings already are the tree
    elif TREE_KEY in extra:
        notes.append("non-tensor entries kept in the index's ckptconv metadata "
                     "(TensorFlow does not list them)")
    md.update(extra)
    names = [p.entry.key for p in planned]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UnsupportedError(f"{display}: two entries flatten to the name {dup.decode()!r}")
    return planned, md, notes


def _shard_plan(planned: list[_Planned], shard_size: int | None) -> int:
    """Assign shard ids greedily in order; returns the number of shards."""
    shard, size = 0, 0
    for p in planned:
        if p.alias_of is not None:
            continue
        if shard_size and size and size + p.nbytes > shard_size:
            shard, size = shard + 1, 0
        p.entry.shard_id = shard
        size += p.nbytes
    return shard + 1


def _write_shard(path: Path, planned: list[_Planned], display: str) -> None:
    pool = None
    pending: list[tuple[_Planned, Any]] = []
    try:
        with OutFile(path) as out:
            for p in planned:
                p.entry.offset = out.pos
                span = p.ref.file_span() if p.ref is not None else None
                if p.ref is None:
                    out.write(p.payload)
                    crc = p.crc
                elif span is not None and span[0].is_remote:  # checksummed as it passes
                    crc = out.copy_from(*span, checksum=crc32c)
                elif span is not None and span[2] >= PARALLEL_CRC_MIN:
                    # bytes copied in the kernel; their checksum read beside the copy
                    if pool is None:
                        pool = ThreadPoolExecutor(max_workers=1)
                    crc = None
                    pending.append((p, pool.submit(crc_of_span, *span, crc32c)))
                    out.copy_from(*span)
                else:
                    crc = 0
                    for chunk in p.ref.iter_bytes():   # checksum exactly the bytes written
                        crc = crc32c(chunk, crc)
                        out.write(chunk)
                p.entry.size = out.pos - p.entry.offset
                if p.entry.size != p.nbytes:
                    raise FormatError(f"{display}: tensor '{p.entry.name}' gave {p.entry.size} "
                                      f"bytes, expected {p.nbytes}")
                if crc is not None:
                    p.entry.crc32c = mask_crc(crc)
            for p, future in pending:
                p.entry.crc32c = mask_crc(future.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)



def write_bundle(ckpt: Checkpoint, path: Path, force: bool = False, shard_size: int | None = None,
                 jobs: int = 1) -> dict:
    """Write ``ckpt`` as the bundle ``path`` (a prefix, ``P.index`` or a folder)."""
    prefix = _target_prefix(path)
    display = prefix.name or str(prefix)
    planned, metadata, notes = _plan(ckpt, display)
    n = _shard_plan(planned, shard_size)
    data_paths = [as_path(data_filename(str(prefix), k, n)) for k in range(n)]
    index_path = as_path(str(prefix) + ".index")
    state = prefix.parent / "checkpoint"
    targets = data_paths + [index_path]
    write_state = force or not state.exists()
    if write_state:
        targets.append(state)
    else:
        notes.append(f"left the existing '{state}' state file as it was")
    with atomic_files(targets, force) as tmps:
        work = [(tmps[k], [p for p in planned if p.alias_of is None and p.entry.shard_id == k],
                 display) for k in range(n)]
        if jobs > 1 and n > 1:       # numpy's crc32c and the file writes release the GIL
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(lambda w: _write_shard(*w), work))
        else:
            for w in work:
                _write_shard(*w)
        by_name = {p.entry.name: p.entry for p in planned if p.alias_of is None}
        for p in planned:
            if p.alias_of is not None:     # tied names share one copy of the bytes
                src = by_name[p.alias_of]
                p.entry.shard_id, p.entry.offset = src.shard_id, src.offset
                p.entry.size, p.entry.crc32c = src.size, src.crc32c
        items = [(HEADER_KEY, encode_header(n))]
        items += sorted((p.entry.key, encode_entry(p.entry)) for p in planned)
        meta_items = []
        if metadata:
            meta_items.append((METADATA_KEY, json.dumps(metadata, separators=(",", ":")).encode()))
        tmps[n].write_bytes(build_table(items, meta_items=meta_items))
        if write_state:
            q = json.dumps(prefix.name, ensure_ascii=False)   # also a text-proto string
            tmps[n + 1].write_text(f"model_checkpoint_path: {q}\n"
                                   f"all_model_checkpoint_paths: {q}\n")
    return {"files": [str(t) for t in targets], "notes": notes}
