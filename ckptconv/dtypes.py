"""Canonical dtypes: one name per element type, shared by every adapter.

Names follow torch (``float32``, ``bfloat16``, ``float8_e4m3fn``, ``uint16``);
each maps to a numpy dtype (ml_dtypes for the ones numpy lacks), to the
safetensors code and to torch's name. Sources of truth: safetensors' README
(dtype codes), ``torch/storage.py`` (``_dtype_to_storage_type_map``,
``_new_dtypes``), ml_dtypes.
"""
from __future__ import annotations

from functools import lru_cache

from ._lazy import ml_dtypes, np
from .errors import FormatError

_NUMPY: dict[str, object] = {}  # canonical name -> numpy dtype (or None), filled on first use


class DType:
    """One element type and its names in numpy, safetensors and legacy torch storages.

    Immutable; one instance per type (``DTYPES``). A plain class rather than a
    frozen dataclass: this module is imported by every load, and a frozen
    dataclass costs ~1 ms to create."""

    __slots__ = ("name", "itemsize", "numpy_type", "safetensors", "storage_class")
    name: str            # canonical (torch) name
    itemsize: int        # bytes per element; sub-byte types are packed
    numpy_type: str | None  # "numpy.<t>" or "ml_dtypes.<t>" (resolved lazily: see ``numpy``)
    safetensors: str | None
    storage_class: str | None  # legacy torch.<X>Storage name, if any

    def __init__(self, name: str, itemsize: int, numpy_type: str | None, safetensors: str | None,
                 storage_class: str | None = None):
        for slot, value in zip(self.__slots__, (name, itemsize, numpy_type, safetensors,
                                                 storage_class)):
            object.__setattr__(self, slot, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"DType is immutable: cannot set {name}")

    def _key(self) -> tuple:
        return (self.name, self.itemsize, self.numpy_type, self.safetensors, self.storage_class)

    def __eq__(self, other) -> bool:
        return self is other or (type(other) is DType and self._key() == other._key())

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return "DType(" + ", ".join(f"{s}={getattr(self, s)!r}" for s in self.__slots__) + ")"

    def __reduce__(self):
        return (DType, self._key())

    def __str__(self) -> str:
        return self.name

    @property
    def numpy(self) -> np.dtype | None:
        """The numpy dtype (ml_dtypes for types numpy lacks), or None;
        numpy is imported on the first call (conversions that only copy bytes never ask)."""
        try:
            return _NUMPY[self.name]
        except KeyError:
            pass
        dt = None
        if self.numpy_type is not None:
            module, _, attr = self.numpy_type.partition(".")
            t = getattr(np if module == "numpy" else ml_dtypes, attr, None)
            dt = None if t is None else np.dtype(t)
        _NUMPY[self.name] = dt
        return dt


_ALL = [
    DType("float64", 8, "numpy.float64", "F64", "DoubleStorage"),
    DType("float32", 4, "numpy.float32", "F32", "FloatStorage"),
    DType("float16", 2, "numpy.float16", "F16", "HalfStorage"),
    DType("bfloat16", 2, "ml_dtypes.bfloat16", "BF16", "BFloat16Storage"),
    DType("float8_e4m3fn", 1, "ml_dtypes.float8_e4m3fn", "F8_E4M3"),
    DType("float8_e5m2", 1, "ml_dtypes.float8_e5m2", "F8_E5M2"),
    DType("float8_e4m3fnuz", 1, "ml_dtypes.float8_e4m3fnuz", "F8_E4M3FNUZ"),
    DType("float8_e5m2fnuz", 1, "ml_dtypes.float8_e5m2fnuz", "F8_E5M2FNUZ"),
    DType("float8_e8m0fnu", 1, "ml_dtypes.float8_e8m0fnu", "F8_E8M0"),
    DType("int64", 8, "numpy.int64", "I64", "LongStorage"),
    DType("int32", 4, "numpy.int32", "I32", "IntStorage"),
    DType("int16", 2, "numpy.int16", "I16", "ShortStorage"),
    DType("int8", 1, "numpy.int8", "I8", "CharStorage"),
    DType("uint64", 8, "numpy.uint64", "U64"),
    DType("uint32", 4, "numpy.uint32", "U32"),
    DType("uint16", 2, "numpy.uint16", "U16"),
    DType("uint8", 1, "numpy.uint8", "U8", "ByteStorage"),
    DType("bool", 1, "numpy.bool_", "BOOL", "BoolStorage"),
    DType("complex128", 16, "numpy.complex128", "C128", "ComplexDoubleStorage"),
    DType("complex64", 8, "numpy.complex64", "C64", "ComplexFloatStorage"),
    DType("complex32", 4, "ml_dtypes.complex32", None),
    DType("int4", 1, "ml_dtypes.int4", None),
    DType("uint4", 1, "ml_dtypes.uint4", None),
]

