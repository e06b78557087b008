"""HDF5 and Keras adapters: files written by h5py, tf-keras (Keras 2 layout)
and Keras 3, read and compared with h5py; files ckptconv writes read back by
h5py and by Keras ``load_weights`` / ``load_model``."""
from __future__ import annotations

import json
import os
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

import ckptconv
from ckptconv.tensor import LazyTensor, StoredTensor

from conftest import assert_one_line_error, run_cli

h5py = pytest.importorskip("h5py")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def h5_datasets(path) -> dict[str, np.ndarray]:
    """Every dataset's value, as h5py reads it, keyed by its path."""
    out = {}

    def walk(group, prefix):   # every link (visititems shows a hard-linked object once)
        for key in group:
            obj = group[key]
            if isinstance(obj, h5py.Dataset):
                out[prefix + key] = obj[()]
            else:
                walk(obj, prefix + key + "/")

    with h5py.File(path, "r") as f:
        walk(f, "")
    return out


def assert_matches_h5py(ck, path, expect_stored=True) -> None:
    want = h5_datasets(path)
    got = ck.tensors()
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, arr in want.items():
        ref = got[name]
        np.testing.assert_array_equal(ref.numpy(), arr, err_msg=name)
        assert ref.numpy().dtype == arr.dtype, name
        if expect_stored:
            assert isinstance(ref, StoredTensor) and ref.file_span() is not None, name


# --- Keras fixtures ---------------------------------------------------------------

def _keras2_model(k2):
    return k2.Sequential([k2.layers.Input((6,)), k2.layers.Dense(5, name="d1"),
                          k2.layers.BatchNormalization(name="bn"), k2.layers.Dense(3, name="out")])


def _keras3_model(keras):
    return keras.Sequential([keras.layers.Input((6,)), keras.layers.Dense(5, name="d1"),
                             keras.layers.BatchNormalization(name="bn"),
                             keras.layers.Dense(3, name="out")])


def _train(model):
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.standard_normal((8, 6)), rng.standard_normal((8, 3)), epochs=1, verbose=0)
    return model


@pytest.fixture(scope="module")
def keras2(tmp_path_factory):
    k2 = pytest.importorskip("tf_keras")
    d = tmp_path_factory.mktemp("keras2")
    model = _train(_keras2_model(k2))
    model.save_weights(d / "weights.h5")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(d / "full.h5")
    return {"k2": k2, "model": model, "weights": d / "weights.h5", "full": d / "full.h5"}


@pytest.fixture(scope="module")
def keras3(tmp_path_factory):
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    d = tmp_path_factory.mktemp("keras3")
    model = _train(_keras3_model(keras))
    model.save_weights(d / "m.weights.h5")
    model.save(d / "m.keras")
    return {"keras": keras, "model": model, "weights": d / "m.weights.h5", "archive": d / "m.keras"}


# --- Keras reading --------------------------------------------------------------

def test_keras2_weights_file(keras2):
    ck = ckptconv.load(keras2["weights"])
    assert ck.format == "keras-h5" and ck.info["layout"] == "keras2-weights"
    assert_matches_h5py(ck, keras2["weights"])
    # Keras' own order: layer_names, then weight_names, the names as h5py shows them
    model = keras2["model"]
    want = [f"{w.name.split('/')[0]}/{w.name}" for layer in model.layers for w in layer.weights]
    assert list(ck.tensors()) == want
    for ref, w in zip(ck.tensors().values(), model.get_weights()):
        np.testing.assert_array_equal(ref.numpy(), w)
    assert ck.metadata["backend"] == "tensorflow" and "layer_names" not in ck.metadata


def test_keras2_full_model_file(keras2):
    ck = ckptconv.load(keras2["full"])
    assert ck.info["layout"] == "keras2-model"
    assert_matches_h5py(ck, keras2["full"])
    names = list(ck.tensors())
    assert names[0] == "model_weights/d1/d1/kernel:0"
    assert any(n.startswith("optimizer_weights/") for n in names)
    assert json.loads(ck.metadata["model_config"])["class_name"] == "Sequential"


def test_keras3_weights_file(keras3):
    ck = ckptconv.load(keras3["weights"])
    assert ck.info["layout"] == "keras3"
    assert_matches_h5py(ck, keras3["weights"])
    names = list(ck.tensors())
    opt = [n for n in names if n.startswith("optimizer/vars/")]
    assert opt == [f"optimizer/vars/{i}" for i in range(len(opt))]    # numeric order
    assert ck.metadata["layers/dense/vars@name"] == "d1"


