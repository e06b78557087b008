"""(a) ckptconv reads every golden file exactly as its manifest says; the torch of
this env loads every golden file of every version that ``check`` says it can,
with the same values, and fails on those ``check`` says it cannot (both
directions: the compat tables are tested, not trusted); (c) files this torch
writes now are read exactly by ckptconv."""
from __future__ import annotations

import hashlib
import json
import warnings

import pytest

import ckptconv
from ckptconv import check

from matrix_helpers import (GOLDEN, HAS_WEIGHTS_ONLY, THIS, THIS_V, assert_same, describe_checkpoint,
                      describe_torch, gen, golden_files, manifest, torch, torch_load)

FILES = golden_files()


def test_golden_covers_five_torch_versions():
    versions = {folder for folder, _ in FILES}
    assert len(versions) >= 5, versions
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    assert total < 5 << 20, f"golden/ holds {total} bytes"


def _entry(folder, name):
    return manifest(folder)["files"][name]


@pytest.mark.parametrize("folder,name", FILES, ids=[f"{f}/{n}" for f, n in FILES])
def test_ckptconv_reads_golden_exactly(folder, name):
    entry = _entry(folder, name)
    path = GOLDEN / folder / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], "file changed"
    ck = ckptconv.load(path)
    tree, tensors = describe_checkpoint(ck)
    if entry["kind"] == "torchscript":  # weights only: compare the flat tensors
        for t in tensors.values():
            t["requires_grad"] = t["parameter"] = None
        want = {n: dict(t, requires_grad=None, parameter=None) for n, t in entry["tensors"].items()}
        assert tensors == want
        return
    assert_same((tree, tensors), entry["tree"], entry["tensors"], f"{folder}/{name}")
    assert ck.info["torch_format"] == entry["kind"]


def _load_torchscript(path):
    return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


@pytest.mark.parametrize("folder,name", FILES, ids=[f"{f}/{n}" for f, n in FILES])
def test_this_torch_loads_golden_as_check_predicts(folder, name):
    entry = _entry(folder, name)
    path = GOLDEN / folder / name
    writer_v = gen.version_tuple(folder.split("-", 1)[1])[:2]
    if entry["kind"] == "torchscript":
        # torch promises to read older TorchScript; newer archives may need newer ops
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sd = _load_torchscript(path)
        except Exception as e:  # noqa: BLE001
            if writer_v <= THIS_V:
                raise
            pytest.skip(f"torch {THIS} cannot read TorchScript from torch {folder}: {e}")
        got = {n: t for n, t in describe_torch(sd)[1].items()}
        assert {n: t["sha256"] for n, t in got.items()} == \
            {n: t["sha256"] for n, t in entry["tensors"].items()}
        return
    report = check(path)
    if report.loads_in(THIS_V):
        obj = torch_load(path, weights_only=False)
        assert_same(describe_torch(obj), entry["tree"], entry["tensors"], f"torch {THIS}")
    else:
        with pytest.raises(Exception):
            torch_load(path, weights_only=False)
    if not HAS_WEIGHTS_ONLY:
        return
    if report.loads_weights_only_in(THIS_V):
        obj = torch_load(path, weights_only=True)
        assert_same(describe_torch(obj), entry["tree"], entry["tensors"], f"torch {THIS} wo")
    else:
        with pytest.raises(Exception):
            torch_load(path, weights_only=True)


def test_own_golden_manifest_agrees_with_check():
    """What this torch recorded when it wrote its golden files agrees with check."""
    folder = f"torch-{THIS}"
    if not (GOLDEN / folder / "manifest.json").exists():
        pytest.skip(f"no golden files for torch {THIS}")
    for name, entry in manifest(folder)["files"].items():
        if "weights_only_loads" in entry:
            assert check(GOLDEN / folder / name).loads_weights_only_in(THIS_V) == \
                entry["weights_only_loads"], name


def test_fresh_files_from_this_torch_read_exactly(tmp_path):
    """(c) torch writes fresh checkpoints (zip, legacy, nested training, tied, dtypes,
    TorchScript) and ckptconv reads them exactly."""
    dest = gen.generate(tmp_path / f"torch-{THIS}")
    fresh = json.loads((dest / "manifest.json").read_text())["files"]
    assert {"state_dict.pt", "state_dict_legacy.pt", "training.pt", "training_legacy.pt",
            "dtypes.pt"} <= set(fresh)
    for name, entry in fresh.items():
        ck = ckptconv.load(dest / name)
        tree, tensors = describe_checkpoint(ck)
        if entry["kind"] == "torchscript":
            assert {n: t["sha256"] for n, t in tensors.items()} == \
                {n: t["sha256"] for n, t in entry["tensors"].items()}
            continue
        assert_same((tree, tensors), entry["tree"], entry["tensors"], f"fresh {name}")
        if HAS_WEIGHTS_ONLY:
            assert check(dest / name).loads_weights_only_in(THIS_V) == \
                entry["weights_only_loads"], name
