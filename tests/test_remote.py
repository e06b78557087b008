"""Object storage: readers and writers on fsspec URLs, against a real S3 API
(moto's server on a free port, started by the ``s3_server`` fixture in
conftest.py) and fsspec's memory and HTTP file systems. No mocked calls.

What must hold: reads are range requests (inspect moves a few hundred KB of a
large file, never the file), outputs are byte-identical to the local
conversion in every direction, and a failed or interrupted write leaves no
object and no open multipart upload behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli

pytest.importorskip("fsspec")
torch = pytest.importorskip("torch")

MiB = 1 << 20


def _state(n_tensors: int, rows: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(rows, 256, generator=g) for i in range(n_tensors)} | \
        {"head.bias": torch.arange(7, dtype=torch.float16), "step": torch.tensor(3)}


@pytest.fixture(scope="module")
def local_sources(tmp_path_factory):
    """Small checkpoints written by the real libraries, one per readable format."""
    import h5py
    import safetensors.torch

    d = tmp_path_factory.mktemp("remote-src")
    sd = _state(4, 64)
    torch.save(sd, d / "model.pt")
    safetensors.torch.save_file(sd, d / "model.safetensors")
    with h5py.File(d / "model.h5", "w") as f:
        for k, v in sd.items():
            f[k.replace(".", "/")] = v.numpy()
    import ckptconv

    ckptconv.convert(d / "model.pt", d / "model.onnx")
    return d, sd


def _put(s3, bucket: str, local, key: str) -> str:
    s3.fs.put_file(str(local), f"{bucket}/{key}")
    return f"s3://{bucket}/{key}"


def _get(s3, url: str) -> bytes:
    return s3.fs.cat_file(url.split("://", 1)[1])


# --- reading by ranges --------------------------------------------------------------

@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_inspect_reads_ranges_not_the_file(cli, s3, tmp_path, ext):
    """A 24 MiB object: inspect moves well under 4 MiB, in a few requests (512 MiB: slow test)."""
    import safetensors.torch

    sd = _state(12, 2048)  # 12 x 2 MiB
    local = tmp_path / f"big{ext}"
    torch.save(sd, local) if ext == ".pt" else safetensors.torch.save_file(sd, local)
    assert local.stat().st_size > 24 * MiB
    url = _put(s3, s3.bucket(), local, f"zoo/big{ext}")
    proc = cli("inspect", url, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["format"] == ("torch" if ext == ".pt" else "safetensors")
    remote = report["remote"]
    assert 0 < remote["bytes_read"] <= 4 * MiB, remote
    assert 0 < remote["requests"] <= 60, remote


def test_api_counts_requests_and_reads_lazily(s3, local_sources):
    import ckptconv
    from ckptconv.remote import remote_stats, stats_since

    d, sd = local_sources
    url = _put(s3, s3.bucket(), d / "model.safetensors", "m.safetensors")
    before = remote_stats()
    ck = ckptconv.load(url)
    header_only = stats_since(before)
    assert header_only["bytes_read"] < 200_000
    got = {k: ref.torch() for k, ref in ck.tensors().items()}
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert stats_since(before)["bytes_read"] >= sum(v.numel() * v.element_size() for v in sd.values())


CODE_ON_LOAD = Path(__file__).resolve().parent / "code_on_load"
# protocol 0: os.system named by GLOBAL; refused, never run
EVIL_PICKLE = b"cos\nsystem\n(S'echo owned'\ntR."


def test_scan_on_s3_reads_ranges_and_judges_like_local(cli, s3, tmp_path):
    """scan of URLs: the same verdicts as the same files scanned locally (pickles,
    Keras Lambda layers in .h5 and .keras), by range requests: a 24 MiB torch zip
    moves its pickle and directory, not its storages."""
    import ckptconv
    from ckptconv.remote import remote_stats, stats_since

    bucket = s3.bucket()
    torch.save(_state(12, 2048), tmp_path / "big.pt")
    (tmp_path / "evil.pkl").write_bytes(EVIL_PICKLE)
    locals_ = {"big.pt": tmp_path / "big.pt", "evil.pkl": tmp_path / "evil.pkl"}
    for name in ("lambda.h5", "lambda.keras", "dense.h5", "dense.keras"):
        locals_[name] = CODE_ON_LOAD / name
    for name, local in locals_.items():
        _put(s3, bucket, local, f"run/{name}")
    before = remote_stats()
    rep = ckptconv.scan(f"s3://{bucket}/run/big.pt")
    used = stats_since(before)
    assert rep.verdict == "safe" and rep.kind == "torch zip", rep
    assert 0 < used["bytes_read"] <= 1 * MiB, used
    for name, local in locals_.items():
        got, want = ckptconv.scan(f"s3://{bucket}/run/{name}"), ckptconv.scan(local)
        assert (got.verdict, got.kind, got.reasons) == (want.verdict, want.kind, want.reasons), name
    assert ckptconv.scan(f"s3://{bucket}/run/lambda.keras").verdict == "unsafe"
    # a prefix and a glob of URLs: every object under it, one verdict each
    summary = ckptconv.scan([f"s3://{bucket}/run"])
    assert {f.path.rsplit("/", 1)[1]: f.verdict for f in summary.files} == {
        "big.pt": "safe", "dense.h5": "safe", "dense.keras": "safe", "evil.pkl": "unsafe",
        "lambda.h5": "unsafe", "lambda.keras": "unsafe"}
    assert [f.path for f in ckptconv.scan([f"s3://{bucket}/run/*.keras"]).files] == [
        f"s3://{bucket}/run/dense.keras", f"s3://{bucket}/run/lambda.keras"]
    proc = cli("scan", f"s3://{bucket}/run/evil.pkl")
    assert proc.returncode == 3 and "os.system" in proc.stdout, proc.stdout + proc.stderr


def test_keras_archive_on_s3_reads_in_place(s3, tmp_path):
    """A .keras zip on S3: its stored model.weights.h5 member is opened by h5py
    through range reads; converting it gives the local conversion's bytes."""
    import ckptconv
    from ckptconv.remote import remote_stats, stats_since

    bucket = s3.bucket()
    url = _put(s3, bucket, CODE_ON_LOAD / "dense.keras", "m/dense.keras")
    before = remote_stats()
    ck = ckptconv.load(url)
    assert ck.format == "keras-h5"
    ckptconv.convert(url, tmp_path / "remote.safetensors")
    ckptconv.convert(CODE_ON_LOAD / "dense.keras", tmp_path / "local.safetensors")
    assert (tmp_path / "remote.safetensors").read_bytes() == \
        (tmp_path / "local.safetensors").read_bytes()
    assert stats_since(before)["requests"] > 0


