"""ckptconv: open any checkpoint, convert it losslessly, never run its code.

    import ckptconv
    ck = ckptconv.load("model.pt")                 # lazy Checkpoint
    ckptconv.convert("model.pt", "model.safetensors")
"""
from __future__ import annotations

__version__ = "0.1.0"

from .api import check, convert, inspect, load, load_into, save, scan, verify  # noqa: E402
from .errors import (  # noqa: E402
    CkptconvError, FormatError, IntegrityError, MappingError, MissingDependencyError,
    UnsafePickleError, UsageError)
from .tensor import ArrayTensor, LazyTensor, StoredTensor, TensorRef  # noqa: E402
from .tree import Checkpoint, ObjectRecord  # noqa: E402


def __getattr__(name):
    if name == "Mapping":
        from .mapping import Mapping

        return Mapping
    raise AttributeError(name)


__all__ = [
    "load", "save", "convert", "inspect", "load_into", "check", "verify", "scan", "Mapping",
    "Checkpoint", "ObjectRecord", "TensorRef", "StoredTensor", "ArrayTensor", "LazyTensor",
    "CkptconvError", "FormatError", "IntegrityError", "MappingError", "MissingDependencyError",
    "UnsafePickleError", "UsageError",
]
