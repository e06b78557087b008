"""torch.distributed.checkpoint folders: read (against ``dcp_to_torch_save``),
write (read back by ``dcp.load`` without a process group and into FSDP2 on
two gloo ranks), inspect layout, verify.

Fixtures are written by torch itself: FSDP2 ``fully_shard`` on two gloo CPU
processes (tests/dist_workers.py) and a single-process ``dcp.save``.
"""
from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

import ckptconv  # noqa: E402
from ckptconv.errors import FormatError, UnsafePickleError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import assert_tree_equal  # noqa: E402
from dist_workers import launch  # noqa: E402


def oracle(folder: Path, tmp: Path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / "oracle.pt"
    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=False)  # the oracle's own file, written just now


@pytest.fixture(scope="session")
def fsdp2_dcp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2") / "ckpt"
    launch("fsdp2_save", out)
    return out


def plain_state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"w": torch.randn(4, 3, generator=g),
                  "b16": torch.randn(5, generator=g).bfloat16(),
                  "h": torch.randn(2, 2, generator=g).half(), "i": torch.arange(6).reshape(2, 3),
                  "mask": torch.tensor([True, False, True]),
                  "u8": torch.arange(4, dtype=torch.uint8),
                  "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)},
        "step": 7, "name": "run-1", "nothing": None, "lr": [0.1, 0.01],
        "nested": {"list": [torch.ones(2), torch.zeros(3, dtype=torch.int32)], "t": (1, "a")},
    }


@pytest.fixture(scope="session")
def plain_dcp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "ckpt"
    dcp.save(plain_state_dict(), checkpoint_id=out, no_dist=True)
    return out


