"""PyTorch checkpoints (``torch.save``): the zip format (torch >= 1.6), the
legacy format (magic number + pickles + raw storages) and TorchScript
archives, read without torch and without executing the pickle.

Ground truth: ``torch/serialization.py`` (``_save``, ``_load``,
``_legacy_load``, ``persistent_load``, location tags), ``torch/_utils.py``
(``_rebuild_tensor_v2``/``_v3``, ``_rebuild_parameter``),
``torch/_tensor.py`` (``_reduce_ex_internal``), ``torch/storage.py``
(``_dtype_to_storage_type_map``, ``_new_dtypes``),
``torch/_weights_only_unpickler.py`` (what ``weights_only=True`` accepts).

Zip layout: ``<root>/data.pkl`` (the pickle), ``<root>/data/<key>`` (one
member per storage, raw little-endian bytes), ``<root>/byteorder``,
``<root>/version``. A storage is a persistent id
``('storage', torch.FloatStorage | torch.UntypedStorage, key, location, numel)``;
a tensor is ``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
hooks)`` or, for dtypes without a legacy storage class (fp8, uint16/32/64),
``_rebuild_tensor_v3(untyped_storage, ..., dtype)``.
"""
from __future__ import annotations

import io
import math
import pickletools
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ckptconv._lazy import np, numpy_loaded

from ckptconv import dtypes as _dt
from ckptconv.atomic import atomic_file
from ckptconv.errors import FormatError, UnsafePickleError, UnsupportedError
from ckptconv.registry import Adapter
from ckptconv.sharding import read_sharded
from ckptconv.tensor import (ArrayTensor, BufferSource, ByteSource, FileHandle, FileSource,
                             StoredTensor, TensorRef, contiguous_strides)
from ckptconv.tree import Checkpoint, ObjectRecord, iter_tensors
from ckptconv.unpickler import (Global, Pending, RestrictedUnpickler, is_dangerous, iter_opcodes,
                                scan_globals, short_repr)
from ckptconv.ziputil import (ZipWriter, is_zip, member_root, read_member_bytes, read_members)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_LEGACY_HEAD = b"\x80\x02\x8a\x0a"  # PROTO 2, LONG1 of 10 bytes: the magic number


class _Storage:
    """A storage named by a persistent id; ``source`` holds its bytes."""

    __slots__ = ("key", "dtype", "location", "numel", "source", "untyped")

    def __init__(self, key, dtype, location, numel, source, untyped):
        self.key, self.dtype, self.location = key, dtype, location
        self.numel, self.source, self.untyped = numel, source, untyped


_STORAGE_DTYPES: dict[str, tuple[_dt.DType | None, bool]] = {}


def _storage_dtype(g: Any, display: str) -> tuple[_dt.DType | None, bool]:
    """(dtype, untyped) of a storage class global like ``torch.FloatStorage``."""
    if type(g) is Global:
        known = _STORAGE_DTYPES.get(g.qualname)
        if known is not None:
            return known
    if isinstance(g, ObjectRecord):
        qual = g.cls
    elif isinstance(g, Global):
        qual = g.qualname
    else:
        raise FormatError(f"{display}: storage type is {short_repr(g)}, not a torch storage class")
    name = qual.rsplit(".", 1)[-1]
    if not qual.startswith("torch.") or not name.endswith("Storage"):
        raise UnsafePickleError(f"{display}: persistent id names {qual}, not a torch storage class")
    if name in ("UntypedStorage", "TypedStorage"):
        return None, True
    try:
        found = _dt.from_storage_class(name), False
    except FormatError as e:
        raise FormatError(f"{display}: {e}") from None
    _STORAGE_DTYPES[qual] = found
    return found


def _torch_dtype(g, display: str) -> _dt.DType:
    qual = g.qualname if isinstance(g, Global) else getattr(g, "cls", None)
    if not isinstance(qual, str) or not qual.startswith("torch.") or qual.count(".") != 1:
        raise FormatError(f"{display}: tensor dtype {short_repr(g)} is not a torch dtype")
    try:
        return _dt.get(qual[len("torch."):])
    except FormatError as e:
        raise FormatError(f"{display}: {e}") from None


MAX_RANK = 64  # numpy's limit; torch's is the same order


def _ints(v, what: str, display: str) -> tuple[int, ...]:
    if type(v) is tuple and len(v) <= MAX_RANK and all(type(x) is int for x in v):
        return v  # the common case, checked cheaply (``type(x) is int`` excludes bool)
    if isinstance(v, ObjectRecord) and v.cls == "torch.Size" and v.args:
        v = v.args[0]
    if not isinstance(v, (tuple, list)) or len(v) > MAX_RANK or \
            not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise FormatError(f"{display}: tensor {what} {short_repr(v)} is not a tuple of at most "
                          f"{MAX_RANK} ints")
    return tuple(v)


