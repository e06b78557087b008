"""ckptconv: open any checkpoint, convert it losslessly, never run its code.

    import ckptconv
    ck = ckptconv.load("model.pt")                 # lazy Checkpoint
    ckptconv.convert("model.pt", "model.safetensors")

Names are resolved on first use so that ``ckptconv --help`` starts without
importing numpy.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load": "api", "save": "api", "convert": "api", "inspect": "api", "load_into": "api",
    "load_state_dict": "api", "check": "api", "verify": "api", "scan": "api", "diff": "api",
    "sanitize": "api", "formats": "api", "presets": "api", "Mapping": "mapping", "Report": "reports",
    "ls": "api", "pick": "api", "prune": "api", "batch": "api",
    "Checkpoint": "tree", "ObjectRecord": "tree",
    "TensorRef": "tensor", "StoredTensor": "tensor", "ArrayTensor": "tensor", "LazyTensor": "tensor",
    "CkptconvError": "errors", "FormatError": "errors", "IntegrityError": "errors",
    "MappingError": "errors", "MissingDependencyError": "errors", "UnsafePickleError": "errors",
    "UsageError": "errors", "UnsupportedError": "errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in ("dtypes", "tree", "tensor", "registry", "errors", "api", "reports"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ckptconv' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
