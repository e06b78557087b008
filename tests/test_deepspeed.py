"""DeepSpeed ZeRO folders (stages 1, 2, 3) consolidated to fp32, against
DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` (weights) and
``safe_get_full_optimizer_state`` (optimizer state, saved by the worker).

The fixture model has a frozen layer, a tied weight, a buffer and odd sizes
(partitions padded); two gloo CPU ranks train it two steps with Adam
(``torch_adam``) under each stage (tests/dist_workers.py).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

import ckptconv  # noqa: E402
from ckptconv.errors import FormatError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from dist_workers import launch  # noqa: E402

STAGES = (1, 2, 3)


@pytest.fixture(scope="session")
def zero_folders(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    launch("deepspeed_save", out, ",".join(map(str, STAGES)), timeout=600)
    return out


def oracle(folder: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder))


@pytest.mark.parametrize("stage", STAGES)
def test_module_equals_zero_to_fp32(zero_folders, stage, tmp_path):
    folder = zero_folders / f"zero{stage}"
    expected = oracle(folder)
    out = tmp_path / "model.pt"
    rep = ckptconv.convert(folder, out, select="module")
    assert rep.source_format == "deepspeed"
    got = torch.load(out, weights_only=True)
    assert list(got) == list(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t.contiguous()), name
    # frozen parameters, the buffer and the tied weight are there; the tie is kept
    assert {"frozen.weight", "frozen.bias", "counter", "head.weight"} <= set(got) or stage == 1
    assert got["head.weight"].data_ptr() == got["emb.weight"].data_ptr()


@pytest.mark.parametrize("stage", STAGES)
def test_select_reaches_optimizer_state(zero_folders, stage, tmp_path):
    folder = zero_folders / f"zero{stage}"
    reference = torch.load(zero_folders / f"zero{stage}-optimizer-reference.pt", weights_only=True)
    out = tmp_path / "optim.safetensors"
    ckptconv.convert(folder, out, select="optimizer.state")
    from safetensors.torch import load_file

    got = load_file(out)
    for name, states in reference.items():
        for key, t in states.items():
            assert torch.equal(got[f"{name}.{key}"], t), (name, key)
    ck = ckptconv.load(folder)
    assert ck.tree["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-2)
    assert ck.tree["epoch"] == 2 and ck.tree["global_steps"] == 2


@pytest.mark.slow
def test_bf16_zero_folders_equal_deepspeed(tmp_path):
    """bf16 training (DeepSpeed's bf16 optimizer files, bf16 frozen weights,
    ``param_slice_mappings`` of ``fragment_address`` records): weights equal
    ``get_fp32_state_dict_from_zero_checkpoint``, optimizer state equals
    DeepSpeed's own per-parameter view, the fragment addresses are inert records."""
    from safetensors.torch import load_file

    from ckptconv.tree import ObjectRecord

    launch("deepspeed_save", tmp_path, ",".join(map(str, STAGES)), "1", timeout=600)
    for stage in STAGES:
        folder = tmp_path / f"zero{stage}"
        assert next((folder / "global_step2").glob("bf16_zero_pp_rank_0_*optim_states.pt"))
        expected = oracle(folder)
        ckptconv.convert(folder, tmp_path / f"m{stage}.pt", select="module")
        got = torch.load(tmp_path / f"m{stage}.pt", weights_only=True)
        assert list(got) == list(expected)
        for name, t in expected.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (stage, name)
        reference = torch.load(tmp_path / f"zero{stage}-optimizer-reference.pt", weights_only=True)
        ckptconv.convert(folder, tmp_path / f"o{stage}.safetensors", select="optimizer.state")
        states = load_file(tmp_path / f"o{stage}.safetensors")
        for name, per_key in reference.items():
            for key, t in per_key.items():
                assert torch.equal(states[f"{name}.{key}"], t), (stage, name, key)
        if stage < 3:
            mappings = ckptconv.load(folder).tree["optimizer"]["param_slice_mappings"][0]
            address = mappings["emb.weight"]
            assert isinstance(address, ObjectRecord)
            assert address.cls == "deepspeed.utils.tensor_fragment.fragment_address"
            assert address.state == {"numel": 66, "start": 0}


def test_inspect_shows_stage_and_ranks(zero_folders):
    rep = ckptconv.inspect(zero_folders / "zero3")
    assert rep.format == "deepspeed"
    assert "ZeRO stage 3, 2 ranks" in rep.info["layout"]
    out = subprocess.run([sys.executable, "-m", "ckptconv", "inspect", str(zero_folders / "zero2")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "ZeRO stage 2, 2 ranks" in out.stdout


def test_missing_rank_file_is_one_line_error(zero_folders, tmp_path):
    import shutil

    bad = tmp_path / "zero2"
    shutil.copytree(zero_folders / "zero2", bad)
    next((bad / "global_step2").glob("zero_pp_rank_1_*optim_states.pt")).unlink()
    with pytest.raises(FormatError, match="partition_count is 2 but there are 1"):
        ckptconv.load(bad, format="deepspeed")
    out = subprocess.run([sys.executable, "-m", "ckptconv", "inspect", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_1gib_zero3_consolidates_with_flat_memory(tmp_path):
    from dist_workers import ckptconv_peak_rss_mib

    src = tmp_path / "big"
    launch("deepspeed_big_save", src, 22, timeout=900)
    assert sum(f.stat().st_size for f in src.rglob("*.pt")) >= 1 << 30
    out = tmp_path / "model.safetensors"
    rss = ckptconv_peak_rss_mib(["convert", src, out, "--select", "module"])
    print(f"ckptconv peak RSS {rss:.0f} MiB")
    assert rss <= 256, f"peak RSS {rss:.0f} MiB"
    from safetensors.torch import load_file

    got = load_file(out)
    expected = oracle(src)
    assert list(got) == list(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t.contiguous()), name
