"""Hostile bytes: every registered, importable reader, fed truncations, bit
flips, overwritten runs, random files and empty files, ends in a
``CkptconvError`` (one line naming the file, exit 1 on the CLI) or reads
cleanly — never another exception, a hang, a crash or a big allocation.

In-process with hypothesis (any non-``CkptconvError`` is a reader bug), and
in a subprocess under ``RLIMIT_AS`` = 1 GiB with a deterministic batch of
mutants per format (memory and time bound, no segfault).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import SAFETY_COUNTS, run_cli  # noqa: E402

import ckptconv  # noqa: E402
from ckptconv.errors import CkptconvError  # noqa: E402
from ckptconv.registry import available_formats, get_adapter  # noqa: E402

TIME_LIMIT_S = 10
MEMORY_LIMIT = 1 << 30

SAMPLE = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b": np.array([1.5, -2.0], dtype=np.float64),
    "idx": np.arange(5, dtype=np.int64),
    "mask": np.array([True, False, True]),
    "h": np.array([0.5, 0.25], dtype=np.float16),
}


# --- one small valid file per readable format ----------------------------------------------

def _save(fmt: str, name: str):
    def build(d: Path) -> tuple[Path, list[Path]]:
        target = d / name
        ckptconv.save(SAMPLE, target, format=fmt)
        files = sorted(p for p in d.iterdir() if p.is_file())
        return target, files
    return build


def _torch_legacy(d: Path):
    import torch

    target = d / "legacy.pt"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "step": 3, "t": torch.tensor([1, 2])},
               target, _use_new_zipfile_serialization=False)
    return target, [target]


def _bare_pickle(d: Path):
    target = d / "weights.pkl"
    target.write_bytes(pickle.dumps({"w": SAMPLE["w"], "meta": {"step": 3, "name": "x"}}, 4))
    return target, [target]


def _torchscript(d: Path):
    import torch

    target = d / "scripted.pt"
    torch.jit.trace(torch.nn.Linear(3, 2), torch.randn(1, 3)).save(target)
    return target, [target]


def _numpy_file(name: str, write):
    def build(d: Path) -> tuple[Path, list[Path]]:
        target = d / name
        write(target)
        return target, [target]
    return build


BUILDERS = {
    "torch": _save("torch", "model.pt"),
    "torch-legacy": _torch_legacy,
    "torch-pickle": _bare_pickle,
    "torchscript": _torchscript,
    "safetensors": _save("safetensors", "model.safetensors"),
    "tf": _save("tf", "model.ckpt"),
    "hdf5": _save("hdf5", "model.h5"),
    "keras-h5": _save("keras-h5", "model.h5"),   # Keras 2 layout: any names (see test_hdf5)
    "onnx": _save("onnx", "model.onnx"),
    "npy": _numpy_file("w.npy", lambda p: np.save(p, SAMPLE["w"])),
    "npz": _numpy_file("model.npz", lambda p: np.savez_compressed(p, **SAMPLE)),
}
_NEEDS_TORCH = {"torch-legacy", "torchscript"}
# folder formats written by training frameworks: their damage (truncated .distcp,
# overlapping or missing chunks, a missing rank file) is tested beside their
# real fixtures, which take the frameworks' own processes to make
_TESTED_ELSEWHERE = {"dcp": "tests/test_dcp.py (verify_*)",
                     "deepspeed": "tests/test_deepspeed.py (missing rank file)"}


def _format_of(case: str) -> str:
    return "torch" if case.startswith("torch") else case


def readable_cases() -> list:
    """Every registered format whose reader imports, with a sample builder."""
    cases = []
    for name in available_formats():
        try:
            adapter = get_adapter(name)
            adapter.check_available("reading")
        except CkptconvError:
            continue
        for case in BUILDERS:
            if _format_of(case) == name:
                cases.append(case)
        if name not in {_format_of(c) for c in BUILDERS}:
            reason = (f"{name} folders: damage is tested in {_TESTED_ELSEWHERE[name]}"
                      if name in _TESTED_ELSEWHERE else f"no sample builder for plugin format {name}")
            cases.append(pytest.param(name, marks=pytest.mark.skip(reason=reason)))
    return cases


CASES = readable_cases()


class _Samples(dict):
    def __repr__(self):  # hypothesis prints fixtures of failing examples: keep it short
        return f"<samples of {', '.join(self)}>"


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """case -> (name of the path to load, {file name: bytes})."""
    out = _Samples()
    for case in [c for c in CASES if isinstance(c, str)]:
        if case in _NEEDS_TORCH:
            try:
                import torch  # noqa: F401
            except ImportError:
                continue
        d = tmp_path_factory.mktemp(f"sample_{case}")
        target, files = BUILDERS[case](d)
        exercise(target)  # the unmutated sample reads cleanly
        out[case] = (target.name, {f.name: f.read_bytes() for f in files})
    return out


def exercise(path: Path) -> None:
    """What a user does with a file: open it, read every tensor, inspect, verify."""
    from ckptconv.verbs.inspect import inspect_checkpoint
    from ckptconv.api import verify   # the verb: the format's own hook

    try:
        ck = ckptconv.load(path)
        for ref in ck.tensors().values():
            for _ in ref.iter_bytes():
                pass
        str(inspect_checkpoint(ck))
    finally:
        rep = verify(path)   # never raises: problems are in the report
        str(rep)


def run_mutant(case_files: dict[str, bytes], load_name: str, victim: str, data: bytes) -> str:
    d = Path(tempfile.mkdtemp(prefix="mutant_"))
    try:
        for name, content in case_files.items():
            (d / name).write_bytes(data if name == victim else content)
        t0 = time.perf_counter()
        try:
            exercise(d / load_name)
            outcome = "read"
        except CkptconvError as e:
            msg = str(e)
            assert "\n" not in msg and msg, f"error is not one line: {msg!r}"
            assert any(n.split(".")[0] in msg for n in case_files), f"names no file: {msg!r}"
            outcome = "refused"
        assert time.perf_counter() - t0 < TIME_LIMIT_S, "reader took too long"
        return outcome
    finally:
        shutil.rmtree(d, ignore_errors=True)


_FUZZ = settings(max_examples=int(os.environ.get("CKPTCONV_FUZZ_EXAMPLES", "25")),
                 deadline=timedelta(seconds=TIME_LIMIT_S), derandomize=not os.environ.get("CKPTCONV_FUZZ_RANDOM"),
                 database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow, HealthCheck.data_too_large])


_FUZZED: set[str] = set()


def _count(case: str, kind: str) -> None:
    key = "hypothesis: fuzzed reads, none raising anything but CkptconvError"
    SAFETY_COUNTS[key] = SAFETY_COUNTS.get(key, 0) + 1
    _FUZZED.add(case)
    SAFETY_COUNTS["hypothesis: fuzzed formats"] = ", ".join(sorted(_FUZZED))


def _case(samples, case):
    if case not in samples:
        pytest.skip(f"{case}: needs torch to build a sample")
    return samples[case]


@pytest.mark.parametrize("case", CASES)
@_FUZZ
@given(data=st.data())
def test_truncation_at_any_byte(samples, case, data):
    load_name, files = _case(samples, case)
    victim = data.draw(st.sampled_from(sorted(files)), label="file")
    blob = files[victim]
    cut = data.draw(st.integers(0, max(len(blob) - 1, 0)), label="cut")
    run_mutant(files, load_name, victim, blob[:cut])
    _count(case, "truncate")


@pytest.mark.parametrize("case", CASES)
@_FUZZ
@given(data=st.data())
def test_bit_flips(samples, case, data):
    load_name, files = _case(samples, case)
    victim = data.draw(st.sampled_from(sorted(files)), label="file")
    blob = bytearray(files[victim])
    if not blob:
        return
    for bit in data.draw(st.lists(st.integers(0, len(blob) * 8 - 1), min_size=1, max_size=4),
                         label="bits"):
        blob[bit // 8] ^= 1 << (bit % 8)
    run_mutant(files, load_name, victim, bytes(blob))
    _count(case, "flip")


@pytest.mark.parametrize("case", CASES)
@_FUZZ
@given(data=st.data())
def test_overwritten_runs(samples, case, data):
    """A run of random bytes pasted over the file (headers, lengths, offsets)."""
    load_name, files = _case(samples, case)
    victim = data.draw(st.sampled_from(sorted(files)), label="file")
    blob = bytearray(files[victim])
    pos = data.draw(st.integers(0, len(blob)), label="pos")
    junk = data.draw(st.binary(min_size=1, max_size=16), label="junk")
    if data.draw(st.booleans(), label="big"):
        junk = data.draw(st.sampled_from([b"\xff" * 8, b"\x7f\xff\xff\xff", b"\0" * 8,
                                          b"\xff\xff\xff\xff\xff\xff\xff\x7f"]), label="number")
    blob[pos:pos + len(junk)] = junk
    run_mutant(files, load_name, victim, bytes(blob))
    _count(case, "overwrite")


@_FUZZ
@given(blob=st.binary(max_size=4096), prefix=st.sampled_from(
    [b"", b"PK\x03\x04", b"\x80\x02", b"\x89HDF\r\n\x1a\n", b"\x08\x07\x12", b"\x93NUMPY\x01\x00",
     b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.", b"\x10\x00\x00\x00\x00\x00\x00\x00{"]))
def test_random_files(tmp_path_factory, blob, prefix):
    """Random bytes behind each format's magic: detection and readers refuse them cleanly."""
    d = tmp_path_factory.mktemp("random", numbered=True)
    f = d / "random.bin"
    f.write_bytes(prefix + blob)
    try:
        exercise(f)
    except CkptconvError as e:
        assert "\n" not in str(e)
    _count("random", "random")


