"""Writing torch zip files that ``torch.load`` reads, with ``weights_only=True``
too, from torch 1.13 on (or the first release that has a tensor's dtype).

Ground truth: ``torch/serialization.py`` (``_save``: the archive records and
storage members), ``torch/_tensor.py`` (``_reduce_ex_internal``: how a tensor
is pickled), ``torch/_weights_only_unpickler.py`` (the opcodes and globals the
weights-only loader accepts). The pickle is planned first (one storage per
distinct source range), then storages are streamed into the zip.
"""
from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ckptconv._lazy import np, numpy_loaded

from ckptconv import dtypes as _dt
from ckptconv.atomic import atomic_file
from ckptconv.errors import UnsupportedError
from ckptconv.tensor import StoredTensor, TensorRef, contiguous_strides
from ckptconv.tree import Checkpoint, ObjectRecord, iter_tensors
from ckptconv.zipstream import ZipWriter

from .known_globals import DICT, KNOWN_GLOBALS, OMEGACONF_CONTAINERS, PARENT_KEY, PARENT_LINKED
from .weights_only import DTYPE_MIN_TORCH


class PickleWriter:
    """Emits protocol-2 opcodes that torch's weights-only loader accepts (1.13+)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.w = self.buf.write
        self.memo_size = 0
        # OmegaConf containers being written, with their memo index: the
        # "parent" markers inside them become references back (LONG_BINGET)
        self.containers: list[int] = []

    def glob(self, qual: str) -> None:
        module, _, name = qual.rpartition(".")
        self.w(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def int_(self, v: int) -> None:
        if 0 <= v < 256:
            self.w(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.w(b"M" + v.to_bytes(2, "little"))
        elif -(1 << 31) <= v < (1 << 31):
            self.w(b"J" + v.to_bytes(4, "little", signed=True))
        else:
            n = (v.bit_length() + 8) // 8
            raw = v.to_bytes(n, "little", signed=True)
            self.w(b"\x8a" + bytes([len(raw)]) + raw)

    def str_(self, s: str) -> None:
        b = s.encode("utf-8", "surrogatepass")
        self.w(b"X" + len(b).to_bytes(4, "little") + b)

    def value(self, v: Any, emit_tensor) -> None:
        import struct

        w = self.w
        if v is None:
            w(b"N")
        elif v is True:
            w(b"\x88")
        elif v is False:
            w(b"\x89")
        elif isinstance(v, TensorRef):
            emit_tensor(v)
        elif numpy_loaded() and isinstance(v, (np.generic, np.ndarray, np.dtype)):
            # (a numpy value exists only once numpy is imported: no import for the check)
            if isinstance(v, np.generic):
                self.np_scalar(v)
            elif isinstance(v, np.ndarray):
                self.np_array(v)
            else:
                self.np_dtype(v)
        elif isinstance(v, int):
            self.int_(int(v))
        elif isinstance(v, float):
            w(b"G" + struct.pack(">d", float(v)))
        elif isinstance(v, str):
            self.str_(v)
        elif isinstance(v, bytes):  # protocol 2 spells bytes as _codecs.encode(latin1 str)
            self.glob("_codecs.encode")
            self.str_(v.decode("latin1"))
            self.str_("latin1")
            w(b"\x86R")
        elif isinstance(v, bytearray):
            self.glob("builtins.bytearray")
            self.value(bytes(v), emit_tensor)
            w(b"\x85R")
        elif isinstance(v, complex):
            self.glob("builtins.complex")
            self.value((v.real, v.imag), emit_tensor)
            w(b"R")
        elif isinstance(v, OrderedDict):
            self.glob("collections.OrderedDict")
            w(b")R")
            self._items(v, emit_tensor)
            attrs = vars(v)
            if attrs:
                self.value(dict(attrs), emit_tensor)
                w(b"b")
        elif isinstance(v, dict):
            w(b"}")
            self._items(v, emit_tensor)
        elif isinstance(v, list):
            w(b"]")
            for i in range(0, len(v), 1000):
                w(b"(")
                for x in v[i:i + 1000]:
                    self.value(x, emit_tensor)
                w(b"e")
        elif isinstance(v, tuple):
            if not v:
                w(b")")
            elif len(v) <= 3:
                for x in v:
                    self.value(x, emit_tensor)
                w(b"\x85\x86\x87"[len(v) - 1:len(v)])
            else:
                w(b"(")
                for x in v:
                    self.value(x, emit_tensor)
                w(b"t")
        elif isinstance(v, (set, frozenset)):
            self.glob("builtins.set" if isinstance(v, set) else "builtins.frozenset")
            self.value((list(v),), emit_tensor)
            w(b"R")
        elif isinstance(v, ObjectRecord):
            self.record(v, emit_tensor)
        else:
            raise UnsupportedError(f"cannot write a {type(v).__name__} into a torch pickle")

    def _items(self, d: dict, emit_tensor) -> None:
        items = list(d.items())
        for i in range(0, len(items), 1000):
            self.w(b"(")
            for k, x in items[i:i + 1000]:
                self.value(k, emit_tensor)
                self.value(x, emit_tensor)
            self.w(b"u")

    def record(self, r: ObjectRecord, emit_tensor) -> None:
        if r.kind == "global":
            self.glob(r.cls)
            return
        if r.kind == "parent":  # written by the node that holds it (below)
            raise UnsupportedError(f"a reference to the enclosing {r.cls} outside of an "
                                   "OmegaConf node")
        self.glob(r.cls)
        if r.kind == "reduce":
            self.value(tuple(r.args), emit_tensor)
            self.w(b"R")
        else:
            args = tuple(r.args)
            if args and isinstance(args[-1], tuple) and len(args[-1]) == 2 and args[-1][0] == "__kwargs__":
                raise UnsupportedError(f"record {r.cls} was built with keyword arguments")
            self.value(args, emit_tensor)
            self.w(b"\x81")
        if KNOWN_GLOBALS.get(r.cls) == DICT:  # a dict subclass: its state is its items
            if not isinstance(r.state, dict):
                raise UnsupportedError(f"record {r.cls} without its items")
            self._items(r.state, emit_tensor)
            return
        parent = self.containers[-1] if self.containers else None
        container = r.cls in OMEGACONF_CONTAINERS
        if container:
            self.containers.append(self.memo_size)
            self.w(b"r" + self.memo_size.to_bytes(4, "little"))  # LONG_BINPUT
            self.memo_size += 1
        if r.cls in PARENT_LINKED and isinstance(r.state, dict):
            self.w(b"}(")
            for k, x in r.state.items():
                self.value(k, emit_tensor)
                if k == PARENT_KEY and isinstance(x, ObjectRecord) and x.kind == "parent":
                    if parent is None:
                        raise UnsupportedError(f"{r.cls} refers to an enclosing {x.cls}, "
                                               "but sits in none")
                    self.w(b"j" + parent.to_bytes(4, "little"))  # LONG_BINGET
                else:
                    self.value(x, emit_tensor)
            self.w(b"ub")
        elif r.state is not None:
            self.value(r.state, emit_tensor)
            self.w(b"b")
        if container:
            self.containers.pop()

    def np_dtype(self, dt: np.dtype) -> None:
        self.glob("numpy.dtype")
        self.value((dt.str[1:] if dt.str[0] in "<>|=" else dt.str, False, True), None)
        self.w(b"R")
        order = "|" if dt.itemsize == 1 or dt.str[0] == "|" else dt.str[0]
        self.value((3, order, None, None, None, -1, -1, 0), None)
        self.w(b"b")

    def np_scalar(self, v: np.generic) -> None:
        self.glob("numpy.core.multiarray.scalar")
        self.np_dtype(v.dtype)
        self.value(v.tobytes(), None)
        self.w(b"\x86R")

    def np_array(self, a: np.ndarray) -> None:
        self.glob("numpy.core.multiarray._reconstruct")
        self.glob("numpy.ndarray")  # _reconstruct(ndarray, (0,), b"b"): one TUPLE3 of args
        self.value((0,), None)
        self.value(b"b", None)
        self.w(b"\x87R")
        self.w(b"(")
        self.int_(1)
        self.value(tuple(a.shape), None)
        self.np_dtype(a.dtype)
        self.w(b"\x89")
        self.value(np.ascontiguousarray(a).tobytes(), None)
        self.w(b"tb")


def _plan_storages(ckpt: Checkpoint):
    """Group tensors into storages: views of one source storage share it."""
    storages: list[dict] = []      # {"refs": [...], "source": src or None, "dtype", "nbytes"}
    by_source: dict[tuple, int] = {}
    placement: dict[int, tuple[int, int, tuple, tuple]] = {}  # id(ref) -> (storage, offset, shape, stride)
    for _, ref in iter_tensors(ckpt.tree):
        if id(ref) in placement:
            continue
        if isinstance(ref, StoredTensor) and not ref.big_endian:
            key = (id(ref.source), ref.dtype.name)
            if ref.source.nbytes % ref.dtype.itemsize == 0:
                idx = by_source.get(key)
                if idx is None:
                    idx = len(storages)
                    by_source[key] = idx
                    storages.append({"source": ref.source, "dtype": ref.dtype,
                                     "nbytes": ref.source.nbytes, "ref": ref})
                placement[id(ref)] = (idx, ref.offset, ref.shape, ref.strides)
                continue
        idx = len(storages)
        storages.append({"source": None, "dtype": ref.dtype, "nbytes": ref.nbytes, "ref": ref})
        placement[id(ref)] = (idx, 0, ref.shape, contiguous_strides(ref.shape))
    return storages, placement


def _check_compat(ckpt: Checkpoint, version: str | None) -> None:
    if not version:
        return
    try:
        want = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        raise UnsupportedError(f"--torch-compat '{version}' is not a version like 1.13") from None
    for name, ref in iter_tensors(ckpt.tree):
        need = DTYPE_MIN_TORCH.get(ref.dtype.name)
        if need and want < need:
            raise UnsupportedError(
                f"tensor '{name}' is {ref.dtype.name}, which torch {version} cannot hold "
                f"(needs {need[0]}.{need[1]}+); cast it with --dtype or target a newer torch")


def write_zip_checkpoint(ckpt: Checkpoint, path: Path, force: bool = False,
                         torch_compat: str | None = None) -> dict:
    _check_compat(ckpt, torch_compat)
    with atomic_file(path, force) as tmp:
        zw = ZipWriter(tmp)
        try:
            write_zip_archive(zw, ckpt)
        finally:
            zw.close()
    return {"files": [str(path)], "notes": []}


def write_zip_archive(zw: ZipWriter, ckpt: Checkpoint) -> None:
    """The members of a ``torch.save`` archive of ``ckpt`` into ``zw`` (a
    file of its own, or one item of a DCP ``.distcp`` file)."""
    storages, placement = _plan_storages(ckpt)
    pw = PickleWriter()
    pw.w(b"\x80\x02")

    def emit_tensor(ref: TensorRef) -> None:
        idx, offset, shape, stride = placement[id(ref)]
        st = storages[idx]
        dtype: _dt.DType = st["dtype"]
        # dtypes with no typed storage class (fp8, uint16..64, complex32)
        # need _rebuild_tensor_v3 over an UntypedStorage
        v3 = dtype.storage_class is None
        if ref.is_parameter:
            pw.glob("torch._utils._rebuild_parameter")
            pw.w(b"(")
        pw.glob("torch._utils._rebuild_tensor_v3" if v3 else "torch._utils._rebuild_tensor_v2")
        pw.w(b"(")
        pw.w(b"(")
        pw.str_("storage")
        pw.glob("torch.storage.UntypedStorage" if v3 else f"torch.{dtype.storage_class}")
        pw.str_(str(idx))
        pw.str_("cpu")
        pw.int_(st["nbytes"] if v3 else st["nbytes"] // dtype.itemsize)
        pw.w(b"tQ")
        pw.int_(offset)
        pw.value(tuple(shape), None)
        pw.value(tuple(stride), None)
        pw.value(bool(ref.requires_grad and not ref.is_parameter), None)
        pw.glob("collections.OrderedDict")
        pw.w(b")R")
        if v3:
            pw.glob(f"torch.{dtype.name}")
        pw.w(b"tR")
        if ref.is_parameter:
            pw.value(bool(ref.requires_grad), None)
            pw.glob("collections.OrderedDict")
            pw.w(b")R")
            pw.w(b"tR")

    pw.value(ckpt.tree, emit_tensor)
    pw.w(b".")
    root = "archive"
    zw.add_bytes(f"{root}/data.pkl", pw.buf.getvalue())
    zw.add_bytes(f"{root}/.format_version", b"1")
    zw.add_bytes(f"{root}/.storage_alignment", b"64")
    zw.add_bytes(f"{root}/byteorder", b"little")
    for idx, st in enumerate(storages):
        if st["source"] is not None:
            whole = StoredTensor(st["dtype"], (st["nbytes"] // st["dtype"].itemsize,),
                                 st["source"])
            zw.add_tensor_bytes(f"{root}/data/{idx}", st["nbytes"], [whole],
                                getattr(st["source"], "crc32", None))
        else:
            zw.add_tensor_bytes(f"{root}/data/{idx}", st["nbytes"], [st["ref"]])
    zw.add_bytes(f"{root}/version", b"3\n")
    zw.add_bytes(f"{root}/.data/serialization_id", b"0" * 40)

