"""``load_into``: load what fits of a checkpoint into a torch module, and say what did not.

The counterpart of ``module.load_state_dict(torch's loader on path ["model_state"],
strict=False)`` that works on any format ckptconv reads, never runs a pickle,
finds the weights inside a training checkpoint on its own, loads only the
keys whose name and shape fit (instead of failing on the first size
mismatch), and reports ``loaded`` / ``missing`` / ``unexpected`` /
``mismatched``. Files saved on a GPU load on a CPU-only machine: the torch
reader records the location tag and never acts on it.

Where the weights are. Every dict in the checkpoint tree that holds tensors
is a candidate (the root too); the one whose names and shapes fit the
module's state dict best wins, ties going to the usual names (``state_dict``,
``model``, ``model_state``, ``model_state_dict``, ``module``, ``net``) and then
to the shallower one. When every key of a candidate starts with the same
segment that the module lacks (``module.`` of DataParallel, ``_orig_mod.`` of
torch.compile), the variant without it is a candidate too. ``select=``
names the subtree and skips the search.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import MappingError
from ..reports import Report
from ..tensor import TensorRef
from ..tree import Checkpoint, join_path
from .torch_fill import Filler, TorchMaterializer, gc_paused, torch_device

PREFERRED = ("state_dict", "model", "model_state", "model_state_dict", "module", "net")
BATCH_BYTES = 64 << 20  # mapped tensors handed to load_state_dict at a time (hooked modules)


@dataclass
class LoadReport(Report):
    """What ``load_into`` loaded, and what it did not (missing, unexpected, mismatched)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # in the module, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)    # in the checkpoint, not in the module
    mismatched: list[dict] = field(default_factory=list)   # {"name", "checkpoint", "model"} shapes
    source_subtree: str = ""                               # "" = the checkpoint's root
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"loaded": self.loaded, "missing": self.missing, "unexpected": self.unexpected,
                "mismatched": self.mismatched, "source_subtree": self.source_subtree,
                "notes": self.notes}

    def __str__(self) -> str:
        where = f"'{self.source_subtree}'" if self.source_subtree else "the root"
        lines = [f"loaded {len(self.loaded)} tensors from {where}: {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched"]
        if self.missing:
            lines.append(f"  missing: {_few(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected: {_few(self.unexpected)}")
        for m in self.mismatched[:8]:
            lines.append(f"  mismatched: {m['name']}: checkpoint {m['checkpoint']}, model {m['model']}")
        if len(self.mismatched) > 8:
            lines.append(f"  ... and {len(self.mismatched) - 8} more mismatched")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _few(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f" ... (+{len(names) - n})" if len(names) > n else "")


@dataclass
class _Candidate:
    """A subtree that may hold the module's weights, with how well it fits."""

    path: tuple
    ck: Checkpoint
    strip: str = ""          # a leading "prefix." removed from every name
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    fit: int = 0             # names with the right shape
    named: int = 0           # names the module has

    @property
    def label(self) -> str:
        return join_path(self.path)

    def rank(self) -> tuple:
        last = str(self.path[-1]) if self.path else ""
        pref = PREFERRED.index(last) if last in PREFERRED else len(PREFERRED)
        return (-self.fit, -self.named, pref, len(self.path), bool(self.strip))


def _subtrees(tree, path=(), depth: int = 4):
    """Dicts (and the root) that hold tensors somewhere below, with their paths."""
    if isinstance(tree, dict):
        yield path, tree
        if depth:
            for k, v in tree.items():
                if isinstance(v, (dict, list, tuple)):
                    yield from _subtrees(v, path + (k,), depth - 1)
    elif isinstance(tree, (list, tuple)) and depth:
        for i, v in enumerate(tree):
            if isinstance(v, (dict, list, tuple)):
                yield from _subtrees(v, path + (i,), depth - 1)


