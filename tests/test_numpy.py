"""npy / npz: files made by numpy itself (np.save, np.savez, np.savez_compressed,
np.lib.format.write_array) read by ckptconv, and ckptconv's outputs read back
by ``np.load(allow_pickle=False)``: values, dtypes, order and bytes compared."""
from __future__ import annotations

import enum
import io
import json
import zipfile

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptconv
from ckptconv.errors import FormatError, UnsafePickleError
from ckptconv.registry import detect_format

from conftest import assert_one_line_error, run_cli
from malicious_corpus import _system_p2, npy_object_file

NUMERIC = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64", "complex64", "complex128"]


def sample(dtype: str, shape=(3, 4)) -> np.ndarray:
    rng = np.random.default_rng(abs(hash(dtype)) % 2**32)
    n = int(np.prod(shape))
    if dtype == "bool":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True).reshape(shape)
    if dtype.startswith("complex"):
        return (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dtype).reshape(shape)
    x = rng.standard_normal(n).astype(dtype)
    if n > 3:
        x[:3] = [np.nan, np.inf, -0.0]
    return x.reshape(shape)


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.fixture(scope="session")
def arrays():
    out = {f"{d}": sample(d) for d in NUMERIC}
    out.update({
        "scalar_f64": np.array(2.5), "scalar_bool": np.array(True), "scalar_c64": np.array(1 - 2j, "c8"),
        "empty": np.zeros((0, 5), np.float32), "empty3": np.zeros((2, 0, 3), np.int16),
        "fortran": np.asfortranarray(sample("float32", (4, 5))),
        "fortran3": np.asfortranarray(sample("int64", (2, 3, 4))),
        "big_endian": sample("float64", (6,)).astype(">f8"),
        "big_endian_i4": np.arange(-3, 3, dtype=">i4"),
    })
    return out


@pytest.fixture(scope="session")
def npy_dir(tmp_path_factory, arrays):
    d = tmp_path_factory.mktemp("npy")
    for name, a in arrays.items():
        np.save(d / f"{name}.npy", a)
    np.savez(d / "plain.npz", **arrays)
    np.savez_compressed(d / "compressed.npz", **arrays)
    np.savez(d / "positional.npz", arrays["float32"], arrays["int8"])
    return d


# --- reading what numpy wrote ---------------------------------------------------------------

def test_npy_every_dtype_reads_as_numpy_does(npy_dir, arrays):
    for name in arrays:
        p = npy_dir / f"{name}.npy"
        assert detect_format(p) == "npy"
        ck = ckptconv.load(p)
        (ref,) = ck.tensors().values()
        want = np.load(p, allow_pickle=False)
        got = ref.numpy()
        same(got, want.astype(want.dtype.newbyteorder("<")) if want.dtype.byteorder == ">" else want)
        assert list(ck.tensors()) == ["arr_0"]


def test_npy_tensors_are_lazy_file_ranges(npy_dir):
    ck = ckptconv.load(npy_dir / "float32.npy")
    handle, offset, nbytes = ck.tensors()["arr_0"].file_span()
    assert offset % 64 == 0 and nbytes == 3 * 4 * 4  # numpy aligns data to 64 bytes
    f = ckptconv.load(npy_dir / "fortran.npy").tensors()["arr_0"]
    assert f.file_span() is None and f.strides == (1, 4)   # Fortran order: a strided view


@pytest.mark.parametrize("archive", ["plain.npz", "compressed.npz"])
def test_npz_reads_every_member(npy_dir, arrays, archive):
    p = npy_dir / archive
    assert detect_format(p) == "npz"
    ck = ckptconv.load(p)
    tensors = ck.tensors()
    assert list(tensors) == list(arrays)
    with np.load(p, allow_pickle=False) as z:
        for name in arrays:
            want = z[name]
            if want.dtype.byteorder == ">":
                want = want.astype(want.dtype.newbyteorder("<"))
            same(tensors[name].numpy(), want)
    stored = tensors["float64"].file_span()
    assert (stored is not None) == (archive == "plain.npz")


def test_positional_savez_names(npy_dir, arrays):
    assert list(ckptconv.load(npy_dir / "positional.npz").tensors()) == ["arr_0", "arr_1"]


