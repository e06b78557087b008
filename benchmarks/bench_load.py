"""Loading benchmark: ``ckptconv.load_into`` / ``ckptconv.load_state_dict``
against the loaders people use today, on the same files, in the same run.

    flock /work/bench.lock python benchmarks/bench_load.py   # 2 GiB inputs, median of 5
    python benchmarks/bench_load.py --quick      # 256 MiB inputs, a smoke run
    python benchmarks/bench_load.py --only cold --only legacy --repeat 3 --markdown

Inputs (made once under /tmp/ckptconv-bench-load-SIZE-COUNT/, kept between
runs): a 2 GiB fp32 state dict of 97 tensors as .safetensors, zip .pt, legacy
(pre-1.6) .pt, TF bundle and HDF5, and a zip .pt of 50,000 small tensors.
ckptconv is byte-compiled first, as a regular install is.

Every contender runs in a fresh process that imports torch and builds the
model (parameters allocated with ``torch.empty``, never touched: the load
pays for their first touch, as a real load does), then times the load alone
and reports it with the growth of peak RSS during the load (the peak is reset
through ``/proc/self/clear_refs`` just before). Warm rows import the loaders'
modules untimed; "cold first call" rows import only the entry point untimed
(``from ckptconv import load_state_dict``, ``import safetensors.torch``) and
time the first call with every import and setup it makes; "cold import +
first call" rows time the loader's own import as well. Contenders of a task
run interleaved (peer, floor, ours, peer, ...); the table gives the median, its
ratio to the fastest peer and to the floor (the least any loader must do:
read the file's bytes into fresh memory for ``load_into``, map the file for
``load_state_dict``). "CPU s" is the process's CPU time over the same span (all
its threads): on a loaded machine a 20 ms first call waits for a core several
times over, and CPU time leaves those waits out (the cold rows are one thread
on both sides, so their CPU ratio is the fair one). Caches cannot be dropped here (no root on the host's
page cache): every input is read once before each run, so all contenders
find it in the page cache. Seconds swing between runs on this shared VM: read
the ratios within one run.
"""
from __future__ import annotations

import argparse
import json
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
    if spec["model"] == "blocks":   # 50,000 tensors in BLOCKS modules of PER parameters each
        class Many(torch.nn.Module):
            def __init__(self, per):
                super().__init__()
                for j in range(per):
                    setattr(self, f"p{j}", torch.nn.Parameter(torch.empty(64)))

        model = torch.nn.Module()
        model.blocks = torch.nn.ModuleList(Many(spec["per"]) for _ in range(spec["blocks"]))
    elif spec["model"]:
        from safetensors import safe_open
        with safe_open(spec["shapes"], "np") as f:  # the names and shapes of the state dict
            names = sorted(f.keys(), key=lambda n: int(n.split(".")[1]))
            model = Model([tuple(f.get_slice(n).get_shape()) for n in names])
    cold = spec.get("cold")
    if cold is None:   # a warm call: the loaders' modules are imported untimed
        import ckptconv, safetensors.torch  # noqa: E401
        ckptconv.load_state_dict  # noqa: B018 (imports ckptconv.api)
        if kind.startswith("h5py"):
            import h5py
        if kind.startswith("tf."):
            import tensorflow as tf
    elif cold == "call":   # the entry point imported untimed (`from X import f` at the top)
        import ckptconv, safetensors.torch  # noqa: E401
        ckptconv.load_state_dict  # noqa: B018 (imports ckptconv.api)
    import gc; gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS
    before = rss("VmRSS:")
    c0 = time.process_time()
    t0 = time.perf_counter()
    if cold == "import+call":   # the loader's own import is part of the first call
        if kind.startswith("ckptconv"):
            import ckptconv
        elif kind.startswith("st."):
            import safetensors.torch
    if kind == "st.load_model":
        safetensors.torch.load_model(model, path, strict=False)
    elif kind == "st.load_file":
        sd = safetensors.torch.load_file(path)
    elif kind == "torch.load+load_state_dict":
        model.load_state_dict(torch.load(path, mmap=spec["mmap"], weights_only=True), strict=False)
    elif kind == "torch.load":
        sd = torch.load(path, mmap=spec["mmap"], weights_only=True)
    elif kind.startswith("h5py"):
        with h5py.File(path, "r") as f:
            sd = {}
            f.visititems(lambda n, o: sd.__setitem__(n.replace("/", "."), torch.from_numpy(o[()]))
                         if isinstance(o, h5py.Dataset) else None)
        if kind == "h5py+load_state_dict":
            model.load_state_dict(sd, strict=False)
    elif kind.startswith("tf."):
        reader = tf.train.load_checkpoint(path)
        sd = {n: torch.from_numpy(reader.get_tensor(n)) for n in reader.get_variable_to_shape_map()}
        if kind == "tf.load_checkpoint+load_state_dict":
            model.load_state_dict({n.replace("/", "."): t for n, t in sd.items()}, strict=False)
    elif kind == "floor.read":
        # the bytes from the page cache into untouched memory, one read call per file:
        # what any loader into fresh parameters has to do at least
        for name in spec["files"]:
            with open(name, "rb", buffering=0) as f:
                buf = torch.empty(os.fstat(f.fileno()).st_size, dtype=torch.uint8)
                f.readinto(memoryview(buf.numpy()))
    elif kind == "floor.map":
        # a private map of the file (what mmap loaders start from; no page touched)
        m = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
    elif kind == "ckptconv.load_into":
        r = ckptconv.load_into(model, path)
        assert not r.missing, r
    elif kind == "ckptconv.load_state_dict":
        sd = ckptconv.load_state_dict(path, mmap=spec["mmap"])
    else:
        raise SystemExit(f"unknown contender {kind}")
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    grown = rss("VmHWM:") - before
    if spec.get("check") and model is not None:
        import safetensors.torch
        # the values landed (cheap spot check: first and last element of each)
        ref = safetensors.torch.load_file(spec["check"])
        for k, v in model.state_dict().items():
            r = ref[k].reshape(-1)
            assert v.reshape(-1)[0] == r[0] and v.reshape(-1)[-1] == r[-1], k
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rss_growth": grown}))
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


