"""Adapter registry: content sniffing, extension-based targets, and
third-party adapters from the entry-point group ``ckptconv.adapters``."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

import ckptconv
from ckptconv.registry import detect_format, format_for_target
from conftest import assert_one_line_error, run_cli

PLUGIN = '''
"""A third-party adapter: numpy .npz archives (read only)."""
from pathlib import Path

import numpy as np

from ckptconv.registry import Adapter
from ckptconv.tensor import ArrayTensor
from ckptconv.tree import Checkpoint


class NpzAdapter(Adapter):
    name = "npz"
    extensions = (".npz",)
    can_write = False

    def sniff(self, head, path):
        return path.suffix == ".npz" and head[:2] == b"PK"

    def read(self, path, **options):
        with np.load(path, allow_pickle=False) as z:
            return Checkpoint({k: ArrayTensor(z[k]) for k in z.files})
'''


@pytest.fixture
def plugin_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "npz_plugin.py").write_text(PLUGIN)
    dist = site / "npz_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: npz-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [ckptconv.adapters]
        npz = npz_plugin:NpzAdapter
        broken = not_a_module_anywhere:Nothing
        """))
    return {"PYTHONPATH": str(site)}


def test_entry_point_adapter_is_used_and_a_broken_one_only_warns(tmp_path, plugin_env):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int64)}
    npz = tmp_path / "weights.npz"
    np.savez(npz, **arrays)
    p = run_cli("formats", "--json", env=plugin_env)
    assert p.returncode == 0, p.stderr
    names = {f["name"]: f for f in json.loads(p.stdout)["formats"]}
    assert names["npz"]["available"] and not names["npz"]["builtin"]
    assert not names["broken"]["available"]
    out = tmp_path / "weights.safetensors"
    p = run_cli("convert", npz, out, env=plugin_env)
    assert p.returncode == 0, p.stderr
    got = ckptconv.load(out).tensors()
    for k, v in arrays.items():
        assert np.array_equal(got[k].numpy(), v)


def test_detection_is_by_content_not_extension(tmp_path):
    torch = pytest.importorskip("torch")
    disguised = tmp_path / "model.safetensors"  # really a torch zip
    torch.save({"w": torch.ones(2)}, disguised)
    assert detect_format(disguised) == "torch"
    assert format_for_target(tmp_path / "x.safetensors") == "safetensors"
    assert format_for_target(tmp_path / "x.pt") == "torch"
    assert format_for_target(tmp_path / "x.bin", "safetensors") == "safetensors"


def test_unknown_target_format_is_a_usage_error(tmp_path):
    src = tmp_path / "a.safetensors"
    ckptconv.save({"w": np.ones(2, np.float32)}, src)
    assert_one_line_error(run_cli("convert", src, tmp_path / "b.xyz"), 2, "--to")
    assert_one_line_error(run_cli("convert", src, tmp_path / "b.bin", "--to", "pth2"), 2,
                          "unknown format 'pth2'")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_one_line_error(run_cli("inspect", text), 1, "notes.txt")