def _nonneg_int(v, what: str, display: str) -> int:
    if type(v) is int and v >= 0:
        return v
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise FormatError(f"{display}: {what} {short_repr(v)} is not a non-negative int")
    return v


def _flag(v, what: str, display: str) -> bool:
    if not isinstance(v, (bool, int)) or isinstance(v, int) and v not in (0, 1):
        raise FormatError(f"{display}: {what} {short_repr(v)} is not a bool")
    return bool(v)


def _resolve(v):
    return v.value() if isinstance(v, Pending) else v


def _plain_numpy_dtype(dtype, display: str, what: str) -> np.dtype:
    """Only dtypes of plain numbers/bytes: object and void (structured) dtypes
    carry pickled Python objects, so they are refused as unsafe."""
    dtype = _resolve(dtype)
    if not isinstance(dtype, np.dtype):
        raise FormatError(f"{display}: {what} {short_repr(dtype)} is not a numpy dtype")
    if dtype.hasobject or dtype.kind in "OV":
        raise UnsafePickleError(f"{display}: {what} '{dtype}' is an object or structured dtype, "
                                "whose data are pickled Python objects (refused; nothing was "
                                "executed)")
    if dtype.itemsize == 0:
        raise FormatError(f"{display}: {what} '{dtype}' has no size")
    return dtype


class _NdarrayPending(Pending):
    """numpy ``_reconstruct(ndarray, (0,), b'b')`` then BUILD(version, shape, dtype, fortran, data)."""

    def __init__(self, display):
        self.display = display
        self.array = None

    def build(self, state):
        d = self.display
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise FormatError(f"{d}: bad numpy array state")
        _, shape, dtype, fortran, data = state if len(state) == 5 else (1,) + state
        dtype = _plain_numpy_dtype(dtype, d, "numpy array dtype")
        if isinstance(data, str):
            data = data.encode("latin1")
        if not isinstance(data, (bytes, bytearray)):
            # a list here is the element list of an object array: pickled objects
            raise UnsafePickleError(f"{d}: numpy array data is a {type(data).__name__}, not bytes "
                                    "(refused, nothing was executed)")
        shape = _ints(shape, "shape", d)
        if any(s < 0 for s in shape):
            raise FormatError(f"{d}: numpy array shape {shape} has a negative dimension")
        fortran = _flag(fortran, "numpy array order flag", d)
        if math.prod(shape) * dtype.itemsize != len(data):
            raise FormatError(f"{d}: numpy array data has {len(data)} bytes for "
                              f"shape {shape} of {dtype}")
        arr = np.frombuffer(bytes(data), dtype=dtype)
        self.array = arr.reshape(shape, order="F" if fortran else "C").copy()

    def value(self):
        if self.array is None:
            raise FormatError(f"{self.display}: numpy array without data")
        return self.array


class _DtypePending(Pending):
    def __init__(self, spec, display):
        if not isinstance(spec, str) or len(spec) > 64:
            raise FormatError(f"{display}: numpy dtype spec {short_repr(spec)} is not a short string")
        try:
            self.dtype = np.dtype(spec)
        except (TypeError, ValueError, OverflowError) as e:
            raise FormatError(f"{display}: bad numpy dtype {spec!r}") from e
        _plain_numpy_dtype(self.dtype, display, "numpy.dtype")
        self.display = display

    def build(self, state):
        if isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "="):
            if state[1] == ">":
                self.dtype = self.dtype.newbyteorder(">")

    def value(self):
        return self.dtype


_TENSOR_REBUILDS = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
                    "torch._utils._rebuild_tensor")
_PARAMETER_REBUILDS = ("torch._utils._rebuild_parameter",
                       "torch._utils._rebuild_parameter_with_state")
_FROM_TYPE_REBUILDS = ("torch._tensor._rebuild_from_type_v2", "torch._tensor._rebuild_from_type")
_RECORDED_CALLS = {"torch.Size", "torch.device", "torch.serialization._get_layout",
                   "builtins.slice", "__builtin__.slice", "torch.finfo", "torch.iinfo"}
