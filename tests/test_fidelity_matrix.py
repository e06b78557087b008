"""Fidelity: every conversion keeps what the target's own loader needs.

Sources are made by the real libraries (torch.save of a state dict with its
``_metadata``, safetensors, tf.train.Checkpoint, h5py, tf_keras full-model and
weights-only files, onnx). Each is converted to every target format, and the
target's own loader reads the output: torch.load(weights_only=True) (and
load_state_dict), safetensors.numpy.load_file, tf.train.load_checkpoint,
h5py, tf_keras/Keras 3 load_weights, onnx.checker + an onnxruntime session.
The values must equal what the source's own library reads. What a target
cannot hold is named in the report's notes ("not kept: ..."), and ``strict``
makes it an error that writes nothing.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import numpy as np
import pytest

import ckptconv
from ckptconv.errors import UnsupportedError

from test_framework_objects import hf_checkpoint, lightning_ckpt, torch_load  # noqa: F401
from test_hdf5 import h5_datasets

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

torch = pytest.importorskip("torch")
h5py = pytest.importorskip("h5py")
onnx = pytest.importorskip("onnx")

TARGETS = ["torch", "safetensors", "tf", "hdf5", "keras-h5", "onnx"]
TARGET_FILE = {"torch": "out.pt", "safetensors": "out.safetensors", "tf": "out.ckpt",
               "hdf5": "out.h5", "keras-h5": "out.h5", "onnx": "out.onnx"}
MIDDLE_FILE = {"safetensors": "m.safetensors", "tf": "m.ckpt", "hdf5": "m.h5", "onnx": "m.onnx"}


# --- sources, made by their own libraries; oracle values read by them too ------------

def _torch_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def _keras2_model(k2):
    return k2.Sequential([k2.layers.Input((4,)), k2.layers.Dense(3, name="d1"),
                          k2.layers.BatchNormalization(name="bn"), k2.layers.Dense(2, name="out")])


@pytest.fixture(scope="session")
def tf():
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="session")
def sources(tf, tmp_path_factory):
    """name -> (path, {tensor name: value as the source's library reads it})."""
    d = tmp_path_factory.mktemp("sources")
    out = {}

    sd = _torch_model().state_dict()
    torch.save(sd, d / "model.pt")
    out["torch"] = (d / "model.pt", {k: v.numpy() for k, v in sd.items()})

    from safetensors.numpy import save_file

    arrays = {"emb.weight": np.arange(12, dtype=np.float32).reshape(4, 3),
              "emb.scale": np.float16([0.5, -2.0]), "step": np.array(7, np.int64)}
    save_file(arrays, str(d / "model.safetensors"))
    out["safetensors"] = (d / "model.safetensors", arrays)

    ck = tf.train.Checkpoint(w=tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3)),
                             n=tf.Variable(np.int64(3)))
    prefix = ck.write(str(d / "tf" / "ckpt"))
    reader = tf.train.load_checkpoint(prefix)
    out["tf"] = (d / "tf" / "ckpt", {n: reader.get_tensor(n) for n in
                                     reader.get_variable_to_shape_map()
                                     if reader.get_variable_to_dtype_map()[n] != tf.string})

    with h5py.File(d / "plain.h5", "w") as f:
        f["group/w"] = np.arange(6, dtype=np.float64).reshape(3, 2)
        f["b"] = np.array([1, 2, 3], np.int32)
        f.attrs["note"] = "made by h5py"
    with h5py.File(d / "plain.h5") as f:
        out["hdf5"] = (d / "plain.h5", {"group/w": f["group/w"][()], "b": f["b"][()]})

    k2 = pytest.importorskip("tf_keras")
    model = _keras2_model(k2)
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.standard_normal((8, 4)), rng.standard_normal((8, 2)), epochs=1, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(d / "full.h5")
    model.save_weights(d / "weights.h5")
    for key, file in (("keras-full", "full.h5"), ("keras-weights", "weights.h5")):
        out[key] = (d / file, h5_datasets(d / file))
    out["keras-model"] = model

    from onnx import helper, numpy_helper

    inits = {"fc.weight": np.arange(6, dtype=np.float32).reshape(3, 2),
             "fc.bias": np.array([0.5, -1.0, 2.0], np.float32)}
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(d / "model.onnx"))
    out["onnx"] = (d / "model.onnx", {t.name: numpy_helper.to_array(t)
                                      for t in onnx.load(str(d / "model.onnx")).graph.initializer})
    return out


# --- the target's own loader -----------------------------------------------------------

