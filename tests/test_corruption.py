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


BUILDERS = {
    "torch": _save("torch", "model.pt"),
    "torch-legacy": _torch_legacy,
    "torch-pickle": _bare_pickle,
    "torchscript": _torchscript,
    "safetensors": _save("safetensors", "model.safetensors"),
    "tf": _save("tf", "model.ckpt"),
    "hdf5": _save("hdf5", "model.h5"),
    "keras-h5": _save("keras-h5", "model.weights.h5"),
    "onnx": _save("onnx", "model.onnx"),
}
_NEEDS_TORCH = {"torch-legacy", "torchscript"}


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
            cases.append(pytest.param(name, marks=pytest.mark.skip(
                reason=f"no sample builder for plugin format {name}")))
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
    from ckptconv.inspect_ import inspect_checkpoint
    from ckptconv.verify import verify

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
            outcome = "refused"
        assert time.perf_counter() - t0 < TIME_LIMIT_S, "reader took too long"
        return outcome
    finally:
        shutil.rmtree(d, ignore_errors=True)


_FUZZ = settings(max_examples=int(os.environ.get("CKPTCONV_FUZZ_EXAMPLES", "25")),
                 deadline=timedelta(seconds=TIME_LIMIT_S), derandomize=True, database=None,
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
