"""PyTorch checkpoints: read without torch, written for torch, compared with
torch's own reader bit for bit."""
from __future__ import annotations

import io
import json
import sys
import zipfile

import numpy as np
import pytest

from conftest import assert_one_line_error, assert_tree_equal, run_cli, tensor_bytes_equal

torch = pytest.importorskip("torch")

import ckptconv  # noqa: E402


def torch_load(path):
    # Oracle only: files written by torch or by ckptconv in this test.
    return torch.load(path, weights_only=False, map_location="cpu")


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_training_checkpoint_reads_equal_to_torch(torch_files, training_ckpt, kind):
    ck = ckptconv.load(torch_files[kind])
    assert ck.format == "torch"
    assert ck.info["torch_format"] == kind
    want = torch_load(torch_files[kind])
    flat = ck.tensors()
    # every tensor in the torch-loaded tree, by flat name
    def walk(node, path):
        if isinstance(node, torch.Tensor):
            yield ".".join(path), node
        elif isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, path + [str(k)])
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                yield from walk(v, path + [str(i)])
    expected = dict(walk(want, []))
    assert set(flat) == set(expected)
    for name, t in expected.items():
        assert tensor_bytes_equal(flat[name].torch(), t), name
    assert ck.tree["epoch"] == 12
    assert type(ck.tree["global_step"]) is np.int64 and ck.tree["global_step"] == 3400
    assert ck.tree["args"].cls == "argparse.Namespace"
    assert ck.tree["args"].state["name"] == "run-7"
    # tied embedding/head: one tensor under two names
    assert ck.aliases["model_state_dict.head.weight"] == "model_state_dict.embed.weight"
    # views keep their storage offsets and strides
    sliced = flat["extras.sliced"]
    assert sliced.offset == 8 and sliced.strides == (6, 1)
    assert flat["extras.transposed"].strides == (1, 6)


@pytest.mark.parametrize("kind", ["zip", "legacy"])
@pytest.mark.parametrize("block_torch", [False, True], ids=["torch-importable", "no-torch"])
def test_pt_to_safetensors_and_back_is_bit_exact(tmp_path, torch_files, training_ckpt, kind,
                                                 block_torch):
    from safetensors import safe_open
    from safetensors.torch import load_file

    st = tmp_path / "train.safetensors"
    back = tmp_path / "back.pt"
    block = ("torch",) if block_torch else ()
    p = run_cli("convert", torch_files[kind], st, block=block)
    assert p.returncode == 0, p.stderr
    p = run_cli("convert", st, back, block=block)
    assert p.returncode == 0, p.stderr

    # the safetensors file is a normal one: load_file works, format pt, every name present
    with safe_open(st, "pt") as f:
        assert f.metadata()["format"] == "pt"
    loaded = load_file(st)
    assert tensor_bytes_equal(loaded["model_state_dict.embed.weight"],
                              training_ckpt["model_state_dict"]["embed.weight"])
    assert tensor_bytes_equal(loaded["model_state_dict.head.weight"],
                              training_ckpt["model_state_dict"]["head.weight"])
    assert tensor_bytes_equal(loaded["extras.sliced"], training_ckpt["extras"]["sliced"].contiguous())

    got = torch_load(back)
    assert_tree_equal(got, training_ckpt)
    sd = got["model_state_dict"]
    assert sd["head.weight"].data_ptr() == sd["embed.weight"].data_ptr()  # tied again
    assert got["optimizer_state_dict"]["param_groups"][0]["lr"] == 1e-3


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_pt_to_pt_keeps_views_and_storage_sharing(tmp_path, torch_files, training_ckpt, kind):
    out = tmp_path / "copy.pt"
    ckptconv.convert(torch_files[kind], out)
    got = torch_load(out)
    assert_tree_equal(got, training_ckpt)
    ex = got["extras"]
    assert ex["transposed"].stride() == (1, 6) and ex["sliced"].storage_offset() == 8
    assert ex["transposed"].untyped_storage().data_ptr() == ex["sliced"].untyped_storage().data_ptr()


def test_written_state_dict_loads_with_weights_only(tmp_path):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    sd = model.state_dict()
    extra = {"bf16": torch.randn(3).bfloat16(), "fp8": torch.randn(4).to(torch.float8_e4m3fn),
             "u16": torch.arange(5).to(torch.uint16), "c64": torch.randn(2, dtype=torch.complex64)}
    src = tmp_path / "sd.safetensors"
    from safetensors.torch import save_file
    save_file({**sd, **extra}, src)
    out = tmp_path / "sd.pt"
    ckptconv.convert(src, out)
    got = torch.load(out, weights_only=True)
    for k, v in {**sd, **extra}.items():
        assert tensor_bytes_equal(got[k], v), k
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    fresh.load_state_dict({k: got[k] for k in sd}, strict=True)


