"""Pickle safety: a corpus of malicious pickles that really run code under
``pickle.load`` (and ``torch.load``) is refused by ``inspect``, ``convert``
and ``scan`` with exit 3 and one line naming the callable, in every place a
checkpoint carries pickles; nothing is executed. Also: structural attacks
(deep, recursive, huge, billion-laughs pickles) end in one-line errors, and
the allowlisted torch calls check their arguments."""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import pytest

import malicious_corpus as mc
from conftest import SAFETY_COUNTS, assert_one_line_error, run_cli

import ckptconv
from ckptconv.cli import main
from ckptconv.errors import CkptconvError, FormatError, UnsafePickleError
from ckptconv.safety import scan, scan_paths

CORPUS = mc.corpus()
BY_NAME = {p.name: p for p in CORPUS}


def cli(*args) -> tuple[int, str, str]:
    """The CLI in-process (its imports never run a pickle, so this is safe)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    return mc.write_corpus(tmp_path_factory.mktemp("corpus"))


def _run_proof(tmp_path, files: dict[str, tuple], loader: str, prelude: str = "") -> dict:
    """pickle-load (or torch-load) every file in a fresh folder each, in one subprocess."""
    entries = []
    for name, (path, payload) in files.items():
        d = tmp_path / f"run_{name}"
        d.mkdir()
        entries.append({"name": name, "dir": str(d), "file": str(path),
                        "setup": payload.setup if payload else ""})
    script = prelude + mc.PROOF_SCRIPT.replace("LOADER(f)", loader)
    p = subprocess.run([sys.executable, "-c", script], input=json.dumps(entries),
                       capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_corpus_is_big_and_varied():
    assert len(CORPUS) >= 30
    assert len({p.trick for p in CORPUS}) == len(CORPUS)
    opcodes = b"".join(p.data for p in CORPUS)
    for op in (mc.STACK_GLOBAL, mc.NEWOBJ, mc.NEWOBJ_EX, mc.OBJ, b"\x82", b"\x83", b"\x84", b"i"):
        assert op in opcodes


def test_every_payload_really_runs_under_pickle_load(tmp_path):
    """The proof: each bare pickle creates its canary under plain pickle.load,
    and a harmless pickle (the control) does not."""
    files = {}
    for p in CORPUS:
        f = tmp_path / f"{p.name}.pkl"
        f.write_bytes(p.data)
        files[p.name] = (f, p)
    control = tmp_path / "control.pkl"
    control.write_bytes(pickle.dumps({"w": [1.0, 2.0], "step": 3}))
    files["control"] = (control, None)
    if not any(p.needs_torch for p in CORPUS) or _has_torch():
        result = _run_proof(tmp_path, files, "pickle.load(f)")
    else:  # pragma: no cover - without torch those few cannot even be unpickled
        result = _run_proof(tmp_path, {k: v for k, v in files.items()
                                       if not (v[1] and v[1].needs_torch)}, "pickle.load(f)")
    assert result.pop("control") is False
    missed = [n for n, ran in result.items() if not ran]
    assert not missed, f"payloads that did not run under pickle.load: {missed}"
    SAFETY_COUNTS["malicious corpus: payloads proven to run under pickle.load"] = \
        f"{len(result)} of {len(CORPUS)}"


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_embedded_payloads_run_under_torch_load(tmp_path, corpus_files, container):
    """torch.load(weights_only=False) runs the payload of a torch zip's data.pkl
    and of a legacy file's main pickle: these containers are real attacks."""
    pytest.importorskip("torch")
    files = {p.name: (corpus_files[(p.name, container)], p) for p in CORPUS}
    result = _run_proof(tmp_path, files, "torch.load(f, weights_only=False)", "import torch\n")
    missed = [n for n, ran in result.items() if not ran]
    assert not missed, f"payloads that did not run under torch.load: {missed}"
    SAFETY_COUNTS[f"malicious corpus: payloads proven to run under torch.load ({container})"] = \
        f"{len(result)} of {len(CORPUS)}"


