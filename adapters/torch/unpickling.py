"""The torch pickle, interpreted: ``TorchUnpickler`` turns the calls torch's
weights-only loader accepts into lazy tensors and plain values, and refuses
everything else by name; ``check_pickle`` judges a pickle without reading
any storage bytes.

Ground truth: ``torch/serialization.py`` (``persistent_load``, location tags),
``torch/_utils.py`` (``_rebuild_tensor_v2``/``_v3``, ``_rebuild_parameter``),
``torch/_tensor.py`` (``_reduce_ex_internal``), ``torch/storage.py``
(``_dtype_to_storage_type_map``, ``_new_dtypes``),
``torch/_weights_only_unpickler.py`` (what ``weights_only=True`` accepts).

A storage is a persistent id
``('storage', torch.FloatStorage | torch.UntypedStorage, key, location, numel)``;
a tensor is ``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
hooks)`` or, for dtypes without a legacy storage class (fp8, uint16/32/64),
``_rebuild_tensor_v3(untyped_storage, ..., dtype)``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from ckptconv._lazy import np

from ckptconv import dtypes as _dt
from ckptconv.errors import FormatError, UnsafePickleError
from ckptconv.tensor import ArrayTensor, ByteSource, StoredTensor, TensorRef
from ckptconv.tree import ObjectRecord
from ckptconv.pickle import (Global, Pending, RestrictedUnpickler, is_dangerous, scan_globals,
                                short_repr)

from .known_globals import (DICT, ENUM, OMEGACONF_CONTAINERS, PARENT_KEY, PARENT_LINKED, PATH,
                            RECORD, TYPE, inert_roles, py3_qualname)



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


def torch_dtype(g, display: str) -> _dt.DType:
    """The dtype a pickled ``torch.float32``-style global names."""
    qual = g.qualname if isinstance(g, Global) else getattr(g, "cls", None)
    if not isinstance(qual, str) or not qual.startswith("torch.") or qual.count(".") != 1:
        raise FormatError(f"{display}: tensor dtype {short_repr(g)} is not a torch dtype")
    try:
        return _dt.get(qual[len("torch."):])
    except FormatError as e:
        raise FormatError(f"{display}: {e}") from None


MAX_RANK = 64  # numpy's limit; torch's is the same order


def int_tuple(v, what: str, display: str) -> tuple[int, ...]:
    """A tensor shape or stride from a pickle: a tuple (or torch.Size) of at most MAX_RANK ints."""
    if type(v) is tuple and len(v) <= MAX_RANK and all(type(x) is int for x in v):
        return v  # the common case, checked cheaply (``type(x) is int`` excludes bool)
    if isinstance(v, ObjectRecord) and v.cls == "torch.Size" and v.args:
        v = v.args[0]
    if not isinstance(v, (tuple, list)) or len(v) > MAX_RANK or \
            not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise FormatError(f"{display}: tensor {what} {short_repr(v)} is not a tuple of at most "
                          f"{MAX_RANK} ints")
    return tuple(v)


def nonneg_int(v, what: str, display: str) -> int:
    """An offset or size from a pickle: a non-negative int (not a bool)."""
    if type(v) is int and v >= 0:
        return v
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise FormatError(f"{display}: {what} {short_repr(v)} is not a non-negative int")
    return v


def pickle_flag(v, what: str, display: str) -> bool:
    """A flag from a pickle (requires_grad...): a bool, or the ints 0 and 1."""
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
        shape = int_tuple(shape, "shape", d)
        if any(s < 0 for s in shape):
            raise FormatError(f"{d}: numpy array shape {shape} has a negative dimension")
        fortran = pickle_flag(fortran, "numpy array order flag", d)
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


def _plain(v, depth: int = 0) -> bool:
    """A plain value (what an Enum member's value is): numbers, strings, tuples of them."""
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return True
    return isinstance(v, tuple) and depth < 4 and len(v) <= 64 and \
        all(_plain(x, depth + 1) for x in v)


class DictRecord(dict, Pending):
    """A known dict subclass being read (``defaultdict(list)``, Lightning's
    ``AttributeDict``): collects its items (SETITEMS), then becomes an
    ``ObjectRecord`` whose state holds them."""

    def __init__(self, cls: str, kind: str, args: tuple):
        super().__init__()
        self.cls, self.kind, self.args = cls, kind, args

    def build(self, state) -> None:
        if state:  # instance attributes of a dict subclass: none in the known ones
            raise FormatError(f"{self.cls}: BUILD with attributes {short_repr(state)}")

    def value(self):
        return ObjectRecord(self.cls, dict(self), self.args, self.kind)


class TorchUnpickler(RestrictedUnpickler):
    """Torch's allowlist, interpreted: rebuild calls make lazy tensors.

    Every allowlisted call checks its arguments' types, counts and ranges
    before building anything (the same calls torch's weights-only loader
    accepts; anything else is refused by name).
    """

    leaf_types = (StoredTensor, ArrayTensor)

    def __init__(self, display: str, storage_source, big_endian: bool = False,
                 allow_globals=()):
        super().__init__(display)
        self.inert = inert_roles(allow_globals)  # known framework globals, recorded inertly
        self.storage_source = storage_source  # (key, dtype, numel, untyped) -> ByteSource
        self.big_endian = big_endian
        self.storages: dict[str, _Storage] = {}
        self.locations: set[str] = set()
        self.tensor_cache: dict[tuple, TensorRef] = {}
        self.calls_seen: set[str] = set()
        self.result: Any = None  # set by check_pickle

    def allowed_global(self, qualname: str) -> bool:
        return qualname in _ALLOWED_NAMES or py3_qualname(qualname) in self.inert

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
            numel = nonneg_int(numel, f"storage '{key}' size", d)
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
            offset = nonneg_int(view[1], "storage view offset", d)
            size = nonneg_int(view[2], "storage view size", d)
            itemsize = (dtype or _dt.get("uint8")).itemsize
            if (offset + size) * itemsize > st.source.nbytes:
                raise FormatError(f"{d}: storage view {short_repr(view)} outside its storage")
            sub = SubSource(st.source, offset * itemsize, size * itemsize)
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
            t.is_parameter, t.requires_grad = True, pickle_flag(args[1], "requires_grad", d)
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
            dtype = torch_dtype(args[1], d)
            if dtype.numpy is None or dtype.numpy.itemsize != arr.dtype.itemsize:
                raise FormatError(f"{d}: {q}: numpy data of {arr.dtype} for a {dtype.name} tensor")
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            return ArrayTensor(arr.view(dtype.numpy), dtype, pickle_flag(args[3], "requires_grad", d))
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
        role = self.inert.get(py3_qualname(q))
        if role is not None and role != TYPE:
            return self._inert_call(py3_qualname(q), role, args, opcode)
        return super().call(func, args, opcode)

    def _inert_call(self, q: str, role: str, args: tuple, opcode: str):
        """A known framework global called by the pickle: recorded with its
        arguments, never called. Enums take one plain value, paths strings,
        a defaultdict a known type (or None) as its factory."""
        d = self.display
        if role == RECORD:  # pickled by NEWOBJ; a call would run its __init__ on torch.load
            raise UnsafePickleError(f"{d}: pickle calls {q} via {opcode} (a known class, but "
                                    "only its NEWOBJ form is recorded; nothing was executed)")
        if role == ENUM and (len(args) != 1 or not _plain(args[0])):
            raise FormatError(f"{d}: Enum {q} via {opcode} with {short_repr(args)} "
                              "(an Enum member is rebuilt from one plain value)")
        if role == PATH and not all(isinstance(a, str) for a in args):
            raise FormatError(f"{d}: path {q} via {opcode} with {short_repr(args)} (not strings)")
        if role == DICT:
            factory = args[0] if args else None
            if len(args) > 1 or not (factory is None or isinstance(factory, Global) and
                                     self.inert.get(py3_qualname(factory.qualname)) == TYPE):
                raise UnsafePickleError(f"{d}: {q} via {opcode} with {short_repr(args)} (only a "
                                        "known type as its factory; refused, nothing was executed)")
            return DictRecord(q, "reduce", args)
        self.records.append(q)
        return ObjectRecord(q, None, args, kind="reduce")

    def new_object(self, cls: Global, args: tuple, kwargs: dict | None = None):
        q = py3_qualname(cls.qualname)
        role = self.inert.get(q)
        if role == DICT:
            if args or kwargs:
                raise FormatError(f"{self.display}: {q} via NEWOBJ with arguments "
                                  f"{short_repr(args)} (a dict subclass takes none)")
            return DictRecord(q, "newobj", ())
        if role is None or is_dangerous(q) and role != RECORD and role != "allowed":
            return super().new_object(cls, args, kwargs)
        self.records.append(q)  # a known record class, even in a module that can run code
        extra = (("__kwargs__", kwargs),) if kwargs else ()
        return ObjectRecord(q, None, tuple(args) + extra)

    def build(self, obj, state):
        # OmegaConf nodes point back at the container being built (a cycle):
        # read as a marker, written back as a reference (see known_globals)
        if isinstance(obj, ObjectRecord) and obj.cls in PARENT_LINKED and \
                isinstance(state, dict) and isinstance(state.get(PARENT_KEY), ObjectRecord):
            parent = state[PARENT_KEY]
            if parent.cls in OMEGACONF_CONTAINERS and parent.state is None:
                state = {**state, PARENT_KEY: ObjectRecord(parent.cls, kind="parent")}
        return super().build(obj, state)

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
                torch_dtype(args[0], d)
        if not ok:
            raise FormatError(f"{d}: {q} with arguments {short_repr(args)} (not what torch writes)")

    def build_other(self, obj, state):
        if isinstance(obj, TensorRef):
            return  # Parameter/tensor __dict__ state (e.g. empty OrderedDict): nothing to keep
        super().build_other(obj, state)

    def bare_global(self, g: Global):
        q = py3_qualname(g.qualname)
        if q in self.inert:
            return ObjectRecord(q, kind="global")
        return super().bare_global(g)

    def _rebuild(self, q: str, args: tuple) -> TensorRef:
        d = self.display
        if q.endswith("_v3"):
            # (storage, offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
            self._nargs(q, args, 7, 8)
            storage, offset, size, stride, rg, hooks = args[:6]
            dtype = torch_dtype(args[6], d)
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
            offset = nonneg_int(offset, "tensor storage offset", d)
        if rg is not False and rg is not True:
            rg = pickle_flag(rg, "requires_grad", d)
        size = int_tuple(size, "size", d)
        stride = int_tuple(stride, "stride", d)
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


def check_pickle(data: bytes, display: str, listing: list | None = None,
                 allow_globals=()) -> TorchUnpickler:
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

    up = TorchUnpickler(display, storage_source, allow_globals=allow_globals)
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


class SubSource(ByteSource):
    """A range of another source: a legacy storage view (view_key, offset, size)."""

    def __init__(self, base: ByteSource, offset: int, nbytes: int):
        self.base, self.offset, self.nbytes = base, offset, nbytes

    def read(self, offset, length):
        return self.base.read(self.offset + offset, length)

    def file_range(self):
        fr = self.base.file_range()
        return None if fr is None else (fr[0], fr[1] + self.offset)


def checkpoint_info(up: TorchUnpickler, kind: str) -> dict:
    """``Checkpoint.info`` of a torch file: what its pickle named and where its tensors were."""
    return {"torch_format": kind,
            "pickle_globals": sorted(set(up.globals_seen)),
            "records": sorted(set(up.records)),
            "storage_locations": sorted(up.locations),
            "storages": len(up.storages)}

