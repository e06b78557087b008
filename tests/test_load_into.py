"""``load_into``: finds the weights inside training checkpoints, loads what fits,
reports missing / unexpected / mismatched, and loads GPU-saved files on a CPU.
Fixtures are written by torch.save and safetensors."""
from __future__ import annotations

import zipfile

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import ckptconv  # noqa: E402
from ckptconv import Checkpoint, MappingError  # noqa: E402
from ckptconv.verbs.load_into import LoadReport  # noqa: E402


# --- a GE2E speaker encoder (Real-Time-Voice-Cloning / Resemblyzer layout) ----------------

MEL_CHANNELS, HIDDEN, EMBEDDING, LAYERS = 40, 256, 256, 3


class SpeakerEncoder(nn.Module):
    """The training model: the GE2E loss's similarity scale and bias are parameters."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(MEL_CHANNELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, EMBEDDING)
        self.relu = nn.ReLU()
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    def forward(self, mels):
        _, (hidden, _) = self.lstm(mels)
        raw = self.relu(self.linear(hidden[-1]))
        return raw / torch.norm(raw, dim=1, keepdim=True)


class VoiceEncoder(nn.Module):
    """The inference model: the same network without the loss parameters."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(MEL_CHANNELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, EMBEDDING)
        self.relu = nn.ReLU()

    forward = SpeakerEncoder.forward


def retag_storages(src, dst, old: str = "cpu", new: str = "cuda:0") -> int:
    """Rewrite the storages' location tag in data.pkl of a torch zip file, as if
    the file had been saved on a GPU. Pickle protocol 2 writes the tag as
    BINUNICODE ('X', 4-byte little-endian length, UTF-8), memoized or once per
    storage depending on the torch version; every occurrence is rewritten (a
    file torch 2.11 saved on an H200 has 'cuda:0' so, once per storage)."""
    old_op = b"X" + len(old).to_bytes(4, "little") + old.encode()
    new_op = b"X" + len(new).to_bytes(4, "little") + new.encode()
    count = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                count = data.count(old_op)
                data = data.replace(old_op, new_op)
            zout.writestr(zipfile.ZipInfo(info.filename, info.date_time), data,
                          compress_type=zipfile.ZIP_STORED)
    return count


@pytest.fixture(scope="module")
def ge2e_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = SpeakerEncoder()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss = model(torch.randn(4, 10, MEL_CHANNELS)).sum() * model.similarity_weight + model.similarity_bias
    loss.sum().backward()
    opt.step()
    d = tmp_path_factory.mktemp("ge2e")
    cpu_path, gpu_path = d / "cpu.pt", d / "encoder.pt"
    torch.save({"step": 1234, "model_state": model.state_dict(), "optimizer_state": opt.state_dict()},
               cpu_path)
    assert retag_storages(cpu_path, gpu_path) >= 1
    return model, gpu_path


def test_gpu_tagged_file_fails_in_plain_torch(ge2e_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the tag is loadable here")
    _, path = ge2e_checkpoint
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)
    # ... while map_location says it is a sound file
    assert "model_state" in torch.load(path, weights_only=True, map_location="cpu")


def test_ge2e_training_checkpoint_loads_with_a_bare_call(ge2e_checkpoint):
    model, path = ge2e_checkpoint
    encoder = VoiceEncoder()
    report = ckptconv.load_into(encoder, path)
    assert isinstance(report, LoadReport)
    assert report.source_subtree == "model_state"
    assert sorted(report.loaded) == sorted(encoder.state_dict())
    assert report.missing == [] and report.mismatched == []
    assert sorted(report.unexpected) == ["similarity_bias", "similarity_weight"]
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    mels = torch.randn(2, 7, MEL_CHANNELS)
    with torch.no_grad():
        torch.testing.assert_close(encoder(mels), model(mels), rtol=0, atol=0)
    assert "model_state" in str(report) and "similarity_weight" in str(report)
    d = report.to_dict()
    assert d["source_subtree"] == "model_state" and len(d["loaded"]) == len(report.loaded)


def test_select_overrides_the_search_and_checkpoint_objects_work(ge2e_checkpoint):
    _, path = ge2e_checkpoint
    ck = ckptconv.load(path)
    report = ckptconv.load_into(VoiceEncoder(), ck, select="model_state", device="cpu")
    assert report.source_subtree == "model_state" and not report.missing
    report = ckptconv.load_into(VoiceEncoder(), ck, select="optimizer_state")
    assert report.loaded == [] and len(report.missing) == len(VoiceEncoder().state_dict())


