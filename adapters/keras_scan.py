"""Code that Keras runs when it loads a model: Lambda layers (marshalled
Python bytecode in the model config), serialized functions, and classes
named by module from a config. Found by reading the config, never by
loading the model.

Where the config is: Keras 2 / tf_keras ``.h5`` full models keep it as JSON
in the root attribute ``model_config`` (``legacy/saving/legacy_h5_format.py``);
Keras 3 ``.keras`` files are zips with ``config.json``
(``keras/src/saving/saving_lib.py``); a tf_keras SavedModel folder has
``keras_metadata.pb`` (``SavedMetadata``: 1 = nodes; ``SavedObject``:
5 = metadata, one JSON layer config each; ``protobuf/saved_metadata.proto``). A Lambda layer's ``function`` is
base64 marshal data (Keras 2: ``function_type: "lambda"``; Keras 3: a
``{"class_name": "__lambda__", "config": {"code": ...}}``), which
``load_model`` turns into a function and calls; Keras 3 also imports the
``module`` named next to each ``class_name``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ckptconv.errors import FormatError
from ckptconv.pickle import is_dangerous

# Keras 2 layers whose config holds Python code or a Python function by name
_CODE_LAYERS = {"Lambda": "a Lambda layer (marshalled Python bytecode that Keras runs on load)"}
_MAX_CONFIG = 64 << 20


def model_config(path: Path) -> str | None:
    """The model config JSON of a Keras ``.h5`` or ``.keras`` file, if any."""
    from ckptconv.tensor import FileHandle
    from ckptconv.ziputil import is_zip, read_member_bytes, read_members

    from ckptconv.paths import open_source, path_or_reader

    with open_source(path) as f:  # local, or a URL read by range requests
        head = f.read(4)
    if is_zip(head):
        handle = FileHandle(path)
        members = read_members(handle)
        m = members.get("config.json")
        return None if m is None else read_member_bytes(handle, m, _MAX_CONFIG).decode("utf-8")
    import h5py

    with path_or_reader(path) as src, h5py.File(src, "r") as f:
        config = f.attrs.get("model_config")
    if config is None:
        return None
    return config.decode("utf-8") if isinstance(config, bytes) else str(config)


def config_code_on_load(config: str, display: str) -> list[str]:
    """One line per place in a Keras model config that runs code on load."""
    try:
        tree = json.loads(config)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{display}: Keras model config is not JSON ({e})") from None
    found: list[str] = []
    todo = [(tree, "config")]
    while todo and len(found) < 20:
        node, where = todo.pop()
        if isinstance(node, list):
            todo.extend((v, f"{where}[{i}]") for i, v in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        cls = node.get("class_name")
        cfg = node.get("config") if isinstance(node.get("config"), dict) else {}
        name = cfg.get("name") or node.get("name") or where
        if cls in _CODE_LAYERS:
            found.append(f"{display}: layer '{name}' is {_CODE_LAYERS[cls]}")
            continue
        if cls == "__lambda__" or node.get("function_type") == "lambda":
            found.append(f"{display}: {where} holds a serialized Python lambda (marshalled "
                         "bytecode that Keras runs on load)")
        module = node.get("module")
        if isinstance(module, str) and isinstance(cls, str) and is_dangerous(f"{module}.{cls}"):
            found.append(f"{display}: {where} names {module}.{cls}, which Keras imports on "
                         "load (a module that can run code)")
        todo.extend((v, f"{where}.{k}") for k, v in node.items() if isinstance(v, (dict, list)))
    return sorted(set(found))


def saved_metadata_configs(pb: bytes) -> list[str]:
    """The JSON layer configs in a ``keras_metadata.pb``."""
    from ._io import iter_fields

    out = []
    for field, wire, node in iter_fields(pb):
        if field == 1 and wire == 2:
            for f, w, v in iter_fields(node):
                if f == 5 and w == 2:
                    out.append(bytes(v).decode("utf-8", "replace"))
    return out


def code_on_load(path: Path) -> list[str]:
    """The ``scan`` hook's findings for a Keras or HDF5 file, or a tf_keras
    SavedModel's ``keras_metadata.pb``."""
    from ._io import decode_file

    if path.name == "keras_metadata.pb":
        configs = decode_file(path, saved_metadata_configs, "a Keras SavedModel metadata protobuf",
                              _MAX_CONFIG)
        return sorted({r for c in configs for r in config_code_on_load(c, path.name)})
    config = model_config(path)
    return [] if config is None else config_code_on_load(config, path.name)

