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
"""A third-party adapter: text files of named float rows (read only)."""
from pathlib import Path

import numpy as np

from ckptconv.registry import Adapter
from ckptconv.tensor import ArrayTensor
from ckptconv.tree import Checkpoint


class RowsAdapter(Adapter):
    name = "rows"
    extensions = (".rows",)
    can_write = False

    def sniff(self, head, path):
        return head.startswith(b"#rows\\n")

    def read(self, path, **options):
        lines = path.read_text().splitlines()[1:]
        return Checkpoint({name: ArrayTensor(np.array([float(v) for v in vals], np.float32))
                           for name, *vals in (line.split(",") for line in lines)})
'''


@pytest.fixture
def plugin_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "rows_plugin.py").write_text(PLUGIN)
    dist = site / "rows_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rows-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [ckptconv.adapters]
        rows = rows_plugin:RowsAdapter
        broken = not_a_module_anywhere:Nothing
        """))
    return {"PYTHONPATH": str(site)}


def test_entry_point_adapter_is_used_and_a_broken_one_only_warns(tmp_path, plugin_env):
    arrays = {"w": np.arange(6, dtype=np.float32), "b": np.ones(3, np.float32)}
    rows = tmp_path / "weights.rows"
    rows.write_text("#rows\n" + "".join(f"{k},{','.join(map(str, v))}\n" for k, v in arrays.items()))
    p = run_cli("formats", "--json", env=plugin_env)
    assert p.returncode == 0, p.stderr
    names = {f["name"]: f for f in json.loads(p.stdout)["formats"]}
    assert names["rows"]["available"] and not names["rows"]["builtin"]
    assert not names["broken"]["available"]
    out = tmp_path / "weights.safetensors"
    p = run_cli("convert", rows, out, env=plugin_env)
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
