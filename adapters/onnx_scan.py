"""ONNX models whose nodes come from custom-op domains: the runtime runs
them with code from a library or a Python function registered by whoever
loads the model (onnxruntime-extensions' ``ai.onnx.contrib`` PyOp calls
Python), not with the operators the ONNX spec defines.

Ground truth: ``onnx/defs`` (the standard domains), onnxruntime's contrib
op domains (``com.microsoft``, built into the runtime).
"""
from __future__ import annotations

from pathlib import Path

from ckptconv.errors import FormatError

STANDARD_DOMAINS = frozenset(("", "ai.onnx", "ai.onnx.ml", "ai.onnx.training",
                              "ai.onnx.preview.training", "com.microsoft", "com.microsoft.nchwc",
                              "com.microsoft.experimental", "com.ms.internal.nhwc"))


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def code_on_load(path: Path) -> list[str]:
    """The ``scan`` hook's findings for an ONNX model."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf errors vary by version
        raise FormatError(f"{path.name}: not an ONNX model ({e})") from None
    found: dict[str, list[str]] = {}
    for graph in _graphs(model.graph):
        for node in graph.node:
            if node.domain not in STANDARD_DOMAINS:
                found.setdefault(node.domain, []).append(node.op_type)
    for opset in model.opset_import:
        if opset.domain not in STANDARD_DOMAINS:
            found.setdefault(opset.domain, [])
    for f in model.functions:
        if f.domain not in STANDARD_DOMAINS:
            found.setdefault(f.domain, []).append(f.name)
    return [f"{path.name}: custom-op domain '{d}'"
            + (f" (ops {', '.join(sorted(set(ops))[:5])})" if ops else "")
            + ": its ops run code the loader registers, not ONNX operators"
            for d, ops in sorted(found.items())]