def test_torchscript_archive_weights(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)
            self.bn = torch.nn.BatchNorm1d(2)

        def forward(self, x):
            return self.bn(self.fc(x))

    net = Net().eval()
    path = tmp_path / "scripted.pt"
    torch.jit.trace(net, torch.randn(4, 3)).save(path)
    ck = ckptconv.load(path)
    assert ck.info["torch_format"] == "torchscript"
    flat = ck.tensors()
    for name, t in net.state_dict().items():
        assert tensor_bytes_equal(flat[name].torch(), t), name
    out = tmp_path / "scripted.safetensors"
    ckptconv.convert(path, out)
    from safetensors.torch import load_file
    got = load_file(out)
    fresh = Net()
    fresh.load_state_dict(got, strict=True)


def test_sharded_bin_with_index(tmp_path):
    torch.manual_seed(2)
    sd = {f"layer.{i}.weight": torch.randn(8, 8) for i in range(4)}
    shards = {"pytorch_model-00001-of-00002.bin": ["layer.0.weight", "layer.1.weight"],
              "pytorch_model-00002-of-00002.bin": ["layer.2.weight", "layer.3.weight"]}
    weight_map = {}
    for shard, names in shards.items():
        torch.save({n: sd[n] for n in names}, tmp_path / shard)
        weight_map.update({n: shard for n in names})
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1024}, "weight_map": weight_map}))
    ck = ckptconv.load(index)
    assert ck.format == "torch"
    assert list(ck.tensors()) == list(weight_map)
    for n, t in sd.items():
        assert tensor_bytes_equal(ck.tensors()[n].torch(), t)


