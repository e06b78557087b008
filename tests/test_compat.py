"""`ckptconv check` and `ckptconv sanitize` with the torch of the main suite
(the other torch versions: tests/compat, run by tox)."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from conftest import assert_one_line_error, make_training_checkpoint, run_cli

torch = pytest.importorskip("torch")

import ckptconv  # noqa: E402
from ckptconv import check, sanitize  # noqa: E402

NUMPY_SCALAR = ("numpy._core.multiarray.scalar" if int(np.__version__.split(".")[0]) >= 2
                else "numpy.core.multiarray.scalar")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("compat")
    out = {"training": d / "training.pt", "legacy": d / "training_legacy.pt",
           "fp8": d / "fp8.pt", "state_dict": d / "state_dict.pt"}
    ck = make_training_checkpoint()
    torch.save(ck, out["training"])
    torch.save(ck, out["legacy"], _use_new_zipfile_serialization=False)
    torch.save({"w8": torch.arange(16, dtype=torch.float32).to(torch.float8_e4m3fn),
                "b": torch.ones(2)}, out["fp8"])
    torch.save(ck["model_state_dict"], out["state_dict"])
    return out


def _check_json(path, **kw):
    p = run_cli("check", path, "--json", **kw)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.parametrize("kind", ["training", "legacy"])
def test_check_names_exactly_the_blocking_globals(files, kind):
    report = _check_json(files[kind], block=("torch",))  # check needs no torch
    assert report["torch_format"] == ("zip" if kind == "training" else "legacy")
    assert report["weights_only"] is False
    assert [b["name"] for b in report["blockers"]] == \
        sorted(["argparse.Namespace", NUMPY_SCALAR, "numpy.dtype"])
    where = {b["name"]: b["paths"] for b in report["blockers"]}
    assert where["argparse.Namespace"] == ["args"]
    assert where[NUMPY_SCALAR] == ["global_step", "best_metric"]
    for v in ("2.6", "2.13", "2.14"):
        assert report["weights_only_by_version"][v] is False
    # and torch agrees
    with pytest.raises(Exception, match="argparse.Namespace|numpy"):
        torch.load(files[kind], weights_only=True)


def test_check_text_report(files):
    p = run_cli("check", files["training"])
    assert p.returncode == 0, p.stderr
    assert "FAILS in torch >= 2.6" in p.stdout
    assert "argparse.Namespace" in p.stdout and "at args" in p.stdout
    assert "sanitize" in p.stdout


def test_check_fp8_names_2_1(files):
    report = _check_json(files["fp8"])
    assert report["min_torch"] == "2.1"
    assert report["min_torch_reasons"][0] == {"torch": "2.1",
                                              "why": "float8_e4m3fn tensors (e.g. 'w8')"}
    assert report["weights_only"] is True
    assert report["weights_only_since"] == "2.4"  # the first matrix torch allowlisting fp8
    assert torch.load(files["fp8"], weights_only=True)["w8"].dtype == torch.float8_e4m3fn


def test_check_clean_state_dict(files):
    report = _check_json(files["state_dict"])
    assert report["weights_only"] is True and report["blockers"] == []
    assert report["weights_only_since"] == "1.13"
    assert report["min_torch"] == "1.6"
    assert report["archive_root"] == "state_dict"
    assert report["zip_version"] == "3"


def test_check_unsafe_file_exits_3(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Evil()}, path)
    p = run_cli("check", path, "--json")
    assert p.returncode == 3, (p.stdout, p.stderr)
    report = json.loads(p.stdout)
    assert report["unsafe"] and "system" in report["unsafe"]
    assert report["exit_code"] == 3
    assert not marker.exists()
    assert run_cli("check", path).returncode == 3


def test_check_refuses_other_formats(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": np.ones(2, np.float32)}, str(path))
    assert_one_line_error(run_cli("check", path), 1, "x.safetensors", "torch files")


def test_check_ckptconv_written_file_says_so(tmp_path, files):
    out = tmp_path / "copy.pt"
    ckptconv.convert(files["state_dict"], out)
    report = check(out)
    assert report.archive_root == "archive"
    assert any("ckptconv" in w for w in report.writer)
    assert report.weights_only


def test_sanitize_cli_loads_with_weights_only(tmp_path, files):
    out = tmp_path / "clean.pt"
    p = run_cli("sanitize", files["training"], out)
    assert p.returncode == 0, p.stderr
    assert "args: argparse.Namespace -> dict with '__class__'" in p.stdout
    assert "global_step: numpy.int64 scalar -> int" in p.stdout
    got = torch.load(out, weights_only=True)
    want = make_training_checkpoint()
    assert got["args"] == {"__class__": "argparse.Namespace", **vars(want["args"])}
    assert got["global_step"] == 3400 and type(got["global_step"]) is int
    assert got["best_metric"] == 0.8125 and type(got["best_metric"]) is float
    for k, t in want["model_state_dict"].items():
        assert torch.equal(got["model_state_dict"][k], t), k
    assert got["model_state_dict"]["head.weight"].data_ptr() == \
        got["model_state_dict"]["embed.weight"].data_ptr()  # still tied
    assert got["optimizer_state_dict"]["param_groups"] == want["optimizer_state_dict"]["param_groups"]
    assert check(out).weights_only
    # never overwrites without --force
    assert_one_line_error(run_cli("sanitize", files["training"], out), 2, "clean.pt")
    p = run_cli("sanitize", files["training"], out, "--force", "--json")
    assert p.returncode == 0
    changes = json.loads(p.stdout)["changes"]
    assert {c["path"] for c in changes} == {"args", "global_step", "best_metric"}


def test_sanitize_for_torch_1_13(tmp_path):
    """torch_compat="1.13": floats become 0-d float64 tensors, uint32 arrays int64."""
    src = tmp_path / "src.pt"
    torch.save({"lr": 0.5, "rng": np.arange(3, dtype=np.uint32), "dt": np.dtype("float16"),
                "dev": torch.device("cpu"), "s": {1, 2}, "w": torch.ones(2)}, src)
    out = tmp_path / "out.pt"
    report = sanitize(src, out, torch_compat="1.13")
    changes = {c["path"]: c["to"] for c in report.changes}
    assert changes["lr"] == "0-d float64 tensor"
    assert changes["rng"].startswith("int64 tensor")
    assert changes["dt"] == "str 'float16'"
    assert changes["dev"] == "str 'cpu'"
    assert changes["s"] == "list"
    assert report.weights_only_since == "1.13"
    got = torch.load(out, weights_only=True)
    assert got["lr"].dtype == torch.float64 and got["lr"].item() == 0.5
    assert got["rng"].dtype == torch.int64 and got["rng"].tolist() == [0, 1, 2]
    assert got["dev"] == "cpu" and got["s"] == [1, 2] and got["dt"] == "float16"


def test_sanitize_default_keeps_what_torch_2_allows(tmp_path):
    src = tmp_path / "src.pt"
    torch.save({"dev": torch.device("cpu"), "dtype": torch.bfloat16, "s": {1, 2}, "b": b"\x00\xff",
                "size": torch.Size([2, 3])}, src)
    out = tmp_path / "out.pt"
    report = sanitize(src, out)
    changed = {c["path"] for c in report.changes}
    # torch 2.0's allowlist has neither torch.device, torch.bfloat16, set nor bytes
    assert changed == {"dev", "dtype", "s", "b"}
    got = torch.load(out, weights_only=True)
    assert got["size"] == torch.Size([2, 3]) and got["dev"] == "cpu" and got["dtype"] == "torch.bfloat16"
    assert got["b"].tolist() == [0, 255]


def test_convert_torch_compat_refuses_fp8_for_1_13(tmp_path, files):
    p = run_cli("convert", files["fp8"], tmp_path / "old.pt", "--torch-compat", "1.13")
    assert_one_line_error(p, 1, "'w8'", "float8_e4m3fn", "1.13")
    assert not (tmp_path / "old.pt").exists()
    p = run_cli("convert", files["fp8"], tmp_path / "new.pt", "--torch-compat", "2.1")
    assert p.returncode == 0, p.stderr
    assert torch.equal(torch.load(tmp_path / "new.pt", weights_only=True)["w8"].view(torch.uint8),
                       torch.load(files["fp8"])["w8"].view(torch.uint8))


def test_compat_module_imports_no_torch():
    code = ("import sys, ckptconv.adapters.torch, ckptconv.cli\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


def test_namespace_subclass_state_survives(tmp_path):
    """A custom class (not argparse) is a blocker too, named by its qualname."""
    src = tmp_path / "ns.pt"
    torch.save({"cfg": _Config(3)}, src)
    report = check(src)
    assert [b.name for b in report.blockers] == [f"{__name__}._Config"]
    out = tmp_path / "ns_clean.pt"
    sanitize(src, out)
    assert torch.load(out, weights_only=True)["cfg"] == {"__class__": f"{__name__}._Config", "n": 3}


class _Config(argparse.Namespace):
    def __init__(self, n):
        super().__init__(n=n)
