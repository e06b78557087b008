"""Many sources: folders, globs and several paths, --out-dir, --jobs (local
processes), --scheduler (a real Dask cluster: ``distributed.LocalCluster``
with worker processes, one per session), --resume and the --json stream.
Object storage through moto's S3 server (conftest ``s3_server``)."""
from __future__ import annotations

import json
import os

import pytest


torch = pytest.importorskip("torch")


@pytest.fixture(scope="session")
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=logging.ERROR) as cluster:
        yield cluster


def _model(path, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {"fc.weight": torch.randn(32, 16, generator=g), "fc.bias": torch.randn(32, generator=g)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return sd


@pytest.fixture
def zoo(tmp_path):
    """zoo/a.pt, zoo/sub/b.pt, zoo/sub/deeper/c.pt (+ a README that is not a source)."""
    root = tmp_path / "zoo"
    models = {rel: _model(root / rel, i) for i, rel in
              enumerate(["a.pt", "sub/b.pt", "sub/deeper/c.pt"])}
    (root / "README.md").write_text("not a checkpoint")
    return root, models


def _lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def _local_conversion(src, tmp_path, ext=".safetensors") -> bytes:
    import ckptconv

    out = tmp_path / "ref" / (src.stem + ext)
    out.parent.mkdir(exist_ok=True)
    ckptconv.convert(src, out, force=True)
    return out.read_bytes()


KEYS = {"src", "dst", "format", "status", "error", "bytes", "seconds", "worker"}


def test_folder_to_out_dir_keeps_relative_names(cli, zoo, tmp_path):
    root, models = zoo
    out = tmp_path / "out"
    proc = cli("convert", root, "--out-dir", out, "--to", "safetensors", "--json")
    assert proc.returncode == 0, proc.stderr
    results = _lines(proc)
    assert len(results) == 3 and all(KEYS <= set(r) for r in results)
    assert {r["status"] for r in results} == {"ok"}
    for rel in models:
        produced = out / rel.replace(".pt", ".safetensors")
        assert produced.read_bytes() == _local_conversion(root / rel, tmp_path)


def test_glob_and_several_paths(cli, zoo, tmp_path):
    root, _ = zoo
    proc = cli("convert", f"{root}/sub/**/*.pt", root / "a.pt", "--out-dir", tmp_path / "o",
                   "--to", "torch", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(r["dst"] for r in _lines(proc)) == sorted(
        str(tmp_path / "o" / n) for n in ("b.pt", "deeper/c.pt", "a.pt"))


def test_jobs_runs_local_processes_and_failures_are_per_file(cli, zoo, tmp_path):
    root, models = zoo
    (root / "broken.pt").write_bytes(b"PK\x03\x04 this is not a torch zip")
    proc = cli("convert", root, "--out-dir", tmp_path / "out", "--to", "safetensors",
                   "--jobs", "2", "--json")
    assert proc.returncode == 1, proc.stderr
    results = {os.path.basename(r["src"]): r for r in _lines(proc)}
    assert results["broken.pt"]["status"] == "error" and results["broken.pt"]["error"]
    assert [r["status"] for n, r in results.items() if n != "broken.pt"] == ["ok"] * 3
    assert not (tmp_path / "out" / "broken.safetensors").exists()
    workers = {r["worker"] for r in results.values()}
    assert all(w.rsplit(":", 1)[-1] != str(os.getpid()) for w in workers)


def test_scheduler_runs_on_dask_workers_with_a_failure(cli, dask_cluster, zoo, tmp_path):
    root, models = zoo
    (root / "sub" / "broken.pt").write_bytes(b"\x80\x02 not a pickle at all")
    proc = cli("convert", root, "--out-dir", tmp_path / "out", "--to", "safetensors",
                   "--scheduler", dask_cluster.scheduler_address, "--json")
    assert proc.returncode == 1, proc.stderr
    results = _lines(proc)
    assert len(results) == 4
    by_name = {os.path.basename(r["src"]): r for r in results}
    assert by_name["broken.pt"]["status"] == "error"
    worker_names = {str(w.name) for w in dask_cluster.workers.values()}
    for rel in models:
        r = by_name[os.path.basename(rel)]
        assert r["status"] == "ok" and r["worker"] in worker_names, (r, worker_names)
        produced = tmp_path / "out" / rel.replace(".pt", ".safetensors")
        assert produced.read_bytes() == _local_conversion(root / rel, tmp_path)


def test_scheduler_from_environment(cli, dask_cluster, zoo, tmp_path, monkeypatch):
    root, _ = zoo
    monkeypatch.setenv("CKPTCONV_SCHEDULER", dask_cluster.scheduler_address)
    proc = cli("inspect", root / "a.pt", root / "sub" / "b.pt", "--json")
    assert proc.returncode == 0, proc.stderr
    worker_names = {str(w.name) for w in dask_cluster.workers.values()}
    results = _lines(proc)
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert {r["worker"] for r in results} <= worker_names
    assert {r["format"] for r in results} == {"torch"}


def test_resume_skips_outputs_that_verify(cli, zoo, tmp_path):
    root, models = zoo
    out = tmp_path / "out"
    assert cli("convert", root, "--out-dir", out, "--to", "safetensors").returncode == 0
    damaged = out / "sub" / "b.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-16])  # truncated: must be converted again
    (out / "a.safetensors").unlink()                  # missing: converted
    proc = cli("convert", root, "--out-dir", out, "--to", "safetensors", "--resume",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    skipped = {os.path.basename(r["src"]): r.get("skipped", False) for r in _lines(proc)}
    assert skipped == {"a.pt": False, "b.pt": False, "c.pt": True}
    for rel in models:
        assert (out / rel.replace(".pt", ".safetensors")).read_bytes() == \
            _local_conversion(root / rel, tmp_path)


def test_existing_outputs_need_force_or_resume(cli, zoo, tmp_path):
    root, _ = zoo
    out = tmp_path / "out"
    assert cli("convert", root, "--out-dir", out, "--to", "safetensors").returncode == 0
    proc = cli("convert", root, "--out-dir", out, "--to", "safetensors", "--json")
    assert proc.returncode == 1
    assert all(r["status"] == "error" and "--force" in r["error"] for r in _lines(proc))


def test_out_dir_on_s3_and_s3_prefix_as_source_on_dask(cli, s3_server, dask_cluster, zoo, tmp_path):
    """local folder -> s3 out dir, then that s3 prefix -> s3 on Dask workers."""
    root, models = zoo
    bucket = s3_server.bucket()
    # the workers may have started before the S3 fixture put credentials in the
    # environment: endpoint and keys travel with the tasks as storage options
    opt = [f"--storage-option={o}" for o in (f"endpoint_url={s3_server.endpoint}",
                                              "key=testing", "secret=testing")]
    proc = cli("convert", root, "--out-dir", f"s3://{bucket}/st", "--to", "safetensors",
               "--json", *opt)
    assert proc.returncode == 0, proc.stderr
    assert sorted(s3_server.fs.find(f"{bucket}/st")) == sorted(
        f"{bucket}/st/{rel.replace('.pt', '.safetensors')}" for rel in models)
    proc = cli("convert", f"s3://{bucket}/st/", "--out-dir", f"s3://{bucket}/pt", "--to",
                   "torch", "--scheduler", dask_cluster.scheduler_address, "--json", *opt)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = _lines(proc)
    assert all(r["requests"] > 0 for r in results)
    import ckptconv

    for rel in models:
        ref = tmp_path / "ref" / rel
        ref.parent.mkdir(parents=True, exist_ok=True)
        ckptconv.convert(root / rel, ref.with_suffix(".safetensors"), force=True)
        ckptconv.convert(ref.with_suffix(".safetensors"), ref, force=True)
        assert s3_server.fs.cat_file(f"{bucket}/pt/{rel}") == ref.read_bytes()


def test_scan_many_reports_unsafe_per_file(cli, dask_cluster, zoo, tmp_path):
    from malicious_corpus import _system_p2, bare

    root, _ = zoo
    (root / "evil.pt").write_bytes(bare(_system_p2()))
    proc = cli("scan", root / "a.pt", root / "evil.pt", "--scheduler",
               dask_cluster.scheduler_address, "--json")
    assert proc.returncode == 3, proc.stderr
    status = {os.path.basename(r["src"]): r["status"] for r in _lines(proc)}
    assert status == {"a.pt": "ok", "evil.pt": "unsafe"}


def test_out_dir_needs_to(cli, zoo, tmp_path):
    root, _ = zoo
    proc = cli("convert", root, "--out-dir", tmp_path / "o")
    assert proc.returncode == 2 and "--to" in proc.stderr


def test_output_names():
    from ckptconv.verbs.batch import output_name

    assert output_name("sub/model.pt", ".safetensors") == "sub/model.safetensors"
    assert output_name("model.safetensors.index.json", ".pt") == "model.pt"
    assert output_name("ckpt", ".pt") == "ckpt.pt"