@pytest.mark.parametrize("name", [p.name for p in CORPUS])
def test_refused_by_inspect_convert_and_scan(tmp_path, monkeypatch, corpus_files, name):
    """Exit 3, one line naming the callable, no output, nothing executed —
    in a bare pickle, a zip's data.pkl, an extra .pkl member, a legacy file
    and a TorchScript-like archive."""
    payload = BY_NAME[name]
    monkeypatch.chdir(tmp_path)  # a payload that ran would create ./canary
    refused = 0
    for container in mc.CONTAINERS:
        path = corpus_files[(name, container)]
        rc, out, err = cli("inspect", path)
        _assert_refused(rc, err, payload, path)
        target = tmp_path / f"{name}.{container}.safetensors"
        rc, out, err = cli("convert", path, target)
        _assert_refused(rc, err, payload, path)
        assert not target.exists() and not list(tmp_path.glob("*ckptconv-tmp"))
        rc, out, err = cli("scan", path)
        assert rc == 3, (container, out)
        assert "UNSAFE" in out and any(e in out for e in payload.expect), out
        refused += 3
    assert not (tmp_path / mc.CANARY).exists()
    key = "malicious corpus: refused with exit 3 (payloads x containers x inspect/convert/scan)"
    SAFETY_COUNTS[key] = SAFETY_COUNTS.get(key, 0) + refused


def _assert_refused(rc, err, payload, path):
    lines = err.strip().splitlines()
    assert rc == 3, (path.name, err)
    assert len(lines) == 1 and lines[0].startswith("ckptconv: error: "), err
    assert path.name in lines[0], lines[0]
    assert any(e in lines[0] for e in payload.expect), (payload.expect, lines[0])
    assert "Traceback" not in err


def test_scan_cli_on_the_whole_corpus_folder(tmp_path, corpus_files):
    folder = next(iter(corpus_files.values())).parent
    p = run_cli("scan", folder, "--json")
    assert p.returncode == 3, p.stderr
    rep = json.loads(p.stdout)
    verdicts = {os.path.basename(f["path"]): f["verdict"] for f in rep["files"]}
    assert len(verdicts) == len(corpus_files)
    assert set(verdicts.values()) == {"unsafe"}, {k: v for k, v in verdicts.items() if v != "unsafe"}
    assert rep["counts"]["unsafe"] == len(corpus_files) and rep["exit_code"] == 3
    assert not (tmp_path / mc.CANARY).exists() and not (folder / mc.CANARY).exists()
    SAFETY_COUNTS["ckptconv scan (subprocess) over the corpus folder"] = \
        f"{rep['counts']['unsafe']} files unsafe, 0 missed"


def test_real_cli_process_refuses_one_line(tmp_path, corpus_files):
    for name, container in (("posix_system_protocol2", "zip"), ("setstate_override", "legacy"),
                            ("innocent_module_class", "bare"), ("ext1_copyreg", "torchscript")):
        path = corpus_files[(name, container)]
        p = run_cli("inspect", path)
        assert_one_line_error(p, 3, path.name)
        assert any(e in p.stderr for e in BY_NAME[name].expect)
        out = tmp_path / "o.safetensors"
        assert_one_line_error(run_cli("convert", path, out), 3, path.name)
        assert not out.exists()


def test_legacy_tar_layout_is_scanned(tmp_path):
    """torch < 0.4's tar layout still loads with torch.load(weights_only=False);
    scan reads its pickles (sys_info, pickle, storages, tensors)."""
    payload = BY_NAME["subprocess_getoutput"].data

    def tar_bytes(main_pickle: bytes) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            for member, data in (("sys_info", pickle.dumps({"little_endian": True}, 2)),
                                 ("storages", pickle.dumps(0, 2) + pickle.dumps([], 2)),
                                 ("tensors", pickle.dumps(0, 2)), ("pickle", main_pickle)):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    evil, good = tmp_path / "evil_tar.pt", tmp_path / "good_tar.pt"
    evil.write_bytes(tar_bytes(payload))
    good.write_bytes(tar_bytes(pickle.dumps({"step": 3}, 2)))
    rep = scan(evil)
    assert rep.verdict == "unsafe" and rep.kind == "torch legacy tar", rep
    assert "subprocess.getoutput" in rep.reasons[0]
    assert scan(good).verdict == "safe", scan(good)