def test_verify_check_sanitize_on_s3(s3, local_sources, tmp_path):
    """The torch verbs on URLs: verify (zip CRCs by range reads; a flipped byte is
    found), check, and sanitize from S3 to S3 (what torch's weights-only loader loads)."""
    import argparse
    import io

    import ckptconv

    d, sd = local_sources
    bucket = s3.bucket()
    good = _put(s3, bucket, d / "model.pt", "model.pt")
    report = ckptconv.verify(good)
    assert report.exit_code == 0 and report.checked.get("zip members (crc32)"), report
    data = bytearray((d / "model.pt").read_bytes())
    at = data.index(sd["layers.0.weight"].numpy().tobytes()[:64])
    data[at] ^= 0xFF
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    bad = ckptconv.verify(_put(s3, bucket, tmp_path / "bad.pt", "bad.pt"))
    assert bad.exit_code == 1 and any("CRC-32" in p for p in bad.problems), bad.problems
    assert ckptconv.check(good).weights_only
    torch.save({"sd": sd, "args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pt")
    src = _put(s3, bucket, tmp_path / "ns.pt", "ns.pt")
    assert not ckptconv.check(src).weights_only
    ckptconv.sanitize(src, f"s3://{bucket}/clean.pt")
    back = torch.load(io.BytesIO(_get(s3, f"s3://{bucket}/clean.pt")), weights_only=True)
    assert torch.equal(back["sd"]["layers.0.weight"], sd["layers.0.weight"])
    assert back["args"]["lr"] == 0.1


def test_load_state_dict_and_load_into_from_s3(s3, local_sources):
    """Loading into torch from a URL: range reads into the tensors' memory (no
    file to map), values equal to torch.load of the same file."""
    import ckptconv

    d, sd = local_sources
    url = _put(s3, s3.bucket(), d / "model.pt", "model.pt")
    got = ckptconv.load_state_dict(url)
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    net = torch.nn.Linear(256, 64)
    report = ckptconv.load_into(net, url, mapping="layers.0.{p} -> {p}")
    assert "weight" in report.loaded
    assert torch.equal(net.weight, sd["layers.0.weight"])


def test_manifest_and_dcp_folder_on_s3(s3, local_sources, tmp_path):
    """convert --manifest to a URL writes <target>.sha256.json beside it and
    verify --manifest checks it; a DCP folder under a prefix reads as locally
    and is written there as one upload."""
    import ckptconv

    d, sd = local_sources
    bucket = s3.bucket()
    src = _put(s3, bucket, d / "model.pt", "model.pt")
    dst = f"s3://{bucket}/out/model.safetensors"
    ckptconv.convert(src, dst, manifest=True)
    assert s3.fs.exists(f"{bucket}/out/model.safetensors.sha256.json")
    assert ckptconv.verify(dst, manifest=True).exit_code == 0
    data = bytearray(_get(s3, dst))
    data[-1] ^= 0xFF
    s3.fs.pipe_file(f"{bucket}/out/model.safetensors", bytes(data))
    report = ckptconv.verify(dst, manifest=True)
    assert report.exit_code == 1 and any("SHA-256" in p for p in report.problems), report
    ckptconv.convert(d / "model.pt", tmp_path / "dcp", to="dcp")
    for f in sorted((tmp_path / "dcp").iterdir()):
        s3.fs.put_file(str(f), f"{bucket}/dcp/{f.name}")
    ck = ckptconv.load(f"s3://{bucket}/dcp")
    assert ck.format == "dcp"
    for k, v in sd.items():
        assert torch.equal(ck.tensors()[k].torch(), v), k
    # a DCP folder written to a prefix: uploaded when complete (.metadata last),
    # read back by torch's own DCP reader from a download, and by ckptconv from S3
    proc = run_cli("convert", src, f"s3://{bucket}/dcp-out", "--to", "dcp", env=s3.env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(s3.fs.ls(f"{bucket}/dcp-out")) == [f"{bucket}/dcp-out/.metadata",
                                                     f"{bucket}/dcp-out/__0_0.distcp"]
    proc = run_cli("convert", src, f"s3://{bucket}/dcp-out", "--to", "dcp", env=s3.env)
    assert_one_line_error(proc, 2, "dcp-out", "--force")
    s3.fs.pipe_file(f"{bucket}/dcp-out/stale.distcp", b"old")
    assert run_cli("convert", src, f"s3://{bucket}/dcp-out", "--to", "dcp", "--force",
                   env=s3.env).returncode == 0
    assert not s3.fs.exists(f"{bucket}/dcp-out/stale.distcp")
    s3.fs.get(f"{bucket}/dcp-out/", str(tmp_path / "dcp-down"), recursive=True)
    import torch.distributed.checkpoint as dcp

    template = {k: torch.empty_like(v) for k, v in sd.items()}
    dcp.load(template, checkpoint_id=str(tmp_path / "dcp-down"), no_dist=True)
    for k, v in sd.items():
        assert torch.equal(template[k], v), k
    back = ckptconv.load(f"s3://{bucket}/dcp-out")
    for k, v in sd.items():
        assert torch.equal(back.tensors()[k].torch(), v), k


def _h5_content(data: bytes) -> dict:
    import io

    import h5py

    out = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        def visit(name, obj):
            attrs = {k: repr(v) for k, v in obj.attrs.items()}
            out[name] = (obj[()].tobytes() if isinstance(obj, h5py.Dataset) else None, attrs)
        f.visititems(visit)
        out["/"] = (None, {k: repr(v) for k, v in f.attrs.items()})
    return out


# --- converting in every direction ----------------------------------------------------

# (direction, source, target): the main pair in every direction, every other
# reader and writer s3 -> s3
CASES = [("s3->local", ".pt", ".safetensors"), ("local->s3", ".pt", ".safetensors"),
         ("s3->s3", ".pt", ".safetensors"), ("s3->s3", ".safetensors", ".pt"),
         ("s3->s3", ".h5", ".safetensors"), ("s3->s3", ".safetensors", ".h5"),
         ("s3->s3", ".onnx", ".safetensors"), ("s3->s3", ".safetensors", ".onnx")]


@pytest.mark.parametrize("direction,src_ext,dst_ext", CASES)
def test_convert_is_byte_identical_to_local(s3, local_sources, tmp_path, direction,
                                            src_ext, dst_ext):
    import ckptconv

    d, _ = local_sources
    local_out = tmp_path / f"local{dst_ext}"
    ckptconv.convert(d / f"model{src_ext}", local_out)
    bucket = s3.bucket()
    src = _put(s3, bucket, d / f"model{src_ext}", f"in/model{src_ext}") \
        if direction.startswith("s3") else d / f"model{src_ext}"
    dst = f"s3://{bucket}/out/model{dst_ext}" if direction.endswith("s3") \
        else tmp_path / f"out{dst_ext}"
    report = ckptconv.convert(src, dst)
    got = _get(s3, dst) if isinstance(dst, str) else dst.read_bytes()
    if dst_ext == ".h5":  # HDF5 stamps object times: compare what h5py reads instead
        assert _h5_content(got) == _h5_content(local_out.read_bytes())
    else:
        assert got == local_out.read_bytes()
    assert report.target == str(dst)


@pytest.mark.parametrize("to,name", [("torch", "out.pt"), ("tf", "tf/model.ckpt")])
def test_remote_source_is_read_once_checksums_on_the_way(s3, tmp_path, to, name):
    """Targets with checksums (torch zip CRC-32, TF bundle CRC-32C): the
    checksum is computed from the bytes as they are copied, so each source
    byte crosses the network once (a second reader for the checksum would
    double the transfer); the output equals the local conversion's."""
    import safetensors.torch

    import ckptconv

    src = tmp_path / "src.safetensors"
    safetensors.torch.save_file({f"w{i}": torch.randn(1024, 1024) for i in range(6)}  # 6 x 4 MiB
                                | {"big": torch.randn(4096, 1024)}, src)              # + 16 MiB
    size = src.stat().st_size
    url = _put(s3, s3.bucket(), src, "src.safetensors")
    report = ckptconv.convert(url, tmp_path / "remote" / name, to=to)
    ckptconv.convert(src, tmp_path / "local" / name, to=to)
    for got in sorted((tmp_path / "remote").rglob("*")):
        if got.is_file():
            want = tmp_path / "local" / got.relative_to(tmp_path / "remote")
            assert got.read_bytes() == want.read_bytes(), got.name
    used = report.remote
    assert size <= used["bytes_read"] <= size + 1 * MiB, (used, size)
    assert used["requests"] <= 20, used


def test_tf_bundle_on_s3_both_ways(s3, local_sources, tmp_path):
    """A TF checkpoint is several objects under one prefix: read and written on S3."""
    import ckptconv

    d, _ = local_sources
    bucket = s3.bucket()
    local_tf = tmp_path / "tf" / "model.ckpt"
    ckptconv.convert(d / "model.safetensors", local_tf, to="tf")
    ckptconv.convert(d / "model.safetensors", f"s3://{bucket}/tf/model.ckpt", to="tf")
    written = sorted(s3.fs.ls(f"{bucket}/tf", detail=False))
    assert [w.rsplit("/", 1)[1] for w in written] == sorted(p.name for p in local_tf.parent.iterdir())
    for w in written:
        assert s3.fs.cat_file(w) == (local_tf.parent / w.rsplit("/", 1)[1]).read_bytes()
    ckptconv.convert(f"s3://{bucket}/tf/model.ckpt", tmp_path / "back.safetensors")
    ckptconv.convert(local_tf, tmp_path / "ref.safetensors")
    assert (tmp_path / "back.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_cli_convert_s3_to_s3_with_storage_option_flag(cli, s3_server, local_sources, tmp_path,
                                                       monkeypatch):
    """The endpoint only from --storage-option (no FSSPEC_S3_ENDPOINT_URL)."""
    d, sd = local_sources
    bucket = s3_server.bucket()
    src = _put(s3_server, bucket, d / "model.pt", "model.pt")
    monkeypatch.delenv("FSSPEC_S3_ENDPOINT_URL", raising=False)
    proc = cli("convert", src, f"s3://{bucket}/model.safetensors",
               "--storage-option", f"endpoint_url={s3_server.endpoint}", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["remote"]["requests"] > 0 and report["remote"]["bytes_written"] > 0
    from safetensors.numpy import load

    got = load(_get(s3_server, f"s3://{bucket}/model.safetensors"))
    for k, v in sd.items():
        assert np.array_equal(got[k], v.numpy()), k


def test_existing_remote_target_needs_force(cli, s3, local_sources):
    d, _ = local_sources
    bucket = s3.bucket()
    dst = _put(s3, bucket, d / "model.safetensors", "model.safetensors")
    proc = cli("convert", d / "model.pt", dst)
    assert_one_line_error(proc, 2, "already exists", "--force")
    assert cli("convert", d / "model.pt", dst, "--force").returncode == 0


def test_missing_object_is_one_line_error(cli, s3):
    proc = cli("inspect", f"s3://{s3.bucket()}/nope.pt")
    assert_one_line_error(proc, 1, "nope.pt")


# --- atomic remote writes ---------------------------------------------------------------

def test_failed_conversion_leaves_no_object(cli, s3, local_sources, tmp_path):
    d, _ = local_sources
    data = (d / "model.safetensors").read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    bucket = s3.bucket()
    proc = cli("convert", bad, f"s3://{bucket}/out.pt")
    assert proc.returncode == 1, proc.stderr
    assert s3.fs.ls(bucket) == []
    assert s3.pending_uploads(bucket) == []


def test_sigterm_during_upload_aborts_the_multipart_upload(s3, tmp_path):
    """Killed while parts are going up: no object, no multipart upload left open."""
    import safetensors.torch

    src = tmp_path / "big.safetensors"
    # 64 MiB in 5 MiB parts: a dozen part uploads, a window wide enough to land the signal in
    safetensors.torch.save_file({f"w{i}": torch.zeros(1024, 1024) for i in range(64)}, src)
    bucket = s3.bucket()
    code = ("import sys; from ckptconv.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "convert", str(src),
                             f"s3://{bucket}/big.pt"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **s3.env, "CKPTCONV_PART_SIZE": str(5 * MiB)})
    deadline = time.monotonic() + 60
    while not s3.pending_uploads(bucket):
        assert proc.poll() is None, ("finished before it could be interrupted", proc.stderr.read())
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert s3.fs.ls(bucket) == []
    assert s3.pending_uploads(bucket) == []


# --- other file systems ---------------------------------------------------------------------

def test_memory_urls_round_trip(local_sources, tmp_path):
    """memory:// in, memory:// out: the same bytes as the same chain of local conversions."""
    import fsspec

    import ckptconv

    d, sd = local_sources
    for base in ("memory://rt", tmp_path / "local"):
        ckptconv.convert(d / "model.pt", f"{base}/model.safetensors", force=True)
        ckptconv.convert(f"{base}/model.safetensors", f"{base}/back.pt", force=True)
    fs = fsspec.filesystem("memory")
    assert fs.cat("/rt/back.pt") == (tmp_path / "local" / "back.pt").read_bytes()
    assert fs.cat("/rt/model.safetensors") == \
        (tmp_path / "local" / "model.safetensors").read_bytes()
    assert sorted(fs.ls("/rt", detail=False)) == ["/rt/back.pt", "/rt/model.safetensors"]


def test_file_urls_are_local_paths(local_sources, tmp_path):
    import ckptconv
    from ckptconv.remote import as_path, is_remote

    d, _ = local_sources
    url = f"file://{d / 'model.pt'}"
    assert not is_remote(url) and as_path(url) == d / "model.pt"
    ckptconv.convert(url, f"file://{tmp_path / 'o.safetensors'}")
    assert (tmp_path / "o.safetensors").is_file()


def test_http_urls_read_by_range(s3, local_sources):
    """moto serves objects over plain HTTP too: the http:// backend, range requests."""
    pytest.importorskip("aiohttp")
    import ckptconv
    from ckptconv.remote import remote_stats, stats_since

    d, sd = local_sources
    bucket = s3.bucket()
    _put(s3, bucket, d / "model.pt", "model.pt")
    s3.fs.chmod(f"{bucket}/model.pt", "public-read")
    before = remote_stats()
    ck = ckptconv.load(f"{s3.endpoint}/{bucket}/model.pt")
    assert ck.format == "torch"
    assert torch.equal(ck.tensors()["layers.0.weight"].torch(), sd["layers.0.weight"])
    assert stats_since(before)["requests"] > 0


def test_storage_option_parsing():
    from ckptconv.errors import UsageError
    from ckptconv.remote import parse_storage_options

    opts = parse_storage_options(["anon=true", "endpoint_url=http://h:1",
                                  "client_kwargs.region_name=eu-west-1", "max_concurrency=4"])
    assert opts == {"anon": True, "endpoint_url": "http://h:1",
                    "client_kwargs": {"region_name": "eu-west-1"}, "max_concurrency": 4}
    with pytest.raises(UsageError):
        parse_storage_options(["novalue"])


def test_unknown_protocol_names_the_fix(cli):
    proc = cli("inspect", "nosuchproto://bucket/model.pt")
    assert_one_line_error(proc, 2, "nosuchproto")


def test_missing_backend_names_the_extra():
    proc = run_cli("inspect", "s3://bucket/model.pt", block=("s3fs",))
    assert_one_line_error(proc, 1, "ckptconv[remote]")


# --- memory stays flat (big files: slow) --------------------------------------------------------

@pytest.fixture(scope="module")
def s3_apart():
    """moto's S3 server in a process of its own, for the big-object tests: moto
    reads a whole object for every range GET (its cost, not ours), so it must
    neither run in the processes measured nor slow down pytest's."""
    import socket
    import urllib.request

    from conftest import S3Endpoint

    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=5).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.2)
    try:
        yield S3Endpoint(endpoint)
    finally:
        server.terminate()
        server.wait(timeout=60)


