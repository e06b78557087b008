"""Memory stays flat in file size: converting a 512 MiB checkpoint keeps the
converting process's peak RSS under 256 MiB (time is not asserted: noisy)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import ckptconv

LIMIT_MIB = 256


# ru_maxrss of a child counts the memory it shared with its parent before exec,
# and the pytest process is large (torch, TF): measure from a tiny launcher.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "ckptconv", *sys.argv[1:]])
_, status, ru = os.wait4(pid, 0)
print(status, ru.ru_maxrss)
"""


def peak_rss_mib(args) -> float:
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, *map(str, args)], capture_output=True,
                         text=True, check=True)
    status, maxrss = out.stdout.split()[-2:]
    assert status == "0", f"ckptconv {args} failed: {out.stderr}"
    return int(maxrss) / 1024


@pytest.fixture(scope="module")
def big_pt(tmp_path_factory):
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(1024, 2048, generator=g) for i in range(64)}  # 512 MiB
    path = d / "big.pt"
    torch.save(sd, path)
    return path


def test_pt_to_safetensors_and_back_with_flat_memory(tmp_path, big_pt):
    st = tmp_path / "big.safetensors"
    rss = peak_rss_mib(["convert", big_pt, st])
    assert rss < LIMIT_MIB, f"pt -> safetensors peak RSS {rss:.0f} MiB"
    back = tmp_path / "back.pt"
    rss = peak_rss_mib(["convert", st, back])
    assert rss < LIMIT_MIB, f"safetensors -> pt peak RSS {rss:.0f} MiB"
    src, out = ckptconv.load(big_pt).tensors(), ckptconv.load(back).tensors()
    for name in ("layers.0.weight", "layers.63.weight"):
        assert np.array_equal(src[name].numpy(), out[name].numpy())


def test_strided_views_stream_in_bounded_chunks(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(4096 * 1024, dtype=torch.float32).reshape(4096, 1024)
    path = tmp_path / "views.pt"
    torch.save({"rows": base[100:3000:3], "cols": base[:, 5:900]}, path)
    out = tmp_path / "views.safetensors"
    ckptconv.convert(path, out)
    from safetensors.torch import load_file

    got = load_file(out)
    assert torch.equal(got["rows"], base[100:3000:3]) and torch.equal(got["cols"], base[:, 5:900])


_NO_NUMPY = """
import sys
from ckptconv.cli import main
rc = main(sys.argv[1:] + ["--no-progress"])
print("numpy imported" if "numpy" in sys.modules else "no numpy")
sys.exit(rc)
"""


def test_plain_copies_do_not_import_numpy(tmp_path):
    """A byte-for-byte conversion never touches an array, so it does not pay
    numpy's import (about 60 ms, 5% of converting 2 GiB)."""
    import torch

    sd = {f"l{i}.weight": torch.randn(8, 4) for i in range(3)}
    sd["bf16"] = torch.ones(4, dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "m.pt")
    steps = [("m.pt", "m.safetensors"), ("m.safetensors", "back.pt"), ("m.safetensors", "tf/m.ckpt"),
             ("tf/m.ckpt", "from_tf.safetensors")]
    for src, dst in steps:
        r = subprocess.run([sys.executable, "-c", _NO_NUMPY, "convert", str(tmp_path / src),
                            str(tmp_path / dst)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().endswith("no numpy"), (src, dst, r.stdout)
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_tied_tensors_are_read_once(tmp_path):
    """A tensor under two names is computed (or read) once: the second copy
    comes from the bytes already written; both names load bit-exact."""
    from safetensors.numpy import load_file

    from ckptconv.tensor import LazyTensor

    calls = []
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)

    def compute():
        calls.append(1)
        return arr.T.copy()

    tied = LazyTensor("float32", (4, 3), compute)
    tree = {"encoder.embed": tied, "other": np.ones(2, np.float16), "decoder.embed": tied}
    ckptconv.save(tree, tmp_path / "t.safetensors")
    assert len(calls) == 1
    got = load_file(tmp_path / "t.safetensors")
    assert np.array_equal(got["encoder.embed"], arr.T) and np.array_equal(got["decoder.embed"], arr.T)
    back = ckptconv.load(tmp_path / "t.safetensors")
    assert back.tree["encoder.embed"] is back.tree["decoder.embed"]


@pytest.mark.parametrize("broken", [("copy_file_range",), ("copy_file_range", "sendfile")])
def test_copies_fall_back_when_the_kernel_cannot(tmp_path, monkeypatch, broken):
    """Where copy_file_range (or sendfile too) fails, bytes go through bounded reads:
    a big tensor and a tied one still arrive bit-exact."""
    import os

    from safetensors.numpy import load_file

    big = np.random.default_rng(0).standard_normal((600, 300)).astype(np.float32)  # > 256 KiB
    ckptconv.save({"big": big, "small": np.arange(5, dtype=np.int64)}, tmp_path / "src.safetensors")
    ck = ckptconv.load(tmp_path / "src.safetensors")
    ck.tree["big_tied"] = ck.tree["big"]

    def refuse(*args, **kwargs):
        raise OSError(95, "not supported here")

    for name in broken:
        monkeypatch.setattr(os, name, refuse)
    ckptconv.save(ck, tmp_path / "out.safetensors")
    got = load_file(tmp_path / "out.safetensors")
    assert np.array_equal(got["big"], big) and np.array_equal(got["big_tied"], big)
    assert np.array_equal(got["small"], np.arange(5))
