"""Sharded checkpoints in the Hugging Face layout: ``NAME.index.json`` with
``{"metadata": {...}, "weight_map": {tensor: shard file}}`` beside the shards
(``model-00001-of-00003.safetensors``, ``pytorch_model-00001-of-00002.bin``).
Format-agnostic: the adapter says how to read one shard.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .errors import FormatError
from .tensor import TensorRef


def read_sharded(path: Path, read_shard: Callable[[Path], tuple[dict[str, TensorRef], dict[str, str]]]
                 ) -> tuple[dict[str, TensorRef], dict, list[dict[str, str]]]:
    """(tensors in weight-map order, the index's metadata, each shard's metadata).

    Shards must lie in the index's folder; every tensor of the weight map
    must be found in the shard it names.
    """
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        index_meta = index.get("metadata") or {}
        if not isinstance(index_meta, dict):
            raise TypeError("metadata is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path.name}: not a sharded checkpoint index ({e})") from None
    folder = path.parent.resolve()
    tensors: dict[str, TensorRef] = {}
    shard_meta = []
    for shard in dict.fromkeys(weight_map.values()):
        if not isinstance(shard, str):
            raise FormatError(f"{path.name}: shard name {shard!r} is not a string")
        sp = (path.parent / shard).resolve()
        if folder not in sp.parents:
            raise FormatError(f"{path.name}: shard '{shard}' lies outside the index's folder")
        if not sp.exists():
            raise FormatError(f"{path.name}: shard '{shard}' is missing")
        found, meta = read_shard(sp)
        shard_meta.append(meta)
        for name, ref in found.items():
            if weight_map.get(name) == shard:
                tensors[name] = ref
    missing = [n for n in weight_map if n not in tensors]
    if missing:
        raise FormatError(f"{path.name}: {len(missing)} tensors of the weight map are not in "
                          f"their shard, e.g. '{missing[0]}'")
    # total_size describes the shard files, not the checkpoint: a writer
    # recomputes it, so it is not passed on as the checkpoint's metadata
    return ({n: tensors[n] for n in weight_map},
            {k: v for k, v in index_meta.items() if k != "total_size"}, shard_meta)


def shard_files(path: Path) -> list[Path]:
    """The files holding the data: the file itself, or the shards of a
    ``*.index.json`` that exist inside its folder (unreadable indexes give
    none: the reader reports them properly)."""
    if not path.name.endswith(".index.json"):
        return [path] if path.is_file() else []
    try:
        index = json.loads(path.read_text())
        shards = dict.fromkeys(index["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError):
        return []
    base = path.parent.resolve()
    out = []
    for s in shards:
        p = (path.parent / s) if isinstance(s, str) else None
        if p is not None and p.is_file() and base in p.resolve().parents:
            out.append(p)
    return out
