"""Object-storage benchmark: ckptconv on S3 (moto's server) against plain copies.

    python benchmarks/bench_remote.py            # 512 MiB objects, median of 3
    python benchmarks/bench_remote.py --quick    # 128 MiB objects, one run

Starts moto's S3 server on a free local port, uploads a .pt and a
.safetensors state dict, then times, each in a fresh process, interleaved:

- s3 -> local: `aws s3 cp`-style downloads of the same object (boto3's
  ``download_file``, a multi-threaded transfer manager; s3fs ``get``) against
  ``ckptconv convert s3://... local`` (a format conversion on the way);
- local -> s3: ``upload_file`` / s3fs ``put`` against ``ckptconv convert local s3://...``;
- s3 -> s3: download + upload against ``ckptconv convert s3://... s3://...``;
- ``ckptconv inspect s3://...``: bytes and requests it needs (metadata only);
- N files converted on a Dask LocalCluster of 1 and of 2 worker processes
  (``--scheduler``), and the ratio.

Ratios are to the plain copy of the same bytes in the same run; peak RSS per
process from ``wait4``; requests from ckptconv's ``--json`` (``remote``).
moto keeps objects in its own memory and serves them from this machine's
loopback, so absolute rates say little about a real bucket: compare rows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table

HERE = Path(__file__).resolve().parent
PY = sys.executable
MiB = 1 << 20


# Each contender (a python command) runs under this wrapper, which reports the
# peak RSS of its own address space (VmHWM): a forked child's ru_maxrss would
# also count the pages of this process (the inputs, moto's objects) it started from.
_WRAP = """
import runpy, sys
args = sys.argv[1:]
try:
    if args[0] == "-m":
        sys.argv = [args[1]] + args[2:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c"] + args[2:]
        exec(compile(args[1], "<bench>", "exec"), {"__name__": "__main__"})
finally:
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM"))
    sys.stderr.write(f"\\nVmHWM_KB {hwm}\\n")
"""


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stdout) of one python command in a fresh process."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    cmd = [cmd[0], "-c", _WRAP, *cmd[1:]]
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os.execvpe(cmd[0], cmd, env)
        finally:
            os._exit(127)
    _, status, _ = os.wait4(pid, 0)
    elapsed = time.perf_counter() - t0
    out.seek(0)
    err.seek(0)
    text, errors = out.read().decode(), err.read().decode()
    if status != 0:
        raise SystemExit(f"benchmark command failed ({status}): {' '.join(cmd[3:])}\n{errors}")
    hwm = [line.split()[1] for line in errors.splitlines() if line.startswith("VmHWM_KB")]
    return elapsed, int(hwm[-1]) / 1024 if hwm else float("nan"), text


def ckptconv(*args: str) -> list[str]:
    extra = ["--force", "--no-progress"] if args[0] == "convert" else []
    return [PY, "-m", "ckptconv", *args, *extra, "--json"]


def boto(code: str) -> list[str]:
    return [PY, "-c", "import os, boto3; s3 = boto3.client('s3', endpoint_url="
            "os.environ['FSSPEC_S3_ENDPOINT_URL']); " + code]


def s3fs_cmd(code: str) -> list[str]:
    return [PY, "-c", "import os, s3fs; fs = s3fs.S3FileSystem(endpoint_url="
            "os.environ['FSSPEC_S3_ENDPOINT_URL']); " + code]


def make_inputs(work: Path, size: int) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)
    n = 64
    rows = max(1, size // (n * 1024 * 4))
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(rows, 1024, generator=g) for i in range(n)}
    files = {"pt": work / "big.pt", "st": work / "big.safetensors"}
    torch.save(sd, files["pt"])
    save_file(sd, files["st"])
    return files


def requests_of(stdout: str) -> str:
    try:
        report = json.loads(stdout)
    except ValueError:
        return "-"
    return str((report.get("remote") or {}).get("requests", "-"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="MiB per object (default 512)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="128 MiB objects, one run")
    ap.add_argument("--files", type=int, default=8, help="files for the Dask rows")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.repeat = 128, 1

    from moto.server import ThreadedMotoServer
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("bench")
    with tempfile.TemporaryDirectory(prefix="ckptconv-bench-remote-") as tmp:
        work = Path(tmp)
        print(f"making {args.size} MiB inputs ...", file=sys.stderr)
        files = make_inputs(work / "in", args.size * MiB)
        for k, p in files.items():
            fs.put_file(str(p), f"bench/{p.name}")
        pt, st = str(files["pt"]), str(files["st"])
        out = work / "out"
        out.mkdir()
        o_st, o_pt = str(out / "o.safetensors"), str(out / "o.pt")
        size = files["pt"].stat().st_size
        rows = [
            ("s3 -> local", "boto3 download_file (aws s3 cp)",
             boto(f"s3.download_file('bench', 'big.pt', {o_pt!r})")),
            ("s3 -> local", "s3fs get", s3fs_cmd(f"fs.get('bench/big.pt', {o_pt!r})")),
            ("s3 -> local", "ckptconv convert pt -> safetensors",
             ckptconv("convert", "s3://bench/big.pt", o_st)),
            ("s3 -> local", "ckptconv convert safetensors -> pt",
             ckptconv("convert", "s3://bench/big.safetensors", o_pt)),
            ("local -> s3", "boto3 upload_file (aws s3 cp)",
             boto(f"s3.upload_file({pt!r}, 'bench', 'copy.pt')")),
            ("local -> s3", "s3fs put", s3fs_cmd(f"fs.put({pt!r}, 'bench/copy.pt')")),
            ("local -> s3", "ckptconv convert pt -> safetensors",
             ckptconv("convert", pt, "s3://bench/out.safetensors")),
            ("s3 -> s3", "boto3 download_file + upload_file",
             boto(f"s3.download_file('bench', 'big.pt', {o_pt!r}); "
                  f"s3.upload_file({o_pt!r}, 'bench', 'copy2.pt')")),
            ("s3 -> s3", "ckptconv convert pt -> safetensors",
             ckptconv("convert", "s3://bench/big.pt", "s3://bench/out2.safetensors")),
            ("inspect (metadata only)", "ckptconv inspect .pt",
             ckptconv("inspect", "s3://bench/big.pt")),
            ("inspect (metadata only)", "ckptconv inspect .safetensors",
             ckptconv("inspect", "s3://bench/big.safetensors")),
        ]
        results: dict[tuple[str, str], list] = {}
        for _ in range(args.repeat):
            for task, who, cmd in rows:
                secs, rss, stdout = timed(cmd, env)
                results.setdefault((task, who), []).append((secs, rss, requests_of(stdout)
                                                            if "ckptconv" in who else "-"))
        table = []
        for task, who, _ in rows:
            runs = results[(task, who)]
            med = statistics.median(r[0] for r in runs)
            base = statistics.median(r[0] for r in results[(task, next(
                w for t, w, _ in rows if t == task))])
            table.append((task, who, f"{med:.2f}", f"{med / base:.2f}x" if "inspect" not in task
                          else "-", f"{size / MiB / med:.0f}" if "inspect" not in task else "-",
                          f"{max(r[1] for r in runs):.0f}", runs[-1][2]))
        table += dask_rows(work, fs, env, args.files, max(16, args.size // 8))
    srv.stop()
    head = ("task", "contender", "median s", "vs plain copy", "MiB/s", "peak RSS MiB",
            "requests")
    print_table(head, table, args.markdown)
    return 0


def dask_rows(work: Path, fs, env: dict, n_files: int, mib_each: int) -> list[tuple]:
    """N files s3 -> s3 on a Dask LocalCluster of 1, then 2 worker processes."""
    import torch
    from distributed import LocalCluster
    from safetensors.torch import save_file

    src = work / "many"
    src.mkdir()
    rows_each = mib_each * MiB // (8 * 1024 * 4)
    for i in range(n_files):
        p = src / f"m{i:02d}.safetensors"
        save_file({f"w{j}": torch.full((rows_each, 1024), float(i)) for j in range(8)}, p)
        fs.put_file(str(p), f"bench/many/{p.name}")
    times = {}
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster:
            cmd = [PY, "-m", "ckptconv", "convert", "s3://bench/many/", "--to", "torch",
                   "--out-dir", f"s3://bench/out-{workers}", "--scheduler",
                   cluster.scheduler_address, "--force", "--json", "--no-progress"]
            timed(cmd, env)  # warm-up: workers import ckptconv
            times[workers] = timed(cmd, env)[0]
    total = n_files * mib_each
    return [(f"{n_files} files x {mib_each} MiB s3 -> s3", f"Dask {w} worker{'s' * (w > 1)}",
             f"{t:.2f}", f"{t / times[1]:.2f}x vs 1 worker", f"{total / t:.0f}", "-", "-")
            for w, t in times.items()]


if __name__ == "__main__":
    sys.exit(main())