def _strip_prefix(tensors: dict[str, TensorRef]) -> tuple[str, dict[str, TensorRef]] | None:
    firsts = {n.split(".", 1)[0] for n in tensors}
    if len(firsts) != 1 or any("." not in n for n in tensors):
        return None
    (p,) = firsts
    return p, {n[len(p) + 1:]: r for n, r in tensors.items()}


def _score(c: _Candidate, expected: dict[str, tuple]) -> None:
    c.named = sum(1 for n in c.tensors if n in expected)
    c.fit = sum(1 for n, r in c.tensors.items() if expected.get(n) == tuple(r.shape))


def find_weights(ck: Checkpoint, expected: dict[str, tuple], mapping=None,
                 select: str | None = None) -> tuple[_Candidate, list[str]]:
    """The subtree of ``ck`` that fits ``expected`` (name -> shape) best."""
    notes: list[str] = []
    if select is not None:
        sub = ck.select(select)
        raw = [_Candidate(tuple(select.split(".")) if select else (), sub)]
    else:
        raw = []
        for path, node in _subtrees(ck.tree):
            sub = Checkpoint(node, dict(ck.metadata), ck.format, ck.path, dict(ck.info))
            raw.append(_Candidate(path, sub))
    cands: list[_Candidate] = []
    for c in raw:
        try:
            mapped = mapping.apply(c.ck) if mapping is not None else c.ck
            c.tensors = mapped.tensors()
        except MappingError:
            if select is not None or not c.path:
                raise
            continue
        if not c.tensors:
            continue
        c.ck = mapped
        _score(c, expected)
        cands.append(c)
        stripped = _strip_prefix(c.tensors)
        if stripped is not None and stripped[0] not in {n.split(".", 1)[0] for n in expected}:
            s = _Candidate(c.path, mapped, stripped[0] + ".", stripped[1])
            _score(s, expected)
            if s.fit > c.fit:
                cands.append(s)
    if not cands:
        raise MappingError(f"{_display(ck)}: no tensors"
                           + (f" under '{select}'" if select else " in the checkpoint"))
    cands.sort(key=_Candidate.rank)
    best = cands[0]
    if select is None and len(cands) > 1:
        notes.append(f"weights found under {best.label and repr(best.label) or 'the root'} "
                     f"({best.fit} of {len(expected)} module keys fit)")
    if best.strip:
        notes.append(f"removed the prefix '{best.strip}' from every key")
    return best, notes


def _display(ck: Checkpoint) -> str:
    return os.path.basename(str(ck.path)) if ck.path else "checkpoint"


def load_into(module, ck: Checkpoint, mapping=None, strict: bool = False, device=None,
              select: str | None = None) -> LoadReport:
    """Load every tensor of ``ck`` whose name and shape fit ``module``; report the
    rest. ``strict`` raises (and loads nothing) unless everything fits.

    The bytes go from the file into the parameters' own memory (``torch_fill``)
    for every parameter and buffer whose module loads the plain way; then
    ``module.load_state_dict`` runs with those very tensors, so that modules'
    hooks run and see the values (``copy_`` of a tensor onto its own memory
    returns at once) -- when there is code to run (a load post-hook, an
    overridden ``load_state_dict``); else the copies onto themselves are skipped. Tensors of modules with their own loading code (a
    ``_load_from_state_dict`` override, a load pre-hook) are handed to
    ``load_state_dict`` as views of the mapped file, ``BATCH_BYTES`` at a time.
    """
    if device is not None:
        device = torch_device(device)
    state = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    best, notes = find_weights(ck, expected, mapping, select)
    tensors = best.tensors
    report = LoadReport(source_subtree=best.label, notes=notes)
    for name in expected:
        ref = tensors.get(name)
        if ref is None:
            report.missing.append(name)
        elif tuple(ref.shape) != expected[name]:
            report.mismatched.append({"name": name, "checkpoint": list(ref.shape),
                                      "model": list(expected[name])})
        else:
            report.loaded.append(name)
    report.unexpected = [n for n in tensors if n not in expected]
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise MappingError(
            f"{_display(ck)}: strict load into {type(module).__name__} failed: "
            + "; ".join(f"{len(v)} {k} ({_few([x['name'] if isinstance(x, dict) else x for x in v], 3)})"
                        for k, v in (("missing", report.missing), ("unexpected", report.unexpected),
                                     ("mismatched", report.mismatched)) if v))
    if device is not None:
        module.to(device)
        state = module.state_dict()
    with gc_paused():
        _fill_and_load(module, state, tensors, report.loaded, plain_loading_names(module, state))
    if device is not None:
        report.notes.append(f"module moved to {device}")
    return report


