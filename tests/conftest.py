"""Shared fixtures: checkpoints written by the real torch, and helpers to run
the CLI in a subprocess (exit codes, one-line errors)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

try:  # CI runs the property tests on fixed examples: a landing never hinges on luck
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, database=None)
    if os.environ.get("CI"):
        _hyp_settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass

# tests/compat/ is the torch-version matrix: tox runs it in each torch env
# (CKPTCONV_COMPAT=1); the default suite leaves it alone.
collect_ignore = [] if os.environ.get("CKPTCONV_COMPAT") else ["compat"]


def run_cli(*args, block=(), env=None, timeout=120):
    """Run ``python -m ckptconv ARGS`` with the modules in ``block`` made unimportable."""
    pre = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in block)
    code = pre + "from ckptconv.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


class _Run:
    """The CLI's main() run in this process (no interpreter start-up per call)."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """``cli(*args)``: ``ckptconv.cli.main`` in this process; returncode/stdout/stderr."""
    from ckptconv.cli import main

    def run(*args) -> _Run:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return _Run(code, out, err)
    return run


def assert_one_line_error(proc, code, *fragments):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ckptconv: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def make_training_checkpoint():
    """A realistic nested training checkpoint, as people save them."""
    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 6)
            self.conv = torch.nn.Conv1d(6, 6, 3, padding=1)
            self.bn = torch.nn.BatchNorm1d(6)
            self.lstm = torch.nn.LSTM(6, 5, batch_first=True)
            self.proj = torch.nn.Linear(5, 6)
            self.head = torch.nn.Linear(6, 11, bias=False)
            self.head.weight = self.embed.weight  # tied input/output embeddings

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = sum(p.float().pow(2).sum() for p in net.parameters())
    loss.backward()
    opt.step()
    net.bn(torch.randn(4, 6, 3))  # BatchNorm running stats and num_batches_tracked
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    extras = {
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "fp16": torch.randn(5).to(torch.float16),
        "int8": torch.randint(-128, 127, (7,), dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.25),
        "transposed": base.t(),
        "sliced": base[1:3, 2:5],
        "float64": torch.randn(2, 2, dtype=torch.float64),
        "int64": torch.arange(4),
    }
    args = argparse.Namespace(lr=1e-3, layers=[1, 2], name="run-7", dropout=None)
    return {
        "epoch": 12,
        "global_step": np.int64(3400),
        "best_metric": np.float64(0.8125),
        "loss": 0.125,
        "args": args,
        "model_state_dict": net.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "extras": extras,
        "history": [0.5, None, (1, "two", None), [3.0]],
        "tags": ("a", None),
    }


@pytest.fixture(scope="session")
def training_ckpt():
    pytest.importorskip("torch")
    return make_training_checkpoint()


@pytest.fixture(scope="session")
def torch_files(tmp_path_factory, training_ckpt):
    """The training checkpoint saved by torch in the zip and the legacy format."""
    import torch

    d = tmp_path_factory.mktemp("torch_files")
    zip_path, legacy_path = d / "train.pt", d / "train_legacy.pt"
    torch.save(training_ckpt, zip_path)
    torch.save(training_ckpt, legacy_path, _use_new_zipfile_serialization=False)
    return {"zip": zip_path, "legacy": legacy_path}


def tensor_bytes_equal(a, b) -> bool:
    """Bit-exact equality of two torch tensors (dtype, shape, bytes)."""
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


def assert_tree_equal(got, want, path="root"):
    """Deep equality: tensors bit-exact, Namespaces by vars, numpy scalars by type and value."""
    import torch

    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: {type(got)}"
        assert tensor_bytes_equal(got, want), f"{path}: tensor differs"
        assert got.requires_grad == want.requires_grad, path
        return
    if isinstance(want, argparse.Namespace):
        assert isinstance(got, argparse.Namespace), f"{path}: {type(got)}"
        assert_tree_equal(vars(got), vars(want), path)
        return
    if isinstance(want, np.generic):
        assert type(got) is type(want) and got == want, f"{path}: {got!r} != {want!r}"
        return
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got.keys()) == list(want.keys()), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_tree_equal(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_tree_equal(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


# --- counts shown at the end of the run (tests/test_safety.py and friends fill it) -------
SAFETY_COUNTS: dict[str, object] = {}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SAFETY_COUNTS:
        terminalreporter.section("safety and integrity")
        for what, n in SAFETY_COUNTS.items():
            terminalreporter.write_line(f"{what}: {n}")


# --- object storage: a real S3 API (moto's server) on a free port ----------------

class S3Endpoint:
    """A running moto S3 server: ``endpoint``, ``env`` (for subprocesses),
    ``fs`` (an s3fs client, for arranging objects), ``bucket()`` (a fresh bucket)."""

    def __init__(self, endpoint: str):
        import s3fs

        self.endpoint = endpoint
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}
        self.fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing",
                                    use_listings_cache=False)
        self._n = 0
        self._client = None

    def bucket(self) -> str:
        self._n += 1
        name = f"b{os.getpid()}-{self._n}"
        self.fs.mkdir(name)
        return name

    def pending_uploads(self, bucket: str) -> list:
        """Multipart uploads started and neither completed nor aborted."""
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                        aws_access_key_id="testing",
                                        aws_secret_access_key="testing")
        return self._client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


@pytest.fixture(scope="session")
def s3_server():
    server_mod = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    ep = S3Endpoint(f"http://{host}:{port}")
    saved = {k: os.environ.get(k) for k in ep.env if k != "FSSPEC_S3_ENDPOINT_URL"}
    os.environ.update({k: v for k, v in ep.env.items() if k != "FSSPEC_S3_ENDPOINT_URL"})
    try:
        yield ep
    finally:
        srv.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server with its endpoint in FSSPEC_S3_ENDPOINT_URL for this test."""
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server.endpoint)
    return s3_server
