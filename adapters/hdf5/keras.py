"""Keras weight files: Keras 2 ``.h5`` (weights or full model), Keras 3
``.weights.h5`` and ``.keras`` archives.

Sources of truth: ``tf_keras/src/saving/legacy/hdf5_format.py``
(``save_weights_to_hdf5_group``: root attribute ``layer_names``, one group
per layer with attribute ``weight_names``, datasets at
``<layer>/<weight name>`` such as ``dense/dense/kernel:0``; a full model puts
that under ``model_weights`` and the optimizer under ``optimizer_weights``;
attributes above 64512 bytes are split into ``layer_names0``,
``layer_names1``, ...) and ``keras/src/saving/saving_lib.py`` (``H5IOStore``:
``layers/<path>/vars/<i>`` per object, ``vars/<i>`` for the model itself,
``optimizer/vars/<i>``; bfloat16 stored as 2-byte opaque with attribute
``dtype = "bfloat16"``).
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

from ckptconv._lazy import np

from ckptconv.atomic import atomic_file
from ckptconv.errors import FormatError, UnsupportedError
from ckptconv.registry import Adapter
from ckptconv.paths import open_source
from ckptconv.reports import name_list
from ckptconv.tensor import FileHandle, FileSource, StoredTensor, TensorRef
from ckptconv.tree import Checkpoint, iter_leaves, iter_tensors, join_path
from ckptconv.views import record_views
from ckptconv.zipstream import ZipWriter, check_member_crcs
from ckptconv.ziputil import is_zip

from .read import as_checkpoint, read_h5
from ..sniffers import keras_layout, keras_list_attr
from .source import KERAS_ARCHIVE_JSON, KERAS_WEIGHTS_MEMBER, H5Source, h5_errors, open_keras_archive
from .keras_names import keras2_to_keras3
from .write import check_h5_names, metadata_without_ours, place_attributes, write_h5

KERAS_STRUCTURAL = re.compile(r"^(layer_names|weight_names)\d*$")
KERAS_HEADER_LIMIT = 64512              # tf_keras HDF5_OBJECT_HEADER_LIMIT
DEFAULT_KERAS2_VERSION = "2.15.0"       # keras_version "1" (absent) would trigger Keras 1 fixes
_KERAS3_NAME = re.compile(r"(^|.*/)vars/\d+$")


def _keras2_order(f, layout: str) -> list[str]:
    """Dataset paths in Keras' own order: layers, their weights, then the optimizer's."""
    import h5py

    root_name = "model_weights" if layout == "keras2-model" else ""
    root = f[root_name] if root_name else f
    prefix = f"{root_name}/" if root_name else ""
    order = []
    for layer in (keras_list_attr(root, "layer_names") or []) + ["top_level_model_weights"]:
        g = root.get(layer)
        if isinstance(g, h5py.Group):
            order += [f"{prefix}{layer}/{w}" for w in keras_list_attr(g, "weight_names") or []]
    opt = f.get("optimizer_weights")
    if isinstance(opt, h5py.Group):
        order += [f"optimizer_weights/{w}" for w in keras_list_attr(opt, "weight_names") or []]
    return order





class KerasH5Adapter(Adapter):
    """Keras weight files: Keras 2 ``.h5`` (weights or full model), Keras 3
    ``.weights.h5`` and ``.keras`` archives.

    The writer picks the layout from the names:

    - every name ends in ``vars/<i>`` (``layers/dense/vars/0``): Keras 3, for
      ``model.load_weights('x.weights.h5')``; a ``.keras`` target becomes the
      archive (with ``config.json``/``metadata.json`` when the source had them).
    - otherwise Keras 2 (``tf_keras`` ``load_weights``, which matches layers by
      order, or by name with ``by_name=True``). The name is the dataset path:
      its first segment is the layer group, the rest the weight name listed
      in ``weight_names`` (``d1/d1/kernel:0``: layer ``d1``, weight
      ``d1/kernel:0``, as Keras writes it; ``d1/kernel`` gives weight
      ``kernel``). A name without "/" is split at its last "."
      (``fc.weight`` -> ``fc/weight``; ``x`` -> ``x/x``). Names under
      ``model_weights/`` and ``optimizer_weights/`` give the full-model
      layout. Layers keep the order of first appearance.
    """

    name = "keras-h5"

    def scan(self, path: Path, report, **options) -> None:
        """``ckptconv scan``'s hook: each place that runs code on load outside pickles."""
        from ..keras_scan import code_on_load

        report.refuse_all(code_on_load(path))

    def read(self, path: Path, **options) -> Checkpoint:
        with h5_errors(path):
            return self._read(path)

    def _read(self, path: Path) -> Checkpoint:
        extra_meta: dict[str, str] = {}
        if _is_zip_file(path):
            src, extra_meta = open_keras_archive(path)
            container = "keras archive"
        else:
            src = H5Source(FileHandle(path))
            container = "h5"
        layout = keras_layout(src.file)
        if layout is None:
            raise FormatError(f"{src.display}: HDF5 file without a Keras weight layout "
                              "(no layer_names, model_weights or layers/*/vars); read it as hdf5")
        order = _keras2_order(src.file, layout) if layout.startswith("keras2") else None
        contents = read_h5(src, order, skip_attr=KERAS_STRUCTURAL.match,
                           numeric_vars=layout == "keras3")
        return as_checkpoint(contents, src, self.name, path, extra_meta,
                           {"layout": layout, "container": container})

    def verify(self, path: Path, **options):
        """``ckptconv verify``: the checks below, then every tensor read in full."""
        from ckptconv.integrity import verify_checkpoint

        return verify_checkpoint(path, self.name, self.check_integrity, **options)

    def check_integrity(self, path: Path, report) -> None:
        """A ``.keras`` archive: every member's CRC-32. HDF5 has no checksums of
        its own (unless filtered with fletcher32, which h5py checks on read)."""
        if _is_zip_file(path):
            problems, members = check_member_crcs(path)
            report.problems.extend(problems)
            report.count("zip members (crc32)", members)
        else:
            report.notes.append("HDF5 carries no checksums of its own: every dataset is read "
                                "in full; use convert --manifest for end-to-end checks")

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False, **options) -> dict:
        entries = list(iter_tensors(ckpt.tree))
        if not entries:
            raise UnsupportedError(f"{path.name}: no tensors to write")
        # Keras' structural attributes are regenerated from the names (an hdf5
        # read of a Keras file carries stale copies in its metadata)
        meta = {k: v for k, v in metadata_without_ours(ckpt).items()
                if not KERAS_STRUCTURAL.match(k.rpartition("@")[2])}
        archive = path.name.endswith(".keras")
        keras3 = all(_KERAS3_NAME.match(n) for n, _ in entries)
        notes = []
        if keras3:
            datasets, attrs = self._keras3_plan(entries, meta, archive)
        elif archive or path.name.endswith(".weights.h5"):
            # Keras 3 loads these names only: map the Keras 2 layout
            datasets, attrs = keras2_to_keras3(entries, meta, path.name)
            keras3 = True
            notes.append("Keras 2 names mapped to the Keras 3 layout (layers by class, from "
                         "model_config)")
        else:
            datasets, attrs = self._keras2_plan(entries, meta)
        check_h5_names([p for p, _ in datasets], path.name)
        if archive:
            notes += self._write_archive(path, datasets, attrs, meta, force)
        else:
            with atomic_file(path, force) as tmp:
                write_h5(tmp, datasets, attrs, opaque_special=True)
        notes.append(f"Keras {'3' if keras3 else '2'} layout")
        return {"files": [str(path)], "notes": notes}

    def losses(self, ckpt: Checkpoint, path: Path) -> list[str]:
        """Keras files hold weights only: no other values, no tree, no views;
        a Keras 3 file mapped from Keras 2 names has no optimizer state."""
        lost = []
        values = [join_path(p) or "(root)" for p, v in iter_leaves(ckpt.tree)
                  if not isinstance(v, TensorRef)]
        if values:
            lost.append(f"{name_list(values, 10)}: keras-h5 holds weights only")
        elif not ckpt.is_flat:
            lost.append("the tree structure (keras-h5 holds flat weights only)")
        attrs = sorted(vars(ckpt.tree)) if isinstance(ckpt.tree, OrderedDict) else []
        if attrs:
            lost.append(f"{', '.join(attrs)} (attributes of the state dict, e.g. the per-module "
                        "versions load_state_dict passes to hooks): keras-h5 has no place for them")
        if record_views(ckpt.unique_tensors().items())[0]:
            lost.append("storage sharing, strides and requires_grad/Parameter flags "
                        "(keras-h5 has no place for them)")
        names = [n for n, _ in iter_tensors(ckpt.tree)]
        if path.name.endswith((".weights.h5", ".keras")) and \
                not all(_KERAS3_NAME.match(n) for n in names):
            opt = [n for n in names if n.startswith("optimizer_weights/")]
            if opt:
                lost.append(f"{name_list(opt, 5)}: Keras 3 keeps optimizer state in another layout")
        return lost

    @staticmethod
    def _keras3_plan(entries, meta: dict[str, str], archive: bool):
        datasets = list(entries)
        if archive:
            meta = {k: v for k, v in meta.items() if k not in KERAS_ARCHIVE_JSON}
        existing = {p.rsplit("/", 1)[0] for p, _ in datasets}
        existing |= {"/".join(p.split("/")[:k]) for p in existing for k in range(1, p.count("/") + 1)}
        return datasets, place_attributes(meta, existing.__contains__)

    @staticmethod
    def _keras2_plan(entries, meta: dict[str, str]):
        layers: dict[tuple[str, str], list[str]] = {}   # (root, layer) -> weight names
        datasets: list[tuple[str, TensorRef]] = []
        optimizer: list[str] = []
        full = any(n.startswith(("model_weights/", "optimizer_weights/")) for n, _ in entries)
        for name, ref in entries:
            if name.startswith("optimizer_weights/"):
                w = name[len("optimizer_weights/"):]
                optimizer.append(w)
                datasets.append((name, ref))
                continue
            root = "model_weights" if full else ""
            rel = name[len("model_weights/"):] if name.startswith("model_weights/") else name
            if "/" not in rel:          # fc.weight -> layer fc, weight "weight"
                layer, _, last = rel.rpartition(".")
                rel = f"{layer}/{last}" if layer else f"{rel}/{rel}"
            layer, _, weight = rel.partition("/")
            layers.setdefault((root, layer), []).append(weight)
            datasets.append((f"{root}/{layer}/{weight}" if root else f"{layer}/{weight}", ref))
        attrs: dict[str, dict] = {}
        roots = ["model_weights"] if full else [""]
        for root in roots:
            names = [layer for (r, layer) in layers if r == root and layer != "top_level_model_weights"]
            group = attrs.setdefault(root, {})
            group.update(_keras_chunked("layer_names", names))
            group.setdefault("backend", meta.get(f"{root}@backend" if root else "backend", "tensorflow"))
            group.setdefault("keras_version", meta.get(f"{root}@keras_version" if root else "keras_version",
                                                       DEFAULT_KERAS2_VERSION))
        for (root, layer), weights in layers.items():
            attrs.setdefault(f"{root}/{layer}" if root else layer, {}).update(
                _keras_chunked("weight_names", weights))
        if optimizer:
            attrs.setdefault("optimizer_weights", {}).update(_keras_chunked("weight_names", optimizer))
        existing = set(attrs) | {p for p, _ in datasets}
        rest = place_attributes(meta, existing.__contains__)
        for path, items in rest.items():
            for k, v in items.items():
                attrs.setdefault(path, {}).setdefault(k, v)
        return datasets, attrs

    def _write_archive(self, path: Path, datasets, attrs, meta: dict[str, str], force: bool) -> list[str]:
        notes = []
        members = {}
        for name in KERAS_ARCHIVE_JSON:
            if name in meta:
                members[name] = meta[name]
        if "metadata.json" not in members:
            members["metadata.json"] = json.dumps({"keras_version": "3", "date_saved": "",
                                                   "saved_by": "ckptconv"})
        if "config.json" not in members:
            notes.append("no config.json in the source: the archive loads with "
                         "model.load_weights(), not keras.saving.load_model()")
        with atomic_file(path, force) as tmp:
            h5_tmp = tmp.with_name(tmp.name + ".weights.h5")
            try:
                write_h5(h5_tmp, datasets, attrs, opaque_special=True)
                size = h5_tmp.stat().st_size
                h5_bytes = StoredTensor("uint8", (size,), FileSource(FileHandle(h5_tmp), 0, size))
                zw = ZipWriter(tmp)     # stored, 64-byte aligned: read in place afterwards
                try:
                    for name, text in members.items():
                        zw.add_bytes(name, text.encode("utf-8"))
                    zw.add_tensor_bytes(KERAS_WEIGHTS_MEMBER, size, [h5_bytes])
                finally:
                    zw.close()
            finally:
                if h5_tmp.exists():
                    h5_tmp.unlink()
        return notes


def _is_zip_file(path: Path) -> bool:
    with open_source(path) as f:  # a local file or a URL (one small range request)
        return is_zip(f.read(4))


def _keras_chunked(name: str, values: list[str]) -> dict[str, np.ndarray]:
    """tf_keras ``save_attributes_to_hdf5_group``: fixed-length byte strings,
    split into ``name0``, ``name1``, ... above the object-header limit."""
    data = np.asarray([v.encode("utf-8") for v in values]) if values else np.asarray([], dtype="S1")
    chunks = 1
    parts = [data]
    while any(p.nbytes > KERAS_HEADER_LIMIT for p in parts):
        chunks += 1
        parts = np.array_split(data, chunks)
    if chunks == 1:
        return {name: data}
    return {f"{name}{k}": p for k, p in enumerate(parts)}


