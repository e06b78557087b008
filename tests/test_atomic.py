"""Writes that lose nothing: a convert killed mid-write (SIGKILL, SIGTERM,
Ctrl-C), a file-size limit (EFBIG), or a source that breaks mid-stream
leaves the previous output byte-identical and no partial file; temp files
are recognisable (``.NAME.PID.*.ckptconv-tmp``) and a later write removes
those whose writer is dead. Existing outputs need ``--force``."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SAFETY_COUNTS, assert_one_line_error, run_cli

import ckptconv
from ckptconv.atomic import TMP_SUFFIX, atomic_file, remove_stale_temps

BIG_MB = 96


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """~96 MB of float32 in a few tensors: converting it with a cast takes a while."""
    d = tmp_path_factory.mktemp("big")
    src = d / "big.safetensors"
    rng = np.random.default_rng(0)
    n = BIG_MB * (1 << 20) // 4 // 8
    ckptconv.save({f"t{i}": rng.standard_normal(n, dtype=np.float32) for i in range(8)}, src)
    return src


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(TMP_SUFFIX)]


def _start_convert(src: Path, dst: Path) -> subprocess.Popen:
    # Ctrl-C as a terminal sends it: a shell's background job (a CI script run
    # with `&`) starts with SIGINT ignored, and the child would inherit that
    code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from ckptconv.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return subprocess.Popen([sys.executable, "-c", code, "convert", str(src), str(dst),
                             "--dtype", "float16", "--force"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop_mid_write(proc: subprocess.Popen, folder: Path, timeout: float = 60) -> Path:
    """Wait until the writer's temp file exists and has data, then freeze it (SIGSTOP)
    so that the signal under test lands mid-write, before the rename."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [t for t in _temps(folder) if f".{proc.pid}." in t.name]
        if mine and mine[0].exists() and mine[0].stat().st_size > 0:
            proc.send_signal(signal.SIGSTOP)
            if mine[0].exists():
                return mine[0]
            proc.send_signal(signal.SIGCONT)
            break
        if proc.poll() is not None:
            break
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    pytest.fail("could not catch the writer mid-write (it finished or never started)")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_mid_convert_leaves_previous_output_intact(tmp_path, big_source, how):
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"previous output " * 1000)
    before = dst.read_bytes()
    proc = _start_convert(big_source, dst)
    tmp = _stop_mid_write(proc, tmp_path)
    assert dst.read_bytes() == before  # frozen mid-write: nothing replaced yet
    sig = getattr(signal, how)
    proc.send_signal(sig)
    if sig != signal.SIGKILL:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert dst.read_bytes() == before
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        # the killed process could not clean up; the next write to the target does
        assert tmp.exists()
        assert remove_stale_temps(dst) == [tmp] and not tmp.exists()
    else:
        assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not _temps(tmp_path), _temps(tmp_path)
    SAFETY_COUNTS[f"convert killed mid-write ({how}): previous output intact"] = "yes"


def test_next_write_removes_temps_of_dead_writers(tmp_path):
    dst = tmp_path / "model.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".{dst.name}.{dead_pid}.abcd1234{TMP_SUFFIX}"
    live = tmp_path / f".{dst.name}.{os.getpid()}.efgh5678{TMP_SUFFIX}"
    moved_aside = tmp_path / f".{dst.name}.{dead_pid}.old.0011{TMP_SUFFIX}"
    other = tmp_path / f".other.safetensors.{dead_pid}.x{TMP_SUFFIX}"
    for p in (stale, live, moved_aside, other):
        p.write_bytes(b"partial")
    ckptconv.save({"w": np.ones(3, np.float32)}, dst)
    assert not stale.exists()           # writer gone: removed
    assert live.exists()                # writer alive (us): kept
    assert moved_aside.exists()         # a previous output moved aside: never auto-removed
    assert other.exists()               # another target's temp: not ours to touch
    assert oct(dst.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_file_size_limit_is_a_clear_error_and_no_partial_file(tmp_path):
    """RLIMIT_FSIZE: the CLI ignores SIGXFSZ, so the write fails with EFBIG and
    ends in one line; nothing partial is left and the previous output stays."""
    src = tmp_path / "src.safetensors"
    ckptconv.save({"w": np.ones(1 << 20, np.float32)}, src)  # 4 MB > the 1 MB limit
    for name, previous in (("new.pt", None), ("old.pt", b"previous output")):
        dst = tmp_path / name
        if previous:
            dst.write_bytes(previous)
        code = "import sys\nfrom ckptconv.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        p = subprocess.run([sys.executable, "-c", code, "convert", str(src), str(dst), "--force"],
                           capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120)
        assert_one_line_error(p, 1, name, "too large")
        assert (dst.read_bytes() == previous) if previous else not dst.exists()
        assert not _temps(tmp_path)
    SAFETY_COUNTS["file-size limit (EFBIG): one-line error, no partial file"] = "yes"


def test_source_failing_mid_write_leaves_nothing(tmp_path):
    """The source is truncated after it was opened: the write fails part-way."""
    src = tmp_path / "src.safetensors"
    ckptconv.save({"a": np.ones(1000, np.float32), "b": np.ones(1000, np.float32)}, src)
    ck = ckptconv.load(src)
    with open(src, "r+b") as f:
        f.truncate(src.stat().st_size - 100)
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"previous")
    with pytest.raises(ckptconv.errors.CkptconvError):
        ckptconv.save(ck, dst, force=True)
    assert dst.read_bytes() == b"previous" and not _temps(tmp_path)


def test_existing_output_needs_force(tmp_path):
    src = tmp_path / "src.safetensors"
    ckptconv.save({"w": np.ones(3, np.float32)}, src)
    for name in ("o.safetensors", "o.pt", "o.h5"):
        dst = tmp_path / name
        dst.write_bytes(b"precious")
        assert_one_line_error(run_cli("convert", src, dst), 2, "--force")
        assert dst.read_bytes() == b"precious"
    assert not _temps(tmp_path)


def test_exception_inside_atomic_file_removes_the_temp(tmp_path):
    dst = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with atomic_file(dst) as tmp:
            tmp.write_bytes(b"half")
            assert tmp.name.startswith(f".x.bin.{os.getpid()}.") and tmp.name.endswith(TMP_SUFFIX)
            raise RuntimeError("boom")
    assert not dst.exists() and not _temps(tmp_path)


def test_failed_writes_release_their_file_descriptors(tmp_path):
    """A write that fails (EFBIG here) in a long-running process leaves no
    descriptor open, in the torch zip writer and the safetensors writer."""
    src = tmp_path / "src.safetensors"
    ckptconv.save({"w": np.ones(1 << 20, np.float32)}, src)  # 4 MB > the 1 MB limit
    code = (
        "import os, signal, sys\n"
        "import ckptconv\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "ck = ckptconv.load(sys.argv[1])\n"
        "def fds():\n"
        "    return len(os.listdir('/proc/self/fd'))\n"
        "counts = []\n"
        "for name in ('o.pt', 'o.safetensors', 'o.pt', 'o.safetensors', 'o.pt'):\n"
        "    try:\n"
        "        ckptconv.save(ck, os.path.join(sys.argv[2], name), force=True)\n"
        "    except ckptconv.CkptconvError:\n"
        "        pass\n"
        "    else:\n"
        "        sys.exit('the write should have failed')\n"
        "    counts.append(fds())\n"
        "print(counts)\n"
        "sys.exit(0 if len(set(counts)) == 1 else 'descriptors leak: %s' % counts)\n")
    p = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path)], capture_output=True,
                       text=True, preexec_fn=_limit_file_size, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not _temps(tmp_path)
