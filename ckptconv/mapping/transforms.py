"""The transforms a rule pipes its tensors through (``| transpose``,
``| split(0)``...) and the lazy tensor operations under them: a rename moves
the same TensorRef, a split or slice of stored bytes is a view, a concat along
the outer dimension streams its inputs, anything else computes with numpy
when a writer asks."""
from __future__ import annotations

import math
from typing import Sequence

from .._lazy import np
from .. import dtypes as _dt
from ..errors import CkptconvError, MappingError
from ..tensor import CHUNK_BYTES, LazyTensor, StoredTensor, TensorRef, cast
from .syntax import ErrorAt, format_arg

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

    def __init__(self, args: list, kwargs: dict, col: int, err: ErrorAt | None):
        self.args, self.kwargs, self.col = list(args), dict(kwargs), col
        self.setup(err or ErrorAt("<rules>", 0, ""))

    def setup(self, err: ErrorAt) -> None:
        if self.args or self.kwargs:
            raise err(self.col, f"{self.name} takes no arguments")

    def _ints(self, err: ErrorAt, values, what: str) -> list[int]:
        if not all(isinstance(v, int) for v in values):
            raise err(self.col, f"{self.name}: {what} must be integers, got {format_arg(values)}")
        return [int(v) for v in values]

    def _one_dimension(self, err: ErrorAt) -> int:
        """The one argument of ``concat(0)``, ``stack(0)``, ``unstack(0)``."""
        if len(self.args) != 1 or self.kwargs:
            raise err(self.col, f"{self.name} takes one dimension: {self.name}(0)")
        return self._ints(err, self.args, "the dimension")[0]

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
        parts = [format_arg(a) for a in self.args]
        parts += [f"{k}={format_arg(v)}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})"


def make_transform(cls: type, *args, **kwargs) -> Transform:
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
    out = _derived(ref, ref.dtype, shape,
                   lambda: np.ascontiguousarray(np.transpose(ref.numpy(), axes)), (ref,))
    out.permuted_from = (ref, tuple(axes))  # load_into copies from a view of the stored bytes
    return out


class Permute(Transform):
    """``permute(3, 2, 0, 1)``: output dimension i is input dimension p[i]."""

    name = "permute"

    def setup(self, err):
        dims = self.args[0] if len(self.args) == 1 and isinstance(self.args[0], list) else self.args
        self.dims = self._ints(err, dims, "dimensions")
        if self.kwargs or sorted(self.dims) != list(range(len(self.dims))):
            raise err(self.col, f"permute needs a permutation of 0..n-1, got {format_arg(dims)}")

    def one(self, ref):
        if len(ref.shape) != len(self.dims):
            raise MappingError(f"{self}: tensor has {len(ref.shape)} dimensions, not {len(self.dims)}")
        return permute(ref, self.dims)

    def inverse(self):
        return [make_transform(Permute, *[int(i) for i in np.argsort(self.dims)])]


class Reshape(Transform):
    """``reshape(4, -1)``; inverting needs the input shape, known once applied."""

    name = "reshape"

    def setup(self, err):
        dims = self.args[0] if len(self.args) == 1 and isinstance(self.args[0], list) else self.args
        self.shape = self._ints(err, dims, "sizes")
        if self.kwargs or sum(1 for s in self.shape if s == -1) > 1 or any(s < -1 for s in self.shape):
            raise err(self.col, f"reshape: bad shape {format_arg(self.shape)}")
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
        return [make_transform(Reshape, *next(iter(self.seen)))]


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
        return [make_transform(Concat, self.dim)]


class Concat(Transform):
    """``concat(dim)``: many tensors into one."""

    name = "concat"
    elementwise = False

    def setup(self, err):
        self.dim = self._one_dimension(err)
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
                return [make_transform(Split, self.dim, list(sizes))]
        elif len(self.seen) > 1:
            raise MappingError(f"{self} cannot be inverted: it joined parts of different sizes")
        return [make_transform(Split, self.dim)]  # equal parts, one per target


class Stack(Transform):
    """``stack(dim)``: many tensors of one shape into one with a new dimension."""

    name = "stack"
    elementwise = False

    def setup(self, err):
        self.dim = self._one_dimension(err)

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
        return [make_transform(Unstack, self.dim)]


class Unstack(Transform):
    """``unstack(dim)``: one tensor into its slices along ``dim``, one per target."""

    name = "unstack"
    elementwise = False

    def setup(self, err):
        self.dim = self._one_dimension(err)

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
        return [make_transform(Stack, self.dim)]


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
        return [make_transform(Cast, src)]


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
        return [make_transform(Slice, self.dim, self.before, -self.after if self.after else None)]


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
        return [make_transform(Scale, 1.0 / self.factor)]


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
            raise err(self.col, f"reorder needs a permutation of 0..n-1, got {format_arg(self.order)}")

    def one(self, ref):
        d = _dim(self.dim, len(ref.shape), str(self))
        n = len(self.order)
        if ref.shape[d] % n:
            raise MappingError(f"{self}: dimension {d} of size {ref.shape[d]} is not {n} equal blocks")
        b = ref.shape[d] // n
        return concat([narrow(ref, d, i * b, (i + 1) * b) for i in self.order], d)

    def inverse(self):
        return [make_transform(Reorder, self.dim, [int(i) for i in np.argsort(self.order)])]


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
