"""Conversion benchmark: ckptconv against `cp` and the tools people use today.

    python benchmarks/bench_convert.py            # 2 GiB inputs, median of 3
    python benchmarks/bench_convert.py --quick    # 256 MiB inputs, a smoke run

Generates its inputs under benchmarks/_work/ (kept between runs), then runs
every contender of a task interleaved, three times, in fresh processes, and
prints the median time as a ratio to `cp` of the same input measured in the
same run, with each process's peak RSS (from wait4). ckptconv fsyncs what it
writes (a crash never leaves a torn file) and `cp` does not, so the table
also gives the ratio to `cp` followed by `sync FILE` (`cp + fsync`). Absolute seconds are
printed for reference only: these machines are noisy, ratios are the result.
Needs torch (input generation and baselines); TF/h5 tasks need those adapters,
h5py for the h5 baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from _common import print_table

HERE = Path(__file__).resolve().parent
PY = sys.executable


def warm(paths: list[Path]) -> None:
    """Read the inputs once (untimed) so every contender starts with them cached:
    this VM drops cold page cache on its own, and a re-read from disk would
    land on whichever contender came next. (``cat`` in a child: a read buffer
    here would count in every later child's peak RSS.)"""
    import subprocess

    files = [str(f) for p in paths
             for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))]
    if files:
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def run(cmd: list[str], inputs: list[Path] = ()) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one command in a fresh process.

    Its inputs are read into the page cache and dirty pages of the previous
    command are flushed first (both untimed), so no contender pays for
    another's writeback or finds its input evicted.
    """
    warm(list(inputs))
    os.sync()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, ru = os.wait4(pid, 0)
    elapsed = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"benchmark command failed ({status}): {' '.join(cmd)}")
    return elapsed, ru.ru_maxrss / 1024


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def ckptconv(*args: str) -> list[str]:
    return [PY, "-m", "ckptconv", *args]


def generate(work: Path, total_bytes: int, small_count: int, small_bytes: int) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    import ckptconv as cc

    work.mkdir(parents=True, exist_ok=True)
    files = {"pt": work / "big.pt", "st": work / "big.safetensors", "small": work / "small.pt",
             "tf": work / "big_tf" / "model.ckpt", "h5": work / "big.h5",
             "shards": work / "bf16" / "model.safetensors.index.json"}
    stamp = work / "inputs.json"
    want = {"total": total_bytes, "small_count": small_count, "small_bytes": small_bytes}
    if stamp.exists() and json.loads(stamp.read_text()) == want and all(
            p.exists() or Path(str(p) + ".index").exists() for p in files.values()):
        return files
    for p in work.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    print(f"generating inputs in {work} ...", file=sys.stderr)
    n = 100
    cols = 1024
    rows = max(1, total_bytes // (n * cols * 4))
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(rows, cols, generator=g) for i in range(n)}
    torch.save(sd, files["pt"])
    save_file(sd, files["st"])
    cc.convert(files["st"], files["tf"], to="tf")
    try:
        cc.convert(files["st"], files["h5"], to="hdf5")
    except Exception as e:  # h5py missing: that task is skipped
        print(f"h5 input not made: {e}", file=sys.stderr)
    del sd
    per = max(1, small_bytes // small_count // 4)
    small = {f"block.{i}.param": torch.randn(per, generator=g) for i in range(small_count)}
    torch.save(small, files["small"])
    del small
    bf = {f"model.layers.{i}.weight": torch.randn(rows, cols, generator=g).to(torch.bfloat16)
          for i in range(n)}
    files["shards"].parent.mkdir(parents=True, exist_ok=True)
    cc.save(bf, files["shards"], shard_size=(total_bytes // 2) // 4 + 1)
    del bf
    stamp.write_text(json.dumps(want))
    return files


def baselines(task: str, src: str, dst: str) -> list[tuple[str, str, list[str]]]:
    """`cp`, and `cp` + fsync of the copy (ckptconv fsyncs its output; cp doesn't)."""
    flag = "-r " if Path(src).is_dir() else ""
    return [(task, "cp", ["cp", *flag.split(), src, dst]),
            (task, "cp + fsync", ["sh", "-c", f"cp {flag}'{src}' '{dst}' && sync '{dst}'"])]


def labels(size_gib: float, small_count: int) -> dict[str, str]:
    """The names of the tasks whose input sizes the options set (``--quick`` included)."""
    return {"small": f"{small_count:,} small tensors pth -> safetensors",
            "inspect": f"inspect {size_gib:g} GiB .pt (metadata only)"}


def tasks(files: dict[str, Path], out: Path,
          names: dict[str, str]) -> list[tuple[str, str, list[str], list[str]]]:
    """(task, contender, command, extra files the command writes)."""
    pt, st, small = str(files["pt"]), str(files["st"]), str(files["small"])
    o_st, o_pt = str(out / "out.safetensors"), str(out / "out.pt")
    load_save = ("import torch; from safetensors.torch import save_file; "
                 "sd = torch.load({src!r}, weights_only=True{mm}); "
                 "save_file({{k: v.contiguous() for k, v in sd.items()}}, {dst!r})")
    t = []
    for task, src, in_size_file in (("pth -> safetensors", pt, pt),
                                    (names["small"], small, small)):
        t += baselines(task, src, o_st)
        t += [(task, "torch.load + save_file", py(load_save.format(src=src, mm="", dst=o_st))),
              (task, "torch.load(mmap) + save_file",
               py(load_save.format(src=src, mm=", mmap=True", dst=o_st))),
              (task, "ckptconv convert", ckptconv("convert", src, o_st, "--force", "--no-progress"))]
    t += baselines("safetensors -> pth", st, o_pt)
    t += [("safetensors -> pth", "load_file + torch.save",
           py(f"import torch; from safetensors.torch import load_file; "
              f"torch.save(load_file({st!r}), {o_pt!r})")),
          ("safetensors -> pth", "ckptconv convert",
           ckptconv("convert", st, o_pt, "--force", "--no-progress"))]
    tf = files["tf"]
    data = sorted(tf.parent.glob(tf.name + ".data-*"))
    if data:
        t += baselines("TF bundle -> safetensors", str(data[0]), o_st)
        t += [("TF bundle -> safetensors", "ckptconv convert",
               ckptconv("convert", str(tf), o_st, "--force", "--no-progress"))]
    if files["h5"].exists():
        h5 = str(files["h5"])
        t += baselines("h5 -> safetensors", h5, o_st)
        t += [("h5 -> safetensors", "h5py read + save_file",
               py(f"import h5py; from safetensors.numpy import save_file; f = h5py.File({h5!r}); "
                  "d = {}; f.visititems(lambda n, o: d.__setitem__(n, o[()]) "
                  "if isinstance(o, h5py.Dataset) and o.dtype.kind in 'fiub' else None); "
                  f"save_file(d, {o_st!r})")),
              ("h5 -> safetensors", "ckptconv convert",
               ckptconv("convert", h5, o_st, "--force", "--no-progress"))]
    shards = files["shards"]
    t += baselines("bf16 4 shards -> one safetensors", str(shards.parent), str(out / "cpdir"))
    t += [("bf16 4 shards -> one safetensors", "ckptconv convert",
           ckptconv("convert", str(shards), o_st, "--force", "--no-progress"))]
    t += [(names["inspect"], "ckptconv inspect", ckptconv("inspect", pt)),
          ("CLI start-up", "ckptconv --help", ckptconv("--help"))]
    return t


def rss_sweep(work: Path, sizes=(0.5, 1, 2, 4), markdown: bool = False) -> int:
    """Peak RSS of ckptconv converting .pt -> .safetensors -> .pt at several sizes:
    flat in file size (the inputs are made by torch in a child, one size at a time)."""
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for gib in sizes:
        pt, st, back = work / "in.pt", work / "out.safetensors", work / "back.pt"
        for p in (pt, st, back):
            p.unlink(missing_ok=True)
        subprocess.run([PY, __file__, "--make-pt", str(gib), str(pt)], check=True)
        _, rss1 = run(ckptconv("convert", str(pt), str(st), "--no-progress"))
        _, rss2 = run(ckptconv("convert", str(st), str(back), "--no-progress"))
        rows.append((f"{gib:g} GiB", f"{rss1:.0f}", f"{rss2:.0f}"))
        for p in (pt, st, back):
            p.unlink(missing_ok=True)
    print_table(("input", "pth -> safetensors peak RSS MiB", "safetensors -> pth peak RSS MiB"),
                rows, markdown)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=2.0, help="GiB of the big inputs (default 2)")
    ap.add_argument("--small-count", type=int, default=50_000)
    ap.add_argument("--small-size", type=float, default=1.0, help="GiB of the small-tensor input")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256 MiB inputs, 5,000 small tensors")
    ap.add_argument("--work", type=Path, default=HERE / "_work")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rss-sweep", action="store_true",
                    help="only peak RSS of pth <-> safetensors at 0.5, 1, 2 and 4 GiB")
    ap.add_argument("--make-pt", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.small_count, args.small_size = 0.25, 5_000, 0.1
    sizes = (int(args.size * (1 << 30)), args.small_count, int(args.small_size * (1 << 30)))
    if args.make_pt:
        import torch

        total, path = int(float(args.make_pt[0]) * (1 << 30)), args.make_pt[1]
        g = torch.Generator().manual_seed(1)
        torch.save({f"layers.{i}.weight": torch.randn(total // (100 * 4096), 1024, generator=g)
                    for i in range(100)}, path)
        return 0
    if args.rss_sweep:
        return rss_sweep(args.work / "rss", markdown=args.markdown)
    if args.generate_only:
        files = generate(args.work, *sizes)
        print(json.dumps({k: str(v) for k, v in files.items()}))
        return 0
    # Inputs are made in a child process: ru_maxrss of every later child counts
    # the memory it shared with this process before exec, so this one stays small.
    import subprocess

    # Bytecode as a regular install has it (pip compiles at install time; an
    # editable install under PYTHONDONTWRITEBYTECODE would recompile every run).
    subprocess.run([PY, "-c", "import compileall, importlib.util as u, os; "
                    "[compileall.compile_dir(os.path.dirname(u.find_spec(m).origin), quiet=1) "
                    "for m in ('ckptconv', 'ckptconv.adapters')]"], check=True)
    made = subprocess.run([PY, __file__, "--generate-only", "--work", str(args.work),
                           "--size", str(args.size), "--small-count", str(args.small_count),
                           "--small-size", str(args.small_size)],
                          check=True, capture_output=True, text=True)
    files = {k: Path(v) for k, v in json.loads(made.stdout.strip().splitlines()[-1]).items()}
    out = args.work / "out"
    out.mkdir(exist_ok=True)
    names = labels(args.size, args.small_count)
    plan = tasks(files, out, names)
    inputs = {"pth -> safetensors": [files["pt"]], names["inspect"]: [files["pt"]],
              names["small"]: [files["small"]],
              "safetensors -> pth": [files["st"]], "TF bundle -> safetensors": [files["tf"].parent],
              "h5 -> safetensors": [files["h5"]],
              "bf16 4 shards -> one safetensors": [files["shards"].parent]}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeat):  # interleaved: every contender once per round
        for task, who, cmd in plan:
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            results.setdefault((task, who), []).append(run(cmd, inputs.get(task, [])))
    rows = []
    for task in dict.fromkeys(t for t, _, _ in plan):
        base = results.get((task, "cp"))
        base_t = statistics.median(s for s, _ in base) if base else None
        for (t2, who), runs in results.items():
            if t2 != task:
                continue
            med = statistics.median(s for s, _ in runs)
            rss = max(r for _, r in runs)
            ratio = f"{med / base_t:.2f}x" if base_t else "-"
            sync_base = results.get((task, "cp + fsync"))
            sync_t = statistics.median(s for s, _ in sync_base) if sync_base else None
            ratio2 = f"{med / sync_t:.2f}x" if sync_t else "-"
            rows.append((task, who, f"{med:.2f}", ratio, ratio2, f"{rss:.0f}"))
    print_table(("task", "contender", "median s", "vs cp", "vs cp+fsync", "peak RSS MiB"), rows,
                args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