def test_safe_checkpoints_scan_safe_with_inert_records(tmp_path, torch_files):
    p = run_cli("scan", torch_files["zip"], torch_files["legacy"], "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads(p.stdout)
    kinds = [f["kind"] for f in rep["files"]]
    assert kinds == ["torch zip", "torch legacy"]
    for f in rep["files"]:
        assert f["verdict"] == "safe" and "argparse.Namespace" in f["records"]
        assert any("torch._utils._rebuild_tensor_v2" in pk["calls"] for pk in f["pickles"])


def test_scan_other_files_and_folders(tmp_path):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    d = tmp_path / "models"
    d.mkdir()
    torch.jit.trace(Net(), torch.randn(1, 3)).save(d / "scripted.pt")
    ckptconv.save({"w": np.ones(3, np.float32)}, d / "w.safetensors")
    np.savez(d / "arrays.npz", a=np.arange(3))
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "README.md").write_text("config and notes\n")
    (d / "state.pkl").write_bytes(pickle.dumps({"w": np.arange(4.0)}))
    summary = scan_paths([d])
    by = {os.path.basename(f.path): f for f in summary.files}
    assert by["scripted.pt"].verdict == "safe" and by["scripted.pt"].kind == "TorchScript archive"
    assert len(by["scripted.pt"].pickles) >= 2  # data.pkl, constants.pkl, .debug_pkl members
    assert by["w.safetensors"].verdict == "safe" and "safetensors" in by["w.safetensors"].kind
    assert by["arrays.npz"].verdict == "safe"
    assert by["README.md"].verdict == "safe"
    assert by["state.pkl"].verdict == "safe"
    # object arrays carry pickled objects: refused like torch's weights_only does
    assert by["objects.npy"].verdict == "unsafe"
    assert summary.exit_code == 3
    assert scan_paths([d / "w.safetensors", tmp_path / "missing.pt"]).exit_code == 1
    assert scan_paths([d / "w.safetensors"]).exit_code == 0


def test_polyglot_file_starting_with_a_pickle_is_scanned(tmp_path):
    """torch.load unpickles the start of any file that is not a zip or tar: a
    payload in front of another format (an HDF5 user block) is found."""
    f = tmp_path / "poly.h5"
    f.write_bytes(BY_NAME["os_system_protocol0"].data + b"\0" * 600)
    assert scan(f).verdict == "unsafe"
    g = tmp_path / "broken.bin"  # a text pickle that never reaches STOP still names os.system
    g.write_bytes(b"cos\nsystem\n(S'touch canary'\ntR\xff")
    rep = scan(g)
    assert rep.verdict == "unsafe" and "os.system" in rep.reasons[0]


def test_bare_benign_pickle_reads_and_converts(tmp_path):
    """A plain pickle of numpy arrays is read (not a torch format, but torch.load
    would unpickle it): arrays become tensors, values exact."""
    src = tmp_path / "weights.pkl"
    w = {"layer.w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": 7}
    src.write_bytes(pickle.dumps(w, protocol=4))
    ck = ckptconv.load(src)
    assert ck.format == "torch" and ck.info["torch_format"] == "pickle"
    np.testing.assert_array_equal(ck.tensors()["layer.w"].numpy(), w["layer.w"])
    proto0 = tmp_path / "old.pkl"
    proto0.write_bytes(pickle.dumps({"a": 1}, protocol=0))
    assert ckptconv.load(proto0).tree == {"a": 1}
    out = tmp_path / "weights.safetensors"
    assert cli("convert", src, out)[0] == 0
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(out)["layer.w"], w["layer.w"])


# --- persistent ids, allowlisted calls with bad arguments --------------------------------

P2, STOP = mc.P2, mc.STOP
_STORAGE_PID = (mc.MARK + mc.u("storage") + mc.g("torch", "FloatStorage") + mc.u("0") + mc.u("cpu")
                + mc.i1(4) + mc.TUPLE + mc.BINPERSID)