DTYPES: dict[str, DType] = {d.name: d for d in _ALL}

# Other spellings users and formats use for the same types.
_ALIASES = {
    "float": "float32", "double": "float64", "half": "float16", "long": "int64",
    "int": "int32", "short": "int16", "bf16": "bfloat16", "fp16": "float16",
    "fp32": "float32", "fp64": "float64", "f32": "float32", "f16": "float16",
    "fp8": "float8_e4m3fn", "float8_e4m3": "float8_e4m3fn", "cfloat": "complex64",
    "cdouble": "complex128", "chalf": "complex32", "bool_": "bool",
}


def get(name: str | DType) -> DType:
    """The canonical DType for a name (torch, numpy, safetensors or alias)."""
    if isinstance(name, DType):
        return name
    key = str(name).removeprefix("torch.").removeprefix("numpy.")
    if key in DTYPES:
        return DTYPES[key]
    low = key.lower()
    if low in _ALIASES:
        return DTYPES[_ALIASES[low]]
    st = _by_safetensors().get(key.upper())
    if st is not None:
        return st
    raise FormatError(f"unknown dtype '{name}'; known: {', '.join(DTYPES)}")


@lru_cache(maxsize=None)
def _by_safetensors() -> dict[str, DType]:
    return {d.safetensors: d for d in _ALL if d.safetensors}


def from_safetensors(code: str) -> DType:
    try:
        return _by_safetensors()[code]
    except KeyError:
        raise FormatError(f"unknown safetensors dtype '{code}'") from None


@lru_cache(maxsize=None)
def _by_numpy() -> dict[np.dtype, DType]:
    out = {}
    for d in reversed(_ALL):
        if d.numpy is not None:
            out[d.numpy] = d
    return out


def from_numpy(dtype) -> DType:
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _by_numpy()[dt]
    except KeyError:
        raise FormatError(f"numpy dtype '{dt}' has no tensor equivalent") from None


def from_storage_class(name: str) -> DType:
    """``FloatStorage`` -> float32 (legacy typed storages of torch.save)."""
    for d in _ALL:
        if d.storage_class == name:
            return d
    raise FormatError(f"unknown storage type 'torch.{name}'")


def numpy_dtype(name: str | DType) -> np.dtype:
    d = get(name)
    if d.numpy is None:
        raise FormatError(f"dtype '{d.name}' has no numpy equivalent")
    return d.numpy


def numpy_descr_holds_objects(descr, undecided: bool = True) -> bool:
    """Whether numpy reads a ``.npy`` header's ``descr`` as a dtype holding Python
    objects: ``np.save`` pickles such an array after the header and
    ``np.load(allow_pickle=True)`` unpickles it. numpy's own ``descr_to_dtype``
    (what ``np.load`` calls on the header) decides, so every spelling it takes
    counts ('|O', 'O8', '<O', 'object', a field of one): a scanner that read the
    header otherwise would call such a file safe. A descr numpy refuses gives
    ``undecided`` (``np.load`` would refuse the file)."""
    from numpy.lib.format import descr_to_dtype

    try:
        return bool(descr_to_dtype(descr).hasobject)
    except Exception:  # noqa: BLE001 - whatever numpy raises on a header it refuses
        return undecided