_UNSUPPORTED_TENSORS = {
    "torch._utils._rebuild_qtensor": "quantized tensors",
    "torch._utils._rebuild_sparse_tensor": "sparse tensors",
    "torch._utils._rebuild_sparse_csr_tensor": "sparse tensors",
    "torch._utils._rebuild_nested_tensor": "nested tensors",
    "torch._utils._rebuild_meta_tensor_no_storage": "meta tensors (no data)",
    "torch._utils._rebuild_wrapper_subclass": "tensor subclasses",
    "torch._utils._rebuild_mkldnn_tensor": "mkldnn tensors",
    "torch._utils._rebuild_xla_tensor": "XLA tensors",
}
_JIT_LISTS = ("torch.jit._pickle.build_intlist", "torch.jit._pickle.build_doublelist",
              "torch.jit._pickle.build_boollist", "torch.jit._pickle.build_tensorlist",
              "torch.jit._pickle.build_stringlist")
_NUMPY_RECONSTRUCT = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
_NUMPY_SCALAR = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
_LAYOUTS = ("torch.strided", "torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc",
            "torch.sparse_bsr", "torch.sparse_bsc", "torch._mkldnn", "torch.jagged")
# Every callable `call` accepts, and the names in dangerous modules a torch
# pickle may still *name* (they resolve to our constructors, never imported).
ALLOWED_CALLS = frozenset(
    _TENSOR_REBUILDS + _PARAMETER_REBUILDS + _FROM_TYPE_REBUILDS + _JIT_LISTS
    + _NUMPY_RECONSTRUCT + _NUMPY_SCALAR + tuple(_RECORDED_CALLS) + tuple(_UNSUPPORTED_TENSORS)
    + ("torch._utils._rebuild_device_tensor_from_numpy", "collections.OrderedDict",
       "builtins.set", "__builtin__.set", "builtins.frozenset", "__builtin__.frozenset",
       "builtins.complex", "__builtin__.complex", "builtins.bytearray", "__builtin__.bytearray",
       "builtins.bytes", "__builtin__.bytes",
       "_codecs.encode", "numpy.dtype", "torch.jit._pickle.restore_type_tag"))
_ALLOWED_NAMES = ALLOWED_CALLS | {"torch.storage.UntypedStorage", "torch.storage.TypedStorage"}


