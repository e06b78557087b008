"""Shared pieces of the torch matrix tests (tests/compat: run by tox in each torch env,
the main suite with its own torch).

``golden/generate.py`` is the one description of what torch holds
(``describe``); ``describe_checkpoint`` writes ckptconv's reading of a file in
the same JSON, so the two compare with ``==``.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "golden"


def _load_generator():
    spec = importlib.util.spec_from_file_location("golden_generate", GOLDEN / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()
THIS = gen.torch_version()
THIS_V = tuple(int(x) for x in THIS.split(".")[:2])
HAS_WEIGHTS_ONLY = "weights_only" in inspect.signature(torch.load).parameters


def golden_files() -> list[tuple[str, str]]:
    """(torch version folder, file name) of every golden file with a manifest."""
    out = []
    for manifest in sorted(GOLDEN.glob("torch-*/manifest.json")):
        for name in json.loads(manifest.read_text())["files"]:
            out.append((manifest.parent.name, name))
    return out


def manifest(folder: str) -> dict:
    return json.loads((GOLDEN / folder / "manifest.json").read_text())


def describe_checkpoint(ck) -> tuple[object, dict]:
    """ckptconv's tree in ``gen.describe``'s JSON: (tree, tensors by flat name)."""
    from ckptconv.tensor import TensorRef
    from ckptconv.tree import ObjectRecord
    import hashlib

    tensors: dict = {}
    first: dict[int, str] = {}

    def walk(obj, path):
        name = ".".join(str(p) for p in path)
        if isinstance(obj, TensorRef):
            tensors[name] = {"dtype": obj.dtype.name, "shape": list(obj.shape),
                             "sha256": hashlib.sha256(obj.tobytes()).hexdigest(),
                             "requires_grad": bool(obj.requires_grad),
                             "parameter": bool(obj.is_parameter)}
            if obj.numel and id(obj) in first:
                return {"$tensor": name, "tied_to": first[id(obj)]}
            if obj.numel:
                first[id(obj)] = name
            return {"$tensor": name}
        if isinstance(obj, OrderedDict):
            return {"$odict": [[walk(k, ()), walk(v, path + (k,))] for k, v in obj.items()]}
        if isinstance(obj, dict):
            return {"$dict": [[walk(k, ()), walk(v, path + (k,))] for k, v in obj.items()]}
        if isinstance(obj, list):
            return [walk(v, path + (i,)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {"$tuple": [walk(v, path + (i,)) for i, v in enumerate(obj)]}
        if isinstance(obj, ObjectRecord):
            if obj.kind == "newobj":
                return {"$obj": obj.cls, "state": walk(obj.state, path)}
            if obj.cls == "torch.device":
                return {"$device": ":".join(str(a) for a in obj.args if a is not None)}
            if obj.cls == "torch.Size":
                return {"$size": list(obj.args[0])}
            if obj.kind == "global" and obj.cls.startswith("torch."):
                return {"$dtype": obj.cls[len("torch."):]}
            return {"$repr": obj.cls}
        if isinstance(obj, (np.generic, np.ndarray, np.dtype)):
            return gen.describe(obj)
        return gen.describe(obj)

    return walk(ck.tree, ()), tensors


def describe_torch(obj) -> tuple[object, dict]:
    tensors: dict = {}
    tree = gen.describe(obj, tensors)
    return tree, tensors


def torch_load(path, weights_only: bool):
    kw = {"weights_only": weights_only} if HAS_WEIGHTS_ONLY else {}
    return torch.load(path, map_location="cpu", **kw)


def assert_same(got: tuple, want_tree, want_tensors: dict, what: str) -> None:
    tree, tensors = got
    assert sorted(tensors) == sorted(want_tensors), f"{what}: tensor names differ"
    for name, t in want_tensors.items():
        assert tensors[name] == t, f"{what}: tensor '{name}': {tensors[name]} != {t}"
    assert tree == want_tree, f"{what}: tree differs"