def test_keras3_archive_is_read_in_place(keras3, tmp_path):
    ck = ckptconv.load(keras3["archive"])
    assert ck.info["container"] == "keras archive"
    assert json.loads(ck.metadata["config.json"])["class_name"] == "Sequential"
    member = tmp_path / "member.weights.h5"
    with zipfile.ZipFile(keras3["archive"]) as zf:
        member.write_bytes(zf.read("model.weights.h5"))
    want = h5_datasets(member)
    got = ck.tensors()
    assert set(got) == set(want)
    for name, arr in want.items():
        np.testing.assert_array_equal(got[name].numpy(), arr, err_msg=name)
        span = got[name].file_span()
        assert span is not None and span[0].path == str(keras3["archive"]), name
    # the same archive deflated: the member is inflated to a temporary file
    deflated = tmp_path / "deflated.keras"
    with zipfile.ZipFile(keras3["archive"]) as src, \
            zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    got2 = ckptconv.load(deflated).tensors()
    for name, arr in want.items():
        np.testing.assert_array_equal(got2[name].numpy(), arr, err_msg=name)


# --- plain HDF5 -------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    path = d / "nested.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["title"] = "experiment 7"
        f.attrs["epochs"] = np.int32(12)
        f.attrs["lrs"] = np.array([0.1, 0.01])
        enc = f.create_group("encoder")
        enc.attrs["kind"] = b"transformer"
        enc["w"] = rng.standard_normal((8, 4)).astype(np.float32)
        enc["w"].attrs["units"] = "none"
        blk = enc.create_group("block/0")
        blk["bias"] = np.arange(4, dtype=np.float64)
        blk["big_endian"] = np.arange(6, dtype=">i4").reshape(2, 3)
        f.create_dataset("chunked", data=rng.standard_normal((50, 20)).astype(np.float32),
                         chunks=(10, 20), compression="gzip")
        f["flags"] = np.array([True, False, True])
        f["scalar"] = np.float16(1.5)
        f["empty"] = np.zeros((0, 2), dtype=np.int16)
        f["complex"] = np.array([1 + 2j, 3 - 4j], dtype=np.complex64)
        f["label"] = "hello"
        f["tied"] = f["encoder/w"]          # a second hard link to one dataset
        f.create_dataset("records", data=np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]))
    ub = d / "userblock.h5"
    with h5py.File(ub, "w", userblock_size=1024) as f:
        f["x"] = np.arange(10, dtype=np.float32)
    return {"nested": path, "userblock": ub}


def test_plain_hdf5_nested_groups(plain):
    ck = ckptconv.load(plain["nested"])
    assert ck.format == "hdf5"
    got = ck.tensors()
    want = {k: v for k, v in h5_datasets(plain["nested"]).items() if k not in ("label", "records")}
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, arr in want.items():
        np.testing.assert_array_equal(got[name].numpy(), arr, err_msg=name)
        assert got[name].numpy().dtype == arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" \
            else got[name].numpy().dtype == arr.dtype
    assert isinstance(got["encoder/block/0/big_endian"], StoredTensor)
    assert isinstance(got["chunked"], LazyTensor)          # compressed: read through h5py
    assert got["tied"] is got["encoder/w"] and ck.aliases == {"tied": "encoder/w"}
    assert ck.tree["label"] == "hello"
    assert "records" in ck.info["skipped"] and "compound" in ck.info["skipped"]
    md = ck.metadata
    assert md["title"] == "experiment 7" and md["encoder@kind"] == "transformer"
    assert md["encoder/w@units"] == "none" and json.loads(md["lrs"]) == [0.1, 0.01]


def test_userblock_offset(plain):
    ck = ckptconv.load(plain["userblock"])
    assert ck.format == "hdf5"
    x = ck.tensors()["x"]
    assert isinstance(x, StoredTensor) and x.file_span()[1] > 1024
    np.testing.assert_array_equal(x.numpy(), np.arange(10, dtype=np.float32))


def test_hdf5_rewrite_keeps_attributes_and_links(plain, tmp_path):
    out = tmp_path / "copy.h5"
    ckptconv.convert(plain["nested"], out)
    with h5py.File(out, "r") as f:
        assert f.attrs["title"] == "experiment 7"
        assert f.attrs["epochs"] == 12 and f.attrs["epochs"].dtype == np.int32
        np.testing.assert_array_equal(f.attrs["lrs"], [0.1, 0.01])
        assert f["encoder/w"].attrs["units"] == "none"
        assert f["tied"] == f["encoder/w"]      # one object, two names
    again = ckptconv.load(out).tensors()
    for name, ref in ckptconv.load(plain["nested"]).tensors().items():
        assert again[name].tobytes() == ref.tobytes(), name


# --- writing ------------------------------------------------------------------

