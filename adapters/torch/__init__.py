"""PyTorch checkpoints (``torch.save``): the zip format (torch >= 1.6), the
legacy format (magic number + pickles + raw storages), bare pickles and
TorchScript archives, read without torch and without executing the pickle;
torch zip files written; ``check`` and ``sanitize`` for torch's
``weights_only`` loader.

Modules, by concern: ``unpickling`` (the torch allowlist over the restricted
pickle engine), ``zip_reader``, ``legacy_reader`` (legacy and bare pickles),
``writer``, ``weights_only`` (what each torch release loads), ``check``,
``sanitize``, ``scan`` (the layouts ``ckptconv scan`` judges), ``adapter``
(the registry's entry point).

The names below are the stable import path for other adapters that read
torch blobs (DCP, DeepSpeed): import them from ``ckptconv.adapters.torch``.
"""
from __future__ import annotations

from .adapter import TorchAdapter
from .unpickling import TorchUnpickler, check_pickle
from .zip_reader import read_torch_blob, read_zip_checkpoint

# names imported when first asked for: reading a zip .pt needs none of them
_LAZY = {"write_zip_archive": "writer", "write_zip_checkpoint": "writer",
         "read_legacy_checkpoint": "legacy_reader", "read_bare_pickle": "legacy_reader",
         "LEGACY_HEAD": "legacy_reader", "LEGACY_MAGIC": "legacy_reader",
         "DTYPE_MIN_TORCH": "weights_only"}

__all__ = ["TorchAdapter", "TorchUnpickler", "check_pickle", "read_zip_checkpoint", "read_torch_blob",
           *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
