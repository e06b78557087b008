"""safetensors: single files and the Hugging Face sharded layout, compared with
safetensors' own reader and with transformers' ``from_pretrained``."""
from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ckptconv
from conftest import assert_one_line_error, run_cli


def sample(fp8=True):
    rng = np.random.default_rng(3)
    return {f"blocks.{i}.weight": rng.standard_normal((64, 32)).astype(np.float32) for i in range(6)} | {
        "norm.weight": rng.standard_normal(32).astype(ml_dtypes.bfloat16),
        **({"fp8": rng.standard_normal(8).astype(ml_dtypes.float8_e4m3fn)} if fp8 else {}),
        "u16": np.arange(9, dtype=np.uint16),
        "scalar": np.array(7, dtype=np.int64),
    }


def test_reads_files_written_by_safetensors(tmp_path):
    sd = sample()
    path = tmp_path / "m.safetensors"
    save_file(sd, path, metadata={"format": "np", "note": "hi"})
    ck = ckptconv.load(path)
    assert ck.metadata["note"] == "hi"
    for k, v in sd.items():
        ref = ck.tensors()[k]
        assert ref.shape == v.shape and ref.tobytes() == v.tobytes(), k


def test_sharded_write_is_the_hugging_face_layout(tmp_path):
    sd = sample(fp8=False)  # safetensors.numpy.load_file has no fp8
    src = tmp_path / "src.safetensors"
    save_file(sd, src)
    out = tmp_path / "out" / "model.safetensors"
    p = run_cli("convert", src, out, "--shard-size", "20KB", "--json")
    assert p.returncode == 0, p.stderr
    files = sorted(f.name for f in out.parent.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    index = json.loads((out.parent / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in sd.values())
    merged = {}
    for s in shards:
        merged.update(load_file(out.parent / s))
    for k, v in sd.items():
        assert merged[k].tobytes() == v.tobytes(), k
    # and the index reads back as one checkpoint
    ck = ckptconv.load(out.parent / "model.safetensors.index.json")
    assert ck.format == "safetensors" and set(ck.tensors()) == set(sd)
    back = tmp_path / "back.safetensors"
    ckptconv.convert(out.parent / "model.safetensors.index.json", back)
    got = load_file(back)
    for k, v in sd.items():
        assert got[k].tobytes() == v.tobytes(), k


def test_sharded_output_loads_with_from_pretrained(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=37)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    src = tmp_path / "bert.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / "hf"
    cfg.save_pretrained(out)
    p = run_cli("convert", src, out / "model.safetensors", "--shard-size", "40KB")
    assert p.returncode == 0, p.stderr
    assert (out / "model.safetensors.index.json").exists()
    loaded = transformers.BertModel.from_pretrained(out).eval()
    ids = torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_bad_headers_are_one_line_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": np.ones(4, np.float32)}, good)
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cases = {
        "absurd.safetensors": struct.pack("<Q", 1 << 60) + raw[8:],
        "cut.safetensors": raw[:8 + n // 2],
        "nodata.safetensors": raw[:-4],
        "badjson.safetensors": raw[:8] + b"{" + b" " * (n - 1) + raw[8 + n:],
        "dtype.safetensors": raw.replace(b'"F32"', b'"Q32"'),
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        assert_one_line_error(run_cli("inspect", p), 1, name)


def test_overlapping_offsets_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p = tmp_path / "overlap.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))
    assert_one_line_error(run_cli("inspect", p), 1, "overlap")


def test_sharded_total_size_is_recomputed_not_carried_over(tmp_path):
    # a total_size read from a source index once replaced the new shards' own
    sd = {"a": np.ones(100, np.float32), "b": np.ones(100, np.float32)}
    src = tmp_path / "src" / "model.safetensors.index.json"
    ckptconv.save(sd, src, shard_size=400)
    assert "total_size" not in ckptconv.load(src).metadata
    dst = tmp_path / "dst" / "model.safetensors.index.json"
    ckptconv.convert(src, dst, dtype="float16", shard_size=200)
    # an int, as transformers writes it (it was once written as the string "400")
    assert json.loads(dst.read_text())["metadata"]["total_size"] == 400


def test_index_with_bad_metadata_is_a_one_line_error(tmp_path):
    p = tmp_path / "model.safetensors.index.json"
    p.write_text(json.dumps({"metadata": [1], "weight_map": {}}))
    assert_one_line_error(run_cli("inspect", p), 1, "metadata")


def test_verbs_stay_callable_after_every_submodule_is_imported(tmp_path):
    # importing a submodule binds it on the package: a submodule named like an
    # exported function (it was ckptconv/verify.py) hides the function
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(ckptconv.__path__):
        if mod.name != "__main__":
            importlib.import_module(f"ckptconv.{mod.name}")
    p = tmp_path / "m.safetensors"
    ckptconv.save({"a": np.ones(3, np.float32)}, p)
    assert ckptconv.verify(p).ok and ckptconv.verify(p).ok
    assert ckptconv.check is ckptconv.api.check and ckptconv.scan is ckptconv.api.scan
