"""Write the golden torch checkpoints of the torch that runs this script.

    python golden/generate.py                              # in any env with torch
    tox exec -e torch-2.6.0 -- python golden/generate.py   # one env of the matrix
    tox exec -e torch-2.6.0 -- python golden/generate.py --dcp-only   # just the DCP folder

writes ``golden/torch-<X.Y.Z>/*.pt`` (tiny files, made by ``torch.save`` and
``torch.jit.save``) and ``manifest.json``: for each file its sha256 and what
this torch itself holds after ``torch.load``: every tensor (flat name joining
the tree path with ".", dtype, shape, sha256 of its contiguous little-endian
bytes), the tied names, and the whole tree with its non-tensor values as JSON
(``describe``). With torch >= 2.4 it also writes ``dcp/``, a single-process
``torch.distributed.checkpoint.save`` folder, and the manifest's ``"dcp"``
entry describes what ``dcp_to_torch_save`` rebuilds from it.
``tests/compat`` checks ckptconv and every other torch of the
matrix against these manifests. This module imports nothing from ckptconv: the
manifests are torch's word, not ours.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import platform
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def torch_version() -> str:
    return torch.__version__.split("+")[0]


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:3] if x.isdigit())


def out_dir(version: str | None = None) -> Path:
    return HERE / f"torch-{version or torch_version()}"


# --- describing what torch loaded ----------------------------------------------

def tensor_bytes(t: "torch.Tensor") -> bytes:
    """Contiguous little-endian bytes of any tensor, through a same-size integer view."""
    t = t.detach().cpu().contiguous()
    if t.is_complex():
        return torch.view_as_real(t).contiguous().numpy().tobytes()
    if t.dtype == torch.bool:
        return t.numpy().tobytes()
    same_size = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    if t.dtype != same_size:
        t = t.view(same_size)
    return t.numpy().tobytes()


def dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def describe(obj, tensors: dict | None = None, path: tuple = (), ties: dict | None = None):
    """JSON for ``obj`` as torch loaded it; tensors go to ``tensors`` by flat name.

    Tensors become ``{"$tensor": name}``; the same tensor (storage, offset,
    shape, stride, dtype) reached twice is recorded once and the second name
    becomes ``{"$tensor": name, "tied_to": first}``.
    """
    tensors = {} if tensors is None else tensors
    ties = {} if ties is None else ties
    name = ".".join(str(p) for p in path)
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr() if hasattr(obj, "untyped_storage")
               else obj.storage().data_ptr(), obj.storage_offset(), tuple(obj.shape),
               tuple(obj.stride()), str(obj.dtype)) if obj.numel() else None
        data = tensor_bytes(obj)
        tensors[name] = {"dtype": dtype_name(obj.dtype), "shape": list(obj.shape),
                         "sha256": hashlib.sha256(data).hexdigest(),
                         "requires_grad": bool(obj.requires_grad),
                         "parameter": isinstance(obj, torch.nn.Parameter)}
        if key is not None and key in ties:
            return {"$tensor": name, "tied_to": ties[key]}
        if key is not None:
            ties[key] = name
        return {"$tensor": name}
    if isinstance(obj, OrderedDict):
        return {"$odict": [[describe(k), describe(v, tensors, path + (k,), ties)]
                           for k, v in obj.items()]}
    if isinstance(obj, dict):
        return {"$dict": [[describe(k), describe(v, tensors, path + (k,), ties)]
                          for k, v in obj.items()]}
    if isinstance(obj, list):
        return [describe(v, tensors, path + (i,), ties) for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return {"$tuple": [describe(v, tensors, path + (i,), ties) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, str)) or type(obj) is int:
        return obj
    if type(obj) is float:
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, np.generic):
        return {"$np": obj.dtype.name, "hex": obj.tobytes().hex()}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": obj.dtype.name, "shape": list(obj.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()}
    if isinstance(obj, np.dtype):
        return {"$npdtype": obj.str}
    if isinstance(obj, argparse.Namespace):
        return {"$obj": "argparse.Namespace",
                "state": describe(vars(obj), tensors, path, ties)}
    if isinstance(obj, torch.device):
        return {"$device": str(obj)}
    if isinstance(obj, torch.dtype):
        return {"$dtype": dtype_name(obj)}
    if isinstance(obj, torch.Size):
        return {"$size": list(obj)}
    if isinstance(obj, (bytes, bytearray)):
        return {"$bytes": bytes(obj).hex()}
    if isinstance(obj, complex):
        return {"$complex": [repr(obj.real), repr(obj.imag)]}
    if isinstance(obj, (set, frozenset)):
        return {"$set": sorted(json.dumps(describe(v)) for v in obj)}
    return {"$repr": f"{type(obj).__module__}.{type(obj).__qualname__}"}


# --- the contents ---------------------------------------------------------------

def _uints(dtype_name_: str, itemsize: int, n: int = 6) -> "torch.Tensor":
    """uint16/32/64 by a same-size view of signed ints: bit patterns with the top bit set."""
    signed = {2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    vals = [0, 1, -1, -2, 2 ** (itemsize * 8 - 2), -(2 ** (itemsize * 8 - 1))][:n]
    return torch.tensor(vals, dtype=signed).view(getattr(torch, dtype_name_))


def _fp8(dtype_name_: str) -> "torch.Tensor":
    """Every bit pattern of a byte, viewed as an fp8 dtype (NaNs and all)."""
    return torch.arange(256, dtype=torch.int16).to(torch.uint8).view(getattr(torch, dtype_name_)) \
        .reshape(16, 16)


# dtype -> how to make a small tensor of it (the torch that lacks one skips it)
DTYPE_MAKERS = {
    "float64": lambda: torch.randn(2, 3, dtype=torch.float64),
    "float32": lambda: torch.randn(3, 2),
    "float16": lambda: torch.randn(5).to(torch.float16),
    "bfloat16": lambda: torch.randn(2, 4).to(torch.bfloat16),
    "int64": lambda: torch.tensor([-(2 ** 63), -1, 0, 2 ** 63 - 1]),
    "int32": lambda: torch.tensor([-(2 ** 31), 7, 2 ** 31 - 1], dtype=torch.int32),
    "int16": lambda: torch.tensor([-32768, 3, 32767], dtype=torch.int16),
    "int8": lambda: torch.tensor([-128, 0, 127], dtype=torch.int8),
    "uint8": lambda: torch.tensor([0, 1, 255], dtype=torch.uint8),
    "bool": lambda: torch.tensor([[True, False], [False, True]]),
    "complex64": lambda: torch.randn(3, dtype=torch.complex64),
    "complex128": lambda: torch.randn(2, dtype=torch.complex128),
    "float8_e4m3fn": lambda: _fp8("float8_e4m3fn"),
    "float8_e5m2": lambda: _fp8("float8_e5m2"),
    "float8_e4m3fnuz": lambda: _fp8("float8_e4m3fnuz"),
    "float8_e5m2fnuz": lambda: _fp8("float8_e5m2fnuz"),
    "float8_e8m0fnu": lambda: _fp8("float8_e8m0fnu"),
    "uint16": lambda: _uints("uint16", 2),
    "uint32": lambda: _uints("uint32", 4),
    "uint64": lambda: _uints("uint64", 8),
}


def _saves(obj, **kw) -> str | None:
    """None when this torch can save and load ``obj`` back, else why not."""
    try:
        buf = io.BytesIO()
        torch.save(obj, buf, **kw)
        buf.seek(0)
        torch.load(buf, **({"weights_only": False} if _has_weights_only() else {}))
        return None
    except Exception as e:  # noqa: BLE001 - recorded in the manifest
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _has_weights_only() -> bool:
    import inspect

    return "weights_only" in inspect.signature(torch.load).parameters


def all_dtypes(legacy: bool = False) -> tuple[dict, dict]:
    """(name -> tensor for every dtype this torch has and saves, name -> why skipped)."""
    torch.manual_seed(1)
    have, skipped = {}, {}
    for name, make in DTYPE_MAKERS.items():
        if not hasattr(torch, name):
            skipped[name] = "this torch has no such dtype"
            continue
        try:
            t = make()
        except Exception as e:  # noqa: BLE001
            skipped[name] = f"cannot make one: {type(e).__name__}: {e}"
            continue
        why = _saves({name: t}, **({"_use_new_zipfile_serialization": False} if legacy else {}))
        if why:
            skipped[name] = why
        else:
            have[name] = t
    return have, skipped


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.proj = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight  # tied input/output embeddings


def make_model():
    torch.manual_seed(0)
    net = _Net()
    net.norm(torch.randn(5, 4))  # running stats move, num_batches_tracked = 1
    return net


def state_dict():
    """A plain state dict (tied embed/head weights appear under both names)."""
    return make_model().state_dict()


def training_checkpoint():
    """A nested training checkpoint as people save them (not weights_only-loadable)."""
    net = make_model()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.head(net.proj(net.embed(torch.tensor([1, 2, 3])))).sum().backward()
    opt.step()
    rng = np.random.RandomState(3)
    return {
        "epoch": 3,
        "global_step": np.int64(1200),
        "best_metric": np.float64(0.8125),
        "loss_scale": np.float32(1024.0),
        "loss": 0.25,
        "args": argparse.Namespace(lr=1e-3, layers=[4, 4], name="golden", dropout=None),
        "model_state_dict": net.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "np_rng": rng.randint(0, 2 ** 31 - 1, size=(4,)).astype(np.uint32),
        "history": [0.5, None, (1, "two", None), [3.0]],
        "tags": ("a", None),
    }


def tied_views():
    """Tied weights and views sharing one storage (a transpose, a row range, a column)."""
    torch.manual_seed(2)
    w = torch.randn(4, 6)
    return OrderedDict([("embed.weight", w), ("head.weight", w), ("rows", w[1:3]),
                        ("column", w[:, 2]), ("transposed", w.t()),
                        ("scalar", torch.tensor(3.25)), ("empty", torch.empty(0, 3))])


def parameters():
    torch.manual_seed(4)
    return {"w": torch.nn.Parameter(torch.randn(2, 2)),
            "frozen": torch.nn.Parameter(torch.randn(3), requires_grad=False),
            "buffer": torch.zeros(2, dtype=torch.int64)}


class _Scripted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.fc = torch.nn.Linear(3, 2)
        self.register_buffer("steps", torch.tensor(9))

    def forward(self, x):
        return self.fc(x)


def files() -> dict:
    """file name -> (object, torch.save keyword arguments, kind)."""
    legacy = {"_use_new_zipfile_serialization": False}
    dtypes, dtypes_skipped = all_dtypes()
    legacy_dtypes, legacy_skipped = all_dtypes(legacy=True)
    out = {
        "state_dict.pt": (state_dict(), {}, "zip"),
        "state_dict_legacy.pt": (state_dict(), legacy, "legacy"),
        "training.pt": (training_checkpoint(), {}, "zip"),
        "training_legacy.pt": (training_checkpoint(), legacy, "legacy"),
        "tied.pt": (tied_views(), {}, "zip"),
        "parameters.pt": (parameters(), {}, "zip"),
        "dtypes.pt": (dtypes, {}, "zip"),
        "dtypes_legacy.pt": (legacy_dtypes, legacy, "legacy"),
        "scripted.pt": (torch.jit.script(_Scripted()), {}, "torchscript"),
    }
    return out, {"dtypes.pt": dtypes_skipped, "dtypes_legacy.pt": legacy_skipped}


def load_like_torch(path: Path, kind: str, weights_only: bool = False):
    """What this torch reads back: the object (TorchScript: its state dict)."""
    if kind == "torchscript":
        return OrderedDict(torch.jit.load(str(path), map_location="cpu").state_dict())
    kw = {"weights_only": weights_only} if _has_weights_only() else {}
    return torch.load(path, map_location="cpu", **kw)


def manifest_entry(path: Path, obj, kind: str, save_kw: dict) -> dict:
    tensors: dict = {}
    tree = describe(obj, tensors)
    entry = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
             "bytes": path.stat().st_size, "kind": kind, "save": save_kw,
             "tensors": tensors, "tree": tree}
    if kind != "torchscript" and _has_weights_only():
        try:
            load_like_torch(path, kind, weights_only=True)
            entry["weights_only_loads"] = True
        except Exception as e:  # noqa: BLE001 - recorded
            entry["weights_only_loads"] = False
            entry["weights_only_error"] = " ".join(str(e).split())[-300:]
    return entry


def generate(dest: Path | None = None) -> Path:
    dest = dest or out_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.pt"):
        old.unlink()
    contents, skipped = files()
    manifest = {"torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version(), "files": {}}
    for name, (obj, kw, kind) in contents.items():
        path = dest / name
        if kind == "torchscript":
            torch.jit.save(obj, str(path))
        else:
            torch.save(obj, path, **kw)
        # describe what torch reads back, not what we meant to save
        back = load_like_torch(path, kind)
        entry = manifest_entry(path, back, kind, kw)
        if name in skipped:
            entry["dtypes_skipped"] = skipped[name]
        manifest["files"][name] = entry
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return dest


# --- torch.distributed.checkpoint (torch >= 2.4) -----------------------------------

DCP_MIN = (2, 4)


def dcp_state_dict() -> dict:
    """A couple of dtypes, a 0-d tensor, nested containers and plain values."""
    return {
        "model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
                  "b": (torch.arange(4, dtype=torch.float32) - 1.5).to(torch.bfloat16),
                  "h": torch.linspace(-2, 2, 6).to(torch.float16).reshape(2, 3),
                  "i": torch.arange(-3, 3, dtype=torch.int64),
                  "scale": torch.tensor(0.5)},
        "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w", "b"]}]},
        "step": 5, "name": "golden", "nothing": None,
    }


def generate_dcp(dest: Path | None = None) -> Path | None:
    """``dest/dcp/`` and the manifest's ``"dcp"`` entry (torch >= 2.4)."""
    if version_tuple(torch_version())[:2] < DCP_MIN:
        return None
    import shutil
    import tempfile

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dest = dest or out_dir()
    folder = dest / "dcp"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        dcp.save(dcp_state_dict(), checkpoint_id=folder, no_dist=True)
    except TypeError:  # no_dist is newer than checkpoint_id: a process-less save anyway
        dcp.save(dcp_state_dict(), checkpoint_id=folder)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, Path(tmp) / "back.pt")
        back = torch.load(Path(tmp) / "back.pt", map_location="cpu",
                          **({"weights_only": False} if _has_weights_only() else {}))
    tensors: dict = {}
    tree = describe(back, tensors)
    path = dest / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"torch": torch.__version__}
    manifest["dcp"] = {"folder": "dcp", "files": {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())},
        "tensors": tensors, "tree": tree}
    path.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", nargs="?", type=Path, help="folder (default golden/torch-<version>)")
    ap.add_argument("--dcp-only", action="store_true", help="only (re)write dcp/ and its entry")
    args = ap.parse_args()
    if not args.dcp_only:
        where = generate(args.dest)
        total = sum(p.stat().st_size for p in where.iterdir() if p.is_file())
        print(f"{where}: {len(list(where.glob('*.pt')))} files, {total} bytes "
              f"(torch {torch.__version__})")
    folder = generate_dcp(args.dest)
    print(f"{folder}: DCP folder" if folder else f"torch {torch.__version__}: no DCP (< 2.4)")