class TorchUnpickler(RestrictedUnpickler):
    """Torch's allowlist, interpreted: rebuild calls make lazy tensors.

    Every allowlisted call checks its arguments' types, counts and ranges
    before building anything (the same calls torch's weights-only loader
    accepts; anything else is refused by name).
    """

    leaf_types = (StoredTensor, ArrayTensor)

    def __init__(self, display: str, storage_source, big_endian: bool = False):
        super().__init__(display)
        self.storage_source = storage_source  # (key, dtype, numel, untyped) -> ByteSource
        self.big_endian = big_endian
        self.storages: dict[str, _Storage] = {}
        self.locations: set[str] = set()
        self.tensor_cache: dict[tuple, TensorRef] = {}
        self.calls_seen: set[str] = set()
        self.result: Any = None  # set by check_pickle

    def allowed_global(self, qualname: str) -> bool:
        return qualname in _ALLOWED_NAMES

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            return super().persistent_load(pid)
        d = self.display
        stype, key, location, numel = pid[1], pid[2], pid[3], pid[4]
        view = pid[5] if len(pid) > 5 else None
        dtype, untyped = _storage_dtype(stype, d)
        if not isinstance(key, str) or not isinstance(location, str) or len(location) > 64:
            raise FormatError(f"{d}: malformed storage id {short_repr(pid)}")
        if type(numel) is not int or numel < 0:
            numel = _nonneg_int(numel, f"storage '{key}' size", d)
        self.locations.add(location)
        st = self.storages.get(key)
        if st is None:
            source = self.storage_source(key, dtype or _dt.get("uint8"), numel, untyped)
            st = _Storage(key, dtype, location, numel, source, untyped)
            self.storages[key] = st
        if view is not None:  # legacy storage views: (view_key, offset, size)
            if not isinstance(view, tuple) or len(view) != 3 or not isinstance(view[0], str):
                raise FormatError(f"{d}: malformed storage view {short_repr(view)}")
            view_key = view[0]
            offset = _nonneg_int(view[1], "storage view offset", d)
            size = _nonneg_int(view[2], "storage view size", d)
            itemsize = (dtype or _dt.get("uint8")).itemsize
            if (offset + size) * itemsize > st.source.nbytes:
                raise FormatError(f"{d}: storage view {short_repr(view)} outside its storage")
            sub = _SubSource(st.source, offset * itemsize, size * itemsize)
            return _Storage(view_key, dtype, location, size, sub, untyped)
        return st

    def _nargs(self, q: str, args: tuple, lo: int, hi: int | None = None) -> None:
        hi = lo if hi is None else hi
        if not lo <= len(args) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise FormatError(f"{self.display}: {q} takes {want} arguments, got {len(args)}")

    def call(self, func: Global, args: tuple, opcode: str):
        q = func.qualname
        self.calls_seen.add(q)
        d = self.display
        if q in _TENSOR_REBUILDS:
            return self._rebuild(q, args)
        if q == "collections.OrderedDict" and not args:  # every tensor's backward hooks
            return OrderedDict()
        if q in _PARAMETER_REBUILDS:
            # (data, requires_grad, backward_hooks[, state]): hooks and state are dropped
            self._nargs(q, args, 3 if q.endswith("_parameter") else 4)
            if not isinstance(args[0], TensorRef):
                raise FormatError(f"{d}: {q} of a {type(args[0]).__name__}, not a tensor")
            if not isinstance(args[2], dict):
                raise FormatError(f"{d}: {q} backward hooks are a {type(args[2]).__name__}")
            t = args[0]
            t.is_parameter, t.requires_grad = True, _flag(args[1], "requires_grad", d)
            return t
        if q in _FROM_TYPE_REBUILDS:
            # (func, new_type, args, state): func may only be a tensor rebuild,
            # never an arbitrary callable smuggled in as an argument
            self._nargs(q, args, 4)
            inner, new_type, inner_args = args[0], args[1], args[2]
            if not isinstance(inner, Global) or inner.qualname not in _TENSOR_REBUILDS + \
                    _PARAMETER_REBUILDS or not isinstance(inner_args, tuple):
                raise UnsafePickleError(f"{d}: {q} of {short_repr(inner)} (only tensor rebuild "
                                        "functions allowed; refused, nothing was executed)")
            if new_type not in (Global("torch", "Tensor"), Global("torch.nn.parameter", "Parameter")):
                raise UnsafePickleError(f"{d}: tensor subclass {short_repr(new_type)} via {q} "
                                        "(refused, nothing was executed)")
            t = self.call(inner, inner_args, opcode)
            if new_type == Global("torch.nn.parameter", "Parameter") and isinstance(t, TensorRef):
                t.is_parameter = True
            return t
        if q == "torch._utils._rebuild_device_tensor_from_numpy":
            # (data, dtype, device, requires_grad)
            self._nargs(q, args, 4)
            arr = _resolve(args[0])
            if not isinstance(arr, np.ndarray) or not isinstance(args[2], str):
                raise FormatError(f"{d}: bad {q} arguments")
            dtype = _torch_dtype(args[1], d)
            if dtype.numpy is None or dtype.numpy.itemsize != arr.dtype.itemsize:
                raise FormatError(f"{d}: {q}: numpy data of {arr.dtype} for a {dtype.name} tensor")
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            return ArrayTensor(arr.view(dtype.numpy), dtype, _flag(args[3], "requires_grad", d))
        if q in _UNSUPPORTED_TENSORS:
            raise FormatError(f"{d}: holds {_UNSUPPORTED_TENSORS[q]} ({q}), which ckptconv "
                              "does not convert yet")
        if q == "collections.OrderedDict":
            self._nargs(q, args, 0, 1)
            od = OrderedDict()
            if args:
                items = args[0]
                if not isinstance(items, (list, tuple)):
                    raise FormatError(f"{d}: bad OrderedDict arguments")
                for kv in items:
                    if not isinstance(kv, (list, tuple)) or len(kv) != 2:
                        raise FormatError(f"{d}: bad OrderedDict item {short_repr(kv)}")
                    od[self._hashable(kv[0])] = kv[1]
            return od
        if q in _RECORDED_CALLS:
            self._check_recorded(q, args)
            return ObjectRecord(q, None, args, kind="reduce")
        if q in ("builtins.set", "__builtin__.set", "builtins.frozenset", "__builtin__.frozenset"):
            self._nargs(q, args, 0, 1)
            items = args[0] if args else []
            if not isinstance(items, (list, tuple, set, frozenset)):
                raise FormatError(f"{d}: bad {q} arguments")
            kind = set if q.endswith(".set") else frozenset
            return kind(self._hashable(x) for x in items)
        if q in ("builtins.complex", "__builtin__.complex"):
            self._nargs(q, args, 0, 2)
            if not all(isinstance(a, (int, float)) for a in args):
                raise FormatError(f"{d}: bad complex arguments")
            return complex(*args)
        if q in ("builtins.bytearray", "__builtin__.bytearray"):
            if args and isinstance(args[0], str) and len(args) == 2 and args[1] in ("latin1", "latin-1"):
                return bytearray(args[0].encode("latin1"))
            if len(args) <= 1 and (not args or isinstance(args[0], (bytes, bytearray))):
                return bytearray(args[0] if args else b"")
            raise FormatError(f"{d}: bad bytearray arguments")
        if q in ("builtins.bytes", "__builtin__.bytes"):  # protocols 0-2 spell b"" as bytes()
            if not args or (len(args) == 1 and isinstance(args[0], (bytes, bytearray))):
                return bytes(args[0] if args else b"")
            raise FormatError(f"{d}: bad bytes arguments")
        if q == "_codecs.encode":  # protocol 2 spelling of bytes: encode(latin1 str, 'latin1')
            if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
                return args[0].encode("latin1")
            raise UnsafePickleError(f"{d}: _codecs.encode with arguments other than (str, 'latin1')")
        if q in _NUMPY_RECONSTRUCT:
            # (subtype, shape, dtype char): only a plain ndarray, data comes in BUILD
            self._nargs(q, args, 3)
            if args[0] != Global("numpy", "ndarray"):
                raise UnsafePickleError(f"{d}: numpy _reconstruct of {short_repr(args[0])} "
                                        "(only numpy.ndarray allowed; nothing was executed)")
            return _NdarrayPending(d)
        if q == "numpy.dtype":
            self._nargs(q, args, 1, 3)
            return _DtypePending(args[0], d)
        if q in _NUMPY_SCALAR:
            self._nargs(q, args, 2)
            dtype = _plain_numpy_dtype(args[0], d, "numpy scalar dtype")
            data = args[1].encode("latin1") if isinstance(args[1], str) else args[1]
            if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
                raise FormatError(f"{d}: numpy scalar of {dtype} with {short_repr(data)} as data")
            return np.frombuffer(bytes(data), dtype=dtype)[0]
        if q in _JIT_LISTS:
            self._nargs(q, args, 1)
            if not isinstance(args[0], (list, tuple)):
                raise FormatError(f"{d}: {q} of a {type(args[0]).__name__}")
            return list(args[0])
        if q == "torch.jit._pickle.restore_type_tag":
            self._nargs(q, args, 1, 2)
            return args[0]
        return super().call(func, args, opcode)

    def _check_recorded(self, q: str, args: tuple) -> None:
        """Recorded calls are kept as records and may be written back into a
        torch file: their arguments must be what torch itself writes."""
        d = self.display
        ok = True
        if q == "torch.Size":
            ok = len(args) == 1 and isinstance(args[0], (tuple, list)) and \
                all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in args[0]) \
                and len(args[0]) <= MAX_RANK
        elif q == "torch.device":
            ok = 1 <= len(args) <= 2 and isinstance(args[0], str) and len(args[0]) <= 64 and \
                (len(args) == 1 or args[1] is None or isinstance(args[1], int))
        elif q == "torch.serialization._get_layout":
            ok = len(args) == 1 and args[0] in _LAYOUTS
        elif q.endswith(".slice"):
            ok = 1 <= len(args) <= 3 and all(a is None or isinstance(a, int) for a in args)
        elif q in ("torch.finfo", "torch.iinfo"):
            ok = len(args) == 1 and isinstance(args[0], Global)
            if ok:
                _torch_dtype(args[0], d)
        if not ok:
            raise FormatError(f"{d}: {q} with arguments {short_repr(args)} (not what torch writes)")

    def build_other(self, obj, state):
        if isinstance(obj, TensorRef):
            return  # Parameter/tensor __dict__ state (e.g. empty OrderedDict): nothing to keep
        super().build_other(obj, state)

    def bare_global(self, g: Global):
        return super().bare_global(g)

    def _rebuild(self, q: str, args: tuple) -> TensorRef:
        d = self.display
        if q.endswith("_v3"):
            # (storage, offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
            self._nargs(q, args, 7, 8)
            storage, offset, size, stride, rg, hooks = args[:6]
            dtype = _torch_dtype(args[6], d)
        elif q.endswith("_v2"):
            # (storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
            self._nargs(q, args, 4, 7)
            storage, offset, size, stride = args[:4]
            rg = args[4] if len(args) > 4 else False
            hooks = args[5] if len(args) > 5 else None
            dtype = None
        else:  # _rebuild_tensor(storage, offset, size, stride)
            self._nargs(q, args, 4)
            storage, offset, size, stride = args
            rg, hooks, dtype = False, None, None
        if not isinstance(storage, _Storage):
            raise FormatError(f"{d}: tensor rebuilt from a {type(storage).__name__}, not a storage")
        if hooks is not None and not isinstance(hooks, dict):
            raise FormatError(f"{d}: tensor backward hooks are a {type(hooks).__name__}")
        if dtype is None:
            if storage.dtype is None:
                raise FormatError(f"{d}: untyped storage '{storage.key}' without a tensor dtype")
            dtype = storage.dtype
        if type(offset) is not int or offset < 0:
            offset = _nonneg_int(offset, "tensor storage offset", d)
        if rg is not False and rg is not True:
            rg = _flag(rg, "requires_grad", d)
        size = _ints(size, "size", d)
        stride = _ints(stride, "stride", d)
        key = (id(storage.source), dtype.name, offset, size, stride, rg)
        ref = self.tensor_cache.get(key)
        if ref is None:
            try:
                ref = StoredTensor(dtype, size, storage.source, offset, stride,
                                   big_endian=self.big_endian, requires_grad=rg)
            except FormatError as e:
                raise FormatError(f"{d}: storage '{storage.key}': {e}") from None
            self.tensor_cache[key] = ref
        return ref


