"""TF2 object-based checkpoints: names from the ``TrackableObjectGraph``.

Source of truth: ``tensorflow/core/protobuf/trackable_object_graph.proto``;
TF stores the graph serialized as the DT_STRING tensor
``_CHECKPOINTABLE_OBJECT_GRAPH``.
"""
from __future__ import annotations

from collections import deque
from typing import Any

from .._io import bytes_value, iter_fields, varint_value

OBJECT_GRAPH_TENSOR = "_CHECKPOINTABLE_OBJECT_GRAPH"


def object_paths(graph: bytes) -> tuple[dict[str, str], dict[str, str]]:
    """From a serialized TrackableObjectGraph: checkpoint key -> readable object
    path (``model.layer_with_weights-0.kernel``; optimizer slots read
    ``optimizer.m[model.dense.kernel]``), and checkpoint key -> the variable's
    own name (``dense/kernel``) where TF recorded one."""
    def record(buf, ints: tuple[int, ...], texts: tuple[int, ...]) -> dict[int, Any]:
        """The int and string fields of a small message (defaults 0 and "")."""
        out: dict[int, Any] = {k: 0 for k in ints}
        out.update({k: "" for k in texts})
        for f, w, v in iter_fields(buf):
            if f in ints:
                out[f] = varint_value(f, w, v)
            elif f in texts:
                out[f] = bytes(bytes_value(f, w, v)).decode("utf-8", "replace")
        return out

    nodes = []
    for f, w, v in iter_fields(graph):
        if f != 1:                       # TrackableObjectGraph.nodes
            continue
        node: dict[str, list] = {"children": [], "attributes": [], "slots": []}
        for f2, w2, v2 in iter_fields(bytes_value(f, w, v)):
            if f2 == 1:                  # ObjectReference{node_id, local_name}
                r = record(bytes_value(f2, w2, v2), (1,), (2,))
                node["children"].append((r[1], r[2]))
            elif f2 == 2:                # SerializedTensor{name, full_name, checkpoint_key}
                r = record(bytes_value(f2, w2, v2), (), (1, 2, 3))
                node["attributes"].append((r[1], r[2], r[3]))
            elif f2 == 3:                # SlotVariableReference{original, slot_name, slot}
                r = record(bytes_value(f2, w2, v2), (1, 3), (2,))
                node["slots"].append((r[1], r[2], r[3]))
        nodes.append(node)
    path: dict[int, str] = {0: ""} if nodes else {}
    queue = deque([0] if nodes else [])
    while queue:                         # breadth first: the shortest path names a node
        i = queue.popleft()
        for child, local in nodes[i]["children"]:
            if 0 <= child < len(nodes) and child not in path:
                path[child] = f"{path[i]}.{local}" if path[i] else local
                queue.append(child)
    for i, node in enumerate(nodes):
        for orig, slot, slot_node in node["slots"]:
            if i in path and orig in path and 0 <= slot_node < len(nodes) and slot_node not in path:
                path[slot_node] = f"{path[i] or 'optimizer'}.{slot}[{path[orig]}]"
    out, names = {}, {}
    for i, node in enumerate(nodes):
        for attr, full_name, key in node["attributes"]:
            if not key:
                continue
            base = path.get(i, f"<node {i}>")
            out[key] = base if attr == "VARIABLE_VALUE" else f"{base}.{attr}"
            if full_name and full_name != key:
                names[key] = full_name
    return out, names

