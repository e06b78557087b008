"""The README's "Adding a format" example, as a really installed plugin: the
package in tests/plugin_example/ is built and pip-installed into a folder,
and ckptconv (a fresh interpreter with that folder on PYTHONPATH) finds it
through the ``ckptconv.adapters`` entry point: listed, sniffed, read,
written, its declared options and its ``verify`` hook used."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ckptconv
from conftest import REPO, assert_one_line_error, run_cli

EXAMPLE = REPO / "tests" / "plugin_example"


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("plugin_site")
    build = tmp_path_factory.mktemp("plugin_build")
    source = build / "ckptconv-jsonweights"      # a copy: the build leaves files beside the source
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                    "__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--no-index", "--target", str(site), str(source)],
                       capture_output=True, text=True, timeout=300, cwd=build,
                       env={**os.environ, "PIP_NO_CACHE_DIR": "1"})
    assert p.returncode == 0, p.stderr
    assert list(site.glob("ckptconv_jsonweights-*.dist-info/entry_points.txt"))
    return {"PYTHONPATH": str(site)}


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_installed_plugin_is_listed_with_its_options_and_hooks(plugin_env):
    p = run_cli("formats", "--json", env=plugin_env)
    assert p.returncode == 0, p.stderr
    found = {f["name"]: f for f in json.loads(p.stdout)["formats"]}
    row = found["json-weights"]
    assert row["available"] and not row["builtin"]
    assert row["extensions"] == [".weights.json"]
    assert row["write_options"] == ["indent"] and row["hooks"] == ["layout", "verify"]
    assert "json-weights" not in {f["name"] for f in ckptconv.formats().formats}  # not installed here


def test_conversion_through_the_installed_plugin(tmp_path, plugin_env):
    arrays = {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
              "fc.bias": np.array([1, -2], np.int64)}
    src = tmp_path / "a.safetensors"
    ckptconv.save(arrays, src)
    out = tmp_path / "b.weights.json"            # target chosen by the plugin's extension
    p = run_cli("convert", src, out, env=plugin_env)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["format"] == "json-weights" and doc["tensors"]["fc.weight"]["shape"] == [2, 3]
    back = tmp_path / "c.safetensors"            # source detected by the plugin's sniffer
    p = run_cli("convert", out, back, env=plugin_env)
    assert p.returncode == 0, p.stderr
    got = ckptconv.load(back).tensors()
    for k, v in arrays.items():
        assert got[k].numpy().dtype == v.dtype and np.array_equal(got[k].numpy(), v)
    p = run_cli("inspect", out, "--json", env=plugin_env)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["format"] == "json-weights" and report["tensor_count"] == 2
    assert report["layout"] == {"storage": "values inline in JSON (no byte offsets)"}
    p = run_cli("inspect", out, env=plugin_env)
    assert "storage: values inline in JSON (no byte offsets)" in p.stdout


def test_plugin_declared_options_and_hooks(tmp_path, plugin_env):
    src = tmp_path / "a.safetensors"
    ckptconv.save({"w": np.ones((2, 2), np.float32)}, src)
    code = f"""
import ckptconv
from ckptconv.errors import UsageError
ckptconv.convert({str(src)!r}, {str(tmp_path / 'i.weights.json')!r}, indent=2)
assert open({str(tmp_path / 'i.weights.json')!r}).read().startswith('{{\\n  "format"')
try:
    ckptconv.convert({str(src)!r}, {str(tmp_path / 'x.pt')!r}, indent=2)
except UsageError as e:
    print(e)
"""
    p = _python(code, plugin_env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ("--indent is not an option of the torch writer; "
                                "formats that take it: json-weights")
    good = tmp_path / "i.weights.json"
    p = run_cli("verify", good, "--json", env=plugin_env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"path": str(good), "tensors": 1, "problems": [],
                                    "exit_code": 0}
    bad = tmp_path / "bad.weights.json"
    doc = json.loads(good.read_text())
    doc["tensors"]["w"]["data"].pop()
    bad.write_text(json.dumps(doc))
    p = run_cli("verify", bad, env=plugin_env)
    assert p.returncode == 1 and "tensor 'w': 3 values for shape [2, 2]" in p.stdout
    # a verb whose hook the format lacks: one line, naming who has it
    assert_one_line_error(run_cli("check", good, env=plugin_env), 1,
                          "i.weights.json: check is for torch files; this is json-weights")
