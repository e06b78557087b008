"""``scan`` verdicts are three-valued and every verb's exit code matches what
it prints: safe (0), unsafe (3, a reason), unscanned (1, the reason). Zip
members are judged by their content, whatever their name; archives we cannot
open, encrypted members and unknown binaries are never called safe; data
after a pickle's STOP is judged on every verb; code that runs on load outside
pickles (Keras Lambda layers, SavedModel Python ops, ONNX custom-op domains)
is flagged, one line each. The Keras and TensorFlow fixtures in
tests/code_on_load were written by the real libraries (make_fixtures.py); a
slow test writes them again."""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import malicious_corpus as mc
from conftest import run_cli

from ckptconv.cli import main
from ckptconv.safety import scan, scan_paths

HERE = Path(__file__).parent
FIXTURES = HERE / "code_on_load"
BENIGN = pickle.dumps({"w": [1.0, 2.0], "step": 3}, protocol=2)
EVIL = mc.corpus()[1].data   # posix.system via GLOBAL + REDUCE


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _encrypt_flag(path: Path) -> None:
    """Set the 'encrypted' bit of every member (local and central headers)."""
    b = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = b.find(sig)
        while i >= 0:
            b[i + off] |= 1
            i = b.find(sig, i + 4)
    path.write_bytes(bytes(b))


def test_zip_members_are_judged_by_content(tmp_path):
    evil = _zip(tmp_path / "evil.zip", {"notes/data.txt": EVIL, "readme.md": b"hello\n"})
    rep = scan(evil)
    assert rep.verdict == "unsafe" and "posix.system" in rep.reasons[0], rep
    assert "data.txt" in rep.reasons[0]
    good = _zip(tmp_path / "good.zip", {"notes/data.txt": BENIGN, "readme.md": b"hello\n"})
    assert scan(good).verdict == "safe" and len(scan(good).pickles) == 1
    # a pickle hidden in a torch zip under another name
    pt = tmp_path / "m.pt"
    pt.write_bytes(mc._zip({"archive/data.pkl": BENIGN, "archive/byteorder": b"little",
                            "archive/extra/model.bin": EVIL}))
    rc, out, _ = cli("scan", pt)
    assert rc == 3 and "UNSAFE" in out and "model.bin" in out


def test_what_scan_cannot_judge_is_unscanned_never_safe(tmp_path):
    enc = _zip(tmp_path / "enc.zip", {"data.pkl": BENIGN})
    _encrypt_flag(enc)
    seven = tmp_path / "model.7z"
    seven.write_bytes(b"7z\xbc\xaf\x27\x1c\x00\x04" + bytes(200))
    gz = tmp_path / "model.pt.gz"
    import gzip
    gz.write_bytes(gzip.compress(EVIL))
    nested = _zip(tmp_path / "nested.zip", {"inner.zip": (tmp_path / "enc.zip").read_bytes()})
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    for path, words in ((enc, "encrypted"), (seven, "7z archive"), (gz, "gzip archive"),
                        (nested, "zip archive inside the archive"), (blob, "not a format")):
        rep = scan(path)
        assert rep.verdict == "unscanned" and words in rep.reasons[0], rep
        rc, out, _ = cli("scan", path)
        assert rc == 1 and "UNSCANNED" in out and "1 unscanned" in out, out
        assert json.loads(run_cli("scan", path, "--json").stdout)["files"][0]["verdict"] == \
            "unscanned"
    # text is judged: no loader unpickles it
    (tmp_path / "README.md").write_text("config and notes\n")
    assert scan(tmp_path / "README.md").verdict == "safe"


