"""(b) this torch loads every file ckptconv writes (weights_only=True where
``check`` says the content allows it, and then the values match); sanitize's
output loads with weights_only=True; the compat tables agree with this torch."""
from __future__ import annotations

import argparse
import hashlib
import inspect
import re

import ml_dtypes
import numpy as np
import pytest

import ckptconv
from ckptconv import check, sanitize
from ckptconv.adapters.torch.weights_only import (GLOBAL_MIN_TORCH, MATRIX, weights_only_allowlist,
                                                  weights_only_opcodes)
from ckptconv.errors import UnsupportedError
from ckptconv.tensor import ArrayTensor
from ckptconv.tree import Checkpoint

from matrix_helpers import (GOLDEN, HAS_WEIGHTS_ONLY, THIS, THIS_V, assert_same, describe_torch,
                            gen, golden_files, manifest, torch, torch_load)

FILES = [(f, n) for f, n in golden_files() if manifest(f)["files"][n]["kind"] != "torchscript"]


def _dtype_min():
    from ckptconv.adapters.torch import DTYPE_MIN_TORCH

    return DTYPE_MIN_TORCH


@pytest.mark.parametrize("folder,name", FILES, ids=[f"{f}/{n}" for f, n in FILES])
def test_this_torch_loads_what_ckptconv_writes(folder, name, tmp_path):
    entry = manifest(folder)["files"][name]
    ck = ckptconv.load(GOLDEN / folder / name)
    out = tmp_path / "out.pt"
    ckptconv.save(ck, out)
    report = check(out)
    if not report.loads_in(THIS_V):
        with pytest.raises(Exception):
            torch_load(out, weights_only=False)
    else:
        got = describe_torch(torch_load(out, weights_only=False))
        assert_same(got, entry["tree"], entry["tensors"], f"torch {THIS} reading ckptconv's copy")
    if HAS_WEIGHTS_ONLY:
        if report.loads_weights_only_in(THIS_V):
            got = describe_torch(torch_load(out, weights_only=True))
            assert_same(got, entry["tree"], entry["tensors"], "weights_only")
        else:
            with pytest.raises(Exception):
                torch_load(out, weights_only=True)
    # --torch-compat THIS: written iff every dtype is one this torch has
    too_new = [n for n, r in ck.tensors().items() if _dtype_min().get(r.dtype.name, (0, 0)) > THIS_V]
    if too_new:
        with pytest.raises(UnsupportedError, match=re.escape(too_new[0].split(".")[0])):
            ckptconv.save(ck, tmp_path / "compat.pt", torch_compat=THIS)
    else:
        ckptconv.save(ck, tmp_path / "compat.pt", torch_compat=THIS)
        got = describe_torch(torch_load(tmp_path / "compat.pt", weights_only=False))
        assert_same(got, entry["tree"], entry["tensors"], "--torch-compat copy")


def _fp8_checkpoint():
    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return Checkpoint({"w8": ArrayTensor(raw.view(ml_dtypes.float8_e4m3fn), "float8_e4m3fn"),
                       "bias": ArrayTensor(np.ones(3, np.float32))}), raw


def test_broken_writer_fp8_for_old_torch_is_caught(tmp_path):
    """A writer that ignores --torch-compat: the file torch < 2.1 cannot read.

    check must name 2.1, torch < 2.1 must fail to load it and torch >= 2.1
    must load it bit-exactly: the compat table is right in both directions.
    """
    ck, raw = _fp8_checkpoint()
    out = tmp_path / "fp8.pt"
    ckptconv.save(ck, out)  # no torch_compat: the "broken" path
    report = check(out)
    assert report.min_torch == "2.1"
    if THIS_V < (2, 1):
        with pytest.raises(Exception):
            torch_load(out, weights_only=False)
    else:
        t = torch_load(out, weights_only=False)["w8"]
        assert t.dtype == torch.float8_e4m3fn
        assert t.view(torch.uint8).numpy().tobytes() == raw.tobytes()
    with pytest.raises(UnsupportedError, match="w8"):
        ckptconv.save(ck, tmp_path / "old.pt", torch_compat="1.13")


