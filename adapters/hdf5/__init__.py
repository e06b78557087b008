"""HDF5 files: plain HDF5 (``hdf5``) and Keras weight files (``keras-h5``).

Sources of truth:

- The HDF5 file format specification (superblock signature
  ``\\x89HDF\\r\\n\\x1a\\n`` at offset 0, 512, 1024, 2048, ... when a user block
  precedes it) and h5py (``Dataset.id.get_offset`` / ``get_storage_size``:
  the absolute file offset and size of a contiguous dataset's raw bytes).
- Keras 2 layout: ``tf_keras/src/saving/legacy/hdf5_format.py``
  (``save_weights_to_hdf5_group``: root attribute ``layer_names``, one group
  per layer with attribute ``weight_names``, datasets at
  ``<layer>/<weight name>`` such as ``dense/dense/kernel:0``; a full model puts
  that under ``model_weights`` and the optimizer under ``optimizer_weights``;
  attributes above 64512 bytes are split into ``layer_names0``,
  ``layer_names1``, ...).
- Keras 3 layout: ``keras/src/saving/saving_lib.py`` (``H5IOStore``:
  ``layers/<path>/vars/<i>`` per object, ``vars/<i>`` for the model itself,
  ``optimizer/vars/<i>``; bfloat16 stored as 2-byte opaque with attribute
  ``dtype = "bfloat16"``; a ``.keras`` file is a zip holding
  ``metadata.json``, ``config.json`` and ``model.weights.h5``, stored).

Names. A tensor's name is its dataset path from the file root joined by "/"
(``dense/dense/kernel:0``, ``layers/dense/vars/0``,
``model_weights/d1/d1/kernel:0``), so what h5py shows is what ckptconv shows.
Keras files list tensors in Keras order (``layer_names`` / ``weight_names``,
``vars`` numerically); plain HDF5 in the file's link order. Attributes become
metadata: root attributes under their own name, others as ``PATH@ATTR``;
non-string attributes are JSON with their dtype kept in
``ckptconv.hdf5.attrs`` so a write restores them. Keras' own structural
attributes (``layer_names``, ``weight_names``) are regenerated, not copied.

Dtypes HDF5 lacks (bfloat16, float8_*, int4/uint4, complex32) are stored
bit-exact: the ``hdf5`` writer uses an unsigned integer dataset of the same
width, the ``keras-h5`` writer a same-width opaque dataset (what Keras 3 does
and reads back); both carry the attribute ``dtype = "<name>"``, which the
reader honours for either storage.

Laziness. Contiguous, unfiltered datasets become ``StoredTensor`` over the
file (bytes stream file-to-file); chunked, compressed or compact datasets are
``LazyTensor`` reading through h5py. A ``.keras`` member stored uncompressed is
read in place; a compressed one is inflated to an unlinked temporary file.

Writing plans the whole file with h5py (datasets allocated early, no fill),
closes it, then moves the tensor bytes to their offsets. ``hdf5`` keeps the
non-tensor tree in the root attribute ``ckptconv.tree``; ``keras-h5`` holds
weights only and says in its notes what it left out. Which Keras layout the
``keras-h5`` writer uses is decided by the names (see ``KerasH5Adapter``).

Modules: ``source`` (where the bytes are, ``.keras`` archives), ``read``,
``write``, ``keras`` (the Keras layouts and the ``keras-h5`` adapter).
"""
from __future__ import annotations

from pathlib import Path

from ckptconv.atomic import atomic_file
from ckptconv.registry import Adapter
from ckptconv.tensor import FileHandle
from ckptconv.tree import TREE_KEY, Checkpoint, iter_tensors, tree_to_metadata
from ckptconv.views import flat_format_losses

from .read import as_checkpoint, read_h5
from .source import H5Source, h5_errors
from .write import check_h5_names, metadata_without_ours, place_attributes, write_h5


class HDF5Adapter(Adapter):
    """Plain HDF5: every numeric dataset is a tensor named by its "/" path."""

    name = "hdf5"

    def scan(self, path: Path, report, **options) -> None:
        """``ckptconv scan``'s hook: each place that runs code on load outside pickles."""
        from ..keras_scan import code_on_load

        report.refuse_all(code_on_load(path))

    def read(self, path: Path, **options) -> Checkpoint:
        with h5_errors(path):
            src = H5Source(FileHandle(path))
            contents = read_h5(src)
            return as_checkpoint(contents, src, self.name, path)

    def losses(self, ckpt: Checkpoint, path: Path) -> list[str]:
        return flat_format_losses(ckpt)

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False, **options) -> dict:
        entries = list(iter_tensors(ckpt.tree))
        check_h5_names([n for n, _ in entries], path.name)
        names = {}
        for n, ref in entries:
            names.setdefault(id(ref), n)
        meta = metadata_without_ours(ckpt)
        meta.update(tree_to_metadata(ckpt, names))
        existing = {n for n, _ in entries}
        existing |= {"/".join(n.split("/")[:k]) for n in existing for k in range(1, n.count("/") + 1)}
        attrs = place_attributes(meta, existing.__contains__)
        with atomic_file(path, force) as tmp:
            write_h5(tmp, entries, attrs, opaque_special=False)
        notes = []
        if not ckpt.is_flat:
            notes.append(f"non-tensor entries kept in the root attribute '{TREE_KEY}'")
        if ckpt.aliases:
            notes.append(f"{len(ckpt.aliases)} tied tensors written as hard links")
        return {"files": [str(path)], "notes": notes}