def _rebuild(size=b")", stride=b")", offset=mc.i1(0), extra=b"") -> bytes:
    return (P2 + mc.g("torch._utils", "_rebuild_tensor_v2") + mc.MARK + _STORAGE_PID + offset
            + size + stride + mc.NEWFALSE + mc.g("collections", "OrderedDict") + mc.EMPTY_TUPLE
            + mc.REDUCE + extra + mc.TUPLE + mc.REDUCE + STOP)


def _ints(*vals) -> bytes:
    return mc.MARK + b"".join(b"J" + v.to_bytes(4, "little", signed=True) for v in vals) + mc.TUPLE


BAD_CALLS = {
    "pid_not_a_storage": (P2 + mc.MARK + mc.u("module") + mc.g("argparse", "Namespace") + mc.TUPLE
                          + mc.BINPERSID + STOP, UnsafePickleError, "persistent id"),
    "pid_text_persid": (b"Pevil\n.", UnsafePickleError, "persistent id"),
    "pid_storage_class_forged": (P2 + mc.MARK + mc.u("storage") + mc.g("argparse", "Namespace")
                                 + mc.u("0") + mc.u("cpu") + mc.i1(4) + mc.TUPLE + mc.BINPERSID
                                 + STOP, UnsafePickleError, "not a torch storage class"),
    "pid_negative_numel": (P2 + mc.MARK + mc.u("storage") + mc.g("torch", "FloatStorage")
                           + mc.u("0") + mc.u("cpu") + b"J\xff\xff\xff\xff" + mc.TUPLE
                           + mc.BINPERSID + STOP, FormatError, "non-negative"),
    "tensor_offset_is_bool": (_rebuild(offset=mc.NEWTRUE), FormatError, "offset"),
    "tensor_negative_size": (_rebuild(size=_ints(-2), stride=_ints(1)), FormatError, "negative"),
    "tensor_rank_100": (_rebuild(size=_ints(*[1] * 100), stride=_ints(*[1] * 100)), FormatError,
                        "at most 64"),
    "tensor_past_storage": (_rebuild(size=_ints(4), stride=_ints(1000)), FormatError, "needs"),
    "tensor_hooks_not_dict": (P2 + mc.g("torch._utils", "_rebuild_tensor_v2") + mc.MARK
                              + _STORAGE_PID + mc.i1(0) + mc.EMPTY_TUPLE + mc.EMPTY_TUPLE
                              + mc.NEWFALSE + mc.u("hooks") + mc.TUPLE + mc.REDUCE + STOP,
                              FormatError, "hooks"),
    "parameter_of_a_string": (P2 + mc.g("torch._utils", "_rebuild_parameter") + mc.u("x")
                              + mc.NEWFALSE + mc.EMPTY_DICT + mc.TUPLE3 + mc.REDUCE + STOP,
                              FormatError, "not a tensor"),
    "size_of_strings": (P2 + mc.g("torch", "Size") + mc.MARK + mc.u("a") + mc.TUPLE + mc.TUPLE1
                        + mc.REDUCE + STOP, FormatError, "torch.Size"),
    "device_huge_string": (P2 + mc.call1(mc.g("torch", "device"), mc.u("x" * 1000)) + STOP,
                           FormatError, "torch.device"),
    "layout_not_a_layout": (P2 + mc.call1(mc.g("torch.serialization", "_get_layout"), mc.u("os"))
                            + STOP, FormatError, "_get_layout"),
    "ordereddict_bad_items": (P2 + mc.g("collections", "OrderedDict") + mc.EMPTY_LIST + mc.MARK
                              + mc.i1(1) + mc.i1(2) + mc.i1(3) + mc.TUPLE + mc.APPEND
                              + mc.TUPLE1 + mc.REDUCE + STOP, FormatError, "OrderedDict item"),
    "reconstruct_not_ndarray": (P2 + mc.g("numpy.core.multiarray", "_reconstruct")
                                + mc.g("argparse", "Namespace") + mc.i1(0) + mc.TUPLE1 + mc.u("b")
                                + mc.TUPLE3 + mc.REDUCE + STOP, UnsafePickleError, "numpy.ndarray"),
    "numpy_void_dtype": (P2 + mc.g("numpy", "dtype") + mc.u("V8") + mc.NEWFALSE + mc.NEWTRUE
                         + mc.TUPLE3 + mc.REDUCE + STOP, UnsafePickleError, "structured"),
    "ordereddict_shadows_items": (P2 + mc.g("collections", "OrderedDict") + mc.EMPTY_TUPLE
                                  + mc.REDUCE + mc.EMPTY_DICT + mc.u("items") + mc.i1(1)
                                  + mc.SETITEM + mc.BUILD + STOP, FormatError, "items"),
    "slot_state_sets_class": (P2 + mc.g("argparse", "Namespace") + mc.EMPTY_TUPLE + mc.NEWOBJ
                              + mc.NONE + mc.EMPTY_DICT + mc.u("__class__") + mc.i1(1)
                              + mc.SETITEM + mc.TUPLE2 + mc.BUILD + STOP, UnsafePickleError,
                              "__class__"),
    "call_result_of_call": (P2 + mc.g("torch", "device") + mc.u("cpu") + mc.TUPLE1 + mc.REDUCE
                            + mc.EMPTY_TUPLE + mc.REDUCE + STOP, UnsafePickleError, "result of"),
}


