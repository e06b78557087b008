"""numpy (and ml_dtypes), imported on first use.

A plain file-to-file conversion never touches an array: the modules on that
path refer to ``np`` through this proxy, so such a run does not pay numpy's
import (about a twentieth of converting 2 GiB). The first attribute read
imports the module and copies its namespace into the proxy, so later reads
are ordinary attribute lookups.
"""
from __future__ import annotations

import importlib
import sys


class LazyModule:
    def __init__(self, name: str):
        self.__dict__["_lazy_name"] = name

    def __getattr__(self, attr: str):
        mod = importlib.import_module(self.__dict__["_lazy_name"])
        self.__dict__.update(mod.__dict__)
        return getattr(mod, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_lazy_name']}>"


np = LazyModule("numpy")
ml_dtypes = LazyModule("ml_dtypes")


def numpy_loaded() -> bool:
    """Whether numpy is imported (by anyone): a numpy value can exist only then."""
    return "numpy" in sys.modules