def test_dtype_table_matches_this_torch(tmp_path):
    """DTYPE_MIN_TORCH: this torch loads a file holding a dtype iff the table says it can
    (torch 2.4.1 loads uint16 files although its torch.save cannot write them)."""
    from ckptconv import dtypes as _dt

    for name, need in _dtype_min().items():
        if name not in gen.DTYPE_MAKERS:
            continue
        dt = _dt.get(name)
        arr = np.frombuffer(bytes(range(4 * dt.itemsize)), dtype=_dt.numpy_dtype(dt))
        out = tmp_path / f"{name}.pt"
        ckptconv.save(Checkpoint({"t": ArrayTensor(arr, name)}), out)
        if THIS_V >= need:
            t = torch_load(out, weights_only=False)["t"]
            assert gen.dtype_name(t.dtype) == name
            assert gen.tensor_bytes(t) == arr.tobytes(), name
        else:
            with pytest.raises(Exception):
                torch_load(out, weights_only=False)
    for qual, need in GLOBAL_MIN_TORCH.items():
        module, _, attr = qual.rpartition(".")
        assert hasattr(__import__(module, fromlist=[attr]), attr) == (THIS_V >= need), qual


def test_weights_only_allowlist_matches_this_torch():
    if THIS_V not in MATRIX:
        pytest.skip(f"torch {THIS} is not a matrix version")
    if not HAS_WEIGHTS_ONLY:
        pytest.skip("no weights_only")
    import torch._weights_only_unpickler as wo

    assert set(wo._get_allowed_globals()) == set(weights_only_allowlist(THIS_V))
    ops = set(re.findall(r"\b([A-Z][A-Z_0-9]+)\[0\]", inspect.getsource(wo.Unpickler.load)))
    assert ops == set(weights_only_opcodes(THIS_V))


# --- sanitize --------------------------------------------------------------------

TRAINING = [(f, n) for f, n in FILES if n.startswith("training")]


def _as_number(np_desc):
    v = np.frombuffer(bytes.fromhex(np_desc["hex"]), dtype=np.dtype(np_desc["$np"]))[0]
    return bool(v) if v.dtype.kind == "b" else int(v) if v.dtype.kind in "iu" else float(v)