def _zip_with_storage(data: bytes) -> bytes:
    """A torch zip whose storage '0' holds 4 float32s (16 bytes)."""
    return mc._zip({"archive/data.pkl": data, "archive/data/0": bytes(16),
                    "archive/byteorder": b"little", "archive/version": b"3\n"})


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_allowlisted_calls_check_their_arguments(tmp_path, name):
    data, error, fragment = BAD_CALLS[name]
    wrappers = (_zip_with_storage,) if _STORAGE_PID in data else (mc.bare, mc.torch_zip)
    for wrap in wrappers:
        f = tmp_path / f"{name}.pt"
        f.write_bytes(wrap(data))
        with pytest.raises(CkptconvError) as ei:
            ckptconv.load(f)
        assert type(ei.value) is error, (type(ei.value), ei.value)
        assert fragment in str(ei.value) and "\n" not in str(ei.value), str(ei.value)


# --- structural attacks: deep, recursive, huge ---------------------------------------------

def _deep_lists(n: int) -> bytes:
    return P2 + b"(" * n + b"l" * n + STOP  # MARK ... LIST, n deep


def _billion_laughs(levels: int = 60) -> bytes:
    body = P2 + mc.EMPTY_LIST + mc.put(0) + mc.POP
    for i in range(1, levels):
        body += mc.MARK + mc.get(i - 1) * 10 + b"l" + mc.put(i) + mc.POP
    return body + mc.get(levels - 1) + STOP


def _hash_bomb(levels: int = 60) -> bytes:
    body = P2 + mc.EMPTY_TUPLE + mc.put(0) + mc.POP
    for i in range(1, levels):
        body += mc.get(i - 1) + mc.get(i - 1) + mc.TUPLE2 + mc.put(i) + mc.POP
    return body + mc.EMPTY_DICT + mc.get(levels - 1) + mc.i1(1) + mc.SETITEM + STOP


def _deep_tuple_key(n: int = 200_000) -> bytes:
    return P2 + mc.EMPTY_DICT + mc.EMPTY_TUPLE + mc.TUPLE1 * n + mc.i1(1) + mc.SETITEM + STOP