def _odd_tensors():
    rng = np.random.default_rng(5)
    return {
        "layer.w": rng.standard_normal((6, 4)).astype(np.float32),
        "layer.bf": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "layer.f8": rng.standard_normal(7).astype(ml_dtypes.float8_e4m3fn),
        "layer.f8b": rng.standard_normal(7).astype(ml_dtypes.float8_e5m2),
        "stats.n": np.arange(5, dtype=np.int64),
        "stats.mask": np.array([True, False]),
        "stats.scalar": np.array(2.5, dtype=np.float64),
        "stats.empty": np.zeros((0, 3), dtype=np.float32),
    }


def test_safetensors_to_hdf5_bit_exact(tmp_path):
    tensors = _odd_tensors()
    st = tmp_path / "in.safetensors"
    ckptconv.save(dict(tensors), st)
    out = tmp_path / "out.h5"
    proc = run_cli("convert", st, out)
    assert proc.returncode == 0, proc.stderr
    raw = h5_datasets(out)
    with h5py.File(out, "r") as f:
        assert f["layer.bf"].dtype == np.uint16 and f["layer.bf"].attrs["dtype"] == "bfloat16"
        assert f["layer.f8"].dtype == np.uint8 and f["layer.f8"].attrs["dtype"] == "float8_e4m3fn"
    for name, arr in tensors.items():
        if arr.dtype.kind == "V" or arr.dtype.itemsize == 1 and arr.dtype != np.bool_:
            assert raw[name].tobytes() == arr.tobytes(), name     # the bits, unchanged
        else:
            np.testing.assert_array_equal(raw[name], arr, err_msg=name)
            assert raw[name].dtype == arr.dtype, name
    back = ckptconv.load(out).tensors()
    for name, arr in tensors.items():
        assert back[name].dtype.name == ckptconv.dtypes.from_numpy(arr.dtype).name, name
        assert back[name].tobytes() == arr.tobytes(), name
        if arr.size:
            assert isinstance(back[name], StoredTensor), name


def test_hdf5_keeps_the_tree(tmp_path):
    w = np.ones((2, 3), np.float32)
    tree = {"model": {"w": w, "w_tied": w}, "epoch": 3, "hist": [0.5, None], "name": "run"}
    out = tmp_path / "tree.h5"
    report = ckptconv.save(tree, out)
    assert any("ckptconv.tree" in n for n in report["notes"])
    back = ckptconv.load(out)
    assert back.tree["epoch"] == 3 and back.tree["hist"] == [0.5, None] and back.tree["name"] == "run"
    assert back.tree["model"]["w"] is back.tree["model"]["w_tied"]
    np.testing.assert_array_equal(back.tree["model"]["w"].numpy(), w)
    with h5py.File(out, "r") as f:
        assert "ckptconv.tree" in f.attrs


def test_safetensors_to_keras2_layout_loads_in_tf_keras(keras2, tmp_path):
    k2, model = keras2["k2"], keras2["model"]
    named = {w.name: np.asarray(v) + 1.0 for w, v in zip(model.weights, model.get_weights())}
    st = tmp_path / "k.safetensors"
    ckptconv.save(named, st)
    out = tmp_path / "k.h5"
    proc = run_cli("convert", st, out, "--to", "keras-h5")
    assert proc.returncode == 0, proc.stderr
    fresh = _keras2_model(k2)
    fresh.load_weights(out)
    for got, want in zip(fresh.get_weights(), named.values()):
        np.testing.assert_array_equal(got, want)
    # and by name, the way Keras 2 matches layers across different models
    fresh2 = _keras2_model(k2)
    fresh2.load_weights(out, by_name=True)
    np.testing.assert_array_equal(fresh2.get_weights()[0], named["d1/kernel:0"])


def test_keras2_long_layer_lists_are_chunked_like_keras(keras2, tmp_path):
    from tf_keras.src.saving.legacy.hdf5_format import load_attributes_from_hdf5_group

    tensors = {f"a_rather_long_layer_name_number_{i:05d}/kernel:0": np.full(1, i, np.float32)
               for i in range(2500)}
    out = tmp_path / "many.h5"
    ckptconv.save(tensors, out, format="keras-h5")
    with h5py.File(out, "r") as f:
        assert "layer_names" not in f.attrs and "layer_names1" in f.attrs   # > 64512 bytes
        layers = load_attributes_from_hdf5_group(f, "layer_names")
    assert layers == [n.split("/")[0] for n in tensors]
    back = ckptconv.load(out)
    assert back.format == "keras-h5" and list(back.tensors()) == list(tensors)


