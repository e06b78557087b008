"""The ``torch`` format's adapter: sniffing, reading (zip, legacy, bare
pickle, sharded ``*.bin.index.json``), writing, and the torch-only verbs
``check``, ``sanitize`` and ``scan``'s layouts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptconv.paths import open_source
from ckptconv.errors import FormatError
from ckptconv.registry import Adapter
from ckptconv.tensor import TensorRef
from ckptconv.tree import Checkpoint

from .zip_reader import read_zip_checkpoint


class TorchAdapter(Adapter):
    name = "torch"

    def read(self, path: Path, allow_globals=None, **options) -> Checkpoint:
        """``allow_globals``: ``MODULE.NAME``s read as inert records in this run,
        beyond the shipped list (``known_globals.py``)."""
        allow = tuple(allow_globals or ())
        if path.name.endswith(".index.json"):
            return self._read_sharded(path, allow)
        with open_source(path) as f:
            head = f.read(16)
        if head.startswith(b"PK"):
            return read_zip_checkpoint(path, allow)
        from .legacy_reader import LEGACY_HEAD, is_bare_pickle, read_bare_pickle, read_legacy_checkpoint

        if head.startswith(LEGACY_HEAD):
            return read_legacy_checkpoint(path, allow)
        if is_bare_pickle(head, path):
            return read_bare_pickle(path, allow)
        raise FormatError(f"{path.name}: not a torch checkpoint")

    def _read_sharded(self, path: Path, allow_globals: tuple) -> Checkpoint:
        """``pytorch_model.bin.index.json`` + ``pytorch_model-0000K-of-0000N.bin`` shards."""
        from ckptconv.sharding import read_sharded

        values: dict[str, Any] = {}  # non-tensor entries of the shards (HF shards have none)

        def read_shard(p: Path):
            part = self.read(p, allow_globals)
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

    def verify(self, path: Path, **options):
        """``ckptconv verify``: the checks below, then every tensor read in full."""
        from ckptconv.integrity import verify_checkpoint

        return verify_checkpoint(path, self.name, self.check_integrity, **options)

    def check_integrity(self, path: Path, report) -> None:
        from .verify import verify_torch

        verify_torch(path, report)

    def losses(self, ckpt: Checkpoint, path: Path) -> list[str]:
        # "format" is safetensors' own marker ("pt"), not the checkpoint's
        keys = [k for k in ckpt.metadata if k != "format"]
        if not keys:
            return []
        return [f"metadata {', '.join(keys[:5])}" + (f" and {len(keys) - 5} more" if len(keys) > 5
                                                      else "")
                + ": a torch file has no string metadata"]

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False,
              torch_compat: str | None = None, **options) -> dict:
        from .writer import write_zip_checkpoint  # the writer only when writing

        return write_zip_checkpoint(ckpt, path, force, torch_compat)

    # --- torch-only verbs (adapter hooks) ------------------------------------

    def scan(self, path: Path, report, **options) -> None:
        """``ckptconv scan``: the layouts torch.load unpickles (zip, legacy, tar, bare pickle)."""
        from .scan import scan_torch

        scan_torch(path, report)

    def interpret_pickle(self, data: bytes, display: str, listing: list):
        """Judge one pickle that ``scan`` found anywhere, with torch's allowlist
        (the table's ``reads_pickles`` format): see ``check_pickle``."""
        from .unpickling import check_pickle

        return check_pickle(data, display, listing)

    def check(self, path: Path, **options):
        """``ckptconv check``: minimum torch, and what blocks ``weights_only=True``."""
        from .check import check_torch_file

        return check_torch_file(path, lambda p: self.read(p, **options))

    def sanitize(self, ckpt: Checkpoint, path: Path, force: bool = False,
                 torch_compat: str | None = None):
        """``ckptconv sanitize``: write ``ckpt`` so that ``weights_only=True`` loads it."""
        from .sanitize import sanitize_checkpoint

        return sanitize_checkpoint(ckpt, path, force, torch_compat)
