"""The key-rename mapping DSL: parse rules, apply them lazily, invert them, report.

One rule a line, ``#`` starts a comment, the first rule that matches a key wins
(the grammar is in CONTRACT.md, "Mapping DSL")::

    module.{rest*}                        -> {rest}
    bert/encoder/layer_{i}/{rest*}/kernel -> bert.encoder.layer.{i}.{rest}.weight | transpose
    {p*}/adam_{m_or_v}                    -> drop
    q.weight, k.weight, v.weight          -> qkv.weight | concat(0)
    attn.qkv.weight -> attn.q.weight, attn.k.weight, attn.v.weight | split(0)
    re:^layers\\.(\\d+)\\.w$                -> blocks.\\1.weight
    {p*}/kernel{t?} -> {p}.weight | permute(3, 2, 0, 1)  if ndim == 4
    add {p*}/lstm_cell/bias -> {p}.bias_hh_l0 | zeros
    add step_count = zeros(shape=[], dtype=int64)

Patterns. ``/`` and ``.`` both separate segments (a pattern written with one
matches names written with the other). ``{x}`` captures one segment (or the
part of one: ``layer_{i}``), ``{x*}`` one or more segments, ``{x?}`` zero or
more characters inside a segment (``kernel{t?}`` matches ``kernel`` and Keras
2's ``kernel:0``). A capture named twice must match the same text twice.
Substituted multi-segment captures take the separator the target pattern
writes next to them (``{p}.weight`` writes dots). ``re:`` sources are Python
regular expressions (``re.search``); their targets use ``\\1`` / ``\\g<name>``.

Rules. Several comma-separated sources make a many-to-one rule: the first
source is matched against a key, the others are filled in with its captures
and must all be present; the keys are claimed together, but only if no earlier
rule claims one of them. The transforms then run on the list of tensors:
``transpose``, ``permute``, ``reshape``, ``cast``, ``slice``, ``pad``, ``scale``,
``reorder`` and ``zeros`` act on each; ``concat``, ``stack`` and ``sum`` turn
many into one; ``split`` and ``unstack`` turn one into as many as there are
targets. One tensor for several targets ties them (one tensor, several names).
``-> drop`` (or ``| drop``) removes keys. ``if ndim == 4`` (also ``!=``, ``<``,
``<=``, ``>``, ``>=``, ``dtype == float16``, joined with ``and``) restricts a rule
to tensors of that rank or dtype. ``add SRC -> TGT | ...`` emits extra tensors
for every key it matches without claiming the key; ``add NAME = zeros(...)``
adds a constant. Keys no rule matches pass through (``strict`` makes them an
error). A line ``---`` starts a stage that maps the previous stage's output
(several ``--map`` options chain the same way). Every application leaves a
``MappingReport`` in ``mapping.report``: rules used and how often, keys
matched, unmatched keys, unused rules, dropped and added names.

Inversion. ``Mapping.inverse()`` swaps sources and targets and inverts the
transforms (split <-> concat, stack <-> unstack, permute, transpose, reorder,
scale, pad -> slice; reshape and cast once the mapping has been applied and
the input shapes / a lossless source dtype are known). Rules that lose
information (drop, slice, sum, scale(0), a down-cast, re:, targets that do not
use every capture) raise ``MappingError``; what an ``add`` rule added is dropped.

Laziness. A rename or a drop moves the same ``TensorRef`` object (ties stay
ties); ``split``/``slice`` of a stored tensor are views (still streamed from the
file), ``concat`` along the outer dimension streams its inputs one after the
other, everything else is a ``LazyTensor`` that computes with numpy when a
writer asks.

The result tree. Rules see the flat tensor names of ``Checkpoint.tensors()``.
The new tree keeps the old one's structure: tensors that pass through stay
where they were, non-tensor leaves are untouched, a renamed tensor is placed
into the deepest dict of the old tree whose path is a prefix of its new name
(``model_state.fc.weight`` goes into ``tree["model_state"]`` as ``"fc.weight"``)
at the position of its first source when that lies in the same dict, and
containers emptied by the mapping disappear. For a flat state dict this is a
new flat dict in source order.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import dtypes as _dt
from .errors import CkptconvError, MappingError, UsageError
from .reports import Report
from .tensor import CHUNK_BYTES, LazyTensor, StoredTensor, TensorRef, cast
from .tree import Checkpoint, ObjectRecord, iter_leaves, join_path

SEP = "./"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _norm(name: str) -> str:
    """A name with both separators written as '.', for sibling look-ups."""
    return name.replace("/", ".")


class _Err:
    """Builds 'FILE:LINE:COL: message' errors."""

    def __init__(self, origin: str, line: int, text: str):
        self.origin, self.line, self.text = origin, line, text

    def __call__(self, col: int, message: str) -> MappingError:
        return MappingError(f"{self.origin}:{self.line}:{col}: {message}")


# --- transform arguments --------------------------------------------------------

_ARG_TOKEN = re.compile(r"""\s*(?:
    (?P<num>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]?inf\b|nan\b)
  | (?P<str>'[^']*'|"[^"]*")
  | (?P<id>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<p>[\[\](),=])
  | (?P<bad>\S))""", re.X)


def _parse_args(text: str, col0: int, err: _Err) -> tuple[list, dict]:
    """Arguments of a transform: numbers, names, strings, [lists], key=value."""
    toks = []
    for m in _ARG_TOKEN.finditer(text):
        if m.group("bad"):
            raise err(col0 + m.start("bad"), f"unexpected character {m.group('bad')!r} in arguments")
        kind = m.lastgroup
        toks.append((kind, m.group(kind), col0 + m.start(kind)))
    toks.append(("end", "", col0 + len(text)))
    pos = 0

    def peek():
        return toks[pos]

    def value():
        nonlocal pos
        kind, v, col = toks[pos]
        pos += 1
        if kind == "num":
            f = float(v)
            return int(v) if re.fullmatch(r"[-+]?\d+", v) else f
        if kind == "str":
            return v[1:-1]
        if kind == "id":
            return None if v == "None" else v
        if kind == "p" and v in "[(":
            close = "]" if v == "[" else ")"
            items = []
            if peek()[1] == close:
                pos += 1
                return items
            while True:
                items.append(value())
                k2, v2, c2 = toks[pos]
                pos += 1
                if v2 == close:
                    return items
                if v2 != ",":
                    raise err(c2, f"expected ',' or '{close}'")
        raise err(col, f"expected a value, found {v or 'end of arguments'!r}")

    args, kwargs = [], {}
    if peek()[0] == "end":
        return args, kwargs
    while True:
        kind, v, col = peek()
        if kind == "id" and toks[pos + 1][1] == "=":
            pos += 2
            kwargs[v] = value()
        else:
            if kwargs:
                raise err(col, "positional argument after key=value")
            args.append(value())
        kind, v, col = toks[pos]
        pos += 1
        if kind == "end":
            return args, kwargs
        if v != ",":
            raise err(col, f"expected ',' between arguments, found {v!r}")


def _fmt_arg(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_arg(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


# --- lazy tensor helpers -----------------------------------------------------------

def _derived(like: TensorRef, dtype, shape, compute, inputs) -> LazyTensor:
    return LazyTensor(dtype, shape, compute, inputs, like.requires_grad, like.is_parameter)


def _dim(d: int, ndim: int, what: str) -> int:
    if not -ndim <= d < max(ndim, 1):
        raise MappingError(f"{what}: dimension {d} is out of range for a {ndim}-d tensor")
    return d % ndim if ndim else 0


def narrow(ref: TensorRef, dim: int, start: int, stop: int) -> TensorRef:
    """``ref[..., start:stop, ...]`` along ``dim``: a view when the bytes are stored."""
    if start == 0 and stop == ref.shape[dim]:
        return ref
    shape = list(ref.shape)
    shape[dim] = stop - start
    if isinstance(ref, StoredTensor):
        return StoredTensor(ref.dtype, shape, ref.source, ref.offset + start * ref.strides[dim],
                            ref.strides, ref.big_endian, ref.requires_grad, ref.is_parameter)
    index = tuple(slice(start, stop) if i == dim else slice(None) for i in range(len(shape)))
    return _derived(ref, ref.dtype, shape, lambda: np.ascontiguousarray(ref.numpy()[index]), (ref,))


def reshape(ref: TensorRef, shape: Sequence[int]) -> TensorRef:
    shape = tuple(int(s) for s in shape)
    if shape == ref.shape:
        return ref
    if isinstance(ref, StoredTensor) and ref.is_contiguous:
        return StoredTensor(ref.dtype, shape, ref.source, ref.offset, None, ref.big_endian,
                            ref.requires_grad, ref.is_parameter)
    return _derived(ref, ref.dtype, shape, lambda: ref.numpy().reshape(shape), (ref,))


class ConcatTensor(LazyTensor):
    """Tensors joined along one dimension; along the outermost one the bytes
    are simply one input's after the other's, so writers stream them."""

    def __init__(self, refs: Sequence[TensorRef], dim: int):
        first = refs[0]
        shape = list(first.shape)
        shape[dim] = sum(r.shape[dim] for r in refs)
        self.parts, self.dim = list(refs), dim
        super().__init__(first.dtype, shape,
                         lambda: np.concatenate([r.numpy() for r in self.parts], axis=dim),
                         refs, first.requires_grad, first.is_parameter)

    def iter_bytes(self, chunk: int = CHUNK_BYTES):
        if all(s == 1 for s in self.shape[:self.dim]):
            for r in self.parts:
                yield from r.iter_bytes(chunk)
        else:
            yield from super().iter_bytes(chunk)


def concat(refs: Sequence[TensorRef], dim: int) -> TensorRef:
    if len(refs) == 1:
        return refs[0]
    first = refs[0]
    d = _dim(dim, len(first.shape), "concat")
    for r in refs[1:]:
        if r.dtype != first.dtype:
            raise MappingError(f"concat: dtypes differ ({first.dtype.name} and {r.dtype.name})")
        if len(r.shape) != len(first.shape) or any(
                a != b for i, (a, b) in enumerate(zip(r.shape, first.shape)) if i != d):
            raise MappingError(f"concat({dim}): shapes {list(first.shape)} and {list(r.shape)} "
                               "do not fit together")
    return ConcatTensor(refs, d)


# --- transforms ------------------------------------------------------------------------

class Transform:
    """One step of a rule's pipeline over a list of tensors."""

    name = ""
    elementwise = True   # acts on each tensor of the list on its own

    def __init__(self, args: list, kwargs: dict, col: int, err: _Err | None):
        self.args, self.kwargs, self.col = list(args), dict(kwargs), col
        self.setup(err or _Err("<rules>", 0, ""))

    def setup(self, err: _Err) -> None:
        if self.args or self.kwargs:
            raise err(self.col, f"{self.name} takes no arguments")

    def _ints(self, err: _Err, values, what: str) -> list[int]:
        if not all(isinstance(v, int) for v in values):
            raise err(self.col, f"{self.name}: {what} must be integers, got {_fmt_arg(values)}")
        return [int(v) for v in values]

    # static list-length bookkeeping (checked at parse time)
    def count(self, n: int, n_targets: int) -> int:
        return n

    def ndim_after(self, ndim: int | None) -> int | None:
        return ndim

    def apply(self, refs: list[TensorRef], n_targets: int) -> list[TensorRef]:
        return [self.one(r) for r in refs]

    def one(self, ref: TensorRef) -> TensorRef:
        raise NotImplementedError

    def inverse(self) -> list["Transform"]:
        raise MappingError(f"{self} cannot be inverted")

    def __str__(self) -> str:
        if not self.args and not self.kwargs:
            return self.name
        parts = [_fmt_arg(a) for a in self.args]
        parts += [f"{k}={_fmt_arg(v)}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})"


def _make(cls: type, *args, **kwargs) -> Transform:
    return cls(list(args), kwargs, 0, None)


class Transpose(Transform):
    """``transpose`` reverses the dimensions (a 2-d matrix is transposed);
    ``transpose(a, b)`` swaps two."""

    name = "transpose"

    def setup(self, err):
        if self.kwargs or len(self.args) not in (0, 2):
            raise err(self.col, "transpose takes no arguments or two dimensions")
        self._ints(err, self.args, "dimensions")

    def axes(self, ndim: int) -> list[int]:
        if not self.args:
            return list(range(ndim))[::-1]
        a, b = (_dim(d, ndim, str(self)) for d in self.args)
        axes = list(range(ndim))
        axes[a], axes[b] = axes[b], axes[a]
        return axes

    def one(self, ref):
        return permute(ref, self.axes(len(ref.shape)))

    def inverse(self):
        return [self]


def permute(ref: TensorRef, axes: Sequence[int]) -> TensorRef:
    axes = list(axes)
    if axes == sorted(axes):
        return ref
    shape = tuple(ref.shape[a] for a in axes)
    return _derived(ref, ref.dtype, shape,
                    lambda: np.ascontiguousarray(np.transpose(ref.numpy(), axes)), (ref,))


class Permute(Transform):
    """``permute(3, 2, 0, 1)``: output dimension i is input dimension p[i]."""

    name = "permute"

    def setup(self, err):
        dims = self.args[0] if len(self.args) == 1 and isinstance(self.args[0], list) else self.args
        self.dims = self._ints(err, dims, "dimensions")
        if self.kwargs or sorted(self.dims) != list(range(len(self.dims))):
            raise err(self.col, f"permute needs a permutation of 0..n-1, got {_fmt_arg(dims)}")

    def one(self, ref):
        if len(ref.shape) != len(self.dims):
            raise MappingError(f"{self}: tensor has {len(ref.shape)} dimensions, not {len(self.dims)}")
        return permute(ref, self.dims)

    def inverse(self):
        return [_make(Permute, *[int(i) for i in np.argsort(self.dims)])]


class Reshape(Transform):
    """``reshape(4, -1)``; inverting needs the input shape, known once applied."""

    name = "reshape"

    def setup(self, err):
        dims = self.args[0] if len(self.args) == 1 and isinstance(self.args[0], list) else self.args
        self.shape = self._ints(err, dims, "sizes")
        if self.kwargs or sum(1 for s in self.shape if s == -1) > 1 or any(s < -1 for s in self.shape):
            raise err(self.col, f"reshape: bad shape {_fmt_arg(self.shape)}")
        self.seen: set[tuple[int, ...]] = set()

    def ndim_after(self, ndim):
        return len(self.shape)

    def target(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        n = math.prod(shape)
        known = math.prod(s for s in self.shape if s != -1)
        out = list(self.shape)
        if -1 in out:
            if known == 0 or n % known:
                raise MappingError(f"{self}: cannot reshape {list(shape)}")
            out[out.index(-1)] = n // known
        if math.prod(out) != n:
            raise MappingError(f"{self}: cannot reshape {list(shape)} ({n} elements)")
        return tuple(out)

    def one(self, ref):
        self.seen.add(ref.shape)
        return reshape(ref, self.target(ref.shape))

    def inverse(self):
        if len(self.seen) != 1:
            raise MappingError(f"{self} cannot be inverted: the input shape is "
                               f"{'unknown (apply the mapping first)' if not self.seen else 'not unique'}")
        return [_make(Reshape, *next(iter(self.seen)))]


class Split(Transform):
    """``split(dim)`` into as many equal parts as there are targets, or
    ``split(dim, [sizes])`` / ``split(dim, a, b, c)``."""

    name = "split"
    elementwise = False

    def setup(self, err):
        if not self.args or self.kwargs:
            raise err(self.col, "split needs a dimension: split(dim) or split(dim, [sizes])")
        rest = self.args[1:]
        if len(rest) == 1 and isinstance(rest[0], list):
            rest = rest[0]
        self.dim, *_ = self._ints(err, self.args[:1], "the dimension")
        self.sizes = self._ints(err, rest, "sizes") if rest else None

    def count(self, n, n_targets):
        if n != 1:
            raise ValueError(f"split takes one tensor, the rule gives it {n}")
        return len(self.sizes) if self.sizes else n_targets

    def apply(self, refs, n_targets):
        (ref,) = refs
        d = _dim(self.dim, len(ref.shape), str(self))
        total = ref.shape[d]
        sizes = self.sizes
        if sizes is None:
            if total % n_targets:
                raise MappingError(f"{self}: dimension {d} of size {total} does not split "
                                   f"into {n_targets} equal parts")
            sizes = [total // n_targets] * n_targets
        elif sum(sizes) != total:
            raise MappingError(f"{self}: sizes add up to {sum(sizes)}, dimension {d} is {total}")
        out, start = [], 0
        for s in sizes:
            out.append(narrow(ref, d, start, start + s))
            start += s
        return out

    def inverse(self):
        return [_make(Concat, self.dim)]


class Concat(Transform):
    """``concat(dim)``: many tensors into one."""

    name = "concat"
    elementwise = False

    def setup(self, err):
        if len(self.args) != 1 or self.kwargs:
            raise err(self.col, "concat takes one dimension: concat(0)")
        (self.dim,) = self._ints(err, self.args, "the dimension")
        self.seen: set[tuple[int, ...]] = set()

    def count(self, n, n_targets):
        return 1

    def apply(self, refs, n_targets):
        d = _dim(self.dim, len(refs[0].shape), str(self))
        self.seen.add(tuple(r.shape[d] for r in refs))
        return [concat(refs, self.dim)]

    def inverse(self):
        if len(self.seen) == 1:
            sizes = next(iter(self.seen))
            if len(set(sizes)) > 1:
                return [_make(Split, self.dim, list(sizes))]
        elif len(self.seen) > 1:
            raise MappingError(f"{self} cannot be inverted: it joined parts of different sizes")
        return [_make(Split, self.dim)]  # equal parts, one per target


class Stack(Transform):
    """``stack(dim)``: many tensors of one shape into one with a new dimension."""

    name = "stack"
    elementwise = False

    def setup(self, err):
        if len(self.args) != 1 or self.kwargs:
            raise err(self.col, "stack takes one dimension: stack(0)")
        (self.dim,) = self._ints(err, self.args, "the dimension")

    def count(self, n, n_targets):
        return 1

    def ndim_after(self, ndim):
        return None if ndim is None else ndim + 1

    def apply(self, refs, n_targets):
        nd = len(refs[0].shape) + 1
        d = _dim(self.dim, nd, str(self))
        if any(r.shape != refs[0].shape for r in refs):
            raise MappingError(f"{self}: shapes differ: {[list(r.shape) for r in refs]}")
        parts = [reshape(r, r.shape[:d] + (1,) + r.shape[d:]) for r in refs]
        return [concat(parts, d)]

    def inverse(self):
        return [_make(Unstack, self.dim)]


class Unstack(Transform):
    """``unstack(dim)``: one tensor into its slices along ``dim``, one per target."""

    name = "unstack"
    elementwise = False

    def setup(self, err):
        if len(self.args) != 1 or self.kwargs:
            raise err(self.col, "unstack takes one dimension: unstack(0)")
        (self.dim,) = self._ints(err, self.args, "the dimension")

    def count(self, n, n_targets):
        if n != 1:
            raise ValueError(f"unstack takes one tensor, the rule gives it {n}")
        return n_targets

    def ndim_after(self, ndim):
        return None if ndim is None else ndim - 1

    def apply(self, refs, n_targets):
        (ref,) = refs
        d = _dim(self.dim, len(ref.shape), str(self))
        if ref.shape[d] != n_targets:
            raise MappingError(f"{self}: dimension {d} has {ref.shape[d]} slices for {n_targets} targets")
        return [reshape(narrow(ref, d, i, i + 1), ref.shape[:d] + ref.shape[d + 1:])
                for i in range(n_targets)]

    def inverse(self):
        return [_make(Stack, self.dim)]


def _lossless_cast(src, dst) -> bool:
    src, dst = _dt.get(src), _dt.get(dst)
    if src == dst:
        return True
    if src.numpy is None or dst.numpy is None:
        return False
    if src.name.startswith("float8") and dst.name in ("float16", "bfloat16", "float32", "float64"):
        return True
    try:
        return bool(np.can_cast(src.numpy, dst.numpy, "safe"))
    except TypeError:
        return False


class Cast(Transform):
    """``cast(float16)``; inverting is allowed when the cast lost nothing."""

    name = "cast"

    def setup(self, err):
        if len(self.args) != 1 or self.kwargs:
            raise err(self.col, "cast takes one dtype: cast(float16)")
        try:
            self.dtype = _dt.get(str(self.args[0]))
        except CkptconvError as e:
            raise err(self.col, str(e)) from None
        self.seen: set[str] = set()

    def one(self, ref):
        self.seen.add(ref.dtype.name)
        return cast(ref, self.dtype)

    def inverse(self):
        if len(self.seen) != 1:
            raise MappingError(f"{self} cannot be inverted: the source dtype is "
                               f"{'unknown (apply the mapping first)' if not self.seen else 'not unique'}")
        src = next(iter(self.seen))
        if not _lossless_cast(src, self.dtype):
            raise MappingError(f"{self} cannot be inverted: {src} -> {self.dtype.name} loses precision")
        return [_make(Cast, src)]


class Slice(Transform):
    """``slice(dim, start, stop)`` (Python semantics: negative and None allowed)."""

    name = "slice"

    def setup(self, err):
        if len(self.args) not in (2, 3) or self.kwargs:
            raise err(self.col, "slice takes slice(dim, start, stop)")
        vals = self.args + [None] * (3 - len(self.args))
        if not all(v is None or isinstance(v, int) for v in vals) or vals[0] is None:
            raise err(self.col, "slice: dim, start and stop must be integers (or None)")
        self.dim, self.start, self.stop = vals

    def one(self, ref):
        d = _dim(self.dim, len(ref.shape), str(self))
        start, stop, _ = slice(self.start, self.stop).indices(ref.shape[d])
        return narrow(ref, d, start, max(start, stop))


class Pad(Transform):
    """``pad(dim, before, after[, value])``: grow a dimension with a constant."""

    name = "pad"

    def setup(self, err):
        if len(self.args) not in (3, 4) or set(self.kwargs) - {"value"}:
            raise err(self.col, "pad takes pad(dim, before, after[, value])")
        self.dim, self.before, self.after = self._ints(err, self.args[:3], "dim, before and after")
        self.value = self.args[3] if len(self.args) == 4 else self.kwargs.get("value", 0)
        if not isinstance(self.value, (int, float)) or self.before < 0 or self.after < 0:
            raise err(self.col, "pad: before/after must be >= 0 and value a number")

    def one(self, ref):
        d = _dim(self.dim, len(ref.shape), str(self))
        widths = [(0, 0)] * len(ref.shape)
        widths[d] = (self.before, self.after)
        shape = list(ref.shape)
        shape[d] += self.before + self.after
        value = self.value
        return _derived(ref, ref.dtype, shape,
                        lambda: np.pad(ref.numpy(), widths, constant_values=value), (ref,))

    def inverse(self):
        return [_make(Slice, self.dim, self.before, -self.after if self.after else None)]


class Scale(Transform):
    """``scale(x)``: multiply a floating-point tensor by ``x``."""

    name = "scale"

    def setup(self, err):
        if len(self.args) != 1 or self.kwargs or not isinstance(self.args[0], (int, float)):
            raise err(self.col, "scale takes one number: scale(0.5)")
        self.factor = float(self.args[0])

    def one(self, ref):
        kind = _dt.numpy_dtype(ref.dtype)
        if not (ref.dtype.name.startswith(("float", "bfloat", "complex"))):
            raise MappingError(f"{self}: tensor of dtype {ref.dtype.name} is not floating-point")
        f = self.factor
        work = np.float64 if kind.itemsize >= 8 or ref.dtype.name.startswith("complex") else np.float32
        if ref.dtype.name.startswith("complex"):
            work = kind
        return _derived(ref, ref.dtype, ref.shape,
                        lambda: (ref.numpy().astype(work) * f).astype(kind), (ref,))

    def inverse(self):
        if self.factor == 0 or not math.isfinite(self.factor):
            raise MappingError(f"{self} cannot be inverted")
        return [_make(Scale, 1.0 / self.factor)]


class Reorder(Transform):
    """``reorder(dim, [1, 0, 2])``: cut ``dim`` into len(order) equal blocks and
    put block order[i] at place i (gate orders of recurrent layers)."""

    name = "reorder"

    def setup(self, err):
        if len(self.args) < 2 or self.kwargs:
            raise err(self.col, "reorder takes reorder(dim, [order...])")
        order = self.args[1] if len(self.args) == 2 and isinstance(self.args[1], list) else self.args[1:]
        (self.dim,) = self._ints(err, self.args[:1], "the dimension")
        self.order = self._ints(err, order, "the block order")
        if sorted(self.order) != list(range(len(self.order))):
            raise err(self.col, f"reorder needs a permutation of 0..n-1, got {_fmt_arg(self.order)}")

    def one(self, ref):
        d = _dim(self.dim, len(ref.shape), str(self))
        n = len(self.order)
        if ref.shape[d] % n:
            raise MappingError(f"{self}: dimension {d} of size {ref.shape[d]} is not {n} equal blocks")
        b = ref.shape[d] // n
        return concat([narrow(ref, d, i * b, (i + 1) * b) for i in self.order], d)

    def inverse(self):
        return [_make(Reorder, self.dim, [int(i) for i in np.argsort(self.order)])]


class Sum(Transform):
    """``sum``: add tensors of one shape (Keras' one LSTM bias = torch's two)."""

    name = "sum"
    elementwise = False

    def count(self, n, n_targets):
        return 1

    def apply(self, refs, n_targets):
        if len(refs) == 1:
            return refs
        first = refs[0]
        if any(r.shape != first.shape or r.dtype != first.dtype for r in refs):
            raise MappingError(f"sum: tensors differ in shape or dtype: "
                               f"{[(r.dtype.name, list(r.shape)) for r in refs]}")
        kind = _dt.numpy_dtype(first.dtype)
        return [_derived(first, first.dtype, first.shape,
                         lambda: np.add.reduce([r.numpy() for r in refs]).astype(kind), refs)]


class Zeros(Transform):
    """``zeros``: zeros shaped like the input; ``zeros(shape=[..], dtype=..)``
    (or ``zeros(2, 3)``) fixes shape and dtype. Also ``ones``."""

    name = "zeros"
    fill = 0

    def setup(self, err):
        if set(self.kwargs) - {"shape", "dtype"}:
            raise err(self.col, f"{self.name} takes a shape and dtype=")
        shape = self.kwargs.get("shape")
        if self.args:
            if shape is not None:
                raise err(self.col, f"{self.name}: give the shape once")
            shape = self.args[0] if len(self.args) == 1 and isinstance(self.args[0], list) else self.args
        self.shape = None if shape is None else tuple(self._ints(err, shape, "sizes"))
        try:
            self.dtype = _dt.get(str(self.kwargs["dtype"])) if "dtype" in self.kwargs else None
        except CkptconvError as e:
            raise err(self.col, str(e)) from None

    def ndim_after(self, ndim):
        return len(self.shape) if self.shape is not None else ndim

    def produce(self, like: TensorRef | None) -> TensorRef:
        shape = self.shape if self.shape is not None else like.shape
        dtype = self.dtype or (like.dtype if like is not None else _dt.get("float32"))
        npdt = _dt.numpy_dtype(dtype)
        fill = self.fill
        compute = lambda: np.full(shape, fill, dtype=npdt)  # noqa: E731
        if like is None:
            return LazyTensor(dtype, shape, compute)
        return LazyTensor(dtype, shape, compute, (), like.requires_grad, like.is_parameter)

    def one(self, ref):
        return self.produce(ref)


class Ones(Zeros):
    name = "ones"
    fill = 1


class Drop(Transform):
    """``drop``: the keys disappear."""

    name = "drop"
    elementwise = False

    def count(self, n, n_targets):
        return 0

    def apply(self, refs, n_targets):
        return []


TRANSFORMS: dict[str, type[Transform]] = {
    cls.name: cls for cls in (Transpose, Permute, Reshape, Split, Concat, Stack, Unstack, Cast,
                              Slice, Pad, Scale, Reorder, Sum, Zeros, Ones, Drop)}


# --- patterns ---------------------------------------------------------------------------

@dataclass
class Capture:
    name: str
    kind: str  # "one" | "multi" | "opt"

    def regex(self) -> str:
        if self.kind == "one":
            return rf"(?P<{self.name}>[^./]+)"
        if self.kind == "opt":
            return rf"(?P<{self.name}>[^./]*)"
        return rf"(?P<{self.name}>[^./]+(?:[./][^./]*)*)"

    def __str__(self):
        return "{" + self.name + {"one": "", "multi": "*", "opt": "?"}[self.kind] + "}"


_CAPTURE_RE = re.compile(r"\{([^{}]*)\}")


def _parse_parts(text: str, col0: int, err: _Err) -> list:
    """Literal text and ``{captures}`` of a pattern."""
    parts: list = []
    pos = 0
    for m in _CAPTURE_RE.finditer(text):
        lit = text[pos:m.start()]
        for ch in "{}":
            if ch in lit:
                raise err(col0 + pos + lit.index(ch), f"unbalanced '{ch}' in pattern")
        if lit:
            parts.append(lit)
        inner = m.group(1)
        kind = "one"
        if inner.endswith("*"):
            kind, inner = "multi", inner[:-1]
        elif inner.endswith("?"):
            kind, inner = "opt", inner[:-1]
        if not _NAME_RE.fullmatch(inner):
            raise err(col0 + m.start(), f"bad capture {m.group(0)!r}: use {{name}}, {{name*}} or {{name?}}")
        if parts and isinstance(parts[-1], Capture):
            raise err(col0 + m.start(), "two captures next to each other are ambiguous")
        parts.append(Capture(inner, kind))
        pos = m.end()
    lit = text[pos:]
    for ch in "{}":
        if ch in lit:
            raise err(col0 + pos + lit.index(ch), f"unbalanced '{ch}' in pattern")
    if lit:
        parts.append(lit)
    return parts


class Pattern:
    """A source pattern: literal segments and captures, or ``re:`` + a regex."""

    def __init__(self, text: str, col: int, err: _Err):
        self.text, self.col = text, col
        self.is_regex = text.startswith("re:")
        if self.is_regex:
            try:
                self.regex = re.compile(text[3:])
            except re.error as e:
                raise err(col + 3 + (e.pos or 0), f"bad regular expression: {e.msg}") from None
            self.parts: list = []
            self.captures = {str(i): "one" for i in range(1, self.regex.groups + 1)}
            self.captures.update({k: "one" for k in self.regex.groupindex})
            return
        if not text:
            raise err(col, "empty pattern")
        self.parts = _parse_parts(text, col, err)
        self.captures: dict[str, str] = {}
        rx = []
        for p in self.parts:
            if isinstance(p, Capture):
                if p.name in self.captures:
                    if self.captures[p.name] != p.kind:
                        raise err(col, f"capture {{{p.name}}} is used with two kinds")
                    rx.append(f"(?P={p.name})")
                else:
                    self.captures[p.name] = p.kind
                    rx.append(p.regex())
            else:
                rx.append("".join("[./]" if ch in SEP else re.escape(ch) for ch in p))
        self.regex = re.compile("".join(rx))

    def match(self, name: str) -> dict | None:
        if self.is_regex:
            m = self.regex.search(name)
            if m is None:
                return None
            caps = {str(i): g for i, g in enumerate(m.groups(), 1)}
            caps.update(m.groupdict())
            caps["__match__"] = m
            return caps
        m = self.regex.fullmatch(name)
        return None if m is None else m.groupdict()

    def fill(self, caps: dict) -> str:
        """This pattern with the captures filled in (its own separators)."""
        return "".join(caps[p.name] if isinstance(p, Capture) else p for p in self.parts)

    def __str__(self):
        return self.text


class Template:
    """A target pattern: literal text and captures to substitute."""

    def __init__(self, text: str, col: int, err: _Err, regex_source: Pattern | None = None):
        self.text, self.col = text, col
        if not text:
            raise err(col, "empty target")
        self.regex_source = regex_source
        if regex_source is not None:
            # re: targets use \1, \g<name> (Python's Match.expand)
            for m in re.finditer(r"\\(\d+)|\\g<(\w+)>", text):
                ref = m.group(1) or m.group(2)
                if ref not in regex_source.captures and not (ref.isdigit() and int(ref) == 0):
                    raise err(col + m.start(), f"target refers to group {ref!r} the regex does not have")
            self.parts = []
            return
        self.parts = _parse_parts(text, col, err)
        for p in self.parts:
            if isinstance(p, Capture) and p.kind == "opt":
                p.kind = "one"  # kinds come from the source; a target only names them
        seps = [ch for p in self.parts if isinstance(p, str) for ch in p if ch in SEP]
        self._default_sep = seps[0] if seps else None
        # the separator written next to each capture
        self._seps = []
        for i, p in enumerate(self.parts):
            sep = None
            if isinstance(p, Capture):
                before = self.parts[i - 1] if i > 0 else ""
                after = self.parts[i + 1] if i + 1 < len(self.parts) else ""
                if isinstance(before, str) and before and before[-1] in SEP:
                    sep = before[-1]
                elif isinstance(after, str) and after and after[0] in SEP:
                    sep = after[0]
                else:
                    sep = self._default_sep
            self._seps.append(sep)

    @property
    def captures(self) -> list[str]:
        return [p.name for p in self.parts if isinstance(p, Capture)]

    def render(self, caps: dict) -> str:
        if self.regex_source is not None:
            return caps["__match__"].expand(self.text)
        out = []
        for p, sep in zip(self.parts, self._seps):
            if isinstance(p, Capture):
                v = caps[p.name]
                if sep is not None:
                    v = re.sub(r"[./]", sep, v)
                out.append(v)
            else:
                out.append(p)
        return "".join(out)

    def __str__(self):
        return self.text


@dataclass
class Guard:
    """``if ndim == 4 and dtype == float32``."""

    conds: list[tuple[str, str, Any]]

    _OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
            "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}

    @classmethod
    def parse(cls, text: str, col: int, err: _Err) -> "Guard":
        conds = []
        pos = 0
        for piece in re.split(r"(\s+and\s+)", text):
            if re.fullmatch(r"\s+and\s+", piece):
                pos += len(piece)
                continue
            m = re.fullmatch(r"\s*(ndim|dtype)\s*(==|!=|<=|>=|<|>)\s*([A-Za-z0-9_]+)\s*", piece)
            if not m:
                raise err(col + pos, f"bad condition {piece.strip()!r}: use ndim == 4 or dtype == float16")
            what, op, value = m.groups()
            if what == "ndim":
                if not value.isdigit():
                    raise err(col + pos + m.start(3), f"ndim compares with an integer, not {value!r}")
                conds.append((what, op, int(value)))
            else:
                if op not in ("==", "!="):
                    raise err(col + pos + m.start(2), "dtype compares with == or !=")
                try:
                    conds.append((what, op, _dt.get(value).name))
                except CkptconvError as e:
                    raise err(col + pos + m.start(3), str(e)) from None
            pos += len(piece)
        return cls(conds)

    def ok(self, ref: TensorRef) -> bool:
        for what, op, value in self.conds:
            have = len(ref.shape) if what == "ndim" else ref.dtype.name
            if not self._OPS[op](have, value):
                return False
        return True

    def __str__(self):
        return "if " + " and ".join(f"{w} {op} {v}" for w, op, v in self.conds)


# --- rules ---------------------------------------------------------------------------------

@dataclass(eq=False)
class Rule:
    sources: list[Pattern]
    targets: list[Template]
    transforms: list[Transform]
    guard: Guard | None = None
    add: bool = False
    line: int = 0
    origin: str = "<rules>"

    @property
    def is_drop(self) -> bool:
        return not self.targets

    @property
    def where(self) -> str:
        return f"{self.origin}:{self.line}"

    def members(self, j: int, name: str, caps: dict, norm_index: dict[str, str]) -> list[str] | None:
        """The keys of a many-to-one rule whose source ``j`` matched ``name``."""
        if len(self.sources) == 1:
            return [name]
        out = []
        for k, pat in enumerate(self.sources):
            if k == j:
                out.append(name)
                continue
            found = norm_index.get(_norm(pat.fill(caps)))
            if found is None:
                return None
            out.append(found)
        return out if len(set(out)) == len(out) else None

    def run(self, refs: list[TensorRef]) -> list[TensorRef]:
        for t in self.transforms:
            if t.elementwise:
                refs = [t.one(r) for r in refs]
            else:
                refs = t.apply(refs, len(self.targets))
        return refs

    def __str__(self) -> str:
        src = ", ".join(str(s) for s in self.sources)
        if self.add and not self.sources:
            text = f"add {self.targets[0]} = " + " | ".join(str(t) for t in self.transforms)
        else:
            tgt = ", ".join(str(t) for t in self.targets) if self.targets else "drop"
            trs = [str(t) for t in self.transforms if not isinstance(t, Drop)]
            text = ("add " if self.add else "") + f"{src} -> {tgt}" + "".join(f" | {t}" for t in trs)
        if self.guard:
            text += f"  {self.guard}"
        return text


def _split_top(text: str, sep: str) -> list[tuple[str, int]]:
    """Split on ``sep`` outside brackets; (piece, offset) pairs."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == sep and depth == 0:
            out.append((text[start:i], start))
            start = i + 1
    out.append((text[start:], start))
    return out


def _strip(piece: str, off: int) -> tuple[str, int]:
    lead = len(piece) - len(piece.lstrip())
    return piece.strip(), off + lead


def _strip_comment(line: str) -> str:
    for i, ch in enumerate(line):
        if ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _parse_transform(piece: str, col: int, err: _Err) -> Transform:
    m = re.fullmatch(r"([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*", piece, re.S)
    if not m:
        raise err(col, f"bad transform {piece!r}: expected name or name(args)")
    name = m.group(1)
    if name not in TRANSFORMS:
        raise err(col, f"unknown transform '{name}' (known: {', '.join(TRANSFORMS)})")
    args, kwargs = ([], {}) if m.group(2) is None else _parse_args(m.group(2), col + m.start(2), err)
    return TRANSFORMS[name](args, kwargs, col, err)


def parse_rule(line: str, lineno: int, origin: str) -> Rule | None:
    """One line of a rules file (None for blank lines and comments)."""
    err = _Err(origin, lineno, line)
    body = _strip_comment(line)
    if not body.strip():
        return None
    text, off = _strip(body, 0)
    add = False
    m = re.match(r"add\s+", text)
    if m and "->" not in text[:m.end()]:
        add, text, off = True, text[m.end():], off + m.end()
        if "->" not in text and "=" in text:
            return _parse_constant(text, off, err, lineno, origin)
    arrow = text.find("->")
    if arrow < 0:
        raise err(off + len(text) + 1, "expected '->' between sources and targets")
    left, right = text[:arrow], text[arrow + 2:]
    lcol, rcol = off + 1, off + arrow + 3  # 1-based columns
    # sources
    ltext, lc = _strip(left, lcol)
    if not ltext:
        raise err(lcol, "no source pattern before '->'")
    if ltext.startswith("re:"):
        sources = [Pattern(ltext, lc, err)]
    else:
        sources = []
        for piece, o in _split_top(left, ","):
            p, c = _strip(piece, lcol + o)
            if not p:
                raise err(c, "empty source pattern")
            if p.startswith("re:"):
                raise err(c, "a re: source must be the only source of its rule")
            sources.append(Pattern(p, c, err))
        caps0 = set(sources[0].captures)
        for s in sources[1:]:
            if set(s.captures) != caps0:
                raise err(s.col, "every source of a rule must use the same captures "
                                 f"({', '.join(sorted(caps0)) or 'none'})")
    # guard at the end: "... if ndim == 4"
    guard = None
    gm = re.search(r"\s+if\s+(.*)$", right)
    if gm:
        guard = Guard.parse(gm.group(1), rcol + gm.start(1), err)
        right = right[:gm.start()]
    pieces = _split_top(right, "|")
    tpiece, to = pieces[0]
    tcol = rcol + to
    transforms = []
    for piece, o in pieces[1:]:
        p, c = _strip(piece, rcol + o)
        if not p:
            raise err(c, "empty transform after '|'")
        transforms.append(_parse_transform(p, c, err))
    targets: list[Template] = []
    ttext, tc = _strip(tpiece, tcol)
    if not ttext:
        raise err(tc, "no target after '->' (write 'drop' to drop keys)")
    if ttext != "drop":
        regex_src = sources[0] if sources[0].is_regex else None
        for piece, o in _split_top(tpiece, ","):
            p, c = _strip(piece, tcol + o)
            if not p:
                raise err(c, "empty target pattern")
            t = Template(p, c, err, regex_src)
            for name in t.captures:
                if name not in sources[0].captures:
                    raise err(c, f"target uses {{{name}}}, which no source captures")
            targets.append(t)
    # drop: only as the last step, with no targets
    drops = [t for t in transforms if isinstance(t, Drop)]
    if drops:
        if transforms[-1] is not drops[0] or len(drops) > 1:
            raise err(drops[0].col, "drop must be the last transform")
        if targets:
            raise err(tc, "a dropping rule has no targets: write 'SOURCE -> drop'")
    if not targets and transforms and not drops:
        raise err(transforms[0].col, "a dropping rule takes no transforms")
    if add and not targets:
        raise err(tc, "an add rule needs a target")
    # static check of how many tensors come out
    n = len(sources)
    for t in transforms:
        try:
            n = t.count(n, len(targets))
        except ValueError as e:
            raise err(t.col, str(e)) from None
    if targets and n != len(targets) and n != 1:
        raise err(tc, f"the rule makes {n} tensors for {len(targets)} targets")
    if not targets and n not in (0, len(sources)):
        raise err(tc, f"the rule makes {n} tensors and has no target")
    return Rule(sources, targets, transforms, guard, add, lineno, origin)


def _parse_constant(text: str, off: int, err: _Err, lineno: int, origin: str) -> Rule:
    """``add NAME = zeros(shape=[2, 3], dtype=float16) | ...``"""
    eq = text.index("=")
    name, ncol = _strip(text[:eq], off + 1)
    if not name or re.search(r"[{}\s]", name):
        raise err(ncol, f"bad name for an added tensor: {name!r}")
    pieces = _split_top(text[eq + 1:], "|")
    transforms = []
    for piece, o in pieces:
        p, c = _strip(piece, off + eq + 2 + o)
        if not p:
            raise err(c, "empty transform")
        transforms.append(_parse_transform(p, c, err))
    first = transforms[0]
    if not isinstance(first, Zeros) or first.shape is None:
        raise err(first.col, "an added constant starts with zeros(shape...) or ones(shape...)")
    if any(not t.elementwise for t in transforms):
        raise err(first.col, "an added constant takes only one-tensor transforms")
    return Rule([], [Template(name, ncol, err)], transforms, None, True, lineno, origin)


# --- reports ---------------------------------------------------------------------------------

@dataclass
class MappingReport(Report):
    """What one application of a mapping did."""

    mapping: str
    keys: int = 0                                          # tensor names in the input
    matched: int = 0                                       # of those, claimed by a rule
    outputs: int = 0                                       # tensor names in the output
    rules: list[dict] = field(default_factory=list)        # {"rule", "where", "used"}
    unmatched: list[str] = field(default_factory=list)     # passed through unchanged
    dropped: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    renamed: dict[str, list[str]] = field(default_factory=dict)  # old -> new names

    @property
    def unused_rules(self) -> list[str]:
        return [f"{r['where']}: {r['rule']}" for r in self.rules if not r["used"]]

    def to_dict(self) -> dict:
        return {"mapping": self.mapping, "keys": self.keys, "matched": self.matched,
                "outputs": self.outputs, "rules": self.rules, "unmatched": self.unmatched,
                "unused_rules": self.unused_rules, "dropped": self.dropped, "added": self.added,
                "renamed": self.renamed}

    def __str__(self) -> str:
        used = sum(1 for r in self.rules if r["used"])
        lines = [f"mapping {self.mapping}: {self.matched} of {self.keys} keys matched by "
                 f"{used} of {len(self.rules)} rules -> {self.outputs} tensors"
                 + (f", {len(self.dropped)} dropped" if self.dropped else "")
                 + (f", {len(self.added)} added" if self.added else "")]
        for r in self.rules:
            lines.append(f"  {r['used']:6d}x  {r['where']}: {r['rule']}")
        if self.unmatched:
            lines.append(f"  unmatched (passed through): {_few(self.unmatched)}")
        if self.unused_rules:
            lines.append(f"  unused rules: {len(self.unused_rules)}")
        return "\n".join(lines)


def _few(names: Sequence[str], n: int = 8) -> str:
    more = f" ... (+{len(names) - n})" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# --- applying ---------------------------------------------------------------------------------

class _Removed:
    def __repr__(self):
        return "<removed>"


_REMOVED = _Removed()


class _Claims:
    """First-match-wins over the flat names, with many-to-one groups."""

    def __init__(self, rules: list[Rule], tensors: dict[str, TensorRef]):
        self.rules = rules
        self.tensors = tensors
        self.norm: dict[str, str] = {}
        for n in tensors:
            self.norm.setdefault(_norm(n), n)
        self._first: dict[str, Any] = {}

    def first(self, name: str, start: int = 0):
        """(rule index, captures, member names) of the first rule from ``start``
        one of whose sources matches ``name`` with its siblings present."""
        if start == 0 and name in self._first:
            return self._first[name]
        hit = None
        for ri in range(start, len(self.rules)):
            rule = self.rules[ri]
            for j, pat in enumerate(rule.sources):
                caps = pat.match(name)
                if caps is None:
                    continue
                members = rule.members(j, name, caps, self.norm)
                if members is None:
                    continue
                if rule.guard and not all(rule.guard.ok(self.tensors[m]) for m in members):
                    continue
                if j != 0:  # captures as the first source sees them
                    caps = rule.sources[0].match(members[0]) or caps
                hit = (ri, caps, members)
                break
            if hit:
                break
        if start == 0:
            self._first[name] = hit
        return hit

    def claim(self, name: str, claimed: dict):
        start = 0
        while start < len(self.rules):
            hit = self.first(name, start)
            if hit is None:
                return None
            ri, caps, members = hit
            ok = not any(m in claimed for m in members)
            if ok and len(members) > 1:
                for m in members:
                    if m != name:
                        other = self.first(m)
                        if other is None or other[0] != ri or other[2] != members:
                            ok = False
                            break
            if ok:
                return hit
            start = ri + 1
        return None


class Mapping:
    """A parsed rule set (or a chain of them); ``apply`` maps a Checkpoint."""

    def __init__(self, rules: list[Rule], name: str = "<rules>", stages: list["Mapping"] | None = None):
        self.rules = list(rules)
        self.name = name
        self.stages = list(stages) if stages else None
        self.report: MappingReport | None = None

    # -- construction --
    @classmethod
    def parse(cls, text: str, name: str = "<rules>") -> "Mapping":
        """Rules text; a line ``---`` starts a new stage that maps the previous
        stage's output (the result is a chain)."""
        stages: list[list[Rule]] = [[]]
        for i, line in enumerate(text.splitlines(), 1):
            if _strip_comment(line).strip() == "---":
                stages.append([])
                continue
            rule = parse_rule(line, i, name)
            if rule is not None:
                stages[-1].append(rule)
        if len(stages) == 1:
            return cls(stages[0], name)
        return cls([], name, [cls(rules, f"{name} stage {k}") for k, rules in enumerate(stages, 1)])

    @classmethod
    def preset(cls, name: str) -> "Mapping":
        text = preset_text(name)
        return cls.parse(text, f"{name}.rules")

    @classmethod
    def load(cls, spec: str | Path) -> "Mapping":
        """A preset name, a path to a rules file, or rules text."""
        s = str(spec)
        if "\n" not in s and "->" not in s and s in preset_names():
            return cls.preset(s)
        p = Path(s)
        if "\n" not in s and p.is_file():
            try:
                text = p.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise MappingError(f"{p.name}: cannot read rules file: {e}") from None
            return cls.parse(text, p.name)
        if "->" in s or ("=" in s and s.lstrip().startswith("add")):
            return cls.parse(s)
        raise UsageError(f"--map '{s}': not a preset, a rules file or rules text; "
                         f"presets: {', '.join(preset_names())}")

    @classmethod
    def chain(cls, mappings: Sequence["Mapping"]) -> "Mapping":
        flat: list[Mapping] = []
        for m in mappings:
            flat.extend(m.stages if m.stages else [m])
        if len(flat) == 1:
            return flat[0]
        return cls([], " + ".join(m.name for m in flat), flat)

    # -- text --
    def to_text(self) -> str:
        """The rules as DSL text (stages separated by ``---``)."""
        if self.stages:
            return "---\n".join(m.to_text() for m in self.stages)
        return "".join(f"{r}\n" for r in self.rules)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self):
        return f"<Mapping {self.name}: {len(self.rules)} rules>"

    # -- application --
    def apply(self, ck: Checkpoint | dict, strict: bool = False) -> Checkpoint:
        """The mapped checkpoint (lazy; no tensor bytes are read). Sets ``self.report``."""
        if not isinstance(ck, Checkpoint):
            ck = Checkpoint.from_state_dict(ck)
        if self.stages:
            return self._apply_chain(ck, strict)
        tensors = ck.tensors()
        report = MappingReport(self.name, keys=len(tensors))
        main = [r for r in self.rules if not r.add]
        adds = [r for r in self.rules if r.add]
        uses = {id(r): 0 for r in self.rules}
        claims = _Claims(main, tensors)
        claimed: dict[str, tuple] = {}
        groups: list[tuple] = []
        for name in tensors:
            if name in claimed:
                continue
            hit = claims.claim(name, claimed)
            if hit is not None:
                for m in hit[2]:
                    claimed[m] = hit
                groups.append(hit)
        report.matched = len(claimed)
        report.unmatched = [n for n in tensors if n not in claimed]
        if strict and report.unmatched:
            raise MappingError(f"{self.name}: {len(report.unmatched)} keys match no rule "
                               f"(strict): {_few(report.unmatched, 5)}")

        memo: dict[tuple, list[TensorRef]] = {}
        outputs: list[tuple[str, TensorRef, str]] = []  # (new name, ref, anchor name)
        origin: dict[str, str] = {}

        def emit(rule, key_refs, caps, anchor, sources_desc):
            k = (id(rule), tuple(id(r) for r in key_refs))
            if rule.is_drop:
                return []
            if k not in memo:
                try:
                    memo[k] = rule.run(list(key_refs))
                except MappingError as e:
                    raise MappingError(f"{rule.where}: {sources_desc}: {e}") from None
            outs = memo[k]
            names = [t.render(caps) for t in rule.targets]
            if len(outs) == 1 and len(names) > 1:
                outs = outs * len(names)  # one tensor, several names: a tie
            if len(outs) != len(names):
                raise MappingError(f"{rule.where}: {sources_desc}: made {len(outs)} tensors "
                                   f"for {len(names)} targets")
            for n, r in zip(names, outs):
                if n in origin:
                    raise MappingError(f"{rule.where}: {sources_desc} and {origin[n]} both map to '{n}'")
                origin[n] = sources_desc
                outputs.append((n, r, anchor))
            return names

        by_first = {g[2][0]: g for g in groups}
        for name in tensors:
            if name not in claimed:
                if name in origin:
                    raise MappingError(f"{self.name}: '{origin[name]}' maps onto '{name}', "
                                       "which is also kept unchanged")
                origin[name] = name
                outputs.append((name, tensors[name], name))
            elif name in by_first:
                ri, caps, members = by_first[name]
                rule = main[ri]
                uses[id(rule)] += 1
                desc = "'" + "', '".join(members) + "'"
                new = emit(rule, [tensors[m] for m in members], caps, name, desc)
                if rule.is_drop:
                    report.dropped.extend(members)
                else:
                    for m in members:
                        report.renamed[m] = new
            for rule in adds:
                if not rule.sources:
                    continue
                for j, pat in enumerate(rule.sources[:1]):
                    caps = pat.match(name)
                    if caps is None:
                        continue
                    members = rule.members(j, name, caps, claims.norm)
                    if members is None or (rule.guard and not all(
                            rule.guard.ok(tensors[m]) for m in members)):
                        continue
                    uses[id(rule)] += 1
                    report.added.extend(emit(rule, [tensors[m] for m in members], caps, name,
                                             f"add '{name}'"))
        for rule in adds:
            if not rule.sources:
                uses[id(rule)] += 1
                ref = rule.transforms[0].produce(None)
                for t in rule.transforms[1:]:
                    ref = t.one(ref)
                n = rule.targets[0].render({})
                if n in origin:
                    raise MappingError(f"{rule.where}: added '{n}' is already in the checkpoint")
                origin[n] = f"add '{n}'"
                outputs.append((n, ref, ""))
                report.added.append(n)
        keep = {n for n in tensors if n not in claimed}  # these stay where they are
        tree = _rebuild(ck.tree, keep, outputs)
        out = Checkpoint(tree, dict(ck.metadata), ck.format, ck.path, dict(ck.info))
        try:
            report.outputs = len(out.tensors())
        except CkptconvError as e:
            raise MappingError(f"{self.name}: {e}") from None
        report.rules = [{"rule": str(r), "where": r.where, "used": uses[id(r)]} for r in self.rules]
        self.report = report
        return out

    def _apply_chain(self, ck: Checkpoint, strict: bool) -> Checkpoint:
        reports = []
        for m in self.stages:
            ck = m.apply(ck, strict=False)
            reports.append(m.report)
        first = reports[0]
        unmatched = set(first.unmatched)
        for r in reports[1:]:
            unmatched &= set(r.unmatched)
        rep = MappingReport(self.name, keys=first.keys)
        rep.unmatched = [n for n in first.unmatched if n in unmatched]
        rep.matched = first.keys - len(rep.unmatched)
        rep.outputs = reports[-1].outputs
        for r in reports:
            rep.rules += r.rules
            rep.dropped += r.dropped
            rep.added += r.added
            rep.renamed.update(r.renamed)
        self.report = rep
        if strict and rep.unmatched:
            raise MappingError(f"{self.name}: {len(rep.unmatched)} keys match no rule "
                               f"(strict): {_few(rep.unmatched, 5)}")
        return ck

    # -- inversion --
    def inverse(self) -> "Mapping":
        """Rules that undo this mapping (renames, transposes, permutes, split<->concat,
        stack<->unstack, lossless casts, scale, pad; reshape/cast once applied).
        Raises MappingError for what loses information (drop, slice, sum, regex)."""
        if self.stages:
            return Mapping.chain([m.inverse() for m in reversed(self.stages)])
        front, rules = [], []
        for r in self.rules:
            inv = _invert_rule(r)
            (front if r.add else rules).append(inv)
        # First match wins in the inverse too, and a general rule's image can
        # cover a specific rule's ('module.{rest*} -> {rest}' inverts to
        # '{rest*} -> module.{rest}'): the more literal sources go first.
        rules.sort(key=lambda r: -sum(len(p) for s in r.sources for p in s.parts if isinstance(p, str)))
        name = self.name[:-6] if self.name.endswith(".rules") else self.name
        return Mapping(front + rules, f"inverse of {name}")


def _invert_rule(r: Rule) -> Rule:
    where = f"{r.where}: '{r}'"
    if any(s.is_regex for s in r.sources):
        raise MappingError(f"{where}: a re: rule cannot be inverted")
    if r.is_drop:
        raise MappingError(f"{where}: dropped keys cannot be brought back")
    err = _Err(f"inverse of {r.origin}", r.line, "")
    kinds = dict(r.sources[0].captures) if r.sources else {}
    used = {c for t in r.targets for c in t.captures}
    lost = [c for c in kinds if c not in used]
    if lost and not r.add:
        raise MappingError(f"{where}: the targets do not use {{{lost[0]}}}, so it cannot be inverted")

    def as_source(t: Template) -> Pattern:
        text = "".join(str(Capture(p.name, kinds.get(p.name, "one"))) if isinstance(p, Capture) else p
                       for p in t.parts)
        return Pattern(text, 1, err)

    def as_target(p: Pattern) -> Template:
        text = "".join("{" + x.name + "}" if isinstance(x, Capture) else x for x in p.parts)
        return Template(text, 1, err)

    new_sources = [as_source(t) for t in r.targets]
    if r.add:  # what was added goes away again
        return Rule(new_sources, [], [_make(Drop)], None, False, r.line, f"inverse of {r.origin}")
    if len(r.targets) > 1 and not any(not t.elementwise for t in r.transforms):
        raise MappingError(f"{where}: a tie (one tensor under several names) cannot be inverted")
    transforms: list[Transform] = []
    for t in reversed(r.transforms):
        try:
            transforms.extend(t.inverse())
        except MappingError as e:
            raise MappingError(f"{where}: {e}") from None
    guard = None
    if r.guard:
        conds = []
        for what, op, value in r.guard.conds:
            if what == "dtype":
                casts = [t for t in r.transforms if isinstance(t, Cast)]
                if casts:
                    if op != "==":
                        continue
                    value = casts[-1].dtype.name
            if what == "ndim":
                nd: int | None = value
                for t in r.transforms:
                    nd = t.ndim_after(nd)
                if nd is None or op != "==":
                    continue
                value = nd
            conds.append((what, op, value))
        guard = Guard(conds) if conds else None
    inv = Rule(new_sources, [as_target(s) for s in r.sources], transforms, guard, False,
               r.line, f"inverse of {r.origin}")
    try:  # the checks a written rule gets (captures, tensor counts)
        parse_rule(str(inv), r.line, inv.origin)
    except MappingError as e:
        raise MappingError(f"{where}: cannot be inverted: {e}") from None
    return inv


# --- rebuilding the tree --------------------------------------------------------------------

def _kids(node):
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, (list, tuple)):
        return list(enumerate(node))
    if isinstance(node, ObjectRecord) and isinstance(node.state, dict):
        return list(node.state.items())
    return []


def _is_container(v) -> bool:
    return isinstance(v, (dict, list, tuple)) or (isinstance(v, ObjectRecord) and v.kind == "newobj")


class _Placer:
    """Finds where a renamed tensor goes in the old tree, with
    each node's keys indexed once: flat state dicts have many thousands."""

    def __init__(self, tree, removed: set[str]):
        self.tree, self.removed = tree, removed
        self._index: dict[int, tuple[dict, list]] = {}

    def index(self, node) -> tuple[dict, list]:
        """(str(key) -> (key, child) for dicts, [(str(key), key, child)] of container children)."""
        got = self._index.get(id(node))
        if got is None:
            kids = _kids(node)
            exact = {str(k): (k, v) for k, v in kids} if isinstance(node, dict) else {}
            conts = sorted(((str(k), k, v) for k, v in kids if _is_container(v)),
                           key=lambda t: -len(t[0]))
            got = self._index[id(node)] = (exact, conts)
        return got

    def resolve(self, name: str) -> tuple[tuple, Any]:
        """(path of a dict in the old tree, key) where a tensor named ``name`` goes:
        the deepest dict whose path is a prefix of the name."""
        node, path, rest = self.tree, (), name
        last = None
        while True:
            exact, conts = self.index(node)
            if isinstance(node, dict):
                last = (path, rest)
                hit = exact.get(rest)
                if hit is not None:
                    k, v = hit
                    if isinstance(v, TensorRef) and join_path(path + (k,)) in self.removed:
                        return path, k
                    raise MappingError(f"mapped name '{name}' collides with an existing "
                                       f"{'tensor' if isinstance(v, TensorRef) else 'entry'}")
            for ks, k, v in conts:  # longest key first
                if rest.startswith(ks + "."):
                    node, path, rest = v, path + (k,), rest[len(ks) + 1:]
                    break
            else:
                break
        if last is None:
            raise MappingError(f"cannot place mapped tensor '{name}': the checkpoint's root is "
                               f"a {type(self.tree).__name__}, not a dict")
        return last


def _rebuild(tree, keep: set[str], outputs: list[tuple[str, TensorRef, str]]):
    paths = {join_path(p): p for p, leaf in iter_leaves(tree) if isinstance(leaf, TensorRef)}
    removed = set(paths) - keep
    placed: dict[tuple, list] = {}   # dict path -> [(key, ref, anchor path)]
    placer = _Placer(tree, removed)
    for name, ref, anchor in outputs:
        if name in keep and anchor == name:
            continue  # passed through: stays where it is
        dpath, key = placer.resolve(name)
        placed.setdefault(dpath, []).append((key, ref, paths.get(anchor)))

    def put(out, key, value, path):
        if key in out:
            raise MappingError(f"mapped name '{join_path(path + (key,))}' is written twice")
        out[key] = value

    def build(node, path):
        if isinstance(node, TensorRef):
            return node if join_path(path) in keep else _REMOVED
        if isinstance(node, dict):
            out = OrderedDict() if isinstance(node, OrderedDict) else {}
            here = placed.get(path, [])
            at: dict[tuple, list] = {}
            tail = []
            for key, ref, anchor in here:
                if anchor is not None and anchor[:-1] == path:
                    at.setdefault(anchor, []).append((key, ref))
                else:
                    tail.append((key, ref))
            for k, v in node.items():
                for key, ref in at.get(path + (k,), ()):
                    put(out, key, ref, path)
                child = build(v, path + (k,))
                if child is not _REMOVED:
                    put(out, k, child, path)
            for key, ref in tail:
                put(out, key, ref, path)
            if node and not out:
                return _REMOVED
            return out
        if isinstance(node, (list, tuple)):
            items = [build(v, path + (i,)) for i, v in enumerate(node)]
            kept = [x for x in items if x is not _REMOVED]
            if node and not kept:
                return _REMOVED
            return kept if isinstance(node, list) else tuple(kept)
        if isinstance(node, ObjectRecord) and node.kind == "newobj":
            if isinstance(node.state, dict):
                state = build(node.state, path)
            elif node.state is not None:
                state = build(node.state, path + ("__state__",))
            else:
                state = None
            args = build(node.args, path + ("__args__",)) if node.args else node.args
            return ObjectRecord(node.cls, {} if state is _REMOVED else state,
                                () if args is _REMOVED else args, node.kind)
        return node

    new = build(tree, ())
    if new is _REMOVED:
        new = OrderedDict() if isinstance(tree, OrderedDict) else {}
        for key, ref, _ in placed.get((), []):
            put(new, key, ref, ())
    return new


# --- presets ----------------------------------------------------------------------------------

def _preset_dir():
    from importlib.resources import files

    return files("ckptconv.presets")


def preset_names() -> list[str]:
    return sorted(p.name[:-6] for p in _preset_dir().iterdir() if p.name.endswith(".rules"))


def preset_text(name: str) -> str:
    p = _preset_dir() / f"{name}.rules"
    if not name or "/" in name or not p.is_file():
        raise UsageError(f"unknown preset '{name}'; presets: {', '.join(preset_names())}")
    return p.read_text()


def _description(text: str) -> str:
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            return s.lstrip("#").strip()
        if s:
            break
    return ""


@dataclass
class PresetsReport(Report):
    presets: list[dict]
    text: str | None = None

    def to_dict(self) -> dict:
        if self.text is not None:
            return {"name": self.presets[0]["name"], "description": self.presets[0]["description"],
                    "rules": self.text}
        return {"presets": self.presets}

    def __str__(self) -> str:
        if self.text is not None:
            return self.text.rstrip("\n")
        width = max((len(p["name"]) for p in self.presets), default=0)
        return "\n".join(f"{p['name']:<{width}}  {p['description']}" for p in self.presets)


def presets_report(name: str | None = None) -> PresetsReport:
    """Every preset with its one-line description, or one preset's rules."""
    if name:
        text = preset_text(name)
        Mapping.parse(text, f"{name}.rules")  # a shipped preset must parse
        return PresetsReport([{"name": name, "description": _description(text)}], text)
    return PresetsReport([{"name": n, "description": _description(preset_text(n))}
                          for n in preset_names()])



def resolve_mapping(mapping) -> Mapping | None:
    """A Mapping from a Mapping, a preset name, a rules file, rules text or a list of those."""
    if mapping is None:
        return None
    if isinstance(mapping, Mapping):
        return mapping
    if isinstance(mapping, (list, tuple)):
        parts = [resolve_mapping(m) for m in mapping]
        return Mapping.chain(parts) if len(parts) > 1 else parts[0]
    return Mapping.load(str(mapping))