STRUCTURAL = {
    "deep_nesting_100k": (_deep_lists(100_000), "deeper than"),
    "billion_laughs": (_billion_laughs(), "billion laughs"),
    "hash_bomb_key": (_hash_bomb(), "key"),
    "deep_tuple_key": (_deep_tuple_key(), "key"),
    "self_reference": (P2 + mc.EMPTY_LIST + mc.put(0) + mc.get(0) + mc.APPEND + STOP,
                       "self-referencing"),
    "absurd_unicode8_length": (b"\x80\x04\x8d" + (1 << 62).to_bytes(8, "little") + b"abc." , "pickle"),
    "absurd_long4_length": (P2 + b"\x8b" + (0x7FFFFFF0).to_bytes(4, "little") + b"\0\0.", "pickle"),
    "absurd_binbytes8": (b"\x80\x04\x8e" + (2**63 - 1).to_bytes(8, "little") + b".", "pickle"),
    "memo_read_before_write": (P2 + mc.get(7) + STOP, "memo"),
    "huge_memo_index": (P2 + mc.NONE + b"r" + (0xFFFFFFFF).to_bytes(4, "little") + STOP, None),
    "no_stop": (P2 + mc.EMPTY_DICT, "pickle"),
    "stack_underflow": (P2 + mc.REDUCE + STOP, "underflow"),
    # a bare text pickle that does not parse is not sniffed as one: "not a checkpoint"
    "long_text_int": (b"I" + b"9" * 100_000 + b"\n.", ("pickle", "not a checkpoint")),
}


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_structural_attacks_end_in_one_line_errors(tmp_path, name):
    data, fragment = STRUCTURAL[name]
    for wrap in (mc.bare, mc.torch_zip, mc.legacy):
        f = tmp_path / f"{name}.pt"
        f.write_bytes(wrap(data))
        t0 = time.perf_counter()
        rc, out, err = cli("inspect", f)
        assert time.perf_counter() - t0 < 10
        if fragment is None and rc == 0:
            continue  # a sparse memo index is legal; it just must not allocate
        assert rc == 1, (wrap.__name__, rc, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f.name in lines[0], err
        if fragment:
            alternatives = (fragment,) if isinstance(fragment, str) else fragment
            assert any(a in lines[0] for a in alternatives), lines[0]
        assert scan(f).verdict != "unsafe"  # malformed, not malicious: exit 1 from scan too


def test_zip_tricks(tmp_path):
    """Duplicate member names (a scanner and torch could read different ones),
    '..' names, and a deflated data.pkl that claims to inflate enormously."""
    good = mc.P2 + mc.EMPTY_DICT + STOP
    dup = tmp_path / "dup.pt"
    with zipfile.ZipFile(dup, "w") as z:
        z.writestr("archive/data.pkl", good)
        with pytest.warns(UserWarning):
            z.writestr("archive/data.pkl", BY_NAME["posix_system_protocol2"].data)
    rc, _, err = cli("inspect", dup)
    assert rc == 1 and "two members" in err
    assert scan(dup).verdict != "safe"
    esc = tmp_path / "escape.pt"
    with zipfile.ZipFile(esc, "w") as z:
        z.writestr("archive/data.pkl", good)
        z.writestr("../../outside.pkl", good)
    rc, _, err = cli("inspect", esc)
    assert rc == 1 and "escapes" in err
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"(" + b"N" * (300 << 20) + b"l.")
    assert bomb.stat().st_size < 2 << 20
    t0 = time.perf_counter()
    rc, _, err = cli("inspect", bomb)
    assert rc == 1 and "zip bomb" in err and time.perf_counter() - t0 < 10


def test_raw_listing_follows_names_through_the_memo(tmp_path):
    """scan's raw listing (scan_globals) names what STACK_GLOBAL really loads,
    even when both strings come from memo slots, and lists EXT codes."""
    from ckptconv.pickle import scan_globals

    names = scan_globals(BY_NAME["memo_obfuscated_stack_global"].data)
    assert ("STACK_GLOBAL", "posix.system") in names
    assert ("STACK_GLOBAL", "argparse._os.system") in scan_globals(BY_NAME["dotted_alias_name"].data)
    assert scan_globals(BY_NAME["ext2_copyreg"].data)[0] == ("EXT2", "<copyreg extension 4660>")
    f = tmp_path / "obf.pkl"
    f.write_bytes(BY_NAME["memo_obfuscated_stack_global"].data)
    assert "posix.system" in scan(f).pickles[0].names
