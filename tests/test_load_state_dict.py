"""``ckptconv.load_state_dict``: any checkpoint as a dict of torch tensors, checked
value by value against the peers that read the same file (``torch.load(mmap=True,
weights_only=True)``, safetensors' ``load_file``, h5py), ties and shared storages
included."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ckptconv  # noqa: E402
from conftest import tensor_bytes_equal  # noqa: E402


def flatten(tree, prefix=""):
    """The flat names ckptconv gives a nested checkpoint: path joined with '.'."""
    out = {}
    items = tree.items() if isinstance(tree, dict) else \
        enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[name] = v
        else:
            out.update(flatten(v, name + "."))
    return out


def same_storage(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert tensor_bytes_equal(g, w), name
        assert g.stride() == w.stride(), name
        assert g.device.type == "cpu" and not g.requires_grad


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.proj = torch.nn.Linear(6, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied input/output embeddings


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    """A training checkpoint (ties, views of one storage, odd dtypes) saved by torch
    in the zip and the legacy format."""
    torch.manual_seed(0)
    net = Tied()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sum(p.pow(2).sum() for p in net.parameters()).backward()
    opt.step()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    ck = {"step": 7, "model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(),
          "extras": {"transposed": base.t(), "sliced": base[1:3, 2:5],
                     "bf16": torch.randn(3, 4).to(torch.bfloat16), "empty": torch.empty(0, 3),
                     "scalar": torch.tensor(3.25), "flags": torch.tensor([True, False]),
                     "int8": torch.arange(-3, 4, dtype=torch.int8)}}
    d = tmp_path_factory.mktemp("sd")
    files = {"zip": d / "train.pt", "legacy": d / "train_legacy.pt"}
    torch.save(ck, files["zip"])
    torch.save(ck, files["legacy"], _use_new_zipfile_serialization=False)
    return files


@pytest.mark.parametrize("kind", ["zip", "legacy"])
@pytest.mark.parametrize("mmap", [True, False])
def test_torch_files_match_torch_load(torch_files, kind, mmap):
    path = torch_files[kind]
    want = flatten(torch.load(path, mmap=mmap and kind == "zip", weights_only=True))
    got = ckptconv.load_state_dict(path, mmap=mmap)
    assert_same_tensors(got, want)
    # storages shared in the file are shared here as in torch.load: tied weights,
    # and views of one storage (a transposed and a sliced view of one tensor)
    for a, b in (("model_state_dict.embed.weight", "model_state_dict.head.weight"),
                 ("extras.transposed", "extras.sliced")):
        assert same_storage(want[a], want[b])
        assert same_storage(got[a], got[b]), (a, b)
    assert got["model_state_dict.embed.weight"] is got["model_state_dict.head.weight"]
    # the optimizer's state has its own tensors, not views of the weights
    assert not same_storage(got["optimizer_state_dict.state.0.exp_avg"],
                            got["model_state_dict.embed.weight"])


def test_mmap_tensors_are_private_maps(torch_files, tmp_path):
    path = tmp_path / "copy.pt"
    path.write_bytes(torch_files["zip"].read_bytes())
    before = path.read_bytes()
    sd = ckptconv.load_state_dict(path)
    sd["model_state_dict.proj.weight"].add_(1)        # copy-on-write: the file stays
    assert path.read_bytes() == before
    again = ckptconv.load_state_dict(path)
    assert not torch.equal(again["model_state_dict.proj.weight"], sd["model_state_dict.proj.weight"])


def test_select_and_mapping(torch_files):
    path = torch_files["zip"]
    want = torch.load(path, weights_only=True)["model_state_dict"]
    got = ckptconv.load_state_dict(path, select="model_state_dict", mapping="proj.{x} -> out.{x}")
    assert sorted(got) == sorted(k.replace("proj.", "out.") for k in want)
    assert torch.equal(got["out.weight"], want["proj.weight"])
    assert got["embed.weight"] is got["head.weight"]


@pytest.fixture(scope="module")
def flat_state():
    g = torch.Generator().manual_seed(3)
    return {"a.weight": torch.randn(33, 17, generator=g),
            "a.bias": torch.randn(17, generator=g).to(torch.bfloat16),
            "b.half": torch.randn(5, 3, generator=g).to(torch.float16),
            "b.int": torch.arange(-4, 7, dtype=torch.int64),
            "b.flags": torch.tensor([True, False, True]),
            "b.scalar": torch.tensor(2.5, dtype=torch.float64),
            "b.empty": torch.empty(0, 4)}


def test_safetensors_matches_load_file(flat_state, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m.safetensors"
    save_file(flat_state, path)
    want = load_file(path)
    assert_same_tensors(ckptconv.load_state_dict(path), want)
    assert_same_tensors(ckptconv.load_state_dict(path, mmap=False), want)


def test_hdf5_matches_h5py(flat_state, tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "m.h5"
    arrays = {k: v for k, v in flat_state.items() if v.dtype != torch.bfloat16}
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k.replace(".", "/"), data=v.numpy())
        f.create_dataset("c/chunked", data=arrays["a.weight"].numpy(), chunks=(8, 17),
                         compression="gzip")
        f.create_dataset("c/big_endian", data=arrays["a.weight"].numpy().astype(">f4"))
    with h5py.File(path, "r") as f:
        want = {}
        f.visititems(lambda n, o: want.__setitem__(n, torch.from_numpy(
            np.asarray(o[()], dtype=o.dtype.newbyteorder("="))).reshape(o.shape))
            if isinstance(o, h5py.Dataset) else None)
    got = ckptconv.load_state_dict(path)
    assert sorted(got) == sorted(want)
    for k in want:
        assert tensor_bytes_equal(got[k], want[k]), k


def test_tf_bundle_matches_the_source(flat_state, tmp_path):
    from safetensors.torch import load_file, save_file

    st = tmp_path / "m.safetensors"
    save_file({k: v for k, v in flat_state.items() if v.dtype != torch.bool}, st)
    ckptconv.convert(st, tmp_path / "tf" / "model.ckpt", to="tf")
    got = ckptconv.load_state_dict(tmp_path / "tf" / "model.ckpt")
    want = load_file(st)
    assert sorted(got) == sorted(want)
    for k in want:
        assert tensor_bytes_equal(got[k], want[k]), k


def test_many_small_tensors_share_one_map(tmp_path):
    sd = {f"p.{i}": torch.full((3,), float(i)) for i in range(500)}
    path = tmp_path / "many.pt"
    torch.save(sd, path)
    got = ckptconv.load_state_dict(path)
    assert_same_tensors(got, torch.load(path, mmap=True, weights_only=True))
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 500


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cuda_device(torch_files):
    path = torch_files["zip"]
    want = flatten(torch.load(path, weights_only=True))
    got = ckptconv.load_state_dict(path, device="cuda")
    for k, w in want.items():
        assert got[k].device.type == "cuda", k
        assert tensor_bytes_equal(got[k].cpu(), w), k
    assert got["model_state_dict.embed.weight"] is got["model_state_dict.head.weight"]


# modules a local load never needs: object storage, writers, streaming copies,
# CRC checks, progress bars, and (for safetensors) the pickle engine
NOT_ON_THE_LOAD_PATH = ("ckptconv.remote", "fsspec", "ckptconv.zipstream", "ckptconv.streaming",
                        "ckptconv.progress", "ckptconv.atomic", "ckptconv.crc",
                        "ckptconv.adapters.torch.writer", "ckptconv.adapters._io",
                        "ckptconv.verbs.convert", "ckptconv.mapping")


@pytest.mark.parametrize("kind", ["safetensors", "zip .pt"])
def test_a_first_load_imports_only_what_it_uses(tmp_path, kind):
    """The first ``load_state_dict`` of a process (#14: a cold call against
    ``load_file`` / ``torch.load``) imports the reader's modules, not the rest."""
    import json
    import subprocess
    import sys

    from safetensors.torch import save_file

    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    path = tmp_path / ("m.safetensors" if kind == "safetensors" else "m.pt")
    save_file(sd, path) if kind == "safetensors" else torch.save(sd, path)
    code = ("import sys, json, torch, ckptconv\n"
            f"sd = ckptconv.load_state_dict({str(path)!r})\n"
            "assert sorted(sd) == ['b', 'w'], sorted(sd)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('ckptconv', 'fsspec')))))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    loaded = set(json.loads(p.stdout.strip().splitlines()[-1]))
    unused = set(NOT_ON_THE_LOAD_PATH) | (
        {"ckptconv.pickle", "ckptconv.adapters.torch"} if kind == "safetensors" else
        {"ckptconv.adapters.torch.legacy_reader", "ckptconv.adapters.torch.weights_only",
         "ckptconv.sharding"})
    assert loaded & unused == set()
    reader = "ckptconv.adapters.safetensors_" if kind == "safetensors" else "ckptconv.adapters.torch"
    assert reader in loaded