@pytest.mark.parametrize("name, data", [
    ("eval_protocol0", b"cbuiltins\neval\n(S'1+1'\ntR."),
    ("system_protocol0", b"cos\nsystem\n(S'echo'\ntR."),
    ("system_protocol1", b"cposix\nsystem\nq\x00(X\x04\x00\x00\x00echoq\x01tq\x02Rq\x03."),
])
def test_protocol_0_and_1_pickles_are_pickles_refused_on_every_verb(tmp_path, name, data):
    f = tmp_path / f"{name}.pkl"
    f.write_bytes(data)
    for verb in ("inspect", "scan", "check"):
        rc, out, err = cli(verb, f)
        assert rc == 3, (verb, out, err)
    rc, _, err = cli("convert", f, tmp_path / "o.safetensors")
    assert rc == 3 and "not a checkpoint format" not in err


@pytest.mark.parametrize("after, code", [
    (BENIGN, 1), (EVIL, 3), (b"cbuiltins\neval\n(S'1'\ntR.", 3), (b"\x00\x01trailing", 1)])
@pytest.mark.parametrize("container", ["bare", "zip"])
def test_data_after_stop_on_every_verb(tmp_path, after, code, container):
    data = pickle.dumps({"w": 1}, protocol=2) + after
    f = tmp_path / ("m.pkl" if container == "bare" else "m.pt")
    f.write_bytes(data if container == "bare" else mc.torch_zip(data))
    for verb in ("inspect", "scan"):
        rc, out, err = cli(verb, f)
        assert rc == code, (verb, out, err)
        assert "after the pickle's STOP" in out + err
    rc, _, err = cli("convert", f, tmp_path / "o.safetensors")
    assert rc == code and "after the pickle's STOP" in err
    assert not (tmp_path / "o.safetensors").exists()


def _frame_exploit() -> bytes:
    from test_unpickler import frame_crossing_exploit

    return frame_crossing_exploit()


def test_frame_crossing_exploit_runs_under_torch_load_and_is_refused(tmp_path):
    """The proof: torch.load of a zip whose data.pkl crosses its frame runs
    os.system (in a subprocess, a fresh folder); every verb refuses it."""
    data = _frame_exploit().replace(b"echo hi", b"touch c")
    pt = tmp_path / "frame.pt"
    pt.write_bytes(mc.torch_zip(data))
    bare = tmp_path / "frame.pkl"
    bare.write_bytes(data)
    run = tmp_path / "run"
    run.mkdir()
    torch = pytest.importorskip("torch")  # noqa: F841
    code = ("import torch, warnings; warnings.simplefilter('ignore')\n"
            f"try:\n    torch.load({str(pt)!r}, weights_only=False)\nexcept Exception:\n    pass\n")
    subprocess.run([sys.executable, "-c", code], cwd=run, timeout=120, capture_output=True)
    assert (run / "c").exists(), "the exploit did not run under torch.load"
    for f in (pt, bare):
        for verb in ("inspect", "scan"):
            rc, out, err = cli(verb, f)
            assert rc == 3 and "runs past the end of its frame" in out + err, (verb, out, err)
        rc, _, err = cli("convert", f, tmp_path / "o.safetensors")
        assert rc == 3 and "offset 11" in err


def test_allowlisted_name_left_uncalled_is_an_inert_record(tmp_path):
    """A pickle holding builtins.set as a value (named, never called) is not 'a
    callable that can run code': it is kept as a record of the name."""
    f = tmp_path / "names.pkl"
    f.write_bytes(mc.P2 + mc.EMPTY_DICT + mc.u("kind") + mc.g("builtins", "set") + mc.SETITEM
                  + mc.STOP)
    rep = scan(f)
    assert rep.verdict == "safe", rep
    rc, out, err = cli("inspect", f)
    assert rc == 0 and "can run code" not in out + err