BLOCKS, PER_BLOCK = 500, 100   # the 50,000 tensors of "blocks.pt", by module


def generate_blocks(work: Path) -> Path:
    """50,000 tensors of 64 floats held 100 to a module (``blocks.{b}.p{j}``): a
    model torch's ``load_state_dict`` handles in seconds (one module per tensor,
    as in small.pt, costs it 50,000 x 50,000 key tests: minutes)."""
    path = work / "blocks.pt"
    if not path.exists():
        import torch

        g = torch.Generator().manual_seed(1)
        sd = {f"blocks.{b}.p{j}": torch.randn(64, generator=g)
              for b in range(BLOCKS) for j in range(PER_BLOCK)}
        torch.save(sd, work / "blocks.tmp")
        (work / "blocks.tmp").rename(path)
    return path


# --- the plan --------------------------------------------------------------------------------

def role(contender: str) -> str:
    """ours (ckptconv), floor (the least any loader must do) or peer (everyone else)."""
    return "ours" if contender.startswith("ckptconv") else \
        "floor" if contender.startswith("floor") else "peer"


def tasks(files: dict[str, Path], small_count: int) -> list[tuple[str, list[tuple[str, dict]]]]:
    """(task, [(contender, child spec), ...])."""
    big, small = str(files["st"]), str(files["small_st"])

    def spec(kind, path, model=True, mmap=True, shapes=big, cold=None):
        out = {"kind": kind, "path": str(path), "model": model, "mmap": mmap, "shapes": shapes}
        if cold:
            out["cold"] = cold
        return out

    def floor_read(path, shapes=big):
        p = Path(path)
        names = sorted(str(q) for q in p.parent.glob(p.name + ".data-*")) if "_tf" in str(p) \
            else [str(p)]
        return ("floor: read the file into fresh memory",
                dict(spec("floor.read", path, model=False, shapes=shapes), files=names))

    def floor_map(path):
        return ("floor: map the file", spec("floor.map", path, model=False))

    st, pt, legacy, tf, h5 = (files[k] for k in ("st", "pt", "legacy", "tf", "h5"))
    into = "ckptconv.load_into"
    sd_ = "ckptconv.load_state_dict"
    plan = []
    for label, cold in (("import + first call", "import+call"), ("first call", "call")):
        plan += [
            (f"cold {label}: load_state_dict .safetensors", [
                ("safetensors.torch.load_file", spec("st.load_file", st, model=False, cold=cold)),
                (sd_, spec(sd_, st, model=False, cold=cold))]),
            (f"cold {label}: load_state_dict zip .pt", [
                ("torch.load(mmap)", spec("torch.load", pt, model=False, cold=cold)),
                (sd_, spec(sd_, pt, model=False, cold=cold))]),
        ]
    # the rows this run must give first (a shared machine may cut a run short)
    plan += [
        ("load_into legacy .pt", [("torch.load + load_state_dict",
                                   spec("torch.load+load_state_dict", legacy, mmap=False)),
                                  floor_read(legacy), (into, spec(into, legacy))]),
        ("load_into TF bundle", [("tf.train.load_checkpoint + load_state_dict",
                                  spec("tf.load_checkpoint+load_state_dict", tf)),
                                 ("torch.load(mmap) + load_state_dict of the same in .pt",
                                  spec("torch.load+load_state_dict", pt)),
                                 floor_read(tf), (into, spec(into, tf))]),
        ("load_into HDF5", [("h5py + load_state_dict", spec("h5py+load_state_dict", h5)),
                            floor_read(h5), (into, spec(into, h5))]),
        ("load_into 50,000 tensors in 500 modules .pt", [
            ("torch.load(mmap) + load_state_dict",
             dict(spec("torch.load+load_state_dict", files["blocks"]), model="blocks",
                  blocks=BLOCKS, per=PER_BLOCK)),
            floor_read(files["blocks"]),
            (into, dict(spec(into, files["blocks"]), model="blocks", blocks=BLOCKS,
                        per=PER_BLOCK))]),
        ("load_state_dict legacy .pt", [("torch.load", spec("torch.load", legacy, model=False,
                                                            mmap=False)),
                                        floor_map(legacy), (sd_, spec(sd_, legacy, model=False))]),
        ("load_state_dict TF bundle", [("tf.train.load_checkpoint",
                                        spec("tf.load_checkpoint", tf, model=False)),
                                       (sd_, spec(sd_, tf, model=False))]),
        ("load_state_dict HDF5", [("h5py", spec("h5py", h5, model=False)), floor_map(h5),
                                  (sd_, spec(sd_, h5, model=False))]),
        ("load_into .safetensors", [("safetensors.torch.load_model", spec("st.load_model", st)),
                                    floor_read(st), (into, spec(into, st))]),
        ("load_into zip .pt", [("torch.load(mmap) + load_state_dict",
                                spec("torch.load+load_state_dict", pt)),
                               floor_read(pt), (into, spec(into, pt))]),
        ("load_state_dict .safetensors", [("safetensors.torch.load_file",
                                           spec("st.load_file", st, model=False)),
                                          floor_map(st), (sd_, spec(sd_, st, model=False))]),
        ("load_state_dict zip .pt", [("torch.load(mmap)", spec("torch.load", pt, model=False)),
                                     floor_map(pt), (sd_, spec(sd_, pt, model=False))]),
        (f"load_state_dict {small_count:,} tensors .pt", [
            ("torch.load(mmap)", spec("torch.load", files["small"], model=False, shapes=small)),
            (sd_, spec(sd_, files["small"], model=False, shapes=small))]),
        (f"load_into {small_count:,} tensors .pt", [   # one module per tensor: minutes for torch
            ("torch.load(mmap) + load_state_dict",
             spec("torch.load+load_state_dict", files["small"], shapes=small)),
            floor_read(files["small"], shapes=small),
            (into, spec(into, files["small"], shapes=small))]),
    ]
    return plan


