"""Keras 2 weight names -> the Keras 3 ``.weights.h5`` layout.

Keras 3 does not address a layer by its name: ``saving_lib._save_container_state``
names each layer of a model after its *class* (``naming.to_snake_case``:
``Dense`` -> ``dense``, ``BatchNormalization`` -> ``batch_normalization``),
numbered per class in layer order (``dense``, ``dense_1``, ...), and stores its
variables as ``layers/<that>/vars/<i>`` in ``layer.weights`` order, with the
layer's own name as the attribute ``name`` of the ``vars`` group. A Keras 2
file lists layers by name (``layer_names``) and their weights in the same
order (``weight_names``), but only a full-model file says each layer's class
(``model_config``). So the mapping needs ``model_config``; without it (a
weights-only file) the conversion is refused with a message that says why.

Sources of truth: ``keras/src/saving/saving_lib.py``, ``keras/src/utils/naming.py``,
``tf_keras/src/saving/legacy/hdf5_format.py``.
"""
from __future__ import annotations

import json
import re

from ckptconv.errors import UnsupportedError
from ckptconv.tensor import TensorRef

_NESTED = ("Sequential", "Functional", "Model")


def to_snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()
    return name


def _layer_classes(model_config: str, display: str) -> list[tuple[str, str]]:
    """(class name, layer name) of the model's layers, in order, inputs left out."""
    try:
        config = json.loads(model_config)
        layers = config["config"]["layers"]
        out = [(layer["class_name"], layer["config"]["name"]) for layer in layers]
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedError(f"{display}: model_config does not list the model's layers "
                               f"({e}); cannot map Keras 2 names to Keras 3") from None
    return [(cls, name) for cls, name in out if cls != "InputLayer"]


def keras2_to_keras3(entries: list[tuple[str, TensorRef]], meta: dict[str, str],
                     display: str) -> tuple[list[tuple[str, TensorRef]], dict[str, dict]]:
    """(datasets at Keras 3 paths, attributes for their groups); the optimizer's
    weights are left out (Keras 3 keeps its state in another layout).

    ``entries`` carry Keras 2 names (``d1/d1/kernel:0``, ``model_weights/d1/...``)
    in Keras order. Raises ``UnsupportedError`` when the layer classes are not
    known or the model nests models.
    """
    config = meta.get("model_config")
    if config is None:
        raise UnsupportedError(
            f"{display}: Keras 3 names layers by class (layers/<class>/vars/<i>); these names "
            f"(e.g. '{entries[0][0]}') come with no model_config to say the classes: convert "
            "a Keras 2 full-model .h5 (model.save), or write a .h5 target (the Keras 2 layout "
            "model.load_weights reads)")
    classes = _layer_classes(config, display)
    nested = [name for cls, name in classes if cls in _NESTED]
    if nested:
        raise UnsupportedError(f"{display}: layers {', '.join(nested[:5])} are models of their "
                               "own; mapping nested models to Keras 3 is not supported")
    weights: dict[str, list[tuple[str, TensorRef]]] = {}
    for name, ref in entries:
        if name.startswith("optimizer_weights/"):
            continue
        rel = name[len("model_weights/"):] if name.startswith("model_weights/") else name
        layer = rel.partition("/")[0]
        weights.setdefault(layer, []).append((name, ref))
    known = {name for _, name in classes}
    unknown = [layer for layer in weights if layer not in known]
    if unknown:
        raise UnsupportedError(f"{display}: weights of layers {', '.join(unknown[:5])} that "
                               "model_config does not list; cannot map them to Keras 3")
    datasets: list[tuple[str, TensorRef]] = []
    attrs: dict[str, dict] = {"vars": {}, "layers": {}}
    used: dict[str, int] = {}
    for cls, layer in classes:
        base = to_snake_case(cls)
        path = base if base not in used else f"{base}_{used[base] + 1}"
        used[base] = used.get(base, -1) + 1
        if layer not in weights:
            continue
        attrs[f"layers/{path}/vars"] = {"name": layer}
        for i, (_, ref) in enumerate(weights[layer]):
            datasets.append((f"layers/{path}/vars/{i}", ref))
    return datasets, attrs