@pytest.mark.parametrize("case", CASES)
def test_zero_length_files(samples, case):
    load_name, files = _case(samples, case)
    for victim in files:
        assert run_mutant(files, load_name, victim, b"") in ("refused", "read")
    if load_name in files:
        assert run_mutant(files, load_name, load_name, b"") == "refused"


@pytest.mark.parametrize("case", CASES)
def test_cli_one_line_errors_on_corrupt_files(tmp_path, samples, case):
    """Through the real CLI: exit 1, one line naming the file, no traceback."""
    load_name, files = _case(samples, case)
    victim = max(files, key=lambda n: len(files[n]))  # the file holding the data
    for name, content in files.items():
        (tmp_path / name).write_bytes(content[: len(content) // 2] if name == victim else content)
    p = run_cli("convert", tmp_path / load_name, tmp_path / "out.safetensors")
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptconv: error: "), p.stderr
    assert "Traceback" not in p.stderr and victim.split(".")[0] in lines[0], lines[0]
    assert not (tmp_path / "out.safetensors").exists()


# --- the memory and time bound, in a subprocess ---------------------------------------------

_BOUNDED_RUNNER = textwrap.dedent(r'''
    import json, os, resource, signal, sys, time, traceback
    from pathlib import Path
    sys.path.insert(0, os.environ["CKPTCONV_TESTS"])
    resource.setrlimit(resource.RLIMIT_AS, (int(os.environ["LIMIT_AS"]),) * 2)
    import test_corruption as tc
    from ckptconv.errors import CkptconvError
    jobs = json.loads(sys.stdin.read())
    results = []
    for job in jobs:
        files = {k: bytes.fromhex(v) for k, v in job["files"].items()}
        signal.alarm(int(tc.TIME_LIMIT_S) + 5)  # a hang ends the process: reported as a crash
        t0 = time.perf_counter()
        try:
            outcome = tc.run_mutant(files, job["load"], job["victim"], bytes.fromhex(job["data"]))
        except CkptconvError as e:
            outcome = "refused"
        except AssertionError as e:
            outcome = "BUG: " + str(e)
        except BaseException as e:
            outcome = "BUG: " + "".join(traceback.format_exception_only(type(e), e)).strip()
        signal.alarm(0)
        results.append({"case": job["case"], "what": job["what"], "outcome": outcome,
                        "seconds": time.perf_counter() - t0})
    print(json.dumps(results))
''')


def _mutants(case: str, load_name: str, files: dict[str, bytes], rng: random.Random):
    for victim, blob in sorted(files.items()):
        n = len(blob)
        for cut in sorted({0, 1, n // 2, n - 1} | {rng.randrange(max(n, 1)) for _ in range(10)}):
            yield f"{victim} truncated at {cut}", victim, blob[:max(cut, 0)]
        for _ in range(12):
            b = bytearray(blob)
            for _ in range(rng.randint(1, 3)):
                if b:
                    i = rng.randrange(len(b) * 8)
                    b[i // 8] ^= 1 << (i % 8)
            yield f"{victim} bit flips", victim, bytes(b)
        for _ in range(6):
            b = bytearray(blob)
            pos = rng.randrange(n + 1)
            b[pos:pos + 8] = rng.choice([b"\xff" * 8, b"\x7f" + b"\xff" * 7, rng.randbytes(8)])
            yield f"{victim} overwritten at {pos}", victim, bytes(b)


def test_readers_stay_within_memory_and_time_bounds(samples):
    """Every mutant of every format, in a process limited to 1 GiB of address
    space: no crash, no hang (10 s each), no exception but CkptconvError."""
    rng = random.Random(1234)
    jobs = []
    for case, (load_name, files) in samples.items():
        for what, victim, data in _mutants(case, load_name, files, rng):
            jobs.append({"case": case, "what": what, "load": load_name, "victim": victim,
                         "files": {k: v.hex() for k, v in files.items()}, "data": data.hex()})
    env = {**os.environ, "CKPTCONV_TESTS": str(Path(__file__).parent), "LIMIT_AS": str(MEMORY_LIMIT),
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    p = subprocess.run([sys.executable, "-c", _BOUNDED_RUNNER], input=json.dumps(jobs),
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, f"runner crashed (rc {p.returncode}): {p.stderr[-3000:]}"
    results = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(results) == len(jobs)
    bugs = [r for r in results if r["outcome"].startswith("BUG")]
    assert not bugs, json.dumps(bugs[:10], indent=1)
    assert max(r["seconds"] for r in results) < TIME_LIMIT_S
    refused = sum(r["outcome"] == "refused" for r in results)
    SAFETY_COUNTS["mutants under a 1 GiB limit (refused cleanly / read)"] = \
        f"{len(results)} ({refused} / {len(results) - refused}) over {len(samples)} formats"


# --- verify: checksums catch flipped bits ------------------------------------------------------

from ckptconv.api import verify  # noqa: E402  (the verb: the format's own hook)

_VERIFY = settings(max_examples=int(os.environ.get("CKPTCONV_VERIFY_EXAMPLES", "40")),
                   deadline=timedelta(seconds=TIME_LIMIT_S), derandomize=not os.environ.get("CKPTCONV_FUZZ_RANDOM"),
                 database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def checked_files(tmp_path_factory):
    """torch zip, TF bundle and safetensors (+ manifest) written by ckptconv,
    with the byte ranges that hold tensor data."""
    from ckptconv.tensor import FileHandle
    from ckptconv.ziputil import read_members

    d = tmp_path_factory.mktemp("checked")
    out = {}
    pt = d / "model.pt"
    ckptconv.save(SAMPLE, pt)
    members = read_members(FileHandle(pt))
    out["torch"] = (pt, [(m.data_offset, m.data_offset + m.size)
                         for n, m in members.items() if "/data/" in n and m.size])
    ckpt = d / "model.ckpt"
    ckptconv.save(SAMPLE, ckpt)
    data = d / "model.ckpt.data-00000-of-00001"
    out["tf"] = (ckpt, [(0, data.stat().st_size)], data)
    src = d / "src.safetensors"
    ckptconv.save(SAMPLE, src)
    st = d / "model.safetensors"
    report = ckptconv.convert(src, st, manifest=True)
    assert str(st) + ".sha256.json" in report.files
    out["safetensors"] = (st, [(0, st.stat().st_size)])
    for path, *_ in out.values():
        rep = verify(path, manifest=path.suffix == ".safetensors")
        assert rep.ok, str(rep)
    return out


def _flipped(path: Path, bit: int, victim: Path | None = None):
    """A context: ``victim`` (default ``path``) with one bit flipped, restored after."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        f = victim or path
        orig = f.read_bytes()
        b = bytearray(orig)
        b[bit // 8] ^= 1 << (bit % 8)
        f.write_bytes(bytes(b))
        try:
            yield
        finally:
            f.write_bytes(orig)
    return cm()


def _bit_in(ranges, data):
    lo, hi = data.draw(st.sampled_from(ranges), label="range")
    return data.draw(st.integers(lo * 8, hi * 8 - 1), label="bit")


_VERIFIED: dict[str, int] = {}


def _verified(what: str) -> None:
    _VERIFIED[what] = _VERIFIED.get(what, 0) + 1
    SAFETY_COUNTS["verify: single flipped bits caught"] = \
        ", ".join(f"{k} {v}/{v}" for k, v in _VERIFIED.items())


@_VERIFY
@given(data=st.data())
def test_verify_catches_a_flipped_bit_in_a_torch_tensor(checked_files, data):
    path, ranges = checked_files["torch"]
    with _flipped(path, _bit_in(ranges, data)):
        rep = verify(path)
    assert rep.exit_code == 1 and any("CRC-32" in p for p in rep.problems), str(rep)
    _verified("torch zip (CRC-32)")


@_VERIFY
@given(data=st.data())
def test_verify_catches_a_flipped_bit_in_a_tf_tensor(checked_files, data):
    path, ranges, data_file = checked_files["tf"]
    with _flipped(path, _bit_in(ranges, data), data_file):
        rep = verify(path)
    assert rep.exit_code == 1 and any("crc32c" in p for p in rep.problems), str(rep)
    _verified("TF bundle (crc32c)")


@_VERIFY
@given(data=st.data())
def test_verify_manifest_catches_any_flipped_bit_in_safetensors(checked_files, data):
    path, ranges = checked_files["safetensors"]
    with _flipped(path, _bit_in(ranges, data)):
        rep = verify(path, manifest=True)
    assert rep.exit_code == 1, str(rep)
    assert any("SHA-256" in p or "bytes" in p or "header" in p or "tensor" in p
               for p in rep.problems), str(rep)
    _verified("safetensors + manifest (SHA-256)")


def test_verify_cli_and_manifest_round_trip(tmp_path):
    src = tmp_path / "src.safetensors"
    ckptconv.save(SAMPLE, src)
    out = tmp_path / "out.pt"
    p = run_cli("convert", src, out, "--manifest")
    assert p.returncode == 0, p.stderr
    manifest = json.loads((tmp_path / "out.pt.sha256.json").read_text())
    assert set(manifest["tensors"]) == set(SAMPLE) and "out.pt" in manifest["files"]
    p = run_cli("verify", out, "--manifest", "--json")
    assert p.returncode == 0, p.stdout
    rep = json.loads(p.stdout)
    assert rep["ok"] and rep["checked"]["manifest tensors"] == len(SAMPLE)
    # a tensor changed in place (valid file, new CRC patched in) still fails the manifest
    ck = ckptconv.load(out)
    changed = dict(SAMPLE, w=SAMPLE["w"] + 1)
    ckptconv.save(changed, out, force=True)
    p = run_cli("verify", out, "--manifest")
    assert p.returncode == 1 and "tensor 'w'" in p.stdout and "SHA-256" in p.stdout, p.stdout
    assert ck is not None
    # no manifest: a verify --manifest problem, a plain verify passes
    (tmp_path / "out.pt.sha256.json").unlink()
    assert run_cli("verify", out).returncode == 0
    p = run_cli("verify", out, "--manifest")
    assert p.returncode == 1 and "no manifest" in p.stdout


def _safetensors_bytes(header: dict, data: bytes, raw_header: bytes | None = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


@pytest.mark.parametrize("case,fragment", [
    ("hole", "belong to no tensor"), ("trailing", "after the last tensor"),
    ("duplicate", "twice"), ("overlap", "overlap"),
])
def test_verify_safetensors_layout(tmp_path, case, fragment):
    a = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    b = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
    if case == "hole":
        blob = _safetensors_bytes({"a": a, "b": dict(b, data_offsets=[12, 20])}, bytes(20))
    elif case == "trailing":
        blob = _safetensors_bytes({"a": a, "b": b}, bytes(24))
    elif case == "overlap":
        blob = _safetensors_bytes({"a": a, "b": dict(b, data_offsets=[4, 12])}, bytes(16))
    else:
        raw = b'{"a":' + json.dumps(a).encode() + b',"a":' + json.dumps(b).encode() + b"}"
        blob = _safetensors_bytes({}, bytes(16), raw)
    f = tmp_path / f"{case}.safetensors"
    f.write_bytes(blob)
    rep = verify(f)
    assert rep.exit_code == 1 and any(fragment in p for p in rep.problems), str(rep)
    p = run_cli("verify", f, "--json") if case == "hole" else None
    if p is not None:
        assert p.returncode == 1 and json.loads(p.stdout)["ok"] is False


# --- targeted hostile headers ---------------------------------------------------------------

_F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("case,header,data,fragment", [
    ("absurd_header_length", None, (1 << 63).to_bytes(8, "little") + b"{}", "not a checkpoint"),
    ("header_past_end", None, (4096).to_bytes(8, "little") + b"{}", "header"),
    ("not_json", None, (8).to_bytes(8, "little") + b"{\xff\xfe     ", "JSON"),
    ("shape_of_floats", {"a": dict(_F32_2, shape=[2.0])}, bytes(8), "malformed"),
    ("offsets_are_strings", {"a": dict(_F32_2, data_offsets=["0", "8"])}, bytes(8), "malformed"),
    ("absurd_shape", {"a": dict(_F32_2, shape=[1 << 62, 1 << 62])}, bytes(8), "needs"),
    ("negative_shape", {"a": dict(_F32_2, shape=[-2])}, bytes(8), "negative"),
    ("unknown_dtype", {"a": dict(_F32_2, dtype="X99")}, bytes(8), "X99"),
    ("offsets_past_end", {"a": dict(_F32_2, data_offsets=[0, 1 << 40])}, bytes(8), "a"),
    ("offsets_reversed", {"a": dict(_F32_2, data_offsets=[8, 0])}, bytes(8), "a"),
    ("overlap", {"a": _F32_2, "b": dict(_F32_2, data_offsets=[4, 12])}, bytes(12), "overlap"),
    ("shape_is_a_string", {"a": dict(_F32_2, shape="2")}, bytes(8), "malformed"),
    ("metadata_not_strings", {"__metadata__": {"k": 1}, "a": _F32_2}, bytes(8), "metadata"),
])
def test_safetensors_hostile_headers(tmp_path, case, header, data, fragment):
    f = tmp_path / f"{case}.safetensors"
    f.write_bytes(data if header is None else _safetensors_bytes(header, data))
    with pytest.raises(CkptconvError) as ei:
        exercise(f)
    msg = str(ei.value)
    assert fragment in msg and "\n" not in msg, msg


def test_safetensors_unsorted_offsets_are_legal(tmp_path):
    """The spec does not order entries: a file listing later data first reads fine."""
    f = tmp_path / "unsorted.safetensors"
    data = np.arange(2, dtype=np.float32).tobytes() + np.arange(2, 4, dtype=np.float32).tobytes()
    f.write_bytes(_safetensors_bytes({"b": dict(_F32_2, data_offsets=[8, 16]), "a": _F32_2}, data))
    t = ckptconv.load(f).tensors()
    np.testing.assert_array_equal(t["a"].numpy(), [0, 1])
    np.testing.assert_array_equal(t["b"].numpy(), [2, 3])
    assert verify(f).ok


def test_verify_onnx_external_data_present_and_sized(tmp_path):
    pytest.importorskip("onnx")
    model = tmp_path / "m.onnx"
    ckptconv.save({"w": np.ones((32, 32), np.float32)}, model, external_data=True)
    external = [p for p in tmp_path.iterdir() if p != model]
    assert external and verify(model).ok
    blob = external[0].read_bytes()
    external[0].write_bytes(blob[:-64])
    rep = verify(model)
    assert rep.exit_code == 1 and any("truncated" in p or "needs" in p for p in rep.problems), rep
    external[0].unlink()
    rep = verify(model)
    assert rep.exit_code == 1 and any("missing" in p for p in rep.problems), rep