def test_keras2_files_rewrite_to_loadable_files(keras2, tmp_path):
    k2 = keras2["k2"]
    for src in ("weights", "full"):
        out = tmp_path / f"{src}.h5"
        ckptconv.convert(keras2[src], out, to="keras-h5")
        a, b = ckptconv.load(keras2[src]).tensors(), ckptconv.load(out).tensors()
        assert list(a) == list(b)
        assert all(a[n].tobytes() == b[n].tobytes() for n in a)
        fresh = _keras2_model(k2)
        fresh.load_weights(out)
        for got, want in zip(fresh.get_weights(), keras2["model"].get_weights()):
            np.testing.assert_array_equal(got, want)
    loaded = k2.models.load_model(tmp_path / "full.h5")
    for got, want in zip(loaded.get_weights(), keras2["model"].get_weights()):
        np.testing.assert_array_equal(got, want)


def test_safetensors_to_keras3_layout_loads_in_keras(keras3, tmp_path):
    keras, model = keras3["keras"], keras3["model"]
    ck = ckptconv.load(keras3["weights"])
    new = {n: np.asarray(r.numpy() * 2) for n, r in ck.tensors().items()}
    st = tmp_path / "k3.safetensors"
    ckptconv.save(new, st)
    out = tmp_path / "new.weights.h5"
    proc = run_cli("convert", st, out)
    assert proc.returncode == 0, proc.stderr
    fresh = _keras3_model(keras)
    fresh.load_weights(out)
    for got, want in zip(fresh.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want * 2)


def test_keras3_archive_rewrite_loads_with_load_model(keras3, tmp_path):
    keras = keras3["keras"]
    out = tmp_path / "copy.keras"
    report = ckptconv.convert(keras3["archive"], out)
    assert report.target_format == "keras-h5"
    loaded = keras.saving.load_model(out)
    for got, want in zip(loaded.get_weights(), keras3["model"].get_weights()):
        np.testing.assert_array_equal(got, want)


def test_keras3_bfloat16_weights(keras3, tmp_path):
    keras = keras3["keras"]
    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(3, dtype="bfloat16")])
    src = tmp_path / "bf.weights.h5"
    model.save_weights(src)
    ck = ckptconv.load(src)
    kernel = ck.tensors()["layers/dense/vars/0"]
    assert kernel.dtype.name == "bfloat16"
    np.testing.assert_array_equal(kernel.numpy(), np.asarray(model.weights[0].numpy(), ml_dtypes.bfloat16))
    out = tmp_path / "bf_copy.weights.h5"
    ckptconv.convert(src, out)
    fresh = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(3, dtype="bfloat16")])
    fresh.load_weights(out)
    for got, want in zip(fresh.get_weights(), model.get_weights()):
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def test_keras_writer_reports_what_it_cannot_hold(tmp_path):
    tree = {"d1": {"kernel": np.ones((2, 2), np.float32)}, "epoch": 4}
    report = ckptconv.save(tree, tmp_path / "x.h5", format="keras-h5")
    assert any("not kept: epoch: keras-h5 holds weights only" in n for n in report["notes"]), \
        report["notes"]
    with pytest.raises(ckptconv.errors.UnsupportedError, match="epoch: keras-h5 holds weights"):
        ckptconv.save(tree, tmp_path / "y.h5", format="keras-h5", lossless=True)
    assert not (tmp_path / "y.h5").exists()
    # Keras 3 finds layers by class: names without a model_config to say them are refused
    with pytest.raises(ckptconv.errors.UnsupportedError, match="no model_config"):
        ckptconv.save(tree, tmp_path / "x.weights.h5", format="keras-h5")


# --- corrupt inputs ---------------------------------------------------------------

def test_corrupt_hdf5_files_fail_in_one_line(plain, keras3, tmp_path):
    data = plain["nested"].read_bytes()
    cut = tmp_path / "truncated.h5"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("inspect", cut), 1, "truncated.h5")
    broken = tmp_path / "superblock.h5"
    broken.write_bytes(data[:8] + b"\xff" * 40 + data[48:])
    assert_one_line_error(run_cli("inspect", broken), 1, "superblock.h5")
    arch = keras3["archive"].read_bytes()
    bad_zip = tmp_path / "cut.keras"
    bad_zip.write_bytes(arch[: len(arch) - 3000])
    assert_one_line_error(run_cli("inspect", bad_zip), 1, "cut.keras")


def test_inspect_via_cli(keras2):
    proc = run_cli("inspect", keras2["weights"], "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["format"] == "keras-h5" and rep["tensor_count"] == 8


def test_cli_import_does_not_pull_h5py():
    import subprocess

    code = "import sys, ckptconv.cli, ckptconv.adapters.hdf5, ckptconv.adapters.hdf5.keras; print('h5py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