def _flatten(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        elif isinstance(v, torch.Tensor):
            out[name] = v.numpy()
    return out


def load_as_target(tf, fmt: str, path) -> dict[str, np.ndarray]:
    """The output read by the target format's own library (nothing of ckptconv)."""
    if fmt == "torch":
        return _flatten(torch.load(path, weights_only=True))
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if fmt == "tf":
        reader = tf.train.load_checkpoint(str(path))
        dtypes = reader.get_variable_to_dtype_map()
        assert not any(n.startswith("_CKPTCONV") for n in dtypes), sorted(dtypes)
        return {n: reader.get_tensor(n) for n in dtypes if dtypes[n] != tf.string}
    if fmt in ("hdf5", "keras-h5"):
        return h5_datasets(path)
    if fmt == "onnx":
        import onnxruntime as ort

        onnx.checker.check_model(str(path), full_check=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, {})))
    raise AssertionError(fmt)


def _same_values(want: dict, got: dict, where: str) -> None:
    """Keras layouts name a weight LAYER/WEIGHT: "fc.weight" is written "fc/weight",
    a bare "step" is "step/step"."""
    norm = {k.replace("/", "."): v for k, v in got.items()}
    for name, value in want.items():
        keys = [name, name.replace("/", "."), f"{name}.{name}"]
        found = [norm.get(k, got.get(k)) for k in keys if k in norm or k in got]
        assert found, f"{where}: '{name}' missing; has {sorted(got)[:8]}"
        arr = np.asarray(found[0])
        assert arr.dtype == np.asarray(value).dtype, f"{where}: {name}: {arr.dtype}"
        np.testing.assert_array_equal(arr, value, err_msg=f"{where}: {name}")