# Runs one verb in a fresh interpreter and prints what it used: its own peak
# RSS (VmHWM of its own memory map: a child's getrusage/wait4 figure would
# count the pages of the pytest process that forked it) and the requests and
# bytes it moved.
_MEASURED = """
import json, sys
import ckptconv
verb, args = sys.argv[1], sys.argv[2:]
report = ckptconv.convert(*args, force=True) if verb == "convert" else ckptconv.inspect(*args)
with open("/proc/self/status") as f:
    hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mib": round(hwm_kib / 1024, 1), "remote": report.remote}))
"""


def _measured(server, verb: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", _MEASURED, verb, *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **server.env},
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{verb} {' '.join(map(str, args))}: {got}")  # the numbers, for benchmarks/README
    return got


@pytest.mark.slow
@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_inspect_512mib_object_transfers_at_most_4mib(s3_apart, tmp_path, ext):
    import safetensors.torch

    sd = {f"w{i}": torch.zeros(1024, 1024) for i in range(128)}  # 128 x 4 MiB
    local = tmp_path / f"huge{ext}"
    torch.save(sd, local) if ext == ".pt" else safetensors.torch.save_file(sd, local)
    del sd
    assert local.stat().st_size >= 512 * MiB
    url = _put(s3_apart, s3_apart.bucket(), local, f"huge{ext}")
    local.unlink()
    got = _measured(s3_apart, "inspect", url)
    assert 0 < got["remote"]["bytes_read"] <= 4 * MiB, got


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """512 MiB of safetensors (twice the memory allowed) and the sha256 of its
    local conversion to .pt (the reference bytes)."""
    import safetensors.torch

    import ckptconv

    d = tmp_path_factory.mktemp("big")
    safetensors.torch.save_file({f"w{i}": torch.full((1024, 1024), i / 7) for i in range(128)},
                                d / "big.safetensors")  # 128 x 4 MiB
    ckptconv.convert(d / "big.safetensors", d / "ref.pt")
    with open(d / "ref.pt", "rb") as f:
        digest = _sha256(f)
    (d / "ref.pt").unlink()
    return d / "big.safetensors", digest


def _sha256(f) -> str:
    import hashlib

    h = hashlib.sha256()
    while chunk := f.read(16 * MiB):
        h.update(chunk)
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["s3->local", "local->s3", "s3->s3"])
def test_convert_peak_rss_is_flat(s3_apart, big_source, tmp_path, direction):
    """Converting 512 MiB in each direction: the converting process's own peak
    RSS stays <= 256 MiB, and the output is the local conversion's bytes."""
    src_local, want = big_source
    bucket = s3_apart.bucket()
    src = _put(s3_apart, bucket, src_local, "big.safetensors") if direction.startswith("s3") \
        else str(src_local)
    dst = f"s3://{bucket}/out/big.pt" if direction.endswith("s3") else str(tmp_path / "out.pt")
    got = _measured(s3_apart, "convert", src, dst)
    assert got["peak_rss_mib"] <= 256, got
    with (s3_apart.fs.open(dst.split("://", 1)[1], "rb") if direction.endswith("s3")
          else open(dst, "rb")) as f:
        assert _sha256(f) == want


def test_cli_and_local_work_import_no_storage_or_cluster_library(local_sources, tmp_path):
    """fsspec, s3fs, Dask and rich are imported only when a URL, a cluster or a bar needs them."""
    d, _ = local_sources
    code = ("import sys, ckptconv.cli, ckptconv.api, ckptconv.remote, ckptconv.verbs.batch\n"
            "heavy = ('fsspec', 's3fs', 'dask', 'distributed', 'rich', 'tqdm', 'numpy', 'torch')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n"
            "ckptconv.api.convert(sys.argv[1], sys.argv[2])\n"
            "print(sorted(m for m in heavy[:6] if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(d / "model.pt"),
                           str(tmp_path / "o.safetensors")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "[]"], proc.stdout