def test_deflated_member_reads_in_any_order(tmp_path):
    big = np.arange(1_200_000, dtype=np.int64).reshape(1200, 1000)
    np.savez_compressed(tmp_path / "c.npz", big=big)
    ref = ckptconv.load(tmp_path / "c.npz").tensors()["big"]
    src = ref.source
    pieces = [(7_000_000, 5000), (8, 16), (9_599_000, 1000), (0, 8)]
    raw = big.tobytes()
    for off, n in pieces:   # backwards reads restart the inflater
        assert bytes(src.read(off, n)) == raw[off:off + n]
    chunks = b"".join(bytes(c) for c in ref.iter_bytes(1 << 20))
    assert chunks == raw


def test_npy_header_versions_2_and_3(tmp_path):
    a = sample("float32", (5, 2))
    for version in ((1, 0), (2, 0), (3, 0)):
        p = tmp_path / f"v{version[0]}.npy"
        with open(p, "wb") as f:
            np.lib.format.write_array(f, a, version=version)
        same(ckptconv.load(p).tensors()["arr_0"].numpy(), a)


def test_text_arrays_become_values(tmp_path):
    np.savez(tmp_path / "t.npz", labels=np.array(["cat", "dog"]), raw=np.array([b"a", b"bc"]),
             w=np.ones(2, np.float32))
    ck = ckptconv.load(tmp_path / "t.npz")
    assert ck.tree["labels"] == ["cat", "dog"] and ck.tree["raw"] == [b"a", b"bc"]
    assert list(ck.tensors()) == ["w"]


# --- object arrays: only through the restricted unpickler -------------------------------------

def test_object_array_of_a_dict(tmp_path):
    w = sample("float32", (2, 3))
    np.save(tmp_path / "d.npy", {"epoch": 4, "w": w, "mean": [0.485, 0.456, 0.406],
                                 "loss": np.float64(0.25)})
    ck = ckptconv.load(tmp_path / "d.npy")
    assert ck.tree["epoch"] == 4 and ck.tree["mean"] == [0.485, 0.456, 0.406]
    assert ck.tree["loss"] == 0.25
    same(ck.tensors()["w"].numpy(), w)
    # an N-d object array keeps its layout as nested lists
    objs = np.empty((2, 2), dtype=object)
    objs[:] = [[1, "a"], [None, 2.5]]
    np.save(tmp_path / "o.npy", np.asfortranarray(objs))
    assert ckptconv.load(tmp_path / "o.npy").tree == {"arr_0": [[1, "a"], [None, 2.5]]}
    # np.savez_compressed of a dict: a deflated object member
    np.savez_compressed(tmp_path / "d.npz", w=w, meta={"epoch": 4, "classes": ["cat", "dog"]})
    ck = ckptconv.load(tmp_path / "d.npz")
    assert ck.tree["meta"] == {"epoch": 4, "classes": ["cat", "dog"]}
    same(ck.tensors()["w"].numpy(), w)


def test_unsafe_object_array_refused(tmp_path):
    evil = tmp_path / "evil.npy"
    evil.write_bytes(npy_object_file(_system_p2()))
    with pytest.raises(UnsafePickleError, match="posix.system"):
        ckptconv.load(evil)
    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as z:
        z.writestr("ok.npy", _npy_bytes(np.ones(3)))
        z.writestr("x.npy", npy_object_file(_system_p2()))
    for p in (evil, tmp_path / "evil.npz"):
        proc = run_cli("convert", p, tmp_path / "out.safetensors")
        assert_one_line_error(proc, 3, "posix.system", "nothing was executed")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("descr", ["<O", "=O", "O8", "|O4", "object", [("a", "<f4"), ("b", "object")]])
def test_every_spelling_of_an_object_dtype_is_a_pickle(tmp_path, descr):
    """numpy reads these descrs as object dtypes too (np.load unpickles the body
    with allow_pickle=True): scan and the reader judge the pickle, whatever the
    spelling; a scanner that knew only '|O' would call the file safe."""
    evil = tmp_path / "evil.npy"
    evil.write_bytes(npy_object_file(_system_p2(), descr))
    with pytest.raises(ValueError, match="Object arrays cannot be loaded"):
        np.load(evil, allow_pickle=False)   # numpy's own word: a pickle follows
    with pytest.raises(UnsafePickleError, match="posix.system"):
        ckptconv.load(evil)
    report = ckptconv.scan(evil)
    assert report.verdict == "unsafe" and "posix.system" in str(report), str(report)
    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as z:
        z.writestr("x.npy", evil.read_bytes())
    assert ckptconv.scan(tmp_path / "evil.npz").verdict == "unsafe"


class Phase(enum.Enum):
    """Pickled as a call of the class with its value (REDUCE): refused unless allowed."""
    TRAIN = "train"