@pytest.mark.parametrize("name, verdict, words", [
    ("lambda.h5", "unsafe", "layer 'lambda' is a Lambda layer"),
    ("lambda.keras", "unsafe", "layer 'lambda' is a Lambda layer"),
    ("dense.h5", "safe", None),
    ("dense.keras", "safe", None),
    ("savedmodel_pyfunc", "unsafe", "graph op EagerPyFunc"),
    ("savedmodel_plain", "safe", None),
])
def test_code_on_load_outside_pickles(tmp_path, name, verdict, words):
    src = FIXTURES / name
    summary = scan_paths([src])
    assert {f.verdict for f in summary.files} == {verdict}, summary
    rc, out, _ = cli("scan", src)
    assert rc == {"safe": 0, "unsafe": 3}[verdict], out
    if words:
        reasons = [r for f in summary.files for r in f.reasons]
        assert len(reasons) == 1 and words in reasons[0], reasons


def _onnx_model(path: Path, domain: str) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("PyOp" if domain else "Relu", ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_onnx_custom_op_domains(tmp_path):
    bad = scan(_onnx_model(tmp_path / "custom.onnx", "ai.onnx.contrib"))
    assert bad.verdict == "unsafe" and "custom-op domain 'ai.onnx.contrib' (ops PyOp)" in bad.reasons[0]
    assert len(bad.reasons) == 1
    assert scan(_onnx_model(tmp_path / "plain.onnx", "")).verdict == "safe"


@pytest.mark.slow
def test_code_on_load_fixtures_regenerate(tmp_path):
    """The fixtures made again by tf_keras, Keras 3 and TensorFlow are judged
    alike; Keras itself refuses the Lambda in safe mode (the oracle)."""
    out = tmp_path / "fx"
    subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), str(out)], check=True,
                   capture_output=True, timeout=600)
    for name in ("lambda.h5", "lambda.keras", "dense.h5", "dense.keras", "savedmodel_pyfunc",
                 "savedmodel_plain"):
        fresh = {f.verdict for f in scan_paths([out / name]).files}
        assert fresh == {f.verdict for f in scan_paths([FIXTURES / name]).files}, name
    code = ("import keras, sys\ntry:\n    keras.models.load_model(sys.argv[1], safe_mode=True)\n"
            "except ValueError as e:\n    print('refused', 'lambda' in str(e).lower())\n")
    p = subprocess.run([sys.executable, "-c", code, str(out / "lambda.keras")], capture_output=True,
                       text=True, timeout=600)
    assert "refused True" in p.stdout, p.stdout + p.stderr


def test_scan_json_status_words(tmp_path):
    (tmp_path / "a.pkl").write_bytes(BENIGN)
    (tmp_path / "b.pkl").write_bytes(EVIL)
    (tmp_path / "c.7z").write_bytes(b"7z\xbc\xaf\x27\x1c" + bytes(32))
    p = run_cli("scan", tmp_path, "--json")
    assert p.returncode == 3
    rep = json.loads(p.stdout)
    assert [f["verdict"] for f in rep["files"]] == ["safe", "unsafe", "unscanned"]
    assert rep["counts"] == {"safe": 1, "unsafe": 1, "unscanned": 1}
    shutil.rmtree(tmp_path)


def test_saved_model_files_are_found_by_name(tmp_path):
    """A SavedModel folder's files are judged as TensorFlow finds them, by name
    beside saved_model.pb (the names are the adapters', reached through the
    registry): the graph by tf's scan, the fingerprint as numbers only."""
    import ckptconv

    folder = tmp_path / "sm"
    folder.mkdir()
    shutil.copy(Path(__file__).parent / "code_on_load" / "savedmodel_pyfunc" / "saved_model.pb",
                folder / "saved_model.pb")
    (folder / "fingerprint.pb").write_bytes(b"\x08\x96\x01\x10\x05")
    fingerprint = ckptconv.scan(folder / "fingerprint.pb")
    assert (fingerprint.kind, fingerprint.verdict) == (
        "TensorFlow SavedModel fingerprint (numbers only)", "safe")
    assert ckptconv.scan(folder / "saved_model.pb").verdict == "unsafe"
    (tmp_path / "fingerprint.pb").write_bytes(b"\x08\x96\x01\x10\x05")   # not in a SavedModel
    assert ckptconv.scan(tmp_path / "fingerprint.pb").verdict == "unscanned"