def sanitized_expectation(tree, tensors: dict, arrays: dict, floats_as_tensors: bool):
    """The manifest's description after the documented sanitize rules, derived here
    without compat.py: numpy scalar -> number, Namespace -> dict with __class__,
    array -> tensor (uint32 -> int64 below torch 2.3), (1.13) float -> 0-d float64."""
    tensors = dict(tensors)

    def float_tensor(x, path):
        name = ".".join(map(str, path))
        tensors[name] = {"dtype": "float64", "shape": [], "requires_grad": False,
                         "parameter": False,
                         "sha256": hashlib.sha256(np.float64(x).tobytes()).hexdigest()}
        return {"$tensor": name}

    def walk(node, path):
        if isinstance(node, list):
            return [walk(v, path + (i,)) for i, v in enumerate(node)]
        if isinstance(node, float) and floats_as_tensors:
            return float_tensor(node, path)
        if not isinstance(node, dict):
            return node
        if "$np" in node:
            x = _as_number(node)
            return float_tensor(x, path) if floats_as_tensors and isinstance(x, float) else x
        if "$obj" in node:
            items = walk(node["state"], path)["$dict"]
            return {"$dict": [["__class__", node["$obj"]]] + items}
        if "$ndarray" in node:
            name = ".".join(map(str, path))
            a = arrays[name]
            a = a.astype(np.int64) if a.dtype == np.uint32 else a
            tensors[name] = {"dtype": str(a.dtype), "shape": list(a.shape), "requires_grad": False,
                             "parameter": False,
                             "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
            return {"$tensor": name}
        for key in ("$dict", "$odict"):
            if key in node:
                return {key: [[k, walk(v, path + (k,))] for k, v in node[key]]}
        if "$tuple" in node:
            return {"$tuple": [walk(v, path + (i,)) for i, v in enumerate(node["$tuple"])]}
        return node

    return walk(tree, ()), tensors


def _arrays(ck) -> dict:
    from ckptconv.tree import iter_leaves

    return {".".join(map(str, p)): v for p, v in iter_leaves(ck.tree) if isinstance(v, np.ndarray)}


@pytest.mark.parametrize("folder,name", TRAINING, ids=[f"{f}/{n}" for f, n in TRAINING])
@pytest.mark.parametrize("compat", [None, "1.13"])
def test_sanitized_training_checkpoint_loads_weights_only(folder, name, compat, tmp_path):
    entry = manifest(folder)["files"][name]
    src = GOLDEN / folder / name
    assert check(src).weights_only is False
    out = tmp_path / "clean.pt"
    report = sanitize(src, out, torch_compat=compat)
    changed = {c["path"] for c in report.changes}
    assert {"args", "global_step", "best_metric", "loss_scale", "np_rng"} <= changed
    after = check(out)
    assert after.weights_only and not after.blockers
    assert after.weights_only_since == ("1.13" if compat else "2.0")
    want_tree, want_tensors = sanitized_expectation(
        entry["tree"], entry["tensors"], _arrays(ckptconv.load(src)), floats_as_tensors=bool(compat))
    if not HAS_WEIGHTS_ONLY:
        return
    if compat or THIS_V >= (2, 0):
        got = describe_torch(torch_load(out, weights_only=True))
        assert_same(got, want_tree, want_tensors, f"sanitized ({compat}) in torch {THIS}")
    else:  # torch 1.13 without torch_compat="1.13": its loader has no float opcode
        assert after.weights_only_by_version["1.13"] is False
        with pytest.raises(Exception):
            torch_load(out, weights_only=True)


def test_sanitize_namespace_values(tmp_path):
    """The sanitized Namespace is a dict naming its class, with the same values."""
    ck = {"args": argparse.Namespace(lr=0.5, name="x"), "step": np.int64(7),
          "w": torch.ones(2)}
    src = tmp_path / "src.pt"
    torch.save(ck, src)
    out = tmp_path / "out.pt"
    sanitize(src, out)
    if HAS_WEIGHTS_ONLY and THIS_V >= (2, 0):
        got = torch_load(out, weights_only=True)
        assert got["args"] == {"__class__": "argparse.Namespace", "lr": 0.5, "name": "x"}
        assert got["step"] == 7 and type(got["step"]) is int
        assert torch.equal(got["w"], torch.ones(2))


def test_sanitized_framework_objects_load_weights_only(tmp_path):
    """Framework objects read as inert records (an Enum member, a path, builtin
    types as values, a defaultdict, an OmegaConf-like parent link) sanitize to
    plain values this torch's weights-only loader reads; no framework installed."""
    from ckptconv.tree import ObjectRecord

    list_type = ObjectRecord("builtins.list", kind="global")
    tree = {"strategy": ObjectRecord("transformers.trainer_utils.IntervalStrategy", None,
                                     ("steps",), "reduce"),
            "out": ObjectRecord("pathlib.PosixPath", None, ("runs", "exp1"), "reduce"),
            "types": [list_type, ObjectRecord("builtins.dict", kind="global")],
            "cache": ObjectRecord("collections.defaultdict", {"a": [1, 2]}, (list_type,), "reduce"),
            "stage": ObjectRecord("deepspeed.runtime.zero.config.ZeroStageEnum", None, (3,),
                                  "reduce"),
            "w": ArrayTensor(np.arange(3, dtype=np.float32))}
    src, out = tmp_path / "records.pt", tmp_path / "clean.pt"
    ckptconv.save(Checkpoint(tree), src)
    assert {b.name for b in check(src).blockers} >= {
        "transformers.trainer_utils.IntervalStrategy", "pathlib.PosixPath", "builtins.list",
        "collections.defaultdict", "deepspeed.runtime.zero.config.ZeroStageEnum"}
    compat = "1.13" if THIS_V < (2, 0) else None
    sanitize(src, out, torch_compat=compat)
    after = check(out)
    assert after.weights_only and not after.blockers
    if not HAS_WEIGHTS_ONLY:
        return
    got = torch_load(out, weights_only=True)
    assert got["strategy"] == "steps" and got["out"] == "runs/exp1" and got["stage"] == 3
    assert got["types"] == ["builtins.list", "builtins.dict"] and got["cache"] == {"a": [1, 2]}
    assert got["w"].tolist() == [0.0, 1.0, 2.0]