@pytest.mark.parametrize("fixture", ["fsdp2_dcp", "plain_dcp"])
def test_equals_dcp_to_torch_save(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    expected = oracle(folder, tmp_path)
    rep = ckptconv.convert(folder, tmp_path / "out.pt")
    assert rep.source_format == "dcp"
    assert_tree_equal(torch.load(tmp_path / "out.pt", weights_only=True), expected)
    # and through safetensors (tree in its metadata) and back to torch
    ckptconv.convert(folder, tmp_path / "out.safetensors")
    ckptconv.convert(tmp_path / "out.safetensors", tmp_path / "back.pt")
    assert_tree_equal(torch.load(tmp_path / "back.pt", weights_only=True), expected)


def test_sharded_tensors_are_file_ranges(fsdp2_dcp):
    ck = ckptconv.load(fsdp2_dcp)
    weight = ck.tree["model"]["0.weight"]         # FSDP2: rows split over the 2 ranks
    spans = weight.file_spans()
    assert len(spans) == 2 and {h.display.rsplit("/", 1)[-1] for h, _, _ in spans} == \
        {"__0_0.distcp", "__1_0.distcp"}
    cols = ck.tree["extra"]["cols"]               # Shard(1): one range per row and rank
    assert len(cols.file_spans()) == 10
    assert cols.torch().equal(torch.arange(35, dtype=torch.bfloat16).reshape(5, 7))
    assert ck.tree["optim"]["param_groups"][0]["params"] == ["0.weight", "0.bias",
                                                              "2.weight", "2.bias"]
    ck.close()


def test_inspect_shows_layout(fsdp2_dcp):
    rep = ckptconv.inspect(fsdp2_dcp)
    assert rep.format == "dcp"
    assert "2 ranks" in rep.info["layout"] and "chunks per tensor: 1 x" in rep.info["layout"]
    assert rep.info["dcp"]["ranks"] == 2 and rep.info["dcp"]["chunks_per_tensor"]["2"] >= 8
    out = subprocess.run([sys.executable, "-m", "ckptconv", "inspect", str(fsdp2_dcp)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "layout: DCP, 2 ranks" in out.stdout


def _rewrite_metadata(folder: Path, change) -> None:
    # the test edits its own fixture's metadata with torch's classes (trusted here)
    meta = pickle.loads((folder / ".metadata").read_bytes())
    change(meta)
    (folder / ".metadata").write_bytes(pickle.dumps(meta))


def _verify(folder: Path):
    from ckptconv.integrity import VerifyReport
    from ckptconv.registry import get_adapter

    report = VerifyReport(str(folder), "dcp")
    get_adapter("dcp").check_integrity(folder, report)
    return report


def test_verify_intact(fsdp2_dcp):
    rep = _verify(fsdp2_dcp)
    assert rep.ok and rep.checked["tensors tiled by their chunks"] == 17
    assert ckptconv.verify(fsdp2_dcp).ok


def test_verify_truncated_distcp(fsdp2_dcp, tmp_path):
    bad = tmp_path / "ck"
    shutil.copytree(fsdp2_dcp, bad)
    f = bad / "__1_0.distcp"
    f.write_bytes(f.read_bytes()[:-3000])
    rep = _verify(bad)
    assert not rep.ok and "truncated" in rep.problems[0]
    assert not ckptconv.verify(bad).ok
    with pytest.raises(FormatError, match="truncated"):
        ckptconv.convert(bad, tmp_path / "x.pt")
    assert subprocess.run([sys.executable, "-m", "ckptconv", "convert", str(bad),
                           str(tmp_path / "y.pt")], capture_output=True).returncode == 1


def test_verify_overlapping_and_missing_chunks(fsdp2_dcp, tmp_path):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    overlap = tmp_path / "overlap"
    shutil.copytree(fsdp2_dcp, overlap)

    def shift(meta):  # the second chunk of 0.weight starts one row early
        chunks = meta.state_dict_metadata["model.0.weight"].chunks
        c = chunks[1]
        chunks[1] = ChunkStorageMetadata(torch.Size([c.offsets[0] - 1, 0]), c.sizes)
        key = next(k for k in meta.storage_data
                   if k.fqn == "model.0.weight" and k.offset == c.offsets)
        info = meta.storage_data.pop(key)
        meta.storage_data[type(key)("model.0.weight", chunks[1].offsets)] = info
        # one more row elsewhere keeps the element count equal: only tiling catches it
        meta.state_dict_metadata["model.0.weight"].size = torch.Size([11, 6])

    _rewrite_metadata(overlap, shift)
    rep = _verify(overlap)
    assert not rep.ok and "overlap" in rep.problems[0] and "model.0.weight" in rep.problems[0]

    missing = tmp_path / "missing"
    shutil.copytree(fsdp2_dcp, missing)
    _rewrite_metadata(missing, lambda m: m.state_dict_metadata["model.2.bias"].chunks.pop())
    rep = _verify(missing)
    assert not rep.ok and "model.2.bias" in rep.problems[0]


class _RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("echo pwned > pwned.txt",)


def test_metadata_that_runs_code_is_refused(plain_dcp, tmp_path):
    bad = tmp_path / "ck"
    shutil.copytree(plain_dcp, bad)
    (bad / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": _RunsCode()}))
    with pytest.raises(UnsafePickleError, match="os.system|posix.system"):
        ckptconv.load(bad, format="dcp")
    out = subprocess.run([sys.executable, "-m", "ckptconv", "inspect", str(bad)], cwd=tmp_path,
                         capture_output=True, text=True)
    assert not (tmp_path / "pwned.txt").exists()
    assert out.returncode in (1, 3)  # not even recognised as DCP, or refused


# --- writing ----------------------------------------------------------------------

def test_written_folder_loads_without_process_group(tmp_path):
    src = tmp_path / "src.pt"
    torch.save(plain_state_dict(), src)
    out = tmp_path / "out"
    rep = ckptconv.convert(src, out, to="dcp")
    assert rep.target_format == "dcp" and (out / ".metadata").is_file()
    assert ckptconv.load(out).format == "dcp"
    # torch's own reader, no process group, into a state dict of the right shapes
    template = plain_state_dict()
    for name, t in template["model"].items():
        template["model"][name] = torch.zeros_like(t)
    template["step"] = 0
    dcp.load(template, checkpoint_id=out, no_dist=True)
    assert_tree_equal(template["model"], plain_state_dict()["model"])
    assert template["step"] == 7
    # and everything, as torch rebuilds it
    assert_tree_equal(oracle(out, tmp_path), torch.load(src, weights_only=True))


def test_written_folder_loads_into_fsdp2(fsdp2_dcp, tmp_path):
    out = tmp_path / "model-dcp"
    ckptconv.convert(fsdp2_dcp, out, to="dcp", select="model")
    reference = tmp_path / "model.pt"
    ckptconv.convert(fsdp2_dcp, reference, select="model")
    launch("fsdp2_load", out, reference)


def test_dcp_to_dcp_round_trip_is_exact(fsdp2_dcp, tmp_path):
    ckptconv.convert(fsdp2_dcp, tmp_path / "again", to="dcp")
    assert_tree_equal(oracle(tmp_path / "again", tmp_path), oracle(fsdp2_dcp, tmp_path))


# --- memory: a 1 GiB folder consolidates in flat memory ------------------------------

@pytest.mark.slow
def test_1gib_dcp_consolidates_with_flat_memory(tmp_path):
    from dist_workers import ckptconv_peak_rss_mib

    src = tmp_path / "big"
    launch("dcp_big_save", src, 1024)
    assert sum(f.stat().st_size for f in src.iterdir()) >= 1 << 30
    out = tmp_path / "big.pt"
    rss = ckptconv_peak_rss_mib(["convert", src, out])
    print(f"ckptconv peak RSS {rss:.0f} MiB")
    assert rss <= 256, f"peak RSS {rss:.0f} MiB"
    got = torch.load(out, mmap=True, weights_only=True)
    rows = torch.arange(got["model"]["layers.0.weight"].shape[0], dtype=torch.float32) % 997
    for t in (0, 7, 15):
        w = got["model"][f"layers.{t}.weight"]
        assert w.shape[1] == 1024 and torch.equal(w[:, 0], t * 1000 + rows)
        assert torch.equal(w[:, 1023], t * 1000 + rows)
    assert got["step"] == 1