class Small(nn.Module):
    def __init__(self, out=3):
        super().__init__()
        self.fc = nn.Linear(4, out)
        self.bn = nn.BatchNorm1d(out)


def test_mismatched_shapes_are_reported_not_fatal(tmp_path):
    path = tmp_path / "m.safetensors"
    src = Small(out=5)
    ckptconv.save({k: v for k, v in src.state_dict().items()}, path)
    dst = Small(out=3)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = ckptconv.load_into(dst, path)
    assert report.loaded == ["bn.num_batches_tracked"]
    mism = {m["name"]: (m["checkpoint"], m["model"]) for m in report.mismatched}
    assert mism["fc.weight"] == ([5, 4], [3, 4]) and mism["bn.running_var"] == ([5], [3])
    assert torch.equal(dst.fc.weight, before["fc.weight"])
    with pytest.raises(MappingError, match=r"strict load into Small failed: .*mismatched \(fc\.weight"):
        ckptconv.load_into(dst, path, strict=True)


def test_strict_success_mapping_and_dtype_cast(tmp_path):
    src = Small()
    sd = {k.replace("fc.", "dense."): v for k, v in src.state_dict().items()}
    sd["dense.weight"] = sd["dense.weight"].to(torch.bfloat16)
    path = tmp_path / "renamed.pt"
    torch.save({"model": sd, "epoch": 3}, path)
    dst = Small()
    report = ckptconv.load_into(dst, path, mapping="dense.{x} -> fc.{x}", strict=True)
    assert report.source_subtree == "model" and not report.missing and not report.unexpected
    assert dst.fc.weight.dtype == torch.float32
    torch.testing.assert_close(dst.fc.weight, src.fc.weight.to(torch.bfloat16).float())
    torch.testing.assert_close(dst.bn.running_var, src.bn.running_var)


def test_dataparallel_prefix_is_found(tmp_path):
    src = Small()
    path = tmp_path / "dp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = Small()
    report = ckptconv.load_into(dst, path)
    assert not report.missing and not report.unexpected
    assert any("module." in n for n in report.notes)
    assert torch.equal(dst.fc.bias, src.fc.bias)


def test_best_fitting_subtree_wins_over_names(tmp_path):
    good, other = Small(), nn.Linear(2, 2)
    ck = Checkpoint.from_state_dict({"net": other.state_dict(), "ema": good.state_dict()})
    report = ckptconv.load_into(Small(), ck)
    assert report.source_subtree == "ema" and not report.missing


def test_no_tensors_is_an_error():
    with pytest.raises(MappingError, match="no tensors"):
        ckptconv.load_into(Small(), Checkpoint({"step": 1}))


def test_device_move(tmp_path):
    path = tmp_path / "s.safetensors"
    ckptconv.save(dict(Small().state_dict()), path)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dst = Small()
    report = ckptconv.load_into(dst, path, device=dev)
    assert dst.fc.weight.device.type == dev and not report.missing
    assert any("moved to" in n for n in report.notes)


# --- bytes straight into the parameters: every format, hooks, casts, layouts --------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(13, 8)
        self.fc = nn.Linear(8, 6)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(8, 13, bias=False)
        self.head.weight = self.embed.weight  # tied


def fresh_net() -> Net:
    net = Net()
    with torch.no_grad():
        for t in net.state_dict().values():
            t.fill_(7)
    return net


@pytest.fixture(scope="module")
def net_files(tmp_path_factory):
    """The state dict of a trained Net saved by torch (zip, legacy), safetensors,
    and converted from the safetensors file to a TF bundle and HDF5."""
    from safetensors.torch import save_model

    torch.manual_seed(1)
    net = Net()
    net.bn(torch.randn(5, 6))
    d = tmp_path_factory.mktemp("net")
    files = {"zip": d / "net.pt", "legacy": d / "legacy.pt", "safetensors": d / "net.safetensors"}
    torch.save(net.state_dict(), files["zip"])
    torch.save(net.state_dict(), files["legacy"], _use_new_zipfile_serialization=False)
    save_model(net, files["safetensors"])
    files["tf"] = d / "tf" / "model.ckpt"
    ckptconv.convert(files["safetensors"], files["tf"], to="tf")
    if pytest.importorskip("h5py"):
        files["hdf5"] = d / "net.h5"
        ckptconv.convert(files["safetensors"], files["hdf5"], to="hdf5")
    return net.state_dict(), files


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "tf", "hdf5"])
def test_every_format_fills_the_parameters_in_place(net_files, kind):
    want, files = net_files
    dst = fresh_net()
    ptrs = {k: v.data_ptr() for k, v in dst.state_dict().items()}
    report = ckptconv.load_into(dst, files[kind])
    # save_model keeps one name of a tie (as load_model expects): the other is missing
    assert report.missing == ([] if kind in ("zip", "legacy") else ["head.weight"])
    assert not report.mismatched
    for k, v in dst.state_dict().items():
        assert torch.equal(v, want[k]), k
        assert v.data_ptr() == ptrs[k], k          # the module's own memory, not a new tensor
    assert dst.head.weight is dst.embed.weight