# (source, target) pairs where the target cannot hold something, and what the note names
LOSSY = {
    ("torch", "keras-h5"): "_metadata",                       # per-module versions
    ("tf", "keras-h5"): "_CHECKPOINTABLE_OBJECT_GRAPH",       # a string tensor
    ("hdf5", "torch"): "note",                                # a root attribute
    ("keras-full", "torch"): "model_config",
    ("keras-weights", "torch"): "keras_version",
}
SOURCES = ["torch", "safetensors", "tf", "hdf5", "keras-full", "keras-weights", "onnx"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", SOURCES)
def test_matrix_target_loader_accepts_and_values_equal(tf, sources, tmp_path, source, target):
    src, want = sources[source]
    dst = tmp_path / TARGET_FILE[target]
    report = ckptconv.convert(src, dst, to=target)
    got = load_as_target(tf, target, dst)
    _same_values(want, got, f"{source} -> {target}")
    lost = [n for n in report.notes if n.startswith("not kept: ")]
    expected = LOSSY.get((source, target))
    if expected is None:
        assert not lost, report.notes
        strict = ckptconv.convert(src, tmp_path / ("strict_" + TARGET_FILE[target]), to=target,
                                  strict=True)
        assert not [n for n in strict.notes if n.startswith("not kept: ")]
    else:
        assert len(lost) == 1 and expected in lost[0], report.notes
        dst2 = tmp_path / ("strict_" + TARGET_FILE[target])
        with pytest.raises(UnsupportedError, match=expected):
            ckptconv.convert(src, dst2, to=target, strict=True)
        assert not list(tmp_path.glob("strict_*"))


def test_tf_target_restores_with_a_tf1_saver(tf, sources, tmp_path):
    src, want = sources["safetensors"]
    ckptconv.convert(src, tmp_path / "s.ckpt", to="tf")
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        variables = {name: v1.get_variable(name.replace(".", "_"), shape=value.shape,
                                           dtype=tf.as_dtype(value.dtype))
                     for name, value in want.items()}
        saver = v1.train.Saver(var_list=variables)      # checkpoint name -> variable
        with v1.Session() as sess:
            saver.restore(sess, str(tmp_path / "s.ckpt"))
            for name, var in variables.items():
                np.testing.assert_array_equal(sess.run(var), want[name])


def test_torch_target_loads_into_the_module_with_metadata_hooks(sources, tmp_path):
    """torch -> every flat format -> torch: load_state_dict(strict=True) takes
    it and BatchNorm's version hook sees the same ``_metadata``."""
    src, _ = sources["torch"]
    original = torch.load(src, weights_only=True)
    for middle in ("safetensors", "tf", "hdf5", "onnx"):
        mid = tmp_path / MIDDLE_FILE[middle]
        ckptconv.convert(src, mid, to=middle)
        back = tmp_path / f"back_{middle}.pt"
        ckptconv.convert(mid, back)
        sd = torch.load(back, weights_only=True)
        assert type(sd) is OrderedDict and list(sd) == list(original), middle
        assert sd._metadata == original._metadata, middle
        seen = []
        model = _torch_model()
        model[1]._register_load_state_dict_pre_hook(
            lambda state_dict, prefix, local_metadata, *a: seen.append(local_metadata))
        model.load_state_dict(sd, strict=True)
        assert seen == [original._metadata["1"]], middle
        for k, v in original.items():
            assert torch.equal(model.state_dict()[k], v), (middle, k)


# --- .pt -> any -> .pt: containers, order, _metadata, strides, storage sharing -----------

@pytest.fixture(scope="session")
def views_pt(tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    sd = _torch_model().state_dict()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd["view.t"] = base.t()                     # non-contiguous view
    sd["view.base"] = base
    sd["view.row"] = base[1]                    # offset into the same storage
    qkv = torch.randn(6, 2)
    sd["attn.qkv"] = qkv
    sd["attn.q"], sd["attn.k"], sd["attn.v"] = qkv[0:2], qkv[2:4], qkv[4:6]
    sd["lonely.strided"] = torch.arange(10.0)[::2]   # storage no saved tensor covers
    torch.save(sd, d / "views.pt")
    return d / "views.pt", sd


def _storage_id(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("middle", ["safetensors", "tf", "hdf5", "onnx"])
def test_pt_through_any_format_and_back_is_the_same_tree(views_pt, tmp_path, middle):
    src, sd = views_pt
    mid = tmp_path / MIDDLE_FILE[middle]
    report = ckptconv.convert(src, mid, to=middle)
    lost = [n for n in report.notes if n.startswith("not kept: ")]
    assert len(lost) == 1 and lost[0].startswith("not kept: lonely.strided: strides"), lost
    ckptconv.convert(mid, tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert type(back) is OrderedDict and list(back) == list(sd)
    assert back._metadata == sd._metadata
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
        assert back[k].dtype == v.dtype, k
        if k != "lonely.strided":
            assert back[k].stride() == v.stride() and \
                back[k].storage_offset() == v.storage_offset(), k
    # views of one storage come back as views of one storage
    groups = [("view.t", "view.base", "view.row"), ("attn.qkv", "attn.q", "attn.k", "attn.v")]
    for group in groups:
        assert len({_storage_id(back[k]) for k in group}) == 1, group
    assert _storage_id(back["view.base"]) != _storage_id(back["attn.qkv"])
    assert back["lonely.strided"].is_contiguous()
    # the middle file itself is what its own library expects: one array per name
    if middle == "safetensors":
        from safetensors.numpy import load_file

        from safetensors import safe_open

        assert set(load_file(str(mid))) == set(sd)
        with safe_open(str(mid), "np") as f:
            assert list(f.keys()) == sorted(sd)        # (safetensors lists names sorted)
            meta = f.metadata()
        # recorded compactly: the state dict's names once, each view's offset and strides
        assert len(meta["ckptconv.views"]) < 300 and len(meta["ckptconv.tree"]) < 500, meta
    with pytest.raises(UnsupportedError, match="lonely.strided"):
        ckptconv.convert(src, tmp_path / "strict.safetensors", strict=True)


def test_pt_to_keras_names_what_it_cannot_hold(views_pt, tmp_path):
    src, _ = views_pt
    report = ckptconv.convert(src, tmp_path / "k.h5", to="keras-h5")
    lost = " ".join(n for n in report.notes if n.startswith("not kept: "))
    assert "_metadata" in lost and "storage sharing" in lost


# --- Keras files stay Keras files -------------------------------------------------------

def _keras_weights_equal(model, other) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(model.get_weights(), other.get_weights()))


@pytest.mark.parametrize("source", ["keras-full", "keras-weights"])
@pytest.mark.parametrize("via", [None, "safetensors", "tf", "onnx"])
def test_h5_from_keras_stays_keras(sources, tmp_path, source, via):
    """.h5 from a Keras file (directly or through another format) is keras-h5
    with layer_names/weight_names (and model_config): tf_keras loads it."""
    k2 = pytest.importorskip("tf_keras")
    src, _ = sources[source]
    model = sources["keras-model"]
    if via:
        mid = tmp_path / MIDDLE_FILE[via]
        ckptconv.convert(src, mid, to=via)
        src = mid
    report = ckptconv.convert(src, tmp_path / "out.h5")
    assert report.target_format == "keras-h5", report.notes
    assert any("'.h5' can be hdf5, keras-h5: wrote keras-h5" in n for n in report.notes)
    with h5py.File(tmp_path / "out.h5") as f:
        root = f["model_weights"] if source == "keras-full" else f
        assert [n.decode() for n in root.attrs["layer_names"]] == ["d1", "bn", "out"]
        assert "weight_names" in root["d1"].attrs
        assert ("model_config" in f.attrs) == (source == "keras-full")
    fresh = _keras2_model(k2)
    fresh.load_weights(tmp_path / "out.h5")
    assert _keras_weights_equal(model, fresh)
    if source == "keras-full":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = k2.models.load_model(tmp_path / "out.h5")
        assert _keras_weights_equal(model, loaded)


def test_weights_h5_target_is_what_keras3_loads(sources, tmp_path):
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    src, _ = sources["keras-full"]
    report = ckptconv.convert(src, tmp_path / "m.weights.h5")
    assert any("Keras 3 layout" in n for n in report.notes)
    assert any(n.startswith("not kept: ") and "optimizer_weights" in n for n in report.notes)
    k3 = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(3, name="d1"),
                           keras.layers.BatchNormalization(name="bn"),
                           keras.layers.Dense(2, name="out")])
    k3.load_weights(tmp_path / "m.weights.h5")
    assert _keras_weights_equal(sources["keras-model"], k3)
    # a weights-only Keras 2 file does not say its layers' classes: a clear error
    with pytest.raises(UnsupportedError, match="model_config"):
        ckptconv.convert(sources["keras-weights"][0], tmp_path / "w.weights.h5")
    assert not (tmp_path / "w.weights.h5").exists()


# --- target format from the source's family -------------------------------------------

def test_ckpt_target_takes_the_source_family(tf, sources, tmp_path):
    pt, _ = sources["torch"]
    report = ckptconv.convert(pt, tmp_path / "rt.ckpt")
    assert report.target_format == "torch" and (tmp_path / "rt.ckpt").is_file()
    assert any("'.ckpt' can be tf, torch: wrote torch (the source is torch)" in n
               for n in report.notes), report.notes
    assert set(torch.load(tmp_path / "rt.ckpt", weights_only=True)) == set(sources["torch"][1])
    report = ckptconv.convert(sources["tf"][0], tmp_path / "tf" / "rt.ckpt")
    assert report.target_format == "tf" and (tmp_path / "tf" / "rt.ckpt.index").is_file()
    assert any("wrote tf (the source is tf)" in n for n in report.notes)
    # through safetensors the family is still torch's
    ckptconv.convert(pt, tmp_path / "m.safetensors")
    assert ckptconv.convert(tmp_path / "m.safetensors", tmp_path / "x.ckpt").target_format == \
        "torch"
    # a source of no family keeps the extension's default, and says so
    report = ckptconv.convert(sources["onnx"][0], tmp_path / "o" / "rt.ckpt")
    assert report.target_format == "tf" and any("the default for .ckpt" in n for n in report.notes)
    assert ckptconv.convert(pt, tmp_path / "p.bin").target_format == "torch"
    report = ckptconv.convert(sources["tf"][0], tmp_path / "t.bin")
    assert report.target_format == "torch" and any("'.bin' is written as torch" in n
                                                    for n in report.notes), report.notes


# --- real training files (made by Lightning and transformers.Trainer: the fixtures of
# tests/test_framework_objects.py) --------------------------------------------------------

def test_lightning_ckpt_through_safetensors_is_a_lightning_ckpt_again(lightning_ckpt, tmp_path):
    """A Lightning .ckpt -> safetensors -> .ckpt is a torch file again (the
    family travels in the metadata), equal to the original as torch loads it."""
    st = tmp_path / "l.safetensors"
    ckptconv.convert(lightning_ckpt, st)
    report = ckptconv.convert(st, tmp_path / "back.ckpt")
    assert report.target_format == "torch", report.notes
    want, got = torch_load(lightning_ckpt), torch_load(tmp_path / "back.ckpt")
    assert {k: repr(v) for k, v in got.items()} == {k: repr(v) for k, v in want.items()}
    assert list(got["state_dict"]) == list(want["state_dict"])


def test_hf_trainer_weights_to_every_target(hf_checkpoint, tf, tmp_path):
    """transformers' model.safetensors (format "pt": a torch file's family)
    to every target, read back by the target's own library."""
    from safetensors.numpy import load_file

    src = hf_checkpoint / "model.safetensors"
    want = load_file(str(src))
    for target in ("torch", "tf", "hdf5", "onnx"):
        dst = tmp_path / TARGET_FILE[target]
        report = ckptconv.convert(src, dst, to=target)
        assert not [n for n in report.notes if n.startswith("not kept: ")], report.notes
        _same_values(want, load_as_target(tf, target, dst), f"hf -> {target}")
    assert ckptconv.convert(src, tmp_path / "x.ckpt").target_format == "torch"
