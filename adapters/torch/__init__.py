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
from .legacy_reader import LEGACY_HEAD, LEGACY_MAGIC, read_bare_pickle, read_legacy_checkpoint
from .unpickling import TorchUnpickler, check_pickle
from .weights_only import DTYPE_MIN_TORCH
from .zip_reader import read_torch_blob, read_zip_checkpoint

__all__ = ["TorchAdapter", "TorchUnpickler", "check_pickle", "read_zip_checkpoint", "read_torch_blob",
           "read_legacy_checkpoint", "read_bare_pickle", "write_zip_checkpoint", "write_zip_archive",
           "LEGACY_HEAD",
           "LEGACY_MAGIC", "DTYPE_MIN_TORCH"]


def __getattr__(name: str):
    """The writer's names, imported when first asked for (a read never needs them)."""
    if name in ("write_zip_archive", "write_zip_checkpoint"):
        from . import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