def test_allow_global_reads_object_arrays_naming_it(tmp_path, cli):
    """``allow_globals=`` / ``--allow-global`` for npy and npz: a class the object
    array's pickle calls is read as an inert record (never called) when the run
    names it, refused otherwise; names that can run code stay refused."""
    np.save(tmp_path / "p.npy", {"phase": Phase.TRAIN, "epoch": 3})
    np.savez(tmp_path / "p.npz", w=np.ones(2), meta={"phase": Phase.TRAIN})
    name = f"{Phase.__module__}.Phase"
    oracle = np.load(tmp_path / "p.npy", allow_pickle=True).item()["phase"]  # numpy's own reader
    for p in (tmp_path / "p.npy", tmp_path / "p.npz"):
        with pytest.raises(UnsafePickleError, match=name):
            ckptconv.load(p)
        ck = ckptconv.load(p, allow_globals=[name])
        rec = ck.tree["phase"] if p.suffix == ".npy" else ck.tree["meta"]["phase"]
        assert (rec.cls, rec.args) == (name, (oracle.value,))
        assert cli("inspect", p).returncode == 3
        proc = cli("inspect", p, "--allow-global", name, "--json")
        assert proc.returncode == 0, proc.stderr
    proc = cli("inspect", tmp_path / "p.npy", "--allow-global", "os.system")
    assert_one_line_error(proc, 2, "os.system")
    with pytest.raises(UnsafePickleError, match="posix.system"):  # allowing a class allows nothing else
        ckptconv.load(_write(tmp_path / "evil.npy", npy_object_file(_system_p2())),
                      allow_globals=[name])


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _npy_bytes(a) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def test_truncated_and_malformed(tmp_path):
    good = _npy_bytes(sample("float64", (100,)))
    (tmp_path / "cut.npy").write_bytes(good[:500])
    assert_one_line_error(run_cli("inspect", tmp_path / "cut.npy"), 1, "cut.npy", "truncated")
    bad = bytearray(good)
    bad[10:20] = b"__import__"
    (tmp_path / "bad.npy").write_bytes(bytes(bad))
    with pytest.raises(FormatError, match="dict literal"):
        ckptconv.load(tmp_path / "bad.npy")
    extra = good.replace(b"'shape': (100,), ", b"'shape': (100,), 'x': 1")
    (tmp_path / "extra.npy").write_bytes(extra)
    with pytest.raises(FormatError, match="exactly the keys"):
        ckptconv.load(tmp_path / "extra.npy")
    zc = io.BytesIO()
    np.savez_compressed(zc, a=np.arange(10_000))
    (tmp_path / "cut.npz").write_bytes(zc.getvalue()[:-200])
    assert_one_line_error(run_cli("inspect", tmp_path / "cut.npz"), 1, "cut.npz")


# --- writing what numpy reads ----------------------------------------------------------------

def test_npy_written_byte_for_byte_as_np_save(npy_dir, arrays, tmp_path):
    for name, a in arrays.items():
        out = tmp_path / f"{name}.npy"
        ckptconv.save(ckptconv.load(npy_dir / f"{name}.npy"), out)
        back = np.load(out, allow_pickle=False)
        if a.dtype.byteorder != ">":  # we write little-endian
            assert out.read_bytes() == (npy_dir / f"{name}.npy").read_bytes(), name
            assert back.flags.f_contiguous == a.flags.f_contiguous
        same(back, a.astype(a.dtype.newbyteorder("<")))


def test_npz_written_loads_with_np_load(npy_dir, arrays, tmp_path):
    for src in ("plain.npz", "compressed.npz"):
        out = tmp_path / f"re_{src}"
        ckptconv.convert(npy_dir / src, out)
        with np.load(out, allow_pickle=False) as z:
            assert z.files == list(arrays)       # no member of our own for a plain archive
            for name, a in arrays.items():
                same(z[name], a.astype(a.dtype.newbyteorder("<")))


def test_training_checkpoint_roundtrip_through_npz(tmp_path):
    torch = pytest.importorskip("torch")
    from conftest import make_training_checkpoint

    obj = make_training_checkpoint()
    torch.save(obj, tmp_path / "ck.pt")
    ckptconv.convert(tmp_path / "ck.pt", tmp_path / "ck.npz")
    src = ckptconv.load(tmp_path / "ck.pt")
    back = ckptconv.load(tmp_path / "ck.npz")
    assert back.leaves().__len__() == src.leaves().__len__()
    assert [k for k, v in back.leaves() if not hasattr(v, "dtype")] == \
        [k for k, v in src.leaves() if not hasattr(v, "dtype")]
    assert back.aliases == src.aliases
    st_src, st_back = src.tensors(), back.tensors()
    assert list(st_back) == list(st_src)
    for name, ref in st_src.items():
        assert st_back[name].dtype == ref.dtype
        assert st_back[name].tobytes() == ref.tobytes(), name
    with np.load(tmp_path / "ck.npz", allow_pickle=False) as z:
        side = json.loads(str(z["__ckptconv__"]))
        assert "ckptconv.tree" in side["metadata"]
        w = z["model.embed.weight"] if "model.embed.weight" in z.files else None
    if w is not None:
        same(w, st_src["model.embed.weight"].numpy())


