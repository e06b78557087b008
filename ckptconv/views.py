"""Storage sharing and strides, kept through formats that hold one
contiguous array per name (safetensors, TF, HDF5, ONNX).

A torch checkpoint can hold several tensors over one storage (``w`` and
``w.t()``, ``qkv`` and its slices) and views with an offset or strides.
Such a file written to a flat format keeps each tensor's values; the
metadata key ``ckptconv.views`` (JSON, present only when there is something
to keep) records how to rebuild the storages on the way back:

``{"s": [[numel, [[name, offset, [strides...]], ...]], ...], "rg": [names], "p": [names]}``

- ``s``: one entry per storage: its length in elements and every tensor
  viewing it (element offset and strides, as torch's ``_rebuild_tensor``);
- ``rg``/``p``: tensors with ``requires_grad`` / saved as ``nn.Parameter``.

A tensor alone over exactly its own elements (a lone transpose, a Fortran
array) is not recorded: written row-major it is the same tensor to every
loader; only sharing and offsets are storage structure worth keeping.

A storage is rebuilt from its *dense* views: those whose elements are
exactly one run ``[offset, offset + numel)`` of the storage, in any order
(contiguous slices, transposes). When they cover the whole storage its
bytes come back exactly; otherwise (a strided slice of a storage saved
alone) the storage cannot be rebuilt and ``record_views`` names the tensors
that come back contiguous instead.
"""
from __future__ import annotations

import json
from typing import Iterable

from ._lazy import np

from . import dtypes as _dt
from .errors import FormatError
from .reports import name_list
from .tensor import ByteSource, StoredTensor, TensorRef

VIEWS_KEY = "ckptconv.views"


def _is_dense(ref: StoredTensor) -> bool:
    """Its elements are exactly [offset, offset + numel) of the storage."""
    if ref.numel == 0:
        return True
    expect = 1
    for stride, size in sorted((st, n) for n, st in zip(ref.shape, ref.strides) if n != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def _covered(refs: Iterable[StoredTensor], numel: int) -> bool:
    runs = sorted((r.offset, r.offset + r.numel) for r in refs if r.numel and _is_dense(r))
    pos = 0
    for lo, hi in runs:
        if lo > pos:
            return False
        pos = max(pos, hi)
    return pos >= numel


def record_views(tensors: Iterable[tuple[str, TensorRef]]) -> tuple[dict[str, str], list[str]]:
    """(metadata to add, names whose storage sharing/strides cannot be kept).

    ``tensors``: (first name, tensor) of each distinct tensor, in order.
    """
    groups: dict[tuple, list[tuple[str, StoredTensor]]] = {}
    rg, param = [], []
    for name, ref in tensors:
        if ref.requires_grad:
            rg.append(name)
        if ref.is_parameter:
            param.append(name)
        if isinstance(ref, StoredTensor) and not ref.big_endian and \
                ref.source.nbytes % ref.dtype.itemsize == 0:
            groups.setdefault((id(ref.source), ref.dtype.name), []).append((name, ref))
    storages, lost = [], []
    for members in groups.values():
        numel = members[0][1].source.nbytes // members[0][1].dtype.itemsize
        alone = members[0][1]
        # one tensor over exactly its own elements (contiguous, or a lone transpose /
        # Fortran-ordered array): its bytes in row-major order are all there is
        if len(members) == 1 and alone.offset == 0 and alone.numel == numel and _is_dense(alone):
            continue
        if not _covered((r for _, r in members), numel):
            lost += [n for n, r in members if not (r.is_contiguous and r.offset == 0
                                                     and r.numel == numel)]
            continue
        storages.append([numel, [[n, r.offset, list(r.strides)] for n, r in members]])
    out = {}
    record = {k: v for k, v in (("s", storages), ("rg", rg), ("p", param)) if v}
    if record:
        out[VIEWS_KEY] = json.dumps(record, separators=(",", ":"))
    return out, lost


class AssembledStorage(ByteSource):
    """A storage rebuilt from the contiguous arrays of its dense views."""

    def __init__(self, dtype: _dt.DType, numel: int, pieces: list[tuple[TensorRef, int, tuple]]):
        self.dtype = dtype
        self.nbytes = numel * dtype.itemsize
        self.pieces = pieces        # (stored array, storage offset, strides in the storage)
        self._bytes: bytearray | None = None

    def _assemble(self) -> bytearray:
        size = self.dtype.itemsize
        buf = bytearray(self.nbytes)
        carrier = np.dtype(f"u{size}") if size in (1, 2, 4, 8) else np.dtype(f"V{size}")
        flat = np.frombuffer(buf, dtype=carrier)
        for ref, offset, strides in self.pieces:
            if not ref.numel:
                continue
            values = np.frombuffer(ref.tobytes(), dtype=carrier).reshape(ref.shape)
            view = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=ref.shape, strides=tuple(s * size for s in strides))
            view[...] = values
        return buf

    def read(self, offset: int, length: int) -> memoryview:
        if self._bytes is None:
            self._bytes = self._assemble()
        if offset + length > self.nbytes:
            raise FormatError(f"rebuilt storage of {self.nbytes} bytes: read past its end")
        return memoryview(self._bytes)[offset:offset + length]


def restore_views(tensors: dict[str, TensorRef], metadata: dict[str, str],
                  display: str = "") -> dict[str, TensorRef]:
    """``tensors`` with the storages, strides and flags of ``ckptconv.views``
    rebuilt (consumes the key from ``metadata``)."""
    raw = metadata.pop(VIEWS_KEY, None)
    if raw is None:
        return tensors
    try:
        record = json.loads(raw)
        storages = record.get("s", [])
        rg, param = set(record.get("rg", [])), set(record.get("p", []))
        out = dict(tensors)
        for numel, views in storages:
            refs = [(tensors[name], int(offset), tuple(int(s) for s in strides))
                    for name, offset, strides in views]
            dtype = refs[0][0].dtype
            if any(r.dtype != dtype for r, _, _ in refs):
                raise ValueError("views of one storage with different dtypes")
            pieces = [(r, off, st) for r, off, st in refs
                      if _is_dense(StoredTensor(dtype, r.shape, _Sized(int(numel) * dtype.itemsize),
                                                off, st))]
            storage = AssembledStorage(dtype, int(numel), pieces)
            for (name, _, _), (r, off, st) in zip(views, refs):
                out[name] = StoredTensor(dtype, r.shape, storage, off, st)
        for name in rg | param:     # fresh refs of this read: their flags are ours to set
            out[name].requires_grad = name in rg
            out[name].is_parameter = name in param
        return out
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise FormatError(f"{display}: bad {VIEWS_KEY} metadata: {e}") from None


class _Sized(ByteSource):
    """A source that only has a size (to check a view's geometry)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def flat_format_losses(ckpt) -> list[str]:
    """What a flat format (one contiguous array per name, ckptconv's metadata
    beside) cannot give back: storage sharing and strides of views whose
    storage no saved tensor covers."""
    lost = record_views(ckpt.unique_tensors().items())[1]
    if not lost:
        return []
    return [f"{name_list(lost, 5)}: strides and storage sharing (views of a storage whose other "
            "elements no saved tensor holds): written contiguous"]