def test_pieces_threads_and_cast_chunks(net_files, monkeypatch):
    """Tiny pieces and staging buffers: a tensor is read in many preadv pieces on
    threads, and cast from a bf16 file a few elements at a time."""
    from ckptconv.verbs import torch_fill

    monkeypatch.setattr(torch_fill, "PIECE_BYTES", 64)
    monkeypatch.setattr(torch_fill, "STAGING_BYTES", 48)
    want, files = net_files
    dst = fresh_net()
    ckptconv.load_into(dst, files["zip"])
    for k, v in dst.state_dict().items():
        assert torch.equal(v, want[k]), k
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in want.items()}
    path = files["zip"].with_name("bf16.pt")
    torch.save(half, path)
    dst, oracle = fresh_net(), fresh_net()
    ckptconv.load_into(dst, path)
    oracle.load_state_dict(torch.load(path, weights_only=True))
    for k, v in dst.state_dict().items():
        assert v.dtype == oracle.state_dict()[k].dtype and torch.equal(v, oracle.state_dict()[k]), k


class Hooked(nn.Module):
    """Modules with their own loading code: a pre-hook that rescales and renames,
    an overridden _load_from_state_dict that transposes, a post-hook."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(4, 4)
        self.scaled = nn.Linear(4, 3)
        self.scaled._register_load_state_dict_pre_hook(self._rescale)
        self.flipped = Flipped()
        self.seen = []
        self.register_load_state_dict_post_hook(lambda m, keys: self.seen.append(
            sorted(keys.missing_keys)))

    @staticmethod
    def _rescale(state_dict, prefix, *args):
        if prefix + "weight" in state_dict:
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"] * 2
        if prefix + "old_bias" in state_dict:
            state_dict[prefix + "bias"] = state_dict.pop(prefix + "old_bias")


class Flipped(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 3))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict:
            state_dict = {**state_dict, prefix + "weight": state_dict[prefix + "weight"].t()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def test_modules_own_hooks_run_as_with_load_state_dict(tmp_path):
    torch.manual_seed(2)
    src = Hooked()
    path = tmp_path / "hooked.pt"
    torch.save(src.state_dict(), path)
    ours, oracle = Hooked(), Hooked()
    report = ckptconv.load_into(ours, path)
    oracle.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(report.loaded) == sorted(src.state_dict()) and not report.missing
    for k, v in oracle.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert torch.equal(ours.scaled.weight, src.scaled.weight * 2)
    assert torch.equal(ours.flipped.weight, src.flipped.weight.t())
    assert ours.seen and ours.seen[-1] == oracle.seen[-1] == []


class OwnLoader(Net):
    """A model whose own ``load_state_dict`` does more than torch's."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self.calls = getattr(self, "calls", 0) + 1
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def test_a_post_hook_alone_or_an_own_load_state_dict_still_runs(net_files):
    """Plain modules only: the copies onto themselves are skipped, but a load
    post-hook (on any module) or an overridden load_state_dict runs as before."""
    want, files = net_files
    for hooked_at in ("", "bn"):
        dst = fresh_net()
        seen = []
        dst.get_submodule(hooked_at).register_load_state_dict_post_hook(
            lambda m, keys: seen.append(list(keys.missing_keys)))
        report = ckptconv.load_into(dst, files["zip"])
        assert not report.missing and seen == [[]], hooked_at
    dst = OwnLoader()
    report = ckptconv.load_into(dst, files["zip"])
    assert not report.missing and dst.calls == 1
    for k, v in dst.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_strided_sources_and_a_strided_parameter(tmp_path):
    """A transposed view saved by torch (strided bytes in the file) and a parameter
    that is itself a transposed view: copied through a map of the file."""
    torch.manual_seed(3)
    src = Small()
    sd = dict(src.state_dict())
    sd["fc.weight"] = sd["fc.weight"].t().contiguous().t()      # stored column-major
    assert not sd["fc.weight"].is_contiguous()
    path = tmp_path / "strided.pt"
    torch.save(sd, path)
    dst = Small()
    with torch.no_grad():
        dst.fc.weight = nn.Parameter(torch.zeros(4, 3).t())      # a column-major parameter
    report = ckptconv.load_into(dst, path)
    assert not report.missing and not report.mismatched
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_mapping_transform_and_device_cpu(tmp_path):
    torch.manual_seed(4)
    src = Small()
    sd = {("dense.kernel" if k == "fc.weight" else k): (v.t() if k == "fc.weight" else v)
          for k, v in src.state_dict().items()}
    path = tmp_path / "keras_like.safetensors"
    ckptconv.save({k: v.contiguous() for k, v in sd.items()}, path)
    dst = Small()
    report = ckptconv.load_into(dst, path, mapping="dense.kernel -> fc.weight | transpose",
                                device="cpu", strict=True)
    assert not report.missing
    assert torch.equal(dst.fc.weight, src.fc.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cuda_through_small_pinned_buffers(net_files, monkeypatch):
    from ckptconv.verbs import torch_fill

    monkeypatch.setattr(torch_fill, "STAGING_BYTES", 96)   # many round trips through both buffers
    want, files = net_files
    for kind in ("zip", "safetensors"):
        dst = fresh_net()
        report = ckptconv.load_into(dst, files[kind], device="cuda")
        assert not report.missing
        for k, v in dst.state_dict().items():
            assert v.device.type == "cuda" and torch.equal(v.cpu(), want[k]), (kind, k)


NO_CUDA = "needs no CUDA device (checks the error a CPU-only machine gives)"


@pytest.mark.skipif(torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_without_a_cuda_device_is_a_usage_error(net_files):
    from ckptconv.errors import UsageError

    _, files = net_files
    dst = fresh_net()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(UsageError, match="device 'cuda'.*is_available"):
        ckptconv.load_into(dst, files["safetensors"], device="cuda")
    for k, v in dst.state_dict().items():    # refused before anything was loaded or moved
        assert v.device.type == "cpu" and torch.equal(v, before[k]), k
    with pytest.raises(UsageError, match="device 'cuda:0'"):
        ckptconv.load_state_dict(files["zip"], device="cuda:0")
    with pytest.raises(UsageError, match="device 'gpu'"):
        ckptconv.load_state_dict(files["zip"], device="gpu")


def test_device_staging_path_on_cpu(tmp_path, monkeypatch):
    """The GPU path's double buffering (read into one staging buffer while the other
    is copied out), run with CPU targets and tiny buffers: every piece lands at its
    place, casts included. Pinning and CUDA events are what only a GPU run checks."""
    from safetensors.torch import save_file

    from ckptconv.verbs import torch_fill

    monkeypatch.setattr(torch_fill, "STAGING_BYTES", 96)
    torch.manual_seed(5)
    sd = {"a": torch.randn(37, 5), "b": torch.randint(-900, 900, (1001,), dtype=torch.int16),
          "c": torch.randn(7, 3).to(torch.bfloat16), "d": torch.randn(24)}
    path = tmp_path / "stage.safetensors"
    save_file(sd, path)
    refs = ckptconv.load(path).tensors()
    with torch_fill.Filler() as filler:
        got = {}
        for name, ref in refs.items():
            dtype = torch.float64 if name == "d" else sd[name].dtype   # "d" is cast
            got[name] = torch.empty(sd[name].shape, dtype=dtype)
            filler._fill_device(got[name], ref, ref.file_span())
    for name, want in sd.items():
        assert torch.equal(got[name], want.to(got[name].dtype)), name


RSS_CHILD = """
import json, sys, torch, ckptconv
shapes = json.loads(sys.argv[2])
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(s)) for s in shapes)
m = M()
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")   # reset the peak
before = status("VmRSS:")
report = ckptconv.load_into(m, sys.argv[1])
assert not report.missing and not report.mismatched, report
print(json.dumps({"growth": status("VmHWM:") - before}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_peak_rss_grows_by_the_model_and_at_most_128_mib(tmp_path, suffix):
    """512 MiB of fp32 in 16 tensors: the load adds the parameters' own pages and
    at most 128 MiB more (measured in a fresh process, peak reset before the load)."""
    import json
    import subprocess
    import sys

    shapes = [[2048, 4096]] * 16
    path = tmp_path / f"big{suffix}"
    make = ("import sys, torch, ckptconv\n"
            "sd = {f'layers.{i}': torch.randn(2048, 4096) for i in range(16)}\n"
            "torch.save(sd, sys.argv[1]) if sys.argv[1].endswith('.pt') else ckptconv.save(sd, sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", make, str(path)], check=True)
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), json.dumps(shapes)],
                         check=True, capture_output=True, text=True)
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    model = 16 * 2048 * 4096 * 4
    assert growth <= model + (128 << 20), (growth >> 20, model >> 20)
