"""ONNX adapter: models written by onnx (initializers, Constant nodes, If/Loop
subgraphs, sparse and external data) and by torch.onnx.export, compared with
onnx.numpy_helper; weights-only and --template writes checked by
onnx.checker, onnx's reader and onnxruntime."""
from __future__ import annotations

import importlib.util
import json
import sys

import ml_dtypes
import numpy as np
import pytest

import ckptconv
from ckptconv.tensor import StoredTensor

from conftest import assert_one_line_error, run_cli

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def build_model() -> "onnx.ModelProto":
    """Weights in every place ONNX keeps them."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "B"),
        helper.make_tensor("typed", TP.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0]),   # float_data
        helper.make_tensor("typed_i64", TP.INT64, [3], [1, -2, 3]),            # int64_data
        numpy_helper.from_array(rng.standard_normal(300).astype(ml_dtypes.bfloat16), "bf16"),
        numpy_helper.from_array(rng.standard_normal(7).astype(np.float16), "fp16"),
        numpy_helper.from_array(np.array([-8, -1, 0, 3, 7], dtype=ml_dtypes.int4), "i4"),
        numpy_helper.from_array(np.array([True, False, True]), "mask"),
        numpy_helper.from_array(np.array(3.5, dtype=np.float64), "scalar"),
        numpy_helper.from_array(np.zeros((0, 3), dtype=np.float32), "empty"),
    ]
    consts = [
        helper.make_node("Constant", [], ["c_value"],
                         value=numpy_helper.from_array(np.arange(6, dtype=np.int32).reshape(2, 3))),
        helper.make_node("Constant", [], ["c_float"], value_float=2.5),
        helper.make_node("Constant", [], ["c_floats"], value_floats=[0.5, 1.5]),
        helper.make_node("Constant", [], ["c_int"], value_int=-7),
        helper.make_node("Constant", [], ["c_ints"], value_ints=[1, 2, 3]),
    ]
    then_g = helper.make_graph(
        [helper.make_node("Add", ["x", "tw"], ["y1"])], "then", [], [_vi("y1", TP.FLOAT, [4])],
        initializer=[numpy_helper.from_array(np.full(4, 7, np.float32), "tw")])
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["ec"], value=numpy_helper.from_array(np.full(4, 9, np.float32))),
         helper.make_node("Add", ["x", "ec"], ["y2"])], "else", [], [_vi("y2", TP.FLOAT, [4])])
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "lw"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [_vi("i", TP.INT64, []), _vi("cond_in", TP.BOOL, []), _vi("v_in", TP.FLOAT, [4])],
        [_vi("cond_out", TP.BOOL, []), _vi("v_out", TP.FLOAT, [4])],
        initializer=[numpy_helper.from_array(np.full(4, 0.25, np.float32), "lw")])
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([5.0, 6.0], np.float32), "S"),
        numpy_helper.from_array(np.array([1, 7], np.int64), "S_idx"), [2, 4])
    nodes = consts + [
        helper.make_node("If", ["cond"], ["yi"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "cond", "x"], ["yl"], name="loop", body=body),
        helper.make_node("MatMul", ["xm", "W"], ["ym"]),
    ]
    g = helper.make_graph(
        nodes, "g",
        [_vi("x", TP.FLOAT, [4]), _vi("cond", TP.BOOL, []), _vi("trip", TP.INT64, []),
         _vi("xm", TP.FLOAT, [2, 64])],
        [_vi("yi", TP.FLOAT, [4]), _vi("yl", TP.FLOAT, [4]), _vi("ym", TP.FLOAT, [2, 32])],
        initializer=inits, sparse_initializer=[sparse])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.metadata_props.add(key="author", value="tests")
    onnx.checker.check_model(m)
    return m


def expected_weights(m) -> dict[str, np.ndarray]:
    """What onnx itself says the weights are, named as ckptconv documents."""
    out = {}

    def graph(g, prefix):
        for t in g.initializer:
            out[prefix + t.name] = numpy_helper.to_array(t)
        for sp in g.sparse_initializer:
            dense = np.zeros(int(np.prod(sp.dims)), numpy_helper.to_array(sp.values).dtype)
            dense[numpy_helper.to_array(sp.indices)] = numpy_helper.to_array(sp.values)
            out[prefix + sp.values.name] = dense.reshape(tuple(sp.dims))
        for i, n in enumerate(g.node):
            label = n.name or f"{n.op_type}_{i}"
            for a in n.attribute:
                if n.op_type == "Constant":
                    v = helper.get_attribute_value(a)
                    out[prefix + n.output[0]] = numpy_helper.to_array(v) if a.name == "value" else \
                        np.asarray(v, dtype=np.float32 if "float" in a.name else np.int64)
                if a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g, f"{prefix}{label}/{a.name}/")

    graph(m.graph, "")
    return out


def assert_same(ref, want: np.ndarray, name: str) -> None:
    got = ref.numpy()
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    m = build_model()
    onnx.save(m, d / "all.onnx")
    ext = d / "ext"
    ext.mkdir()
    # onnx.save converts the proto it is given to external data: give it a copy
    onnx.save(build_model(), ext / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    return {"dir": d, "inline": d / "all.onnx", "external": ext / "model.onnx", "proto": m}


def test_reads_every_kind_of_weight_equal_to_numpy_helper(models):
    ck = ckptconv.load(models["inline"])
    assert ck.format == "onnx"
    want = expected_weights(models["proto"])
    got = ck.tensors()
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, arr in want.items():
        assert_same(got[name], arr, name)
    # the documented names of subgraph weights
    assert {"branch/then_branch/tw", "branch/else_branch/ec", "loop/body/lw"} <= set(got)
    assert ck.metadata == {"author": "tests"}
    assert ck.info["sparse"] == 1 and ck.info["in_subgraphs"] == 3


def test_raw_data_is_read_in_place(models):
    ck = ckptconv.load(models["inline"])
    w = ck.tensors()["W"]
    assert isinstance(w, StoredTensor)
    handle, offset, nbytes = w.file_span()
    assert handle.path == str(models["inline"]) and nbytes == 64 * 32 * 4
    raw = models["inline"].read_bytes()[offset:offset + nbytes]
    assert raw == numpy_helper.to_array(models["proto"].graph.initializer[0]).tobytes()


def test_external_data_is_stored_over_the_data_file(models):
    ck = ckptconv.load(models["external"])
    full = onnx.load(str(models["external"]))       # onnx's own reader, external data loaded
    want = expected_weights(full)
    got = ck.tensors()
    assert set(got) == set(want)
    for name, arr in want.items():
        assert_same(got[name], arr, name)
    span = got["W"].file_span()
    assert span is not None and span[0].path.endswith("weights.bin")
    assert "weights.bin" in ck.info["external_data"]


def test_weights_only_model_roundtrip(models, tmp_path):
    src = ckptconv.load(models["inline"]).tensors()
    for opts, out in (({}, tmp_path / "w.onnx"), ({"external_data": True}, tmp_path / "wx.onnx")):
        report = ckptconv.convert(models["inline"], out, force=True, **opts)
        onnx.checker.check_model(str(out), full_check=True)
        m = onnx.load(str(out))
        got = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        assert list(got) == list(src)
        for name, arr in got.items():
            assert_same(src[name], arr, name)
        if opts:
            assert (tmp_path / "wx.onnx.data").stat().st_size >= 64 * 32 * 4
            assert any(t.data_location == TP.EXTERNAL for t in onnx.load(str(out), load_external_data=False)
                       .graph.initializer)
            assert len(report.files) == 2


def test_safetensors_to_onnx_exact(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "enc.w": rng.standard_normal((40, 30)).astype(np.float32),
        "enc.bf": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "enc.f8": rng.standard_normal(9).astype(ml_dtypes.float8_e4m3fn),
        "enc.f8b": rng.standard_normal(4).astype(ml_dtypes.float8_e5m2),
        "enc.h": rng.standard_normal(6).astype(np.float16),
        "n.i64": np.arange(5, dtype=np.int64),
        "n.u8": np.arange(7, dtype=np.uint8),
        "n.mask": np.array([True, False]),
        "n.scalar": np.array(1.25, dtype=np.float64),
        "n.empty": np.zeros((0, 4), dtype=np.float32),
    }
    st = tmp_path / "in.safetensors"
    ckptconv.save(dict(tensors), st)
    out = tmp_path / "out.onnx"
    proc = run_cli("convert", st, out)
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(str(out), full_check=True)
    m = onnx.load(str(out))
    got = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert set(got) == set(tensors)
    for name, arr in tensors.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        assert got[name].tobytes() == arr.tobytes(), name
    back = ckptconv.load(out).tensors()
    for name, arr in tensors.items():
        assert_same(back[name], arr, name)


def test_tree_survives_in_metadata_props(tmp_path):
    tree = {"model": {"w": np.ones((2, 2), np.float32)}, "step": 7, "names": ["a", None]}
    ck = ckptconv.tree.Checkpoint(ckptconv.tree.to_canonical(tree))
    out = tmp_path / "tree.onnx"
    report = ckptconv.save(ck, out)
    assert any("ckptconv.tree" in n for n in report["notes"])
    back = ckptconv.load(out)
    assert back.tree["step"] == 7 and back.tree["names"] == ["a", None]
    np.testing.assert_array_equal(back.tree["model"]["w"].numpy(), tree["model"]["w"])


# --- torch.onnx.export + --template ------------------------------------------

def _torch_net(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch = pytest.importorskip("torch")
    import warnings

    d = tmp_path_factory.mktemp("export")
    x = torch.randn(2, 3, 5, 5)
    path = d / "exported.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the dynamo exporter needs onnxscript; the TorchScript one does not
        dynamo = importlib.util.find_spec("onnxscript") is not None
        torch.onnx.export(_torch_net(0), (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamo=dynamo, external_data=False)
    new = _torch_net(1)
    st = d / "new.safetensors"
    ckptconv.save({k: v for k, v in new.state_dict().items()}, st)
    return {"dir": d, "model": path, "new": st, "net": new, "x": x}


def _ort_run(path, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_template_gets_new_weights_and_runs(exported, tmp_path):
    import torch

    out = tmp_path / "out.onnx"
    proc = run_cli("convert", exported["new"], out, "--template", exported["model"], "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["notes"][0].startswith("replaced 6 of")
    assert not any("not in the template" in n for n in report["notes"]), report["notes"]
    onnx.checker.check_model(str(out), full_check=True)
    # same length swaps: the template's structure is untouched
    assert out.stat().st_size == exported["model"].stat().st_size
    with torch.no_grad():
        want = exported["net"](exported["x"]).numpy()
    np.testing.assert_allclose(_ort_run(out, exported["x"]), want, atol=1e-5, rtol=0)
    before = _ort_run(exported["model"], exported["x"])
    assert not np.allclose(before, want, atol=1e-3)


def test_template_with_external_data(exported, tmp_path):
    import torch

    out = tmp_path / "ext" / "out.onnx"
    report = ckptconv.convert(exported["new"], out, template=exported["model"], external_data=True)
    assert [p.rsplit("/", 1)[-1] for p in report.files] == ["out.onnx", "out.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    m = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TP.EXTERNAL for t in m.graph.initializer)
    with torch.no_grad():
        want = exported["net"](exported["x"]).numpy()
    np.testing.assert_allclose(_ort_run(out, exported["x"]), want, atol=1e-5, rtol=0)


def test_template_reports_unused_and_missing(exported, tmp_path):
    import torch

    sd = dict(exported["net"].state_dict())
    sd.pop("5.bias")
    sd["extra.weight"] = torch.zeros(2)
    st = tmp_path / "partial.safetensors"
    ckptconv.save(sd, st)
    report = ckptconv.convert(st, tmp_path / "p.onnx", template=exported["model"])
    text = " | ".join(report.notes)
    assert "template tensors not in the source, kept: 5.bias" in text
    assert "source tensors not in the template, not written: extra.weight" in text


def test_template_shape_mismatch_is_one_line_error(exported, tmp_path):
    import torch

    sd = dict(exported["net"].state_dict())
    sd["3.weight"] = torch.zeros(10, 99)
    st = tmp_path / "bad.safetensors"
    ckptconv.save(sd, st)
    out = tmp_path / "bad.onnx"
    proc = run_cli("convert", st, out, "--template", exported["model"])
    assert_one_line_error(proc, 1, "'3.weight'", "[10, 100]", "[10, 99]")
    assert not out.exists()


# --- corrupt inputs -------------------------------------------------------------

def test_garbage_and_truncated_models_fail_in_one_line(models, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(3).bytes(5000))
    assert_one_line_error(run_cli("inspect", garbage), 1, "garbage.onnx")
    assert_one_line_error(run_cli("inspect", garbage, "--from", "onnx"), 1, "garbage.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(models["inline"].read_bytes()[:-700])
    assert_one_line_error(run_cli("inspect", cut), 1, "cut.onnx")
    assert_one_line_error(run_cli("inspect", cut, "--from", "onnx"), 1, "cut.onnx")


def test_external_data_escaping_the_folder_is_refused(models, tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64 * 32 * 4)
    m = onnx.load(str(models["external"]), load_external_data=False)
    for t in m.graph.initializer:
        if t.name == "W":
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../secret.bin"
                if e.key == "offset":
                    e.value = "0"
    path = inner / "evil.onnx"
    onnx.save(m, str(path))
    proc = run_cli("inspect", path)
    assert_one_line_error(proc, 1, "evil.onnx", "'W'", "outside the model's folder")


def test_missing_external_file_is_one_line_error(models, tmp_path):
    path = tmp_path / "lonely.onnx"
    path.write_bytes(models["external"].read_bytes())
    assert_one_line_error(run_cli("inspect", path), 1, "lonely.onnx", "weights.bin", "missing")


def test_inspect_via_cli(models):
    proc = run_cli("inspect", models["external"], "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["format"] == "onnx" and rep["tensor_count"] == len(expected_weights(models["proto"]))


def test_cli_import_does_not_pull_onnx():
    import subprocess

    code = "import sys, ckptconv.cli, ckptconv.adapters.onnx, ckptconv.adapters.onnx.read; print('onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tied_tensor_is_stored_once_in_external_data(tmp_path):
    """Two initializers of one tied tensor name the same range of the data file."""
    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    tree = {"embed.weight": w, "bias": np.ones(3, np.float32)}
    src = tmp_path / "tied.safetensors"
    ckptconv.save(tree, src)
    loaded = ckptconv.load(src)
    loaded.tree["lm_head.weight"] = loaded.tree["embed.weight"]
    out = tmp_path / "tied.onnx"
    ckptconv.save(loaded, out, external_data=True)
    onnx.checker.check_model(str(out), full_check=True)
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert np.array_equal(got["embed.weight"], w) and np.array_equal(got["lm_head.weight"], w)
    assert (tmp_path / "tied.onnx.data").stat().st_size < 2 * w.nbytes