def test_bfloat16_like_numpy_does(tmp_path):
    b = np.arange(-3, 3).astype(ml_dtypes.bfloat16)
    f8 = np.linspace(-2, 2, 5).astype(ml_dtypes.float8_e4m3fn)
    np.save(tmp_path / "numpy_bf16.npy", b)
    report = ckptconv.convert(tmp_path / "numpy_bf16.npy", tmp_path / "x.npy")
    ckptconv.save({"b": b}, tmp_path / "ours_bf16.npy")
    assert (tmp_path / "ours_bf16.npy").read_bytes() == (tmp_path / "numpy_bf16.npy").read_bytes()
    assert "uint16" in ckptconv.load(tmp_path / "numpy_bf16.npy").tensors()["arr_0"].dtype.name
    assert report.tensors == 1
    info = ckptconv.save({"b": b, "f8": f8, "f": np.ones(2, np.float32)}, tmp_path / "m.npz")
    assert any("np.load" in n for n in info["notes"])
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        assert z["b"].dtype == np.dtype("V2")
        same(z["b"].view(ml_dtypes.bfloat16), b)
        same(z["f8"].view(ml_dtypes.float8_e4m3fn), f8)
    t = ckptconv.load(tmp_path / "m.npz").tensors()
    assert t["b"].dtype.name == "bfloat16" and t["f8"].dtype.name == "float8_e4m3fn"
    same(t["b"].numpy(), b)


def test_npy_holds_one_array(tmp_path):
    with pytest.raises(ckptconv.UnsupportedError, match="npz"):
        ckptconv.save({"a": np.ones(2), "b": np.ones(3)}, tmp_path / "two.npy")
    proc = run_cli("convert", "--to", "npy", tmp_path / "missing.npz", tmp_path / "x.npy")
    assert proc.returncode == 1


def test_cli_convert_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {"w": torch.randn(4, 3), "b": torch.arange(4, dtype=torch.int32),
          "h": torch.randn(2).to(torch.bfloat16)}
    torch.save(sd, tmp_path / "sd.pt")
    assert run_cli("convert", tmp_path / "sd.pt", tmp_path / "sd.npz").returncode == 0
    assert run_cli("convert", tmp_path / "sd.npz", tmp_path / "back.pt").returncode == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    with np.load(tmp_path / "sd.npz", allow_pickle=False) as z:
        same(z["w"], sd["w"].numpy())


_DTYPES = st.sampled_from(NUMERIC)
_SHAPES = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(_DTYPES, _SHAPES, st.booleans(), st.booleans())
def test_property_np_save_roundtrip(dtype, shape, fortran, big):
    a = sample(dtype, shape)
    if fortran:
        a = np.asfortranarray(a)
    if big:
        a = a.astype(a.dtype.newbyteorder(">"))
    raw = _npy_bytes(a)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p, q = Path(d) / "a.npy", Path(d) / "b.npy"
        p.write_bytes(raw)
        ckptconv.save(ckptconv.load(p), q)
        back = np.load(q, allow_pickle=False)
        same(back, a.astype(a.dtype.newbyteorder("<")))
        if not big:
            assert q.read_bytes() == raw


@pytest.mark.parametrize("fmt,ext", [("torch", "pt"), ("safetensors", "safetensors"), ("tf", "ckpt"),
                                     ("hdf5", "h5"), ("onnx", "onnx"), ("npz", "npz")])
def test_np_saved_array_converts_both_ways(tmp_path, fmt, ext):
    a = sample("float32", (4, 3))
    np.save(tmp_path / "a.npy", a)
    try:
        ckptconv.convert(tmp_path / "a.npy", tmp_path / f"a.{ext}", to=fmt)
    except ckptconv.MissingDependencyError:
        pytest.skip(f"{fmt} needs an optional dependency")
    ckptconv.convert(tmp_path / f"a.{ext}", tmp_path / "back.npy")
    assert (tmp_path / "back.npy").read_bytes() == (tmp_path / "a.npy").read_bytes()
