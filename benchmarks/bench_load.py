"""Loading benchmark: ``ckptconv.load_into`` / ``ckptconv.load_state_dict``
against the loaders people use today, on the same files, in the same run.

    python benchmarks/bench_load.py              # 2 GiB inputs, median of 5
    python benchmarks/bench_load.py --quick      # 256 MiB inputs, a smoke run

Inputs (made once under benchmarks/_work/load/, kept between runs): a 2 GiB
fp32 state dict of 97 tensors as .safetensors, zip .pt, legacy (pre-1.6) .pt,
TF bundle and HDF5, and a zip .pt of 50,000 small tensors.

Every contender runs in a fresh process that imports its libraries and
builds the model (parameters allocated with ``torch.empty``, never touched:
the load pays for their first touch, as a real load does), then times the
load alone and reports it with the growth of peak RSS during the load (the
peak is reset through ``/proc/self/clear_refs`` just before). Contenders of a
task run interleaved (peer, ours, peer, ours, ...); the table gives the median
and the ratio to the task's peer. Caches cannot be dropped here (no root on
the host's page cache): every input is read once before each run, so all
contenders find it in the page cache. Seconds swing between runs on this
shared VM: read the ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable

N_TENSORS, COLS = 97, 1024

# --- the child: build the model, time one load ---------------------------------------------

CHILD = textwrap.dedent("""
    import json, os, sys, time
    import torch
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])

    class Block(torch.nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(shape))  # allocated, untouched

    class Model(torch.nn.Module):
        def __init__(self, shapes):
            super().__init__()
            self.layers = torch.nn.ModuleList(Block(s) for s in shapes)

    def rss(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

    kind, path = spec["kind"], spec["path"]
    model = None
    if spec["model"]:
        from safetensors import safe_open
        with safe_open(spec["shapes"], "np") as f:  # the names and shapes of the state dict
            names = sorted(f.keys(), key=lambda n: int(n.split(".")[1]))
            model = Model([tuple(f.get_slice(n).get_shape()) for n in names])
    import ckptconv, safetensors.torch  # noqa: E401 (imports are not timed)
    if kind.startswith("h5py"):
        import h5py
    import gc; gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS
    before = rss("VmRSS:")
    t0 = time.perf_counter()
    if kind == "st.load_model":
        safetensors.torch.load_model(model, path, strict=False)
    elif kind == "st.load_file":
        sd = safetensors.torch.load_file(path)
    elif kind == "torch.load+load_state_dict":
        model.load_state_dict(torch.load(path, mmap=spec["mmap"], weights_only=True), strict=False)
    elif kind == "torch.load":
        sd = torch.load(path, mmap=spec["mmap"], weights_only=True)
    elif kind == "h5py+load_state_dict":
        with h5py.File(path, "r") as f:
            sd = {}
            f.visititems(lambda n, o: sd.__setitem__(n.replace("/", "."), torch.from_numpy(o[()]))
                         if isinstance(o, h5py.Dataset) else None)
        model.load_state_dict(sd, strict=False)
    elif kind == "ckptconv.load_into":
        r = ckptconv.load_into(model, path)
        assert not r.missing, r
    elif kind == "ckptconv.load_state_dict":
        sd = ckptconv.load_state_dict(path, mmap=spec["mmap"])
    else:
        raise SystemExit(f"unknown contender {kind}")
    seconds = time.perf_counter() - t0
    grown = rss("VmHWM:") - before
    if spec.get("check") and model is not None:
        # the values landed (cheap spot check: first and last element of each)
        ref = safetensors.torch.load_file(spec["check"])
        for k, v in model.state_dict().items():
            r = ref[k].reshape(-1)
            assert v.reshape(-1)[0] == r[0] and v.reshape(-1)[-1] == r[-1], k
    print(json.dumps({"seconds": seconds, "rss_growth": grown}))
""")


def child(spec: dict) -> dict:
    out = subprocess.run([PY, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed: {spec['kind']} {spec['path']}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm(paths: list[Path]) -> None:
    """Read the inputs once (untimed, in a child) so every contender finds them cached."""
    files = [str(f) for p in paths
             for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))]
    if files:
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


# --- inputs ----------------------------------------------------------------------------------

def generate(work: Path, total_bytes: int, small_count: int) -> dict[str, Path]:
    import torch
    from safetensors.torch import save_file

    import ckptconv as cc

    files = {"st": work / "big.safetensors", "pt": work / "big.pt", "legacy": work / "big_legacy.pt",
             "tf": work / "big_tf" / "model.ckpt", "h5": work / "big.h5",
             "small": work / "small.pt", "small_st": work / "small.safetensors"}
    stamp = work / "inputs.json"
    want = {"total": total_bytes, "small_count": small_count, "n": N_TENSORS}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return files
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"generating inputs in {work} ...", file=sys.stderr)
    rows = max(1, total_bytes // (N_TENSORS * COLS * 4))
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(rows, COLS, generator=g) for i in range(N_TENSORS)}
    save_file(sd, files["st"])
    torch.save(sd, files["pt"])
    torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
    del sd
    cc.convert(files["st"], files["tf"], to="tf")
    cc.convert(files["st"], files["h5"], to="hdf5")
    small = {f"layers.{i}.weight": torch.randn(64, generator=g) for i in range(small_count)}
    torch.save(small, files["small"])
    save_file(small, files["small_st"])
    stamp.write_text(json.dumps(want))
    return files


# --- the plan --------------------------------------------------------------------------------

def tasks(files: dict[str, Path]) -> list[tuple[str, list[tuple[str, dict]]]]:
    """(task, [(contender, child spec), ...]); the first contender is the peer."""
    big, small = str(files["st"]), str(files["small_st"])

    def spec(kind, path, model=True, mmap=True, shapes=big):
        return {"kind": kind, "path": str(path), "model": model, "mmap": mmap, "shapes": shapes}

    st, pt, legacy, tf, h5 = (files[k] for k in ("st", "pt", "legacy", "tf", "h5"))
    into = "ckptconv.load_into"
    sd_ = "ckptconv.load_state_dict"
    return [
        ("load_into .safetensors", [("safetensors.torch.load_model", spec("st.load_model", st)),
                                    (into, spec(into, st))]),
        ("load_into zip .pt", [("torch.load(mmap) + load_state_dict",
                                spec("torch.load+load_state_dict", pt)), (into, spec(into, pt))]),
        ("load_state_dict 50,000 tensors .pt", [
            ("torch.load(mmap)", spec("torch.load", files["small"], model=False, shapes=small)),
            (sd_, spec(sd_, files["small"], model=False, shapes=small))]),
        ("load_into 50,000 tensors .pt", [
            ("torch.load(mmap) + load_state_dict",
             spec("torch.load+load_state_dict", files["small"], shapes=small)),
            (into, spec(into, files["small"], shapes=small))]),
        ("load_state_dict .safetensors", [("safetensors.torch.load_file",
                                           spec("st.load_file", st, model=False)),
                                          (sd_, spec(sd_, st, model=False))]),
        ("load_state_dict zip .pt", [("torch.load(mmap)", spec("torch.load", pt, model=False)),
                                     (sd_, spec(sd_, pt, model=False))]),
        ("load_into legacy .pt", [("torch.load + load_state_dict",
                                   spec("torch.load+load_state_dict", legacy, mmap=False)),
                                  (into, spec(into, legacy))]),
        ("load_into TF bundle", [("torch.load(mmap) + load_state_dict of the .pt",
                                  spec("torch.load+load_state_dict", pt)), (into, spec(into, tf))]),
        ("load_into HDF5", [("h5py + load_state_dict", spec("h5py+load_state_dict", h5)),
                            (into, spec(into, h5))]),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=2.0, help="GiB of the big inputs (default 2)")
    ap.add_argument("--small-count", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="256 MiB inputs, 5,000 small tensors, 3 runs")
    ap.add_argument("--only", help="run only the tasks whose name contains this text")
    ap.add_argument("--work", type=Path, default=HERE / "_work" / "load")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.small_count, args.repeat = 0.25, 5_000, 3
    files = generate(args.work, int(args.size * (1 << 30)), args.small_count)
    plan = [t for t in tasks(files) if not args.only or args.only in t[0]]
    head = ("task", "contender", "median s", "vs peer", "peak RSS growth MiB")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print("  ".join(head))
    for task, contenders in plan:   # rows printed as each task ends
        results: dict[str, list[dict]] = {}
        for _ in range(args.repeat):  # interleaved: peer, ours, peer, ours, ...
            for who, spec in contenders:
                warm([Path(spec["path"]).parent if "_tf" in spec["path"] else Path(spec["path"])])
                results.setdefault(who, []).append(child(spec))
        peer = statistics.median(r["seconds"] for r in results[contenders[0][0]])
        for who, _ in contenders:
            med = statistics.median(r["seconds"] for r in results[who])
            grown = max(r["rss_growth"] for r in results[who]) / (1 << 20)
            row = (task, who, f"{med:.3f}", f"{med / peer:.2f}x", f"{grown:.0f}")
            print("| " + " | ".join(row) + " |" if args.markdown else "  ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
