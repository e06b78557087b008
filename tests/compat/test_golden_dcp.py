"""DCP folders written by each torch >= 2.4 of the matrix (golden/torch-*/dcp/,
by ``golden/generate.py``): ckptconv reads each exactly as that torch's
``dcp_to_torch_save`` rebuilt it (every tensor's bytes by SHA-256, every
leaf), in every env of the matrix and in the main suite; and the torch of
this env reads what ckptconv writes back as DCP."""
from __future__ import annotations

import hashlib
import json

import pytest

import ckptconv

from matrix_helpers import GOLDEN, THIS_V, assert_same, describe_checkpoint, gen, torch

DCP = sorted(m.parent.name for m in GOLDEN.glob("torch-*/manifest.json")
             if "dcp" in json.loads(m.read_text()))


def test_golden_dcp_from_the_oldest_and_newest_torch():
    assert {"torch-2.4.1", "torch-2.13.0", "torch-2.15.0"} <= set(DCP), DCP


@pytest.mark.parametrize("folder", DCP)
def test_ckptconv_reads_golden_dcp_exactly(folder):
    entry = json.loads((GOLDEN / folder / "manifest.json").read_text())["dcp"]
    path = GOLDEN / folder / entry["folder"]
    for name, digest in entry["files"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest, "file changed"
    ck = ckptconv.load(path)
    assert ck.format == "dcp"
    assert_same(describe_checkpoint(ck), entry["tree"], entry["tensors"], f"{folder}/dcp")


@pytest.mark.skipif(THIS_V < gen.DCP_MIN, reason="torch.distributed.checkpoint needs torch >= 2.4")
@pytest.mark.parametrize("folder", DCP)
def test_this_torch_reads_dcp_written_by_ckptconv(folder, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    entry = json.loads((GOLDEN / folder / "manifest.json").read_text())["dcp"]
    out = tmp_path / "rewritten"
    ckptconv.convert(GOLDEN / folder / entry["folder"], out, to="dcp")
    dcp_to_torch_save(out, tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", map_location="cpu", weights_only=True)
    tensors: dict = {}
    assert (gen.describe(back, tensors), tensors) == (entry["tree"], entry["tensors"])
