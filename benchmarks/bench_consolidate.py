"""Consolidating distributed checkpoints: ckptconv against the frameworks' own tools.

    python benchmarks/bench_consolidate.py              # 1 GiB DCP folder, ~1 GiB ZeRO-3 folder
    python benchmarks/bench_consolidate.py --quick      # 256 MiB DCP, a smaller ZeRO-3 model
    python benchmarks/bench_consolidate.py --markdown   # the table for benchmarks/README.md

The inputs are written once under ``benchmarks/_work/`` by the real libraries
(``tests/dist_workers.py``): a DCP folder saved by ``dcp.save`` from two gloo
ranks (16 fp32 tensors, rows sharded over the ranks), and a DeepSpeed ZeRO-3
checkpoint of two ranks (Linear(2048, 2048) layers trained one Adam step).

Every contender of a task runs in a fresh process, interleaved, ``--repeat``
times; the median time is printed as a ratio to the framework's own tool
(``dcp_to_torch_save``, ``zero_to_fp32``'s
``convert_zero_checkpoint_to_fp32_state_dict``) and to ``cp`` + ``sync`` of
the same input, measured in the same run, with each process's peak RSS
(``wait4``). Before every run the inputs are read once (all contenders find
them cached) and ``sync`` flushes the previous run's writes, both untimed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"
sys.path.insert(0, str(REPO / "tests"))

from dist_workers import launch, peak_rss_mib  # noqa: E402

PY = sys.executable
DCP_TO_TORCH = ("import sys; from torch.distributed.checkpoint.format_utils import "
                "dcp_to_torch_save; dcp_to_torch_save(sys.argv[1], sys.argv[2])")
ZERO_TO_FP32 = ("import sys; from deepspeed.utils.zero_to_fp32 import "
                "convert_zero_checkpoint_to_fp32_state_dict as c; c(sys.argv[1], sys.argv[2])")


def inputs(quick: bool) -> tuple[Path, Path]:
    dcp_dir = WORK / ("dcp-256m" if quick else "dcp-1g")
    zero_dir = WORK / ("zero3-small" if quick else "zero3-1g")
    if not (dcp_dir / ".metadata").exists():
        shutil.rmtree(dcp_dir, ignore_errors=True)
        launch("dcp_big_save", dcp_dir, 256 if quick else 1024, timeout=900)
    if not (zero_dir / "latest").exists():
        shutil.rmtree(zero_dir, ignore_errors=True)
        launch("deepspeed_big_save", zero_dir, 6 if quick else 22, timeout=1800)
    return dcp_dir, zero_dir


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def warm(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(8 << 20):
                    pass
    os.sync()


def tasks(dcp_dir: Path, zero_dir: Path) -> list[tuple[str, Path, str, list[tuple[str, list]]]]:
    out = WORK / "out"
    cp = ["cp", "-r"]
    cp_sync = "cp -r {src} {dst} && sync {dst}/* {dst}"

    def shell(text: str, src: Path, dst: Path) -> list[str]:
        return ["sh", "-c", text.format(src=src, dst=dst)]

    return [
        ("DCP (2 ranks) -> torch .pt", dcp_dir, "dcp_to_torch_save", [
            ("cp", cp + [str(dcp_dir), str(out / "cp")]),
            ("cp + fsync", shell(cp_sync, dcp_dir, out / "cp")),
            ("dcp_to_torch_save", [PY, "-c", DCP_TO_TORCH, str(dcp_dir), str(out / "model.pt")]),
            ("ckptconv convert", [PY, "-m", "ckptconv", "convert", str(dcp_dir),
                                  str(out / "model.pt")]),
            ("ckptconv convert -> safetensors", [PY, "-m", "ckptconv", "convert", str(dcp_dir),
                                                 str(out / "model.safetensors")]),
        ]),
        ("ZeRO-3 (2 ranks) -> fp32 state dict", zero_dir, "zero_to_fp32", [
            ("cp", cp + [str(zero_dir), str(out / "cp")]),
            ("cp + fsync", shell(cp_sync, zero_dir, out / "cp")),
            ("zero_to_fp32", [PY, "-c", ZERO_TO_FP32, str(zero_dir), str(out / "zero")]),
            ("ckptconv convert --select module", [PY, "-m", "ckptconv", "convert", str(zero_dir),
                                                  str(out / "model.pt"), "--select", "module"]),
            ("ckptconv --select module -> safetensors",
             [PY, "-m", "ckptconv", "convert", str(zero_dir), str(out / "model.safetensors"),
              "--select", "module"]),
        ]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small inputs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    dcp_dir, zero_dir = inputs(args.quick)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    subprocess.run([PY, "-m", "compileall", "-q", str(REPO / "ckptconv"), str(REPO / "adapters")],
                   check=True)
    rows = []
    for title, src, tool, contenders in tasks(dcp_dir, zero_dir):
        times: dict[str, list[float]] = {name: [] for name, _ in contenders}
        rss: dict[str, float] = {}
        for _ in range(args.repeat):
            for name, cmd in contenders:
                shutil.rmtree(WORK / "out", ignore_errors=True)
                (WORK / "out").mkdir()
                warm(src)
                peak, seconds = peak_rss_mib(cmd, env)
                times[name].append(seconds)
                rss[name] = max(rss.get(name, 0), peak)
        median = {name: statistics.median(t) for name, t in times.items()}
        for name, _ in contenders:
            rows.append((f"{title}, {folder_bytes(src) / (1 << 30):.2f} GiB", name, median[name],
                         median[name] / median[tool], median[name] / median["cp + fsync"],
                         rss[name]))
    shutil.rmtree(WORK / "out", ignore_errors=True)
    if args.markdown:
        print("| task | contender | median s | vs framework tool | vs cp+fsync | peak RSS MiB |")
        print("|---|---|---|---|---|---|")
        for task, name, s, tool, floor, peak in rows:
            print(f"| {task} | {name} | {s:.2f} | {tool:.2f}x | {floor:.2f}x | {peak:.0f} |")
    else:
        for task, name, s, tool, floor, peak in rows:
            print(f"{task:<48} {name:<40} {s:7.2f} s  {tool:5.2f}x tool  {floor:5.2f}x cp+fsync"
                  f"  {peak:7.0f} MiB")


if __name__ == "__main__":
    main()