class _AnySizeSource(ByteSource):
    """A storage of the size its persistent id claims, with no bytes behind it:
    for interpreting a pickle only to judge its safety (``check_pickle``)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def read(self, offset, length):
        raise FormatError("safety check: storage bytes are not read")


def check_pickle(data: bytes, display: str, listing: list | None = None) -> TorchUnpickler:
    """Interpret one pickle with torch's allowlist, only to judge it: storages
    are taken at their word, nothing is read behind them.

    Raises ``UnsafePickleError`` naming the first refused callable. When the
    pickle is malformed for us (``FormatError``), its raw name listing still
    decides: a dangerous name anywhere in it makes it unsafe, since
    ``pickle.load`` might get that far where we stopped. Returns the
    unpickler (``globals_seen``, ``records``, ``calls_seen``) when acceptable.
    ``listing``: ``scan_globals(data)`` if the caller has it already.
    """
    def storage_source(key, dtype, numel, untyped):
        return _AnySizeSource(numel * (1 if untyped else dtype.itemsize))

    up = TorchUnpickler(display, storage_source)
    try:
        up.result = up.load(data)
    except UnsafePickleError:
        raise
    except FormatError as e:
        for opcode, name in listing if listing is not None else scan_globals(data, display):
            if opcode in ("EXT1", "EXT2", "EXT4") or (
                    opcode in ("GLOBAL", "INST", "STACK_GLOBAL") and is_dangerous(name)
                    and not up.allowed_global(name)):
                raise UnsafePickleError(f"{display}: pickle names {name} via {opcode} "
                                        f"(refused, nothing was executed; it is also malformed: "
                                        f"{e})") from None
        raise
    return up


def read_bare_pickle(path: Path) -> Checkpoint:
    """A plain ``pickle.dump`` file (protocol 2+), e.g. a dict of numpy arrays.

    Not a torch format, but ``torch.load`` runs such a file's pickle (it reads
    it as the legacy magic number), so it is read here, with the same
    allowlist. It has no storages; numpy arrays become the tensors.
    """
    from ckptconv.tree import to_canonical

    handle = FileHandle(path)
    display = handle.display
    if handle.size > 1 << 31:
        raise FormatError(f"{display}: bare pickle of {handle.size} bytes is too big to interpret")

    def storage_source(key, dtype, numel, untyped):
        raise FormatError(f"{display}: a bare pickle cannot hold torch storages (persistent id "
                          f"'{key}'); is it part of a legacy checkpoint?")

    up = TorchUnpickler(display, storage_source)
    tree = to_canonical(up.load(handle.pread(0, handle.size, "pickle")))
    return Checkpoint(tree, {}, "torch", str(path), _checkpoint_info(up, "pickle"))


_TEXT_PICKLE_SNIFF = 1 << 20


def is_bare_pickle(head: bytes, path: Path | None = None) -> bool:
    """A plain pickle: PROTO 2..5 and a valid opcode next (not a safetensors
    header that happens to start with 0x80: its 9th byte is '{'), or a
    protocol 0/1 pickle that parses to its STOP within its first MiB."""
    if len(head) >= 3 and head[0] == 0x80:
        return (2 <= head[1] <= 5 and head[2:3].decode("latin1") in _PICKLE_OPCODES
                and head[8:9] != b"{")
    if not head or head[:1].decode("latin1") not in _PICKLE_OPCODES or path is None:
        return False
    with open(path, "rb") as f:
        prefix = f.read(_TEXT_PICKLE_SNIFF)
    try:
        return any(name == "STOP" for name, _, _ in iter_opcodes(prefix))
    except Exception:  # noqa: BLE001 - sniffing: anything that does not parse is not a pickle
        return False


_PICKLE_OPCODES = frozenset(op.code for op in pickletools.opcodes)


class _SubSource(ByteSource):
    def __init__(self, base: ByteSource, offset: int, nbytes: int):
        self.base, self.offset, self.nbytes = base, offset, nbytes

    def read(self, offset, length):
        return self.base.read(self.offset + offset, length)

    def file_range(self):
        fr = self.base.file_range()
        return None if fr is None else (fr[0], fr[1] + self.offset)


# --- reading ---------------------------------------------------------------------

def _checkpoint_info(up: TorchUnpickler, kind: str) -> dict:
    return {"torch_format": kind,
            "pickle_globals": sorted(set(up.globals_seen)),
            "records": sorted(set(up.records)),
            "storage_locations": sorted(up.locations),
            "storages": len(up.storages)}


def read_zip_checkpoint(path: Path) -> Checkpoint:
    handle = FileHandle(path)
    members = read_members(handle)
    root = member_root(members, path)
    prefix = f"{root}/" if root else ""
    display = handle.display
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
        if m.compress_type != 0:
            return BufferSource(read_member_bytes(handle, m))
        src = FileSource(handle, m.data_offset, nbytes, f"storage '{key}'")
        if nbytes == m.size:
            src.crc32 = m.crc  # lets a zip writer copy the storage without re-reading it
        return src

    up = TorchUnpickler(f"{display}:{prefix}data.pkl", storage_source, big)
    data = read_member_bytes(handle, members[f"{prefix}data.pkl"], 1 << 31)
    tree = up.load(data)
    kind = "torchscript" if torchscript else "zip"
    info = _checkpoint_info(up, kind)
    info["archive_root"] = root
    version = members.get(f"{prefix}version") or members.get(f"{prefix}.data/version")
    if version is not None:
        info["zip_version"] = read_member_bytes(handle, version, 64).decode("latin1").strip()
    extra = sorted(n for n in members if n.endswith(".pkl") and n != f"{prefix}data.pkl")
    for name in extra:
        # torch.jit.load unpickles constants.pkl; a zip may carry other
        # pickles (another root's data.pkl): refuse any that could run code.
        check_pickle(read_member_bytes(handle, members[name], 1 << 31), f"{display}:{name}")
    info["extra_pickles"] = extra
    if torchscript:
        tree = _torchscript_weights(tree)
    return Checkpoint(tree, {}, "torch", str(path), info)


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


def _scan_one_pickle(f: io.BufferedReader, display: str) -> int:
    """Skip one pickle without interpreting it; returns its end offset."""
    import pickletools

    try:
        for op, _, pos in pickletools.genops(f):
            if op.name == "STOP":
                return pos + 1
    except Exception as e:
        raise FormatError(f"{display}: corrupt or truncated pickle ({e})") from None
    raise FormatError(f"{display}: truncated pickle (no STOP opcode)")


def read_legacy_checkpoint(path: Path) -> Checkpoint:
    """The pre-1.6 format: magic, protocol, sys_info, main pickle, storage keys, raw storages."""
    handle = FileHandle(path)
    display = handle.display

    def plain(f, what):
        up = RestrictedUnpickler(f"{display} ({what})")
        return up.load(f)

    with open(path, "rb") as f:
        magic = plain(f, "magic number")
        if magic != LEGACY_MAGIC:
            raise FormatError(f"{display}: not a torch legacy file (bad magic number)")
        protocol = plain(f, "protocol version")
        if protocol != LEGACY_PROTOCOL:
            raise FormatError(f"{display}: unsupported legacy protocol version {protocol!r}")
        sys_info = plain(f, "sys info")
        if not isinstance(sys_info, dict):
            raise FormatError(f"{display}: bad sys info record")
        big = not sys_info.get("little_endian", True)
        main_start = f.tell()
        main_end = _scan_one_pickle(f, f"{display} (main pickle)")
        f.seek(main_end)
        keys = plain(f, "storage keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise FormatError(f"{display}: bad storage key list")
        data_start = f.tell()
        f.seek(main_start)
        main_bytes = f.read(main_end - main_start)

    # First pass: learn each storage's dtype and size; the raw data follows
    # the pickles in the order of `keys`, each as int64 numel + bytes.
    found: dict[str, tuple[_dt.DType, int, bool]] = {}

    def probe(key, dtype, numel, untyped):
        found[key] = (dtype, numel, untyped)
        return BufferSource(b"")

    class _Probe(TorchUnpickler):
        def _rebuild(self, q, args):
            return ArrayTensor(np.zeros(0, np.uint8))

        def persistent_load(self, pid):
            if isinstance(pid, tuple) and len(pid) > 5 and pid[5] is not None:
                pid = pid[:5]
            return super().persistent_load(pid)

    _Probe(display, probe, big).load(main_bytes)
    sources: dict[str, ByteSource] = {}
    offset = data_start
    order = "big" if big else "little"
    for key in keys:
        if key not in found:
            raise FormatError(f"{display}: storage '{key}' listed but never used")
        dtype, numel, untyped = found[key]
        size = 1 if untyped else dtype.itemsize
        header = int.from_bytes(handle.pread(offset, 8, f"storage '{key}' header"), order)
        if header < 0 or offset + 8 + header * size > handle.size:
            raise FormatError(f"{display}: storage '{key}' needs {header * size} bytes at offset "
                              f"{offset + 8}, file ends at {handle.size} (truncated?)")
        src = FileSource(handle, offset + 8, header * size, f"storage '{key}'")
        sources[key] = src
        offset += 8 + header * size

    def storage_source(key, dtype, numel, untyped):
        if key not in sources:
            raise FormatError(f"{display}: storage '{key}' has no data")
        return sources[key]

    up = TorchUnpickler(display, storage_source, big)
    tree = up.load(main_bytes)
    info = _checkpoint_info(up, "legacy")
    return Checkpoint(tree, {}, "torch", str(path), info)


# --- writing ---------------------------------------------------------------------

# the first torch release that has each dtype (for --torch-compat and `check`)
DTYPE_MIN_TORCH = {"bfloat16": (1, 10), "float8_e4m3fn": (2, 1), "float8_e5m2": (2, 1),
                   "float8_e4m3fnuz": (2, 2), "float8_e5m2fnuz": (2, 2), "float8_e8m0fnu": (2, 7),
                   "uint16": (2, 3), "uint32": (2, 3), "uint64": (2, 3), "complex32": (1, 9)}


class _PickleWriter:
    """Emits protocol-2 opcodes that torch's weights-only loader accepts (1.13+)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.w = self.buf.write

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
        elif isinstance(v, (bytes, bytearray)):
            self.glob("_codecs.encode")
            self.str_(bytes(v).decode("latin1"))
            self.str_("latin1")
            w(b"\x86R")
            if isinstance(v, bytearray):
                pass
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
        if r.state is not None:
            self.value(r.state, emit_tensor)
            self.w(b"b")

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
    storages, placement = _plan_storages(ckpt)
    pw = _PickleWriter()
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
    with atomic_file(path, force) as tmp:
        zw = ZipWriter(tmp)
        try:
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
        finally:
            zw.close()
    return {"files": [str(path)], "notes": []}


