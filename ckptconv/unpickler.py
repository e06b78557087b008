"""The restricted unpickler moved to the ``ckptconv.pickle`` package; this
name stays for adapters that import it (remove once none does)."""
from __future__ import annotations

from .pickle import *  # noqa: F401,F403
from .pickle import __all__  # noqa: F401
