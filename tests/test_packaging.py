"""Packaging promises of the contract: extras pull only what a feature needs."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["project"]["optional-dependencies"]


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_core_dependencies_are_numpy_safetensors_ml_dtypes():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert _names(data["project"]["dependencies"]) == {"numpy", "safetensors", "ml_dtypes"}


def test_contract_extras_exist():
    assert {"torch", "tf", "hdf5", "onnx", "remote", "dask", "all", "test"} <= set(_extras())


def test_no_feature_extra_pulls_tensorflow():
    for name, reqs in _extras().items():
        if name == "test":  # TensorFlow is a test oracle only
            continue
        assert not {n for n in _names(reqs) if n.startswith(("tensorflow", "tf-keras"))}, name


def test_tf_extra_is_the_c_crc32c_only():
    assert _names(_extras()["tf"]) == {"google-crc32c"}


def test_only_torch_and_all_pull_torch():
    pulling = {name for name, reqs in _extras().items() if "torch" in _names(reqs)}
    assert pulling == {"torch", "all", "test"}
