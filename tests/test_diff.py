"""``diff``: keys, shapes, dtypes, streamed value differences; ``--suggest``
rules that ``convert --map`` and ``load_into`` accept."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import ckptconv
from ckptconv import Checkpoint
from ckptconv.verbs.diff import compare_values, diff, name_similarity, suggest_rules
from ckptconv.mapping import Mapping
from ckptconv.tensor import ArrayTensor


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ckptconv", *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    a = {"same": w, "changed": w, "only_a": np.ones(2, np.float32), "shape": np.zeros((2, 3), np.float32),
         "dtype": np.ones(4, np.float32), "ints": np.arange(5, dtype=np.int64)}
    w2 = w.copy()
    w2[3, 4] += 0.5
    b = {"same": w, "changed": w2, "only_b": np.ones(2, np.float32), "shape": np.zeros((3, 2), np.float32),
         "dtype": np.ones(4, np.float16), "ints": np.arange(5, dtype=np.int64)}
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ckptconv.save(a, pa)
    ckptconv.save(b, pb)
    return pa, pb, w, w2


def test_diff_report(pair):
    pa, pb, w, w2 = pair
    r = diff(pa, pb)
    assert r.only_a == ["only_a"] and r.only_b == ["only_b"]
    assert r.shape_mismatch == [{"name": "shape", "a": [2, 3], "b": [3, 2]}]
    assert r.dtype_mismatch == [{"name": "dtype", "a": "float32", "b": "float16"}]
    (v,) = r.value_diffs
    assert v["name"] == "changed" and v["max_abs"] == pytest.approx(0.5)
    assert v["max_rel"] == pytest.approx(0.5 / max(abs(w[3, 4]), abs(w2[3, 4])))
    assert r.identical == 2 and r.compared == 5 and r.exit_code == 0  # same, ints (dtype: values equal)
    text = str(r)
    assert "only in A: only_a" in text and "value: changed: max abs 0.5" in text
    json.dumps(r.to_dict())


def test_values_are_compared_in_chunks():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(1000).astype(np.float32)
    y = x + rng.standard_normal(1000).astype(np.float32) * 1e-3
    y[10], x[20], y[20], x[30] = np.nan, np.nan, np.nan, 0
    y[30] = 0
    whole = compare_values(ArrayTensor(x), ArrayTensor(y), chunk_elements=10**6)
    for chunk in (1, 7, 64, 999):
        part = compare_values(ArrayTensor(x), ArrayTensor(y), chunk_elements=chunk)
        assert part.max_abs == whole.max_abs == np.inf  # NaN on one side only
        assert part.max_rel == whole.max_rel
    y[10] = x[10]
    r = compare_values(ArrayTensor(x), ArrayTensor(y), chunk_elements=7)
    d = np.abs(x.astype(np.float64) - y)
    assert r.max_abs == pytest.approx(np.nanmax(d))
    assert compare_values(ArrayTensor(x), ArrayTensor(x.copy()), chunk_elements=3).identical


def test_same_bytes_of_the_same_file_are_equal_unread(pair):
    pa = pair[0]
    a1, a2 = ckptconv.load(pa).tensors(), ckptconv.load(pa).tensors()
    assert compare_values(a1["same"], a2["same"]).identical


def test_cli_diff_json_and_map(pair, tmp_path):
    pa, pb, *_ = pair
    r = cli("diff", pa, pb, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["only_a"] == ["only_a"] and d["value_diffs"][0]["name"] == "changed"
    r = cli("diff", pa, pb, "--map", "only_a -> only_b\nshape -> shape | transpose", "--json")
    d = json.loads(r.stdout)
    assert d["only_a"] == [] and d["only_b"] == [] and d["shape_mismatch"] == []
    assert d["mapping"]["matched"] == 2


def test_name_similarity():
    assert name_similarity("blocks.0.attn.proj.weight", "layers.0.attention.proj.weight") > \
        name_similarity("blocks.0.attn.proj.weight", "layers.0.attention.proj.bias")
    assert name_similarity("blocks.0.norm1.weight", "layers.1.ln_1.weight") == 0  # numbers differ
    assert name_similarity("enc.emb.weight", "encoder.embedding.weight") > 0.8


def test_suggest_transpose_and_split():
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((6, 4)).astype(np.float32)
    k = rng.standard_normal((4, 5)).astype(np.float32)
    a = Checkpoint.from_state_dict({"attn/qkv/kernel": qkv, "dense/kernel": k})
    b = Checkpoint.from_state_dict({"attn.q.kernel": qkv[:2], "attn.k.kernel": qkv[2:4],
                                    "attn.v.kernel": qkv[4:], "dense.weight": k.T.copy()})
    s = suggest_rules(a.tensors(), b.tensors())
    m = Mapping.parse(s.text)
    out = m.apply(a).tensors()
    for n, ref in b.tensors().items():
        np.testing.assert_array_equal(out[n].numpy(), ref.numpy())
    assert "split(0)" in s.text and "transpose" in s.text


# --- a torch model and a drifted variant -------------------------------------------------

def drift_models():
    """ModelA and ModelB: B renames modules (blocks->layers, attn->attention,
    norm1->ln_1, mlp->ffn, embed->embedding, norm->final_norm), fuses q/k/v
    into qkv and adds a layer (pre_head)."""
    from torch import nn

    H = 8

    class AttnA(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.proj = (nn.Linear(H, H) for _ in range(4))

    class MlpA(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(H, 4 * H), nn.Linear(4 * H, H)

    class BlockA(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(H), AttnA(), nn.LayerNorm(H), MlpA()

    class ModelA(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, H)
            self.blocks = nn.ModuleList([BlockA() for _ in range(3)])
            self.norm = nn.LayerNorm(H)
            self.head = nn.Linear(H, 10)

    class AttnB(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(H, 3 * H), nn.Linear(H, H)

    class BlockB(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attention, self.ln_2, self.ffn = nn.LayerNorm(H), AttnB(), nn.LayerNorm(H), MlpA()

    class ModelB(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(50, H)
            self.layers = nn.ModuleList([BlockB() for _ in range(3)])
            self.final_norm = nn.LayerNorm(H)
            self.pre_head = nn.Linear(H, H)  # added
            self.head = nn.Linear(H, 10)

    return ModelA, ModelB


def test_suggest_maps_a_model_onto_its_drifted_variant(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    ModelA, ModelB = drift_models()
    torch.manual_seed(0)
    a, b = ModelA(), ModelB()  # independent random weights: names and shapes only
    for m in a.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(a.state_dict(), pa)
    torch.save(b.state_dict(), pb)
    r = cli("diff", pa, pb, "--suggest")
    assert r.returncode == 0, r.stderr
    rules = tmp_path / "suggested.rules"
    rules.write_text(r.stdout)
    Mapping.load(str(rules))  # a rules file convert --map accepts
    assert "concat(0)" in r.stdout and "{i}" in r.stdout
    report = ckptconv.load_into(b, pa, mapping=str(rules))
    assert sorted(report.missing) == ["pre_head.bias", "pre_head.weight"]
    assert report.unexpected == [] and report.mismatched == []
    sa = a.state_dict()
    for i in range(3):
        want = torch.cat([sa[f"blocks.{i}.attn.{x}.weight"] for x in "qkv"])
        assert torch.equal(b.layers[i].attention.qkv.weight, want)
        assert torch.equal(b.layers[i].ln_2.bias, sa[f"blocks.{i}.norm2.bias"])
        assert torch.equal(b.layers[i].ffn.fc2.weight, sa[f"blocks.{i}.mlp.fc2.weight"])
    assert torch.equal(b.final_norm.weight, a.norm.weight)
    assert torch.equal(b.embedding.weight, a.embed.weight)
    # and convert --map takes the same file
    out = tmp_path / "b_from_a.safetensors"
    r = cli("convert", pa, out, "--map", rules)
    assert r.returncode == 0, r.stderr
    assert set(ckptconv.load(out).tensors()) == set(b.state_dict()) - {"pre_head.weight", "pre_head.bias"}


# --- non-tensor values: epoch, hyper-parameters, preprocessing constants, metadata ---------

@pytest.fixture(scope="module")
def runs_pair(tmp_path_factory):
    """Two torch checkpoints of one run, as training scripts save them: model and
    optimizer state, epoch, loss, hyper-parameters and normalisation constants."""
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("drift")
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def save(path, epoch, loss, lr, mean, std, extra):
        torch.save({"epoch": epoch, "model_state_dict": net.state_dict(),
                    "optimizer_state_dict": opt.state_dict(), "loss": loss,
                    "hparams": {"lr": lr, "batch_size": 32, "augment": True},
                    "normalize": {"mean": mean, "std": torch.tensor(std)}, **extra}, path)

    save(d / "a.pth", 3, 0.5, 0.1, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], {"note": "warmup"})
    save(d / "b.pth", 7, torch.tensor(0.25), 0.1, [0.5, 0.5, 0.5], [0.229, 0.224, 0.2],
         {"best": 0.9})
    return d / "a.pth", d / "b.pth"


def test_diff_reports_values_path_by_path(runs_pair):
    pa, pb = runs_pair
    r = diff(pa, pb)
    by_path = {e["path"]: e for e in r.values}
    assert by_path["epoch"] == {"path": "epoch", "a": 3, "b": 7}
    assert by_path["normalize.mean"] == {"path": "normalize.mean", "a": [0.485, 0.456, 0.406],
                                         "b": [0.5, 0.5, 0.5]}
    assert by_path["note"] == {"path": "note", "a": "warmup"}
    assert by_path["best"] == {"path": "best", "b": 0.9}
    assert "loss" in by_path and by_path["loss"]["a"] == 0.5   # a float became a tensor
    assert "hparams.lr" not in by_path and "hparams.batch_size" not in by_path
    # the std tensor is small: its values ride along with the tensor difference
    (std,) = [v for v in r.value_diffs if v["name"] == "normalize.std"]
    assert std["a_values"] == pytest.approx([0.229, 0.224, 0.225])
    assert std["b_values"] == pytest.approx([0.229, 0.224, 0.2])
    text = str(r)
    assert "value: epoch: 3 -> 7" in text
    assert "value: normalize.mean: [0.485, 0.456, 0.406] -> [0.5, 0.5, 0.5]" in text
    assert "only in A (value): note = 'warmup'" in text and "only in B (value): best = 0.9" in text
    assert r.identical >= 2  # weight and bias are the same tensors


def test_diff_metadata_and_types(tmp_path):
    a = {"w": np.ones(2, np.float32)}
    ckptconv.save(Checkpoint.from_state_dict(a, {"step": "100", "arch": "resnet"}), tmp_path / "a.safetensors")
    ckptconv.save(Checkpoint.from_state_dict(a, {"step": "200"}), tmp_path / "b.safetensors")
    r = diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert r.metadata == [{"path": "step", "a": "100", "b": "200"}, {"path": "arch", "a": "resnet"}]
    assert r.values == [] and r.identical == 1
    assert "metadata: step: '100' -> '200'" in str(r)
    ta = Checkpoint({"e": 3, "f": float("nan"), "g": True})
    tb = Checkpoint({"e": 3.0, "f": float("nan"), "g": 1})
    assert [e["path"] for e in diff(ta, tb).values] == ["e", "g"]  # type changes; NaN == NaN


def test_cli_values_only_and_tensors_only(runs_pair):
    pa, pb = runs_pair
    r = cli("diff", pa, pb, "--values-only", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert "value_diffs" not in d and "only_a" not in d
    assert {"path": "epoch", "a": 3, "b": 7} in d["values"]
    r = cli("diff", pa, pb, "--tensors-only", "--json")
    d = json.loads(r.stdout)
    assert "values" not in d and any(v["name"] == "normalize.std" for v in d["value_diffs"])
    r = cli("diff", pa, pb, "--values-only")
    assert "shared tensors compared" not in r.stdout and "value: epoch: 3 -> 7" in r.stdout
    r = cli("diff", pa, pb, "--values-only", "--tensors-only")
    assert r.returncode == 2
