"""ONNX models: the weights a graph carries.

Sources of truth: ``onnx/onnx.proto`` (``ModelProto``, ``GraphProto``,
``NodeProto``, ``AttributeProto``, ``TensorProto``, ``SparseTensorProto``),
``onnx/external_data_helper.py`` (``location``/``offset``/``length`` entries,
resolved relative to the model's folder) and the protobuf wire format
(https://protobuf.dev/programming-guides/encoding/).

Reading walks the serialized model with a small wire-format scanner over a
memory map (no protobuf object of the whole model is built), so it knows the
byte offset of every ``raw_data`` and makes those tensors ``StoredTensor``s
over the ``.onnx`` file itself; external data are ``StoredTensor``s over the
data file. Tensors held in typed fields (``float_data``, ``int64_data``, ...),
packed 4-bit tensors and the scalar/list forms of ``Constant``
(``value_float(s)``, ``value_int(s)``) are decoded lazily by ``onnx`` itself.

What is a weight, and its name:

- ``graph.initializer``: its own name.
- ``Constant`` nodes (``value``, ``sparse_value``, ``value_float(s)``,
  ``value_int(s)``): the node's output name.
- Weights inside subgraphs (``If`` branches, ``Loop``/``Scan`` bodies, any
  GRAPH/GRAPHS attribute, nested): the same, prefixed by the node path,
  ``<node name or OpType_index>/<attribute>/`` (``/<k>`` for GRAPHS lists),
  so names stay unique however the exporter named things.
- ``sparse_initializer`` / ``sparse_value``: a dense tensor, computed lazily
  from the values and indices (linear ``[NNZ]`` or coordinate ``[NNZ, rank]``).
- String tensors, ``FLOAT4E2M1``/2-bit types and ``functions`` are not
  weights ckptconv reads; they are listed in ``info['skipped']``.

``metadata_props`` become the checkpoint's metadata (and carry the
non-tensor tree when ckptconv wrote the file).

Writing: ``--to onnx`` writes a weights-only model (a graph of initializers,
each also a graph output and no nodes: ``onnx.checker`` accepts it and an
onnxruntime session returns the weights), streamed: the protobuf framing
is computed first, tensor bytes follow file-to-file. ``template=model.onnx``
replaces the weights of an existing graph by name instead (shapes and dtypes
must match); when every replaced tensor sits inline as ``raw_data`` the output
is the template's bytes with those ranges swapped (same length), otherwise the
model is rebuilt with ``onnx``. External data (``<name>.onnx.data`` next to
the model, tensors from 1 KB up, 4 KB aligned above 64 KB) is used when the
model would pass 2 GB or with ``external_data=True``.
"""
from __future__ import annotations

from pathlib import Path

from ckptconv.registry import Adapter
from ckptconv.tree import Checkpoint, tree_from_metadata
from ckptconv.views import flat_format_losses

from .read import scan_onnx


class OnnxAdapter(Adapter):
    name = "onnx"

    def scan(self, path: Path, report, **options) -> None:
        """``ckptconv scan``'s hook: each place that runs code on load outside pickles."""
        from ..onnx_scan import code_on_load

        report.refuse_all(code_on_load(path))

    def read(self, path: Path, **options) -> Checkpoint:
        scan = scan_onnx(path)
        tensors = {t.name: t.ref for t in scan.tensors}
        info = dict(scan.info)
        tree, meta = tree_from_metadata(tensors, scan.metadata, path.name, info)
        if scan.skipped:
            info["skipped"] = f"{len(scan.skipped)} not read: " + "; ".join(scan.skipped[:20])
        return Checkpoint(tree, meta, self.name, str(path), info)

    def losses(self, ckpt: Checkpoint, path: Path) -> list[str]:
        return flat_format_losses(ckpt)

    def write(self, ckpt: Checkpoint, path: Path, force: bool = False, template=None,
              external_data: bool = False, dedupe_tied: bool = False, **options) -> dict:
        from .write import write_onnx

        return write_onnx(ckpt, path, force=force, template=template,
                          external_data=external_data, dedupe_tied=dedupe_tied)