def save_rewritten(sd, path, rename=lambda name: name, edit=lambda name, data: data):
    """torch.save ``sd``, then re-zip it member by member through ``rename``/``edit``."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(rename(info.filename), edit(info.filename, src.read(info)))
    return path


def test_zip_root_folder_name_is_free(tmp_path):
    sd = {"w": torch.randn(3, 3), "b": torch.arange(3)}
    odd = save_rewritten(sd, tmp_path / "odd.pt",
                         rename=lambda n: "some_other_root/" + n.split("/", 1)[1])
    ck = ckptconv.load(odd)
    assert ck.info["archive_root"] == "some_other_root"
    for n, t in sd.items():
        assert tensor_bytes_equal(ck.tensors()[n].torch(), t)
    assert tensor_bytes_equal(torch_load(odd)["w"], sd["w"])  # torch agrees it is valid


def test_gpu_location_tags_are_recorded_not_acted_on(tmp_path):
    """A checkpoint saved on a GPU (location 'cuda:0') reads on a CPU-only machine."""
    sd = {"w": torch.randn(2, 3)}

    def to_cuda(name, data):
        if name.endswith("data.pkl"):
            return data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        return data

    gpu = save_rewritten(sd, tmp_path / "gpu.pt", edit=to_cuda)
    ck = ckptconv.load(gpu)
    assert ck.info["storage_locations"] == ["cuda:0"]
    out = tmp_path / "cpu.pt"
    ckptconv.convert(gpu, out)
    assert tensor_bytes_equal(torch.load(out, weights_only=True)["w"], sd["w"])  # no map_location


def test_safetensors_output_loads_with_load_file(tmp_path, torch_files):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "o.safetensors"
    ckptconv.convert(torch_files["zip"], out, select="model_state_dict")
    with safe_open(out, "pt") as f:
        md = f.metadata()
    assert md["format"] == "pt"
    sd = load_file(out)
    want = torch_load(torch_files["zip"])["model_state_dict"]
    assert list(sd) == list(want) or set(sd) == set(want)
    for k in want:
        assert tensor_bytes_equal(sd[k], want[k]), k


def test_dedupe_tied_stores_once_and_reties(tmp_path, torch_files):
    from safetensors import safe_open

    out = tmp_path / "dedupe.safetensors"
    p = run_cli("convert", torch_files["zip"], out, "--dedupe-tied")
    assert p.returncode == 0, p.stderr
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
    assert "model_state_dict.embed.weight" in keys and "model_state_dict.head.weight" not in keys
    back = tmp_path / "back.pt"
    ckptconv.convert(out, back)
    sd = torch_load(back)["model_state_dict"]
    assert sd["head.weight"].data_ptr() == sd["embed.weight"].data_ptr()


def test_refuses_code_execution_with_exit_3(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned > /dev/null",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    p = run_cli("inspect", path)
    assert_one_line_error(p, 3, "evil.pt", "system")


def test_truncated_and_garbage_files_are_one_line_errors(tmp_path, torch_files):
    data = torch_files["zip"].read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        assert_one_line_error(run_cli("convert", bad, tmp_path / f"o{cut}.safetensors"), 1, bad.name)
        assert not (tmp_path / f"o{cut}.safetensors").exists()
    legacy = torch_files["legacy"].read_bytes()
    bad = tmp_path / "cut_legacy.pt"
    bad.write_bytes(legacy[: len(legacy) - 100])
    assert_one_line_error(run_cli("inspect", bad), 1, bad.name)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_one_line_error(run_cli("inspect", empty), 1, "empty")


def test_never_overwrites_without_force(tmp_path, torch_files):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    assert_one_line_error(run_cli("convert", torch_files["zip"], out), 2, "--force")
    assert out.read_bytes() == b"precious"
    assert run_cli("convert", torch_files["zip"], out, "--force").returncode == 0
    assert out.read_bytes() != b"precious"
    assert not [p for p in tmp_path.iterdir() if "ckptconv-tmp" in p.name]


def test_dtype_cast_and_select(tmp_path, torch_files, training_ckpt):
    from safetensors.torch import load_file

    out = tmp_path / "bf16.safetensors"
    p = run_cli("convert", torch_files["zip"], out, "--select", "extras", "--dtype", "bf16", "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["target_format"] == "safetensors"
    got = load_file(out)
    assert got["float64"].dtype == torch.bfloat16
    assert torch.equal(got["float64"], training_ckpt["extras"]["float64"].to(torch.bfloat16))
    assert got["int8"].dtype == torch.int8  # ints are not cast


def test_inspect_json(torch_files):
    p = run_cli("inspect", torch_files["zip"], "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["format"] == "torch"
    names = {t["name"]: t for t in rep["tensors"]}
    assert names["extras.bf16"]["dtype"] == "bfloat16" and names["extras.bf16"]["shape"] == [3, 4]
    assert rep["values"]["epoch"] == "12"
    assert rep["tied"] == {"model_state_dict.head.weight": "model_state_dict.embed.weight"}


def test_cli_import_is_light():
    code = ("import sys, ckptconv.cli; heavy = [m for m in ('torch', 'tensorflow', 'h5py', 'onnx') "
            "if m in sys.modules]; print(','.join(heavy))")
    import subprocess
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_sharded_bin_keeps_non_tensor_entries(tmp_path):
    sd = {"a.weight": torch.randn(2, 2), "b.weight": torch.randn(3)}
    torch.save({"a.weight": sd["a.weight"], "epoch": 4}, tmp_path / "m-00001-of-00002.bin")
    torch.save({"b.weight": sd["b.weight"]}, tmp_path / "m-00002-of-00002.bin")
    index = tmp_path / "m.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"a.weight": "m-00001-of-00002.bin",
                                                "b.weight": "m-00002-of-00002.bin"}}))
    with ckptconv.load(index) as ck:
        assert ck.tree["epoch"] == 4
        for n, t in sd.items():
            assert tensor_bytes_equal(ck.tensors()[n].torch(), t)
    # closed: a later read opens the file again
    assert tensor_bytes_equal(ck.tensors()["b.weight"].torch(), sd["b.weight"])


def test_torch_blob_at_an_offset_reads_lazily(tmp_path):
    """A torch.save zip stored inside a bigger file (as DCP's .distcp files hold them)."""
    from ckptconv.adapters.torch import read_torch_blob
    from ckptconv.tensor import FileHandle

    buf = io.BytesIO()
    torch.save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": 7}, buf)
    blob = buf.getvalue()
    path = tmp_path / "items.bin"
    path.write_bytes(b"x" * 1000 + blob + b"y" * 333)
    tree, info = read_torch_blob(FileHandle(path), 1000, len(blob))
    assert tree["step"] == 7 and info["torch_format"] == "zip"
    assert tree["w"].file_span()[1] >= 1000  # a range of the outer file, not a copy
    assert torch.equal(tree["w"].torch(), torch.arange(12, dtype=torch.float32).reshape(3, 4))
    with pytest.raises(ckptconv.FormatError, match="items.bin"):
        read_torch_blob(FileHandle(path), 1000, len(blob) - 40)  # cut through the end record


def test_bytes_and_bytearray_keep_their_types(tmp_path):
    src = tmp_path / "b.pt"
    torch.save({"a": bytearray(b"\x00\xffx"), "b": b"\x01\x80"}, src)
    out = tmp_path / "copy.pt"
    ckptconv.convert(src, out)
    got = torch.load(out, weights_only=True)
    assert got == {"a": bytearray(b"\x00\xffx"), "b": b"\x01\x80"}
    assert type(got["a"]) is bytearray and type(got["b"]) is bytes
