"""What each torch release can load: the weights-only loader's allowlist and
opcodes by version, and the first release that has each dtype and rebuild
function.

Sources of truth, read from each torch of the matrix (tox.ini):
``torch/_weights_only_unpickler.py`` (``_get_allowed_globals`` and the opcodes
``Unpickler.load`` understands: what ``torch.load with weights_only=True``, the
default since torch 2.6, accepts), ``torch/_utils.py`` (which ``_rebuild_*``
functions exist), ``torch/storage.py`` (dtypes). The tables below are those
sources transcribed; ``tests/compat`` compares them with the real torch in
every env of the matrix, in both directions (what we say loads does, what we
say fails does).
"""
from __future__ import annotations

from ckptconv.errors import UsageError

Version = tuple[int, int]

# --- torch's weights_only allowlist, by version -----------------------------------

# Legacy tensor/storage type names (torch._tensor_classes, torch._storage_classes).
_TENSOR_TYPES = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long",
                 "Short")
_STORAGE_TYPES = _TENSOR_TYPES + ("ComplexDouble", "ComplexFloat")
_QSTORAGE_TYPES = ("QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8")


def _names(pattern: str, items) -> set[str]:
    return {pattern.format(x) for x in items}


# torch 1.13.1 ``_get_allowed_globals()``: exactly these names.
_ALLOW_1_13 = frozenset(
    {"collections.OrderedDict", "torch.nn.parameter.Parameter", "torch.serialization._get_layout",
     "torch.Size", "torch.Tensor", "torch.storage.TypedStorage", "torch.storage.UntypedStorage"}
    | _names("torch.{}", ("complex32", "complex64", "complex128", "float16", "float32", "float64",
                          "int8", "int16", "int32", "int64"))
    | _names("torch.{}Tensor", _TENSOR_TYPES) | _names("torch.cuda.{}Tensor", _TENSOR_TYPES)
    | _names("torch.sparse.{}Tensor", _TENSOR_TYPES[:1] + _TENSOR_TYPES[2:])
    | _names("torch.cuda.sparse.{}Tensor", _TENSOR_TYPES[:1] + _TENSOR_TYPES[2:])
    | _names("torch.{}Storage", _STORAGE_TYPES + _QSTORAGE_TYPES)
    | _names("torch.cuda.{}Storage", _STORAGE_TYPES)
    | _names("torch._utils.{}", ("_rebuild_meta_tensor_no_storage", "_rebuild_parameter",
                                 "_rebuild_sparse_csr_tensor", "_rebuild_sparse_tensor",
                                 "_rebuild_tensor", "_rebuild_tensor_v2")))

# What each later release changed (added, removed), read from its source.
_ALLOW_CHANGES: list[tuple[Version, set[str], set[str]]] = [
    ((2, 0), {"torch._tensor._rebuild_from_type_v2"}, {"torch._utils._rebuild_sparse_csr_tensor"}),
    ((2, 4), {"collections.Counter", "torch.device", "torch.bfloat16", "torch.bool", "torch.uint8",
              "torch.float8_e4m3fn", "torch.float8_e4m3fnuz", "torch.float8_e5m2",
              "torch.float8_e5m2fnuz", "torch.qint32", "torch.qint8", "torch.quint2x4",
              "torch.quint4x2", "torch.quint8"}
     | _names("torch.bits{}", ("16", "1x8", "2x4", "4x2", "8"))
     | _names("torch.{}", ("per_channel_affine", "per_channel_affine_float_qparams",
                           "per_channel_symmetric", "per_tensor_affine", "per_tensor_symmetric"))
     | _names("torch._utils.{}", ("_rebuild_nested_tensor", "_rebuild_parameter_with_state",
                                  "_rebuild_qtensor", "_rebuild_tensor_v3",
                                  "_rebuild_wrapper_subclass")), set()),
    ((2, 6), {"_codecs.encode", "builtins.bytearray", "builtins.complex", "builtins.set",
              "torch._utils._rebuild_device_tensor_from_cpu_tensor",
              "torch._utils._rebuild_device_tensor_from_numpy", "torch.uint16", "torch.uint32",
              "torch.uint64"}, set()),
    ((2, 13), {"torch.float4_e2m1fn_x2", "torch.float8_e8m0fnu"}
     | _names("torch.int{}", range(1, 8)) | _names("torch.uint{}", range(1, 8)), set()),
    ((2, 14), {"torch.bcomplex32"}, set()),
]

# The opcodes torch's weights-only Unpickler.load understands (protocol 2, as
# torch.save writes). 1.13 lacks BINFLOAT: no Python float loads there.
_OPS_1_13 = frozenset({
    "APPEND", "APPENDS", "BINGET", "BININT", "BININT1", "BININT2", "BINPERSID", "BINPUT",
    "BINUNICODE", "BUILD", "EMPTY_DICT", "EMPTY_LIST", "EMPTY_SET", "EMPTY_TUPLE", "GLOBAL",
    "LONG1", "LONG_BINGET", "LONG_BINPUT", "MARK", "NEWFALSE", "NEWOBJ", "NEWTRUE", "NONE",
    "PROTO", "REDUCE", "SETITEM", "SETITEMS", "SHORT_BINSTRING", "STOP", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3"})
_OPS_CHANGES: list[tuple[Version, set[str]]] = [((2, 0), {"BINFLOAT"})]

# The torch releases the matrix runs (tox.ini); reports speak of these.
MATRIX: tuple[Version, ...] = ((1, 13), (2, 0), (2, 4), (2, 6), (2, 13), (2, 14))
WEIGHTS_ONLY_DEFAULT: Version = (2, 6)  # torch.load with weights_only=True by default since


def weights_only_allowlist(version: Version) -> frozenset[str]:
    """The globals ``torch.load with weights_only=True`` of ``version`` accepts (transcribed)."""
    names = set(_ALLOW_1_13)
    for since, added, removed in _ALLOW_CHANGES:
        if version >= since:
            names = (names | added) - removed
    return frozenset(names)


def weights_only_opcodes(version: Version) -> frozenset[str]:
    ops = set(_OPS_1_13)
    for since, added in _OPS_CHANGES:
        if version >= since:
            ops |= added
    return frozenset(ops)


# --- what a file needs to load at all ---------------------------------------------

ZIP_MIN_TORCH: Version = (1, 6)
# functions a pickle may name that older torch does not have (torch/_utils.py)
GLOBAL_MIN_TORCH: dict[str, Version] = {
    "torch._utils._rebuild_tensor_v3": (2, 1),  # dtypes without a typed storage (fp8, uint16..)
    "torch._utils._rebuild_parameter_with_state": (2, 0),
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": (2, 6),
}

# the first torch release that has each dtype (for --torch-compat and `check`)
DTYPE_MIN_TORCH: dict[str, Version] = {
    "bfloat16": (1, 10), "float8_e4m3fn": (2, 1), "float8_e5m2": (2, 1),
    "float8_e4m3fnuz": (2, 2), "float8_e5m2fnuz": (2, 2), "float8_e8m0fnu": (2, 7),
    "uint16": (2, 3), "uint32": (2, 3), "uint64": (2, 3), "complex32": (1, 9)}


def parse_version(v: str | Version | None) -> Version | None:
    if v is None or isinstance(v, tuple):
        return v
    try:
        parts = [int(x) for x in str(v).split("+")[0].split(".")[:2]]
    except ValueError:
        raise UsageError(f"'{v}' is not a torch version like 2.6") from None
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def fmt_version(v: Version | None) -> str | None:
    return None if v is None else f"{v[0]}.{v[1]}"