def _fill_and_load(module, state: dict, tensors: dict, names: list[str], plain: set[str]) -> None:
    """Bytes into the memory of the ``plain`` names, then ``load_state_dict`` with
    them and with mapped views of the others (``BATCH_BYTES`` at a time)."""
    import torch

    direct = [n for n in names if n in plain]
    with torch.no_grad(), Filler() as filler:
        filled = set()
        for name in direct:
            t = state[name]
            if t.data_ptr() in filled:   # a tied parameter's second name: after the first,
                filler.wait()            # as load_state_dict's copies go one after another
            filled.add(t.data_ptr())
            filler.fill(t, tensors[name])
    # load_state_dict with the filled tensors only copies each onto itself, unless
    # something is there to run: skipped then (torch's recursion filters the whole
    # dict at every module with children: quadratic for 50,000 one-tensor modules)
    batch = {name: state[name] for name in direct} if _runs_loading_code(module) else {}
    size = 0
    materialize = TorchMaterializer(mmap=True)
    for name in names:
        if name in plain:
            continue
        batch[name] = materialize(tensors[name])
        size += tensors[name].nbytes
        if size >= BATCH_BYTES:
            _load_batch(module, batch)
            batch, size, materialize = {}, 0, TorchMaterializer(mmap=True)
    if batch:
        _load_batch(module, batch)


def _runs_loading_code(module) -> bool:
    """Whether ``module.load_state_dict`` would run code of its own beyond the plain
    loaders' copies: an overridden ``load_state_dict``, or a load post-hook anywhere."""
    import torch

    return type(module).load_state_dict is not torch.nn.Module.load_state_dict or \
        any(m._load_state_dict_post_hooks for m in module.modules())


# Loaders that only copy the tensor of each name into the parameter or buffer
# of that name (``_NormBase`` adds a missing ``num_batches_tracked`` first).
def _plain_loaders():
    import torch

    return {torch.nn.Module._load_from_state_dict,
            torch.nn.modules.batchnorm._NormBase._load_from_state_dict}


def plain_loading_names(module, state: dict) -> set[str]:
    """Names of ``state`` that ``load_state_dict`` would only ``copy_`` into the
    tensor ``state`` holds: dense tensors of modules with the plain loader and no
    load pre-hook on them or on a module above them."""
    import torch

    plain = _plain_loaders()
    owners: dict[str, bool] = {}

    def walk(m, prefix: str, ok: bool) -> None:
        ok = ok and not m._load_state_dict_pre_hooks and \
            type(m)._load_from_state_dict in plain
        owners[prefix] = ok
        for name, child in m._modules.items():
            if child is not None:
                walk(child, f"{prefix}{name}.", ok)

    walk(module, "", True)
    out = set()
    for name, t in state.items():
        prefix = name[:name.rfind(".") + 1]
        if owners.get(prefix) and type(t) is torch.Tensor and t.layout == torch.strided \
                and not t.is_meta:
            out.add(name)
    return out


def _load_batch(module, batch: dict) -> None:
    # load_state_dict (not param.copy_) so that modules' own loading hooks run;
    # it casts to the parameter's dtype and copies across devices.
    result = module.load_state_dict(batch, strict=False)
    if result.unexpected_keys:  # names we checked against state_dict(): cannot happen
        raise MappingError(f"load_state_dict did not take {', '.join(result.unexpected_keys[:3])}")
