"""``ckptconv diff A B``: keys, shapes, dtypes and values of two checkpoints,
and ``--suggest``: DSL rules that map A's names onto B's.

Values are compared in bounded chunks streamed from both files (a tensor is
never loaded whole): the largest absolute difference and the largest relative
one, ``|a - b| / max(|a|, |b|)``, with NaNs in the same places counting as
equal. Tensors that are the same bytes of the same file are equal unread.

Suggestions pair the names only in A with the names only in B:

1. fused / split tensors: sibling names in A (``...q.weight``, ``...k.weight``,
   ``...v.weight``) whose sizes along one dimension add up to one tensor of B
   (``...qkv.weight``) become ``concat``, and the other way round ``split``;
2. one-to-one pairs by shape (the same, transposed, permuted, or only the same
   number of elements), by equal values where both are small enough to hash,
   and by name similarity (word tokens with abbreviations, ``attn`` ~
   ``attention``, numbers that must agree), greedily, best first, ties going to
   the pair at the same relative place in both files;
3. the pairs are written as rules, numbers turned into captures
   (``blocks.{i}.attn.q.weight -> layers.{i}.attention.q.weight``), then rules
   that differ only in their last segment merged; the rule set is verified by
   applying it to A, and generalisations that go wrong are replaced by
   literal rules.

The suggestion is a rules file ``convert --map`` and ``load_into`` accept; the
diff summary rides along as ``#`` comments.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .. import dtypes as _dt
from ..errors import CkptconvError, UsageError
from ..tensor import CHUNK_BYTES, TensorRef
from ..reports import Report
from ..tree import Checkpoint, children, join_path

HASH_LIMIT = 64 << 20          # hash tensors up to this size for value matching
HASH_BUDGET = 2 << 30          # and at most this much in all


# --- value comparison ------------------------------------------------------------------

def iter_elements(ref: TensorRef, count: int) -> Iterator[np.ndarray]:
    """The elements of ``ref`` in row-major order, ``count`` at a time."""
    npdt = _dt.numpy_dtype(ref.dtype)
    size = npdt.itemsize
    want = count * size
    buf = bytearray()
    for chunk in ref.iter_bytes(max(want, size)):
        buf += chunk
        while len(buf) >= want:
            yield np.frombuffer(bytes(buf[:want]), dtype=npdt)
            del buf[:want]
    if buf:
        if len(buf) % size:
            raise CkptconvError(f"tensor bytes end inside an element ({len(buf)} bytes left)")
        yield np.frombuffer(bytes(buf), dtype=npdt)


def _as_number(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "c":
        return x.astype(np.complex128)
    return x.astype(np.float64)


@dataclass
class ValueDiff:
    identical: bool
    max_abs: float = 0.0
    max_rel: float = 0.0


def _same_bytes_in_file(a: TensorRef, b: TensorRef) -> bool:
    sa, sb = a.file_span(), b.file_span()
    if sa is None or sb is None:
        return False
    try:
        return (os.path.samefile(sa[0].path, sb[0].path) and sa[1:] == sb[1:])
    except OSError:
        return False


def compare_values(a: TensorRef, b: TensorRef, chunk_elements: int | None = None) -> ValueDiff:
    """Streamed comparison of two tensors with the same number of elements."""
    if a is b or (a.dtype == b.dtype and a.shape == b.shape and _same_bytes_in_file(a, b)):
        return ValueDiff(True)
    if a.numel != b.numel:
        raise CkptconvError(f"cannot compare {a.numel} with {b.numel} elements")
    if chunk_elements is None:
        chunk_elements = max(1, CHUNK_BYTES // max(a.dtype.itemsize, b.dtype.itemsize, 8))
    identical = a.dtype == b.dtype
    max_abs = max_rel = 0.0
    for xa, xb in zip(iter_elements(a, chunk_elements), iter_elements(b, chunk_elements)):
        if identical and xa.tobytes() != xb.tobytes():
            identical = False
        if xa.dtype == np.bool_ or xb.dtype == np.bool_:
            xa, xb = xa.astype(np.int8), xb.astype(np.int8)
        fa, fb = _as_number(xa), _as_number(xb)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(fa - fb)
            both_nan = np.isnan(fa) & np.isnan(fb)
            same_inf = (fa == fb)
            diff = np.where(both_nan | same_inf, 0.0, diff)
            diff = np.where(np.isnan(diff), np.inf, diff)
            scale = np.maximum(np.abs(fa), np.abs(fb))
            rel = np.where(diff == 0, 0.0, diff / np.where(scale == 0, 1.0, scale))
        if diff.size:
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float(np.nan_to_num(rel, nan=np.inf).max()))
    if identical:
        return ValueDiff(True)
    return ValueDiff(max_abs == 0 and a.dtype == b.dtype, max_abs, max_rel)


# --- the report ------------------------------------------------------------------------

@dataclass
class DiffReport(Report):
    a: str
    b: str
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    shape_mismatch: list[dict] = field(default_factory=list)   # {"name", "a", "b"}
    dtype_mismatch: list[dict] = field(default_factory=list)   # {"name", "a", "b"}
    value_diffs: list[dict] = field(default_factory=list)      # {"name", "max_abs", "max_rel"}
    identical: int = 0
    compared: int = 0
    mapping: dict | None = None
    suggestion: str | None = None
    exit_code: int = 0
    # non-tensor leaves and metadata: {"path", "a", "b"}; a side that lacks it is absent
    values: list[dict] | None = None
    metadata: list[dict] | None = None
    values_compared: int = 0
    tensors_compared: bool = True

    def to_dict(self) -> dict:
        keys = ["a", "b"]
        if self.tensors_compared:
            keys += ["only_a", "only_b", "shape_mismatch", "dtype_mismatch", "value_diffs",
                     "identical", "compared"]
        if self.values is not None:
            keys += ["values", "metadata", "values_compared"]
        d = {k: getattr(self, k) for k in keys + ["mapping"]}
        if self.suggestion is not None:
            d["suggestion"] = self.suggestion
        return d

    def summary_lines(self) -> list[str]:
        lines = [f"A: {self.a}", f"B: {self.b}"]
        if self.tensors_compared:
            lines += self._tensor_lines()
        if self.values is not None:
            lines += self._value_lines()
        return lines

    def _value_lines(self) -> list[str]:
        changed = sum("a" in e and "b" in e for e in self.values)
        only_a = sum("b" not in e for e in self.values)
        lines = [f"{self.values_compared} non-tensor values compared: {changed} differ, "
                 f"{only_a} only in A, {len(self.values) - changed - only_a} only in B; "
                 f"{len(self.metadata)} metadata differences"]
        for kind, entries in (("value", self.values), ("metadata", self.metadata)):
            for e in entries:
                if "a" in e and "b" in e:
                    lines.append(f"{kind}: {e['path']}: {_show(e['a'])} -> {_show(e['b'])}")
                else:
                    side = "A" if "a" in e else "B"
                    lines.append(f"only in {side} ({kind}): {e['path']} = "
                                 f"{_show(e[side.lower()])}")
        return lines

    def _tensor_lines(self) -> list[str]:
        lines = [f"{self.compared} shared tensors compared: {self.identical} identical, "
                 f"{len(self.value_diffs)} differ in value, {len(self.shape_mismatch)} in shape, "
                 f"{len(self.dtype_mismatch)} in dtype; {len(self.only_a)} only in A, "
                 f"{len(self.only_b)} only in B"]
        for n in self.only_a:
            lines.append(f"only in A: {n}")
        for n in self.only_b:
            lines.append(f"only in B: {n}")
        for m in self.shape_mismatch:
            lines.append(f"shape: {m['name']}: {m['a']} vs {m['b']}")
        for m in self.dtype_mismatch:
            lines.append(f"dtype: {m['name']}: {m['a']} vs {m['b']}")
        for v in self.value_diffs:
            line = f"value: {v['name']}: max abs {v['max_abs']:.6g}, max rel {v['max_rel']:.6g}"
            if "a_values" in v:  # a small tensor (a normalisation mean/std): its values
                line += f" ({_show(v['a_values'])} -> {_show(v['b_values'])})"
            lines.append(line)
        return lines

    def __str__(self) -> str:
        if self.suggestion is None:
            return "\n".join(self.summary_lines())
        head = ["# ckptconv diff --suggest: rules mapping A's names onto B's"]
        head += ["# " + line for line in self.summary_lines()]
        return "\n".join(head) + "\n\n" + self.suggestion.rstrip("\n")


def _open(x) -> tuple[Checkpoint, str]:
    if isinstance(x, Checkpoint):
        return x, str(x.path or "<checkpoint>")
    from ..registry import read_checkpoint as load

    return load(x), str(x)


def diff(path_a, path_b, mapping=None, suggest: bool = False, tensors: bool = True,
         values: bool = True) -> DiffReport:
    """Compare two checkpoints (paths or Checkpoints); ``mapping`` is applied to A.

    ``tensors``: names, shapes, dtypes and values of the tensors; ``values``: the
    non-tensor leaves (epoch, hyper-parameters, constants) and metadata, path by path.
    """
    if not (tensors or values):
        raise UsageError("diff: compare tensors, values or both (not neither)")
    ck_a, name_a = _open(path_a)
    ck_b, name_b = _open(path_b)
    report = DiffReport(name_a, name_b)
    if mapping is not None:
        from ..mapping import resolve_mapping

        mapping = resolve_mapping(mapping)
        ck_a = mapping.apply(ck_a)
        report.mapping = mapping.report.to_dict()
    if values:
        _diff_values(ck_a, ck_b, report)
    report.tensors_compared = tensors
    if tensors:
        _diff_tensors(ck_a.tensors(), ck_b.tensors(), report)
    if suggest:
        report.suggestion = suggest_rules(ck_a.tensors(), ck_b.tensors()).text
    return report


def _diff_tensors(ta: dict[str, TensorRef], tb: dict[str, TensorRef], report: DiffReport) -> None:
    report.only_a = [n for n in ta if n not in tb]
    report.only_b = [n for n in tb if n not in ta]
    for n, ra in ta.items():
        rb = tb.get(n)
        if rb is None:
            continue
        report.compared += 1
        if ra.dtype != rb.dtype:
            report.dtype_mismatch.append({"name": n, "a": ra.dtype.name, "b": rb.dtype.name})
        if ra.shape != rb.shape:
            report.shape_mismatch.append({"name": n, "a": list(ra.shape), "b": list(rb.shape)})
            continue
        if ra.dtype.numpy is None or rb.dtype.numpy is None:
            same = ra.tobytes() == rb.tobytes()
            if same and ra.dtype == rb.dtype:
                report.identical += 1
            elif not same:
                report.value_diffs.append({"name": n, "max_abs": math.inf, "max_rel": math.inf})
            continue
        v = compare_values(ra, rb)
        if v.identical:
            report.identical += 1
        elif v.max_abs or ra.dtype == rb.dtype:
            entry = {"name": n, "max_abs": v.max_abs, "max_rel": v.max_rel}
            if ra.numel <= SMALL_TENSOR:
                entry["a_values"] = _plain(ra.numpy().tolist())
                entry["b_values"] = _plain(rb.numpy().tolist())
            report.value_diffs.append(entry)


# --- non-tensor values -------------------------------------------------------------------

SMALL_TENSOR = 16       # differing tensors this small show their values (mean/std, class weights)
SHORT_LIST = 64         # a list of this many scalars or fewer is one value (mean = [0.485, ...])
_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def value_leaves(tree, path: tuple = ()) -> Iterator[tuple[str, object]]:
    """(dotted path, value) for every non-tensor leaf; short lists of scalars are one leaf."""
    if isinstance(tree, TensorRef):
        return
    if isinstance(tree, (list, tuple)) and 0 < len(tree) <= SHORT_LIST and \
            all(isinstance(x, _SCALARS) or _is_np_scalar(x) for x in tree):
        yield join_path(path), tree
        return
    kids = list(children(tree))
    if not kids:  # a scalar, an inert record, an empty container
        yield join_path(path), tree
        return
    for k, v in kids:
        yield from value_leaves(v, path + (k,))


def _is_np_scalar(x) -> bool:
    return type(x).__module__ == "numpy" and hasattr(x, "item") and getattr(x, "ndim", 1) == 0


def _plain(x):
    """A JSON-able form of a leaf value, keeping its type visible."""
    if _is_np_scalar(x):
        x = x.item()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return repr(x)


def _same_value(a, b) -> bool:
    if _is_np_scalar(a) or _is_np_scalar(b):
        a, b = (v.item() if _is_np_scalar(v) else v for v in (a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_value, a, b))
    if type(a) is not type(b):
        return False  # 3 vs 3.0, True vs 1: a change of type is a difference
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot compare are shown as their reprs
        return repr(a) == repr(b)


def _diff_entries(va: dict, vb: dict, report_to: list[dict]) -> int:
    for path in list(va) + [p for p in vb if p not in va]:
        if path not in vb:
            report_to.append({"path": path, "a": _plain(va[path])})
        elif path not in va:
            report_to.append({"path": path, "b": _plain(vb[path])})
        elif not _same_value(va[path], vb[path]):
            report_to.append({"path": path, "a": _plain(va[path]), "b": _plain(vb[path])})
    return len(set(va) | set(vb))


def _diff_values(ck_a: Checkpoint, ck_b: Checkpoint, report: DiffReport) -> None:
    report.values, report.metadata = [], []
    va, vb = dict(value_leaves(ck_a.tree)), dict(value_leaves(ck_b.tree))
    report.values_compared = _diff_entries(va, vb, report.values)
    _diff_entries(dict(ck_a.metadata), dict(ck_b.metadata), report.metadata)


def _show(x) -> str:
    text = repr(x) if isinstance(x, str) else str(x)
    return text if len(text) <= 120 else text[:117] + "..."


# --- suggestions -----------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+|[A-Z]+")


def _segments(name: str) -> list[str]:
    return [s for s in re.split(r"[./]", name) if s]


def _tokens(name: str) -> list[str]:
    out = []
    for seg in _segments(name):
        out += [t.lower() for t in _TOKEN.findall(seg)]
    return out


def _numbers(name: str) -> list[str]:
    return re.findall(r"\d+", name)


def _word_sim(x: str, y: str) -> float:
    if x == y:
        return 1.0
    if len(x) >= 2 and len(y) >= 2 and (x.startswith(y) or y.startswith(x)):
        return 0.85  # attn ~ attention, emb ~ embedding
    # abbreviations: every letter of the short one in order in the long one, same first letter
    s, t = (x, y) if len(x) <= len(y) else (y, x)
    if len(s) >= 2 and s[0] == t[0]:
        it = iter(t)
        if all(ch in it for ch in s):
            return 0.7  # ln ~ layernorm, proj ~ projection
    return difflib.SequenceMatcher(None, x, y).ratio() * 0.6


def name_similarity(a: str, b: str) -> float:
    """0..1: how alike two tensor names are (numbers must agree)."""
    if _numbers(a) != _numbers(b):
        return 0.0
    ta = [t for t in _tokens(a) if not t.isdigit()]
    tb = [t for t in _tokens(b) if not t.isdigit()]
    if not ta or not tb:
        return 0.5 if ta == tb else 0.0

    def directed(x, y):
        return sum(max(_word_sim(u, v) for v in y) for u in x) / len(x)

    score = (directed(ta, tb) + directed(tb, ta)) / 2
    la, lb = _segments(a)[-1], _segments(b)[-1]
    if re.sub(r"\d+", "", la) != re.sub(r"\d+", "", lb):
        score *= 0.5  # weight vs bias: almost never the same tensor
    return score


def _shape_transforms(sa: tuple, sb: tuple) -> list[list[str]]:
    """Transform chains that turn shape ``sa`` into ``sb`` (best first)."""
    if sa == sb:
        return [[]]
    if len(sa) == len(sb) and sorted(sa) == sorted(sb):
        if len(sa) == 2:
            return [["transpose"]]
        perms = [p for p in itertools.permutations(range(len(sa)))
                 if tuple(sa[i] for i in p) == tuple(sb)]
        if perms:
            return [[f"permute({', '.join(map(str, p))})"] for p in perms]
    if math.prod(sa) == math.prod(sb):
        return [[f"reshape({', '.join(map(str, sb))})"]]
    return []


def _content_key(ref: TensorRef, budget: list[int]) -> str | None:
    if ref.nbytes > HASH_LIMIT or ref.nbytes > budget[0] or ref.numel < 2:
        return None
    budget[0] -= ref.nbytes
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{ref.dtype.name}".encode())
    for chunk in ref.iter_bytes():
        h.update(chunk)
    return h.hexdigest()


def _unique_content_keys(names: list[str], tensors, budget: list[int]) -> dict[str, str | None]:
    """Content hashes, kept only where unique on their side: equal values are
    evidence of a pair only when they single one tensor out (not all-ones)."""
    keys = {n: _content_key(tensors[n], budget) for n in names}
    counts: dict[str, int] = {}
    for k in keys.values():
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    return {n: k if k is not None and counts[k] == 1 else None for n, k in keys.items()}


@dataclass
class _Pair:
    a: list[str]
    b: list[str]
    transforms: list[str]
    score: float = 0.0


@dataclass
class Suggestion:
    text: str
    pairs: list[_Pair]
    unmatched_a: list[str]
    unmatched_b: list[str]


def _find_fused(only_a: list[str], only_b: list[str], ta, tb, used_a: set, used_b: set,
                many: str) -> list[_Pair]:
    """Groups of sibling tensors on the ``many`` side that make one tensor on
    the other side when concatenated."""
    pairs = []
    many_names, one_names = (only_a, only_b) if many == "a" else (only_b, only_a)
    many_t, one_t = (ta, tb) if many == "a" else (tb, ta)
    used_many, used_one = (used_a, used_b) if many == "a" else (used_b, used_a)
    # siblings: names that differ in exactly one segment
    groups: dict[tuple, list[str]] = {}
    for n in many_names:
        segs = _segments(n)
        for i in range(len(segs)):
            key = (i, tuple(segs[:i]), tuple(segs[i + 1:]))
            groups.setdefault(key, []).append(n)
    for one in one_names:
        if one in used_one:
            continue
        ro = one_t[one]
        best = None
        for (i, pre, post), names in groups.items():
            names = [n for n in names if n not in used_many]
            if len(names) < 2 or len(names) > 8:
                continue
            names = [n for n in names if many_t[n].dtype == ro.dtype
                     and len(many_t[n].shape) == len(ro.shape)]
            for d in range(len(ro.shape)):
                fit = [n for n in names if many_t[n].shape[:d] == ro.shape[:d]
                       and many_t[n].shape[d + 1:] == ro.shape[d + 1:]]
                # subsets (in file order) whose sizes along d add up
                for k in range(2, min(len(fit), 6) + 1):
                    for combo in itertools.combinations(fit, k):
                        if sum(many_t[n].shape[d] for n in combo) != ro.shape[d]:
                            continue
                        # the group's name: the differing segments run together ("q"+"k"+"v")
                        parts = [_segments(n)[i] for n in combo]
                        joined = ".".join(list(pre) + ["".join(parts)] + list(post))
                        score = name_similarity(joined, one)
                        if best is None or score > best[0]:
                            best = (score, list(combo), parts, d)
        if best is None or best[0] < 0.3:
            continue
        score, names, parts, d = best
        # order: as the fused name spells them ("qkv"), else as listed
        seg = _segments(one)
        pos = []
        for p in parts:
            where = [s.lower().find(p.lower()) for s in seg if p.lower() in s.lower()]
            pos.append(where[0] if where else -1)
        if all(x >= 0 for x in pos) and len(set(pos)) == len(pos):
            names = [n for _, n in sorted(zip(pos, names))]
        used_many.update(names)
        used_one.add(one)
        if many == "a":
            pairs.append(_Pair(names, [one], [f"concat({d})"], score))
        else:
            sizes = [tb[n].shape[d] for n in names]
            arg = f"split({d})" if len(set(sizes)) == 1 else f"split({d}, [{', '.join(map(str, sizes))}])"
            pairs.append(_Pair([one], names, [arg], score))
    return pairs


def suggest_rules(ta: dict[str, TensorRef], tb: dict[str, TensorRef]) -> Suggestion:
    """DSL rules that map the names of ``ta`` onto those of ``tb``."""
    only_a = [n for n in ta if n not in tb]
    only_b = [n for n in tb if n not in ta]
    pairs: list[_Pair] = []
    # shared names whose layout changed
    for n in ta:
        if n in tb and ta[n].shape != tb[n].shape:
            chains = _shape_transforms(ta[n].shape, tb[n].shape)
            if chains:
                pairs.append(_Pair([n], [n], chains[0], 1.0))
    used_a: set[str] = set()
    used_b: set[str] = set()
    pairs += _find_fused(only_a, only_b, ta, tb, used_a, used_b, many="a")
    pairs += _find_fused(only_a, only_b, ta, tb, used_a, used_b, many="b")
    # one-to-one
    budget = [HASH_BUDGET]
    rest_a = [n for n in only_a if n not in used_a]
    rest_b = [n for n in only_b if n not in used_b]
    keys_a = _unique_content_keys(rest_a, ta, budget)
    keys_b = _unique_content_keys(rest_b, tb, budget)
    pos_a = {n: i / max(len(rest_a) - 1, 1) for i, n in enumerate(rest_a)}
    pos_b = {n: i / max(len(rest_b) - 1, 1) for i, n in enumerate(rest_b)}
    cands = []
    for a in rest_a:
        for b in rest_b:
            chains = _shape_transforms(ta[a].shape, tb[b].shape)
            if not chains:
                continue
            sim = name_similarity(a, b)
            same_values = keys_a[a] is not None and keys_a[a] == keys_b[b]
            if sim < 0.3 and not same_values:
                continue
            chain = chains[0]
            score = sim + (10.0 if same_values else 0.0)
            score += 0.1 if not chain else 0.05 if not chain[0].startswith("reshape") else 0.0
            score -= 0.2 * abs(pos_a[a] - pos_b[b])
            cands.append((score, a, b, chain))
    cands.sort(key=lambda c: -c[0])
    for score, a, b, chain in cands:
        if a in used_a or b in used_b:
            continue
        used_a.add(a)
        used_b.add(b)
        pairs.append(_Pair([a], [b], chain, score))
    unmatched_a = [n for n in only_a if n not in used_a]
    unmatched_b = [n for n in only_b if n not in used_b]
    text = _write_rules(pairs, ta, tb, unmatched_a, unmatched_b)
    return Suggestion(text, pairs, unmatched_a, unmatched_b)


# --- from pairs to rules ------------------------------------------------------------------------

_CAP_NAMES = "ijklmn"


def _literal_rule(p: _Pair) -> str:
    return _rule_text(p.a, p.b, p.transforms)


def _rule_text(src: list[str], dst: list[str], transforms: list[str]) -> str:
    text = f"{', '.join(src)} -> {', '.join(dst)}"
    return text + "".join(f" | {t}" for t in transforms)


def _generalize(p: _Pair) -> tuple[str, str] | None:
    """The pair with its numbers as captures: (rule text, key for merging)."""
    names = p.a + p.b
    nums = [_numbers(n) for n in names]
    if any(x != nums[0] for x in nums) or not nums[0] or len(nums[0]) > len(_CAP_NAMES):
        return None
    caps = _CAP_NAMES[:len(nums[0])]

    def sub(name: str) -> str:
        it = iter(caps)
        return re.sub(r"\d+", lambda m: "{" + next(it) + "}", name)

    src = [sub(n) for n in p.a]
    dst = [sub(n) for n in p.b]
    text = _rule_text(src, dst, p.transforms)
    return text, text


def _merge_leaves(rules: list[str]) -> list[str]:
    """Rules equal but for the same last segment on both sides -> one rule with {leaf}."""
    shape = re.compile(r"^(?P<s>[^,]*[./])(?P<l1>[A-Za-z_]\w*) -> (?P<t>[^,|]*[./])(?P<l2>[A-Za-z_]\w*)(?P<tr>( \|.*)?)$")
    groups: dict[tuple, list[str]] = {}
    order: list = []
    for r in rules:
        m = shape.match(r)
        if m and m.group("l1") == m.group("l2") and "{leaf}" not in r:
            key = (m.group("s"), m.group("t"), m.group("tr"))
            if key not in groups:
                order.append(key)
            groups.setdefault(key, []).append(r)
        else:
            order.append(r)
    out = []
    for item in order:
        if isinstance(item, str):
            out.append(item)
        elif len(groups[item]) == 1:
            out.append(groups[item][0])
        else:
            s, t, tr = item
            out.append(f"{s}{{leaf}} -> {t}{{leaf}}{tr}")
    return out


def _verify(text: str, pairs: list[_Pair], ta, tb) -> bool:
    from ..mapping import Mapping

    try:
        m = Mapping.parse(text, "<suggested>")
        out = m.apply(Checkpoint(dict(ta))).tensors()
    except CkptconvError:
        return False
    for p in pairs:
        for b in p.b:
            r = out.get(b)
            if r is None or r.shape != tb[b].shape:
                return False
    produced = set(out) - set(ta)
    for n in produced:
        if n in tb and out[n].shape != tb[n].shape:
            return False
    wanted = {b for p in pairs for b in p.b}
    stray = [n for n in produced if n not in wanted]
    paired = {a for p in pairs for a in p.a}
    kept = all(n in out and out[n].shape == r.shape
               for n, r in ta.items() if n in tb and n not in paired)
    return kept and not stray and all(n in out for n in wanted)


def _write_rules(pairs: list[_Pair], ta, tb, unmatched_a, unmatched_b) -> str:
    literal = [_literal_rule(p) for p in pairs if p.a != p.b or p.transforms]
    general: list[str] = []
    for p in pairs:
        if p.a == p.b and not p.transforms:
            continue
        g = _generalize(p)
        general.append(g[0] if g else _literal_rule(p))
    general = list(dict.fromkeys(general))
    candidates = [_merge_leaves(general), general, literal]
    body = literal
    for rules in candidates:
        text = "".join(r + "\n" for r in rules)
        if _verify(text, pairs, ta, tb):
            body = rules
            break
    lines = body[:]
    if unmatched_a:
        lines.append("")
        lines.append(f"# only in A, no counterpart found ({len(unmatched_a)}); kept as they are:")
        lines += [f"#   {n} {list(ta[n].shape)}" for n in unmatched_a]
    if unmatched_b:
        lines.append("")
        lines.append(f"# only in B, no source found ({len(unmatched_b)}):")
        lines += [f"#   {n} {list(tb[n].shape)}" for n in unmatched_b]
    if not body:
        lines.insert(0, "# no renames needed")
    return "\n".join(lines) + "\n"
