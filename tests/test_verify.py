"""``verify``: the core dispatches to each adapter's ``verify`` hook and reads
every tensor; an intact file whose content is refused as unsafe exits 3, not 1."""
from __future__ import annotations

import struct
import subprocess
import sys
import zipfile

import numpy as np

import ckptconv
from ckptconv.registry import get_adapter


def _unsafe_torch_zip(path) -> None:
    """torch.save's zip layout whose data.pkl calls posix.system (never run)."""
    cmd = b"touch canary"
    pickle = (b"\x80\x02cposix\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd
              + b"\x85R.")                                   # TUPLE1 REDUCE STOP
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/version", b"3\n")


def test_intact_but_unsafe_file_is_unsafe_not_corrupt(tmp_path):
    p = tmp_path / "evil.pt"
    _unsafe_torch_zip(p)
    report = ckptconv.verify(p)
    assert report.problems == [] and report.unsafe, report
    assert report.checked["zip members (crc32)"] == 3
    assert report.exit_code == 3
    r = subprocess.run([sys.executable, "-m", "ckptconv", "verify", str(p)], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "UNSAFE" in r.stdout and "posix" in r.stdout
    assert not (tmp_path / "canary").exists()


def test_formats_say_what_verify_checks(tmp_path):
    """Each built-in either has a verify hook or is read in full with a note."""
    ckptconv.save({"w": np.ones((2, 3), np.float32)}, tmp_path / "a.h5", format="hdf5")
    report = ckptconv.verify(tmp_path / "a.h5")
    assert report.ok and report.checked == {"tensors read": 1}
    assert any("no format-level checks" in n for n in report.notes)
    for name in ("torch", "safetensors", "tf", "keras-h5"):
        assert callable(getattr(get_adapter(name), "verify", None)), name