class TorchAdapter(Adapter):
    name = "torch"
    extensions = (".pt", ".pth", ".bin", ".ckpt.pt", ".tar")
    description = "PyTorch torch.save (zip and legacy), TorchScript weights"

    def sniff(self, head: bytes, path: Path) -> bool:
        if path.is_dir():
            return False
        if head.startswith(_LEGACY_HEAD):
            return True
        if path.name.endswith(".index.json") and b'"weight_map"' in head:
            return b".bin" in head and b".safetensors" not in head
        if is_zip(head):
            # torch writes "<root>/data.pkl" first: check the first local header
            nlen = int.from_bytes(head[26:28], "little")
            if 30 + nlen <= len(head) and head[30:30 + nlen].endswith(b"data.pkl"):
                return True
            try:
                members = read_members(FileHandle(path))
            except FormatError:
                # a truncated torch zip still starts with "<root>/data.pkl"
                return b"/data.pkl" in head[:200] or head[30:38] == b"data.pkl"
            return any(n.endswith("data.pkl") for n in members) and not \
                any(n.endswith("model.weights.h5") for n in members)
        return is_bare_pickle(head, path)

    def read(self, path: Path, **options) -> Checkpoint:
        if path.name.endswith(".index.json"):
            return self._read_sharded(path)
        with open(path, "rb") as f:
            head = f.read(16)
        if head.startswith(b"PK"):
            return read_zip_checkpoint(path)
        if head.startswith(_LEGACY_HEAD):
            return read_legacy_checkpoint(path)
        if is_bare_pickle(head, path):
            return read_bare_pickle(path)
        raise FormatError(f"{path.name}: not a torch checkpoint")

    def _read_sharded(self, path: Path) -> Checkpoint:
        """``pytorch_model.bin.index.json`` + ``pytorch_model-0000K-of-0000N.bin`` shards."""
        values: dict[str, Any] = {}  # non-tensor entries of the shards (HF shards have none)

        def read_shard(p: Path):
            part = self.read(p)
            for name, leaf in part.leaves():
                if not isinstance(leaf, TensorRef):
                    values.setdefault(name, leaf)
            return part.tensors(), {}

        tensors, index_meta, _ = read_sharded(path, read_shard)
        tree: dict[str, Any] = dict(tensors)
        for name, value in values.items():
            tree.setdefault(name, value)
        md = {k: str(v) for k, v in index_meta.items()}
        return Checkpoint(tree, md, "torch", str(path), {"sharded": True})

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False,
              torch_compat: str | None = None, **options) -> dict:
        return write_zip_checkpoint(ckpt, path, force, torch_compat)
