"""TensorFlow checkpoints (the "tensor bundle" format), read and written
without TensorFlow.

A checkpoint is a *prefix* ``P``: ``P.index`` is a LevelDB-style SSTable
mapping tensor names to ``BundleEntryProto`` records (key ``""`` holds the
``BundleHeaderProto``), and ``P.data-0000K-of-0000N`` hold the raw bytes.
Sources of truth, all in tensorflow/tensorflow:

- ``core/util/tensor_bundle/tensor_bundle.{h,cc}`` and ``tensor_bundle.proto``
  (entries, shards, string tensor layout, masked crc32c of every tensor);
- ``core/lib/io/{table_builder,block_builder,format,block}.cc`` (SSTable:
  prefix-compressed keys with restart points, 5-byte block trailer of
  compression type + masked crc32c, 48-byte footer with the metaindex and
  index block handles and the magic 0xdb4775248b80fb57);
- ``core/util/saved_tensor_slice_util.cc`` + ``core/lib/strings/ordered_code.cc``
  (keys of the slices of partitioned variables);
- ``core/protobuf/trackable_object_graph.proto`` (TF2 object-based
  checkpoints store it serialized as the DT_STRING ``_CHECKPOINTABLE_OBJECT_GRAPH``);
- ``core/framework/types.proto`` (DataType numbers).

The tree of a TF checkpoint is a flat dict: stored name -> TensorRef, and
stored name -> bytes (or nested lists of bytes) for DT_STRING tensors.

ckptconv's own metadata (the non-tensor tree, tied names, the source format,
user metadata) is a JSON object stored in the index table's *metaindex*
block under the key ``ckptconv.metadata``: TensorFlow writes that block
empty and never reads it, so ``tf.train.list_variables`` and
``load_checkpoint`` show only the checkpoint's own variables. Files written by
ckptconv 0.1 kept it in a string tensor ``_CKPTCONV_METADATA``; it is still
read (and not shown as a tensor).

Modules: ``table`` (the SSTable), ``records`` (protobuf records, dtypes,
string tensors, slice keys), ``bundle`` (reading, verification),
``object_graph`` (TF2 names), ``writer``.
"""
from __future__ import annotations

from pathlib import Path

from ckptconv.registry import Adapter
from ckptconv.tree import Checkpoint
from ckptconv.views import flat_format_losses
from ckptconv.paths import as_path

from .bundle import check_bundle, read_bundle


class TFBundleAdapter(Adapter):
    name = "tf"

    def scan(self, path: Path, report, **options) -> None:
        """``ckptconv scan``'s hook: each place that runs code on load outside pickles."""
        from ..tf_scan import code_on_load

        report.refuse_all(code_on_load(path))

    def read(self, path: Path, verify: bool = False, **options) -> Checkpoint:
        return read_bundle(path, verify=verify)

    def verify(self, path: Path, **options):
        """``ckptconv verify``: the checks below, then every tensor read in full."""
        from ckptconv.integrity import verify_checkpoint

        return verify_checkpoint(path, self.name, self.check_integrity, **options)

    def check_integrity(self, path: Path, report) -> None:
        """Every tensor's crc32c, and the sizes, shards and slices of the index."""
        problems, entries = check_bundle(path)
        report.problems.extend(problems)
        report.count("tf entries (crc32c)", entries)

    def losses(self, ckpt: Checkpoint, path: Path) -> list[str]:
        return flat_format_losses(ckpt)

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False,
              shard_size: int | None = None, jobs: int = 1, **options) -> dict:
        from .writer import write_bundle

        return write_bundle(ckpt, as_path(path), force=force, shard_size=shard_size, jobs=jobs)

