"""The torch zip format (``torch.save`` since torch 1.6) and TorchScript
archives (``torch.jit.save``): weights read, code never run.

Ground truth: ``torch/serialization.py`` (``_save``, ``_load``) and
``caffe2/serialize/inline_container.cc`` (``PyTorchStreamWriter``).
Layout: ``<root>/data.pkl`` (the pickle), ``<root>/data/<key>`` (one member
per storage, raw bytes in ``<root>/byteorder`` order), ``<root>/version``;
TorchScript adds ``<root>/code/`` and ``<root>/constants.pkl``.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from ckptconv.errors import FormatError
from ckptconv.tensor import BufferSource, FileHandle, FileSource, TensorRef
from ckptconv.tree import Checkpoint, ObjectRecord
from ckptconv.ziputil import STORED, Member, member_root, read_member_bytes, read_members

from .unpickling import TorchUnpickler, check_pickle, checkpoint_info


def read_zip_checkpoint(path: Path, allow_globals=()) -> Checkpoint:
    """A torch zip file (or TorchScript archive): the tree with lazy tensors."""
    handle = FileHandle(path)
    tree, info = read_zip_archive(handle, read_members(handle), allow_globals)
    return Checkpoint(tree, {}, "torch", str(path), info)


def read_torch_blob(handle: FileHandle, offset: int, length: int,
                    allow_globals=()) -> tuple[Any, dict]:
    """One ``torch.save`` zip stored at ``offset`` (``length`` bytes) inside a
    bigger file, e.g. an item of a DCP ``.distcp`` file: ``(tree, info)``, its
    tensors lazy ranges of ``handle``'s file."""
    return read_zip_archive(handle, read_members(handle, offset, length), allow_globals)


def read_zip_archive(handle: FileHandle, members: dict[str, Member],
                     allow_globals=()) -> tuple[Any, dict]:
    """The tree of a torch zip archive whose members are ``members``, and its ``info``."""
    display = handle.display
    root = member_root(members, Path(display))
    prefix = f"{root}/" if root else ""
    big = False
    if f"{prefix}byteorder" in members:
        order = read_member_bytes(handle, members[f"{prefix}byteorder"], 64).strip()
        if order not in (b"little", b"big"):
            raise FormatError(f"{display}: unknown byteorder {order!r}")
        big = order == b"big"
    torchscript = any(n.startswith(f"{prefix}code/") for n in members) or \
        f"{prefix}constants.pkl" in members

    def storage_source(key, dtype, numel, untyped):
        m = members.get(f"{prefix}data/{key}")
        if m is None:
            raise FormatError(f"{display}: storage '{key}' is missing from the archive "
                              f"(no member {prefix}data/{key})")
        nbytes = numel * (1 if untyped else dtype.itemsize)
        if nbytes > m.size:
            raise FormatError(f"{display}: storage '{key}' needs {nbytes} bytes, member holds {m.size}")
        if m.compress_type != STORED:
            return BufferSource(read_member_bytes(handle, m))
        src = FileSource(handle, m.data_offset, nbytes, f"storage '{key}'")
        if nbytes == m.size:
            src.crc32 = m.crc  # lets a zip writer copy the storage without re-reading it
        return src

    up = TorchUnpickler(f"{display}:{prefix}data.pkl", storage_source, big, allow_globals)
    data = read_member_bytes(handle, members[f"{prefix}data.pkl"], 1 << 31)
    tree = up.load(data)
    kind = "torchscript" if torchscript else "zip"
    info = checkpoint_info(up, kind)
    info["archive_root"] = root
    version = members.get(f"{prefix}version") or members.get(f"{prefix}.data/version")
    if version is not None:
        info["zip_version"] = read_member_bytes(handle, version, 64).decode("latin1").strip()
    extra = sorted(n for n in members if n.endswith(".pkl") and n != f"{prefix}data.pkl")
    for name in extra:
        # torch.jit.load unpickles constants.pkl; a zip may carry other
        # pickles (another root's data.pkl): refuse any that could run code.
        check_pickle(read_member_bytes(handle, members[name], 1 << 31), f"{display}:{name}",
                     allow_globals=allow_globals)
    info["extra_pickles"] = extra
    if torchscript:
        tree = _torchscript_weights(tree)
    return tree, info


def _torchscript_weights(tree):
    """TorchScript: keep the module records' parameters/buffers as a nested dict.

    The module objects are ``__torch__.*`` records whose state holds the
    weights and a few flags (``training``...); the code is never run.
    """
    def walk(node):
        if isinstance(node, ObjectRecord) and isinstance(node.state, dict):
            out = OrderedDict()
            for k, v in node.state.items():
                w = walk(v)
                if w is not None and w != {}:
                    out[k] = w
            return out
        if isinstance(node, TensorRef):
            return node
        return None

    weights = walk(tree)
    return weights if weights is not None else tree

