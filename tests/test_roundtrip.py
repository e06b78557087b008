"""Every reader x every writer: a checkpoint written in format A by ckptconv,
converted to format B, reads back bit-exactly (names, dtypes, shapes, bytes)."""
from __future__ import annotations

import importlib

import ml_dtypes
import numpy as np
import pytest

import ckptconv
from ckptconv.errors import MissingDependencyError
from ckptconv.registry import FORMATS as TABLE
from ckptconv.registry import get_adapter

# (npy holds one array: its round trips through every format are in test_numpy.py)
FORMATS = [f for f in TABLE if f != "npy"]
# keras-h5 as .h5: the Keras 2 layout keeps any names (a Keras 3 .weights.h5 takes
# only Keras 3 names, or Keras 2 ones with a model_config: tests/test_fidelity_matrix.py)
EXT = {"torch": "pt", "safetensors": "safetensors", "tf": "ckpt", "hdf5": "h5",
       "keras-h5": "h5", "onnx": "onnx", "npz": "npz", "dcp": "dcp"}


def _available(fmt: str) -> bool:
    try:
        a = get_adapter(fmt)
        for mod in a.requires:
            importlib.import_module(mod)
        return True
    except (ImportError, MissingDependencyError):
        return False


def base_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "encoder.layer0.weight": rng.standard_normal((6, 4)).astype(np.float32),
        "encoder.layer0.bias": rng.standard_normal(6).astype(np.float32),
        "encoder.norm.weight": rng.standard_normal(6).astype(ml_dtypes.bfloat16),
        "head.weight": rng.standard_normal((3, 6)).astype(np.float16),
        "head.scale": np.array(2.5, dtype=np.float64),
        "stats.count": np.arange(5, dtype=np.int64),
        "stats.mask": np.array([True, False, True]),
        "stats.codes": np.arange(-4, 4, dtype=np.int8),
        "stats.empty": np.zeros((0, 3), dtype=np.float32),
    }


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    path = d / "base.safetensors"
    ckptconv.save(dict(base_tensors()), path)
    return path


@pytest.mark.parametrize("src_fmt", FORMATS)
@pytest.mark.parametrize("dst_fmt", FORMATS)
def test_reader_writer_pair_roundtrips_exactly(tmp_path, base_file, src_fmt, dst_fmt):
    for fmt in (src_fmt, dst_fmt):
        if not _available(fmt):
            pytest.skip(f"{fmt} adapter or its optional dependency is not installed")
        if not get_adapter(fmt).can_write:
            pytest.skip(f"{fmt} is read-only: no sample to write")
    a = tmp_path / f"a.{EXT[src_fmt]}"
    b = tmp_path / f"b.{EXT[dst_fmt]}"
    ckptconv.convert(base_file, a, to=src_fmt)
    ckptconv.convert(a, b, to=dst_fmt)
    got = ckptconv.load(b, format=dst_fmt)
    tensors = got.tensors()
    want = base_tensors()
    # formats that key by "/" (TF, HDF5, Keras) may write "." names with "/";
    # compare under a separator-insensitive name.
    norm = {k.replace("/", "."): v for k, v in tensors.items()}
    assert set(norm) == set(want), sorted(set(norm) ^ set(want))
    for name, arr in want.items():
        ref = norm[name]
        assert ref.dtype.name == ckptconv.dtypes.from_numpy(arr.dtype).name, name
        assert tuple(ref.shape) == arr.shape, name
        assert ref.tobytes() == np.ascontiguousarray(arr).tobytes(), name
