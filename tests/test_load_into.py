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
