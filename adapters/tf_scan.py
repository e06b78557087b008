"""Code that TensorFlow runs when it loads a SavedModel: graph ops that call
back into Python (``PyFunc``, ``PyFuncStateless``, ``EagerPyFunc``: a
``tf.py_function``/``tf.numpy_function``) or touch files and the system
(``ReadFile``, ``WriteFile``, ``MatchingFiles`` ...). Found by decoding
``saved_model.pb`` by hand; TensorFlow is never imported.

Ground truth: ``tensorflow/core/protobuf/saved_model.proto`` (SavedModel:
2 = meta_graphs), ``meta_graph.proto`` (MetaGraphDef: 2 = graph_def),
``framework/graph.proto`` (GraphDef: 1 = node, 2 = library),
``framework/function.proto`` (FunctionDefLibrary: 1 = function; FunctionDef:
3 = node_def), ``framework/node_def.proto`` (NodeDef: 1 = name, 2 = op).
"""
from __future__ import annotations

from pathlib import Path

from ._io import decode_file, iter_fields

# op -> why it matters
CODE_OPS = {
    "PyFunc": "calls a Python function (tf.numpy_function / tf.py_func)",
    "PyFuncStateless": "calls a Python function (tf.numpy_function)",
    "EagerPyFunc": "calls a Python function (tf.py_function)",
    "ReadFile": "reads a file",
    "WriteFile": "writes a file",
    "MatchingFiles": "lists files",
    "DeleteFile": "deletes a file",
    "ImmutableConst": "maps a file into memory",
}
_MAX_PB = 1 << 31


def graph_ops(pb: bytes) -> list[tuple[str, str]]:
    """(op, node name) of every node in a SavedModel's graphs and functions."""
    found: list[tuple[str, str]] = []

    def node(buf):
        name = op = ""
        for f, w, v in iter_fields(buf):
            if f == 1 and w == 2:
                name = bytes(v).decode("utf-8", "replace")
            elif f == 2 and w == 2:
                op = bytes(v).decode("utf-8", "replace")
        found.append((op, name))

    def graph(buf):
        for f, w, v in iter_fields(buf):
            if f == 1 and w == 2:
                node(v)
            elif f == 2 and w == 2:            # FunctionDefLibrary
                for ff, fw, fv in iter_fields(v):
                    if ff == 1 and fw == 2:    # FunctionDef
                        for nf, nw, nv in iter_fields(fv):
                            if nf == 3 and nw == 2:
                                node(nv)

    for f, w, v in iter_fields(pb):
        if f == 2 and w == 2:                  # MetaGraphDef
            for mf, mw, mv in iter_fields(v):
                if mf == 2 and mw == 2:
                    graph(mv)
    return found


def code_on_load(path: Path) -> list[str]:
    """The ``scan`` hook's findings for a SavedModel (its folder or its
    ``saved_model.pb``); a checkpoint bundle has no graph."""
    pb = path / "saved_model.pb" if path.is_dir() else path
    if pb.name != "saved_model.pb" or not pb.is_file():
        return []
    ops = decode_file(pb, graph_ops, "a SavedModel protobuf", _MAX_PB)
    out = []
    for op in sorted({op for op, _ in ops if op in CODE_OPS}):
        nodes = sorted({n for o, n in ops if o == op})
        out.append(f"{pb.name}: graph op {op} ({CODE_OPS[op]}) in node {nodes[0]}"
                   + (f" and {len(nodes) - 1} more" if len(nodes) > 1 else ""))
    return out