def byte_compile() -> None:
    """Bytecode as a regular install has it (pip compiles at install time; an editable
    install under PYTHONDONTWRITEBYTECODE would compile ckptconv's sources in every
    fresh process, and a cold first call would time the compiler)."""
    subprocess.run([PY, "-c", "import compileall, importlib.util as u, os; "
                    "[compileall.compile_dir(os.path.dirname(u.find_spec(m).origin), quiet=1) "
                    "for m in ('ckptconv', 'ckptconv.adapters')]"], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=2.0, help="GiB of the big inputs (default 2)")
    ap.add_argument("--small-count", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="256 MiB inputs, 5,000 small tensors, 3 runs")
    ap.add_argument("--only", action="append",
                    help="run only the tasks whose name contains this text (repeatable)")
    ap.add_argument("--work", type=Path, help="where the inputs are made once and kept "
                    "(default /tmp/ckptconv-bench-load-SIZE-COUNT)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.small_count, args.repeat = 0.25, 5_000, 3
    work = args.work or Path(f"/tmp/ckptconv-bench-load-{args.size:g}GiB-{args.small_count}")
    files = generate(work, int(args.size * (1 << 30)), args.small_count)
    files["blocks"] = generate_blocks(work)
    byte_compile()
    plan = [t for t in tasks(files, args.small_count) if not args.only or any(o in t[0] for o in args.only)]
    head = ("task", "contender", "median s", "vs fastest peer", "vs floor", "median CPU s",
            "CPU vs fastest peer", "peak RSS growth MiB")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print("  ".join(head))
    for task, contenders in plan:   # rows printed as each task ends
        results: dict[str, list[dict]] = {}
        for _ in range(args.repeat):  # interleaved: peer, floor, ours, peer, floor, ours, ...
            for who, spec in contenders:
                warm([Path(spec["path"]).parent if "_tf" in spec["path"] else Path(spec["path"])])
                results.setdefault(who, []).append(child(spec))
        median = {who: statistics.median(r["seconds"] for r in results[who]) for who, _ in contenders}
        cpu = {who: statistics.median(r["cpu"] for r in results[who]) for who, _ in contenders}
        peer = min(m for who, m in median.items() if role(who) == "peer")
        peer_cpu = min(m for who, m in cpu.items() if role(who) == "peer")
        floor = [m for who, m in median.items() if role(who) == "floor"]
        for who, _ in contenders:
            med = median[who]
            grown = max(r["rss_growth"] for r in results[who]) / (1 << 20)
            row = (task, who, f"{med:.3f}", f"{med / peer:.2f}x",
                   f"{med / floor[0]:.2f}x" if floor and floor[0] > 0 else "-", f"{cpu[who]:.3f}",
                   f"{cpu[who] / peer_cpu:.2f}x" if peer_cpu > 0 else "-", f"{grown:.0f}")
            print("| " + " | ".join(row) + " |" if args.markdown else "  ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
