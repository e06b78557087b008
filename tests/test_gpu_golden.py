"""A checkpoint saved on a real GPU reads (and converts) on a CPU-only machine."""
from __future__ import annotations

from pathlib import Path

import pytest

import ckptconv
from conftest import tensor_bytes_equal

torch = pytest.importorskip("torch")
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "gpu"


def test_cuda_saved_checkpoint_reads_as_cpu(tmp_path):
    ck = ckptconv.load(GOLDEN / "ge2e_encoder_cuda.pt")
    assert "cuda:0" in ck.info["storage_locations"]
    ref = torch.load(GOLDEN / "ge2e_encoder_reference_cpu.pt", weights_only=True)
    model = ck.select("model_state").tensors()
    assert set(model) == set(ref)
    for name, t in ref.items():
        assert tensor_bytes_equal(model[name].torch(), t), name
    out = tmp_path / "cpu.pt"
    ckptconv.convert(GOLDEN / "ge2e_encoder_cuda.pt", out)
    got = torch.load(out, weights_only=True)  # no map_location needed any more
    for name, t in ref.items():
        assert tensor_bytes_equal(got["model_state"][name], t), name
    assert got["step"] == ck.tree["step"]
