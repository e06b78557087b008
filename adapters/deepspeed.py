"""DeepSpeed ZeRO checkpoint folders (stages 1, 2 and 3), consolidated to fp32.

A folder holds ``latest`` (the tag, e.g. ``global_step100``) and
``<tag>/``: ``mp_rank_00_model_states.pt`` (stages 1/2) or
``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` (stage 3, one per rank) and
one ``*_optim_states.pt`` per data-parallel rank holding that rank's
partition of the fp32 master weights and of the optimizer state.

Ground truth: ``deepspeed/utils/zero_to_fp32.py``
(``get_fp32_state_dict_from_zero_checkpoint``): stages 1/2 concatenate each
parameter group's flat fp32 partitions over the ranks and cut the parameters
out in ``param_shapes`` order (plus ``param_alignment_paddings``); stage 3
partitions every parameter over the ranks (``ceil(numel / world)`` each, the
last padded) and takes each rank's piece from its flat groups. Frozen
parameters come from ``frozen_param_fragments``, buffers from the module
(floating ones cast to fp32), tied parameters from ``shared_params``.

Every parameter becomes a ``ConcatTensor``: a list of byte ranges of the
optimizer files, copied file to file by writers. The tree is
``{"module": <zero_to_fp32's state dict>, "optimizer": {"state": {name:
{exp_avg, ...}}, "param_groups": ...}, <the model states' other entries>}``;
``--select module`` gives exactly what ``zero_to_fp32`` does.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ckptconv.errors import FormatError
from ckptconv.pickle import short_repr
from ckptconv.registry import Adapter
from ckptconv.paths import as_path
from ckptconv.tensor import ByteSource, ConcatTensor, FileHandle, StoredTensor, TensorRef, cast
from ckptconv.tree import Checkpoint, ObjectRecord


from .torch import read_torch_blob
from .torch.unpickling import int_tuple

_OWN_KEYS = ("module", "optimizer", "buffer_names", "param_shapes", "frozen_param_shapes",
             "frozen_param_fragments", "shared_params")


def _natural(text: str) -> list:
    return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", text)]


def find_tag_folder(path: Path) -> Path:
    """The folder holding the state files: ``path/<latest>`` or ``path`` itself."""
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
            raise FormatError(f"{path.name}/latest: names {tag!r}, not a tag folder")
        folder = path / tag
        if not folder.is_dir():
            raise FormatError(f"{path.name}/latest: names '{tag}', which is not a folder here")
        return folder
    return path


def _read_state_file(path: Path, allow_globals=()) -> Any:
    """A ``*_states.pt`` file: its pickle names DeepSpeed's enums, loss scalers and
    fragment addresses, read as inert records (the torch reader's known globals)."""
    handle = FileHandle(path, f"{path.parent.name}/{path.name}")
    return read_torch_blob(handle, 0, handle.size, allow_globals)[0]


def _get(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise FormatError(f"{where}: has no '{key}' (not a DeepSpeed ZeRO checkpoint?)")
    return d[key]


def _stage(value: Any, where: str) -> int:
    if isinstance(value, ObjectRecord) and value.args:
        value = value.args[0]
    if type(value) is not int or value not in (1, 2, 3):
        raise FormatError(f"{where}: zero_stage {short_repr(value)} (stages 1, 2, 3 are read)")
    return value


def _flat(ref: Any, where: str) -> tuple[ByteSource, int, int]:
    """(source, byte offset, numel) of a contiguous flat tensor in a file."""
    if not isinstance(ref, StoredTensor) or not ref.is_contiguous or ref.big_endian:
        raise FormatError(f"{where}: {short_repr(ref)} is not a flat stored tensor")
    return ref.source, ref.offset * ref.dtype.itemsize, ref.numel


class _Flat:
    """The concatenation of flat tensors (of one dtype), cut into byte ranges."""

    def __init__(self, refs: list, where: str):
        self.parts = [_flat(r, where) for r in refs]
        self.dtype = refs[0].dtype if refs else None
        if any(r.dtype != self.dtype for r in refs):
            raise FormatError(f"{where}: flat partitions of different dtypes")
        self.numel = sum(n for _, _, n in self.parts)

    def ranges(self, start: int, numel: int) -> list:
        out, pos, size = [], 0, self.dtype.itemsize if self.dtype else 0
        for source, base, n in self.parts:
            lo, hi = max(start, pos), min(start + numel, pos + n)
            if lo < hi:
                out.append((source, base + (lo - pos) * size, (hi - lo) * size))
            pos += n
        return out


def _tensor(flat_ranges: list, dtype, shape: tuple, what: str) -> ConcatTensor:
    return ConcatTensor(dtype, shape, flat_ranges, what=what)


def _numel(shape: tuple) -> int:
    return math.prod(shape)


def _zero2_params(param_shapes: list, per_rank_groups: list, paddings, world: int,
                  where: str) -> dict[str, ConcatTensor]:
    """Stages 1/2: group g is the concatenation of every rank's partition g."""
    out: dict[str, ConcatTensor] = {}
    for g, shapes in enumerate(param_shapes):
        flat = _Flat([groups[g] for groups in per_rank_groups], f"{where}: group {g}")
        pads = paddings[g] if paddings is not None else None
        if pads is not None and len(pads) != len(shapes):
            raise FormatError(f"{where}: group {g} has {len(pads)} alignment paddings for "
                              f"{len(shapes)} parameters")
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = _numel(shape)
            if offset + n > flat.numel:
                raise FormatError(f"{where}: parameter '{name}' needs elements {offset}.."
                                  f"{offset + n} of group {g}, which holds {flat.numel}")
            out[name] = _tensor(flat.ranges(offset, n), flat.dtype, shape, f"{where}: '{name}'")
            offset += n + (pads[i] if pads is not None else 0)
        align = 2 * world  # zero_to_fp32: both ends rounded up to 2 * world_size
        if math.ceil(offset / align) != math.ceil(flat.numel / align):
            raise FormatError(f"{where}: parameters of group {g} use {offset} of its "
                              f"{flat.numel} elements (wrong param_shapes?)")
    return out


def _zero3_params(param_shapes: list, per_rank_groups: list, world: int,
                  where: str) -> dict[str, ConcatTensor]:
    """Stage 3: each parameter is ``ceil(numel / world)`` elements on every
    rank, at the same offset of each rank's concatenated flat groups."""
    flats = [_Flat(groups, f"{where}: rank {r}") for r, groups in enumerate(per_rank_groups)]
    out: dict[str, ConcatTensor] = {}
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            n = _numel(shape)
            part = math.ceil(n / world)
            ranges: list = []
            left = n * flats[0].dtype.itemsize
            for flat in flats:  # the last rank's piece ends in padding: cut it off
                for source, at, nbytes in flat.ranges(offset, part):
                    take = min(nbytes, left)
                    if take:
                        ranges.append((source, at, take))
                    left -= take
            if offset + part > min(f.numel for f in flats):
                raise FormatError(f"{where}: parameter '{name}' runs past the flat groups")
            out[name] = _tensor(ranges, flats[0].dtype, shape, f"{where}: '{name}'")
            offset += part
    if offset != flats[0].numel:
        raise FormatError(f"{where}: parameters use {offset * world} of "
                          f"{flats[0].numel * world} elements (wrong param_shapes?)")
    return out


def _shapes(value: Any, where: str) -> OrderedDict:
    if not isinstance(value, dict):
        raise FormatError(f"{where}: param shapes are a {type(value).__name__}")
    return OrderedDict((str(k), int_tuple(v, "shape", where)) for k, v in value.items())


def read_deepspeed(path: Path, allow_globals=()) -> Checkpoint:
    folder = find_tag_folder(path)
    where = f"{path.name}" if folder == path else f"{path.name}/{folder.name}"
    optim_files = sorted(folder.glob("*_optim_states.pt"), key=lambda p: _natural(p.name))
    model_files = sorted(folder.glob("*_model_states.pt"), key=lambda p: _natural(p.name))
    if not optim_files or not model_files:
        raise FormatError(f"{where}: no *_optim_states.pt / *_model_states.pt files")
    optims = [_get(_read_state_file(f, allow_globals), "optimizer_state_dict", f.name)
              for f in optim_files]
    stage = _stage(_get(optims[0], "zero_stage", optim_files[0].name), optim_files[0].name)
    world = _get(optims[0], "partition_count", optim_files[0].name)
    if isinstance(world, list):
        world = max(world)
    if world != len(optim_files):
        raise FormatError(f"{where}: partition_count is {world} but there are "
                          f"{len(optim_files)} *_optim_states.pt files (a rank's file missing?)")
    if stage <= 2:
        model_files = [f for f in model_files if f.name == "mp_rank_00_model_states.pt"] or \
            model_files[:1]
    elif len(model_files) != world:
        raise FormatError(f"{where}: ZeRO-3 needs one model states file per rank ({world}), "
                          f"found {len(model_files)}")
    models = [_read_state_file(f, allow_globals) for f in model_files]
    m0 = models[0]
    for key in ("buffer_names", "param_shapes", "module"):
        _get(m0, key, model_files[0].name)
    param_shapes = [_shapes(s, where) for s in m0["param_shapes"]]

    state: OrderedDict = OrderedDict()
    buffer_names = set(m0["buffer_names"])
    for name, ref in m0["module"].items():
        if name in buffer_names and isinstance(ref, TensorRef):
            floating = ref.dtype.name.startswith(("float", "bfloat"))
            state[name] = cast(ref, "float32") if floating else ref
    frozen = m0.get("frozen_param_shapes") or {}
    for name, shape in _shapes(frozen, where).items():
        frags = [(_get(m.get("frozen_param_fragments"), name, f"{where}: frozen fragments"))
                 for m in models]
        if stage <= 2:
            if tuple(frags[0].shape) != shape:
                raise FormatError(f"{where}: frozen '{name}' is {list(frags[0].shape)}, "
                                  f"expected {list(shape)}")
            state[name] = frags[0]
        else:
            flat = _Flat(frags, f"{where}: frozen '{name}'")
            state[name] = _tensor(flat.ranges(0, _numel(shape)), flat.dtype, shape,
                                  f"{where}: frozen '{name}'")
    groups_key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    fp32 = [_get(o, groups_key, f.name) for o, f in zip(optims, optim_files)]
    if stage <= 2:
        def consolidate(groups):
            return _zero2_params(param_shapes, groups,
                                 optims[0].get("param_alignment_paddings"), world, where)
    else:
        def consolidate(groups):
            return _zero3_params(param_shapes, groups, world, where)
    state.update(consolidate(fp32))
    for alias, target in (m0.get("shared_params") or {}).items():
        if target in state:
            state[alias] = state[target]

    names_by_group = [list(s) for s in param_shapes] if stage <= 2 else \
        [[n for s in param_shapes for n in s]]
    tree: dict[str, Any] = {
        "module": state,
        "optimizer": _optimizer_state(optims, fp32, consolidate, names_by_group, stage)}
    tree.update((k, v) for k, v in m0.items() if k not in _OWN_KEYS)
    layout = {"zero_stage": stage, "ranks": world, "tag": folder.name,
              "optim_files": [f.name for f in optim_files],
              "model_files": [f.name for f in model_files],
              "param_groups": len(param_shapes),
              "frozen_params": len(frozen), "shared_params": len(m0.get("shared_params") or {})}
    info = {"layout": (f"DeepSpeed ZeRO stage {stage}, {world} ranks, tag {folder.name}, "
                       f"{len(param_shapes)} param groups, {len(frozen)} frozen, "
                       f"{layout['shared_params']} shared parameters; weights under 'module'"),
            "deepspeed": layout}
    return Checkpoint(tree, {}, "deepspeed", str(path), info)


def _optimizer_state(optims: list, fp32: list, consolidate, names_by_group: list,
                     stage: int) -> dict:
    """The base optimizer's state by parameter name: flat partitions shaped
    like the fp32 groups (exp_avg, exp_avg_sq ...) are cut like the weights;
    other values (``step``) are rank 0's, given to each parameter of their
    group (stage 3's flat sub-groups do not follow parameter boundaries: the
    first sub-group's value). Then ``param_groups`` and the ZeRO optimizer's
    own scalars (loss scaler, clip_grad ...)."""
    inner = "base_optimizer_state" if stage <= 2 else "optimizer_state_dict"
    skip = (inner, "fp32_flat_groups", "single_partition_of_fp32_groups")
    out: dict[str, Any] = {}
    bases = [o.get(inner) for o in optims]
    if all(isinstance(b, dict) and isinstance(b.get("state"), dict) for b in bases):
        per_name: dict[str, dict] = OrderedDict((n, OrderedDict()) for ns in names_by_group
                                                for n in ns)
        first = bases[0]["state"].get(0)
        for key in (k for k in (first or {}) if isinstance(k, str)):
            tensors = [[b["state"].get(g, {}).get(key) for g in range(len(f))]
                       for b, f in zip(bases, fp32)]
            if all(isinstance(t, StoredTensor) and len(t.shape) == 1 and t.numel >= f.numel
                   for row, frow in zip(tensors, fp32) for t, f in zip(row, frow)):
                # (stages 1/2 drop the last rank's padding from the fp32
                # partition but may keep it in the state: cut it off here)
                trimmed = [[StoredTensor(t.dtype, (f.numel,), t.source, t.offset)
                            for t, f in zip(row, frow)] for row, frow in zip(tensors, fp32)]
                for name, ref in consolidate(trimmed).items():
                    per_name[name][key] = ref
            else:
                for g, names in enumerate(names_by_group):
                    for name in names:
                        per_name[name][key] = bases[0]["state"].get(g, {}).get(key)
        out["state"] = per_name
        out["param_groups"] = bases[0].get("param_groups")
    out.update((k, v) for k, v in optims[0].items() if k not in skip)
    return out


class DeepSpeedAdapter(Adapter):
    name = "deepspeed"

    def read(self, path: Path, allow_globals=(), **options) -> Checkpoint:
        return read_deepspeed(as_path(path), allow_globals or ())

    def layout(self, ckpt: Checkpoint) -> dict:
        return dict(ckpt.info.get("deepspeed", {}))

