"""The canonical form: a ``Checkpoint`` is a tree with lazy tensor leaves.

Nodes are dicts (any hashable keys, ``OrderedDict`` kept as such), lists,
tuples, plain scalars, strings, bytes, None, numpy scalars, and inert
``ObjectRecord``s (a pickled class instance that was *recorded*, never
constructed). Leaves that are ``TensorRef``s are the tensors. The same
``TensorRef`` object at two paths is a tied tensor (``aliases``).

Flat tensor names join the path with ".": ``model_state_dict.conv.weight``;
a plain state dict keeps its own keys. ``encode_tree``/``decode_tree`` turn
the non-tensor structure into JSON, so formats that only hold flat named
tensors (safetensors, TF, HDF5) can carry the whole checkpoint in metadata.
"""
from __future__ import annotations

import base64
import json
import math
from collections import OrderedDict
from typing import Any, Iterator

from ._lazy import np

from .errors import FormatError, UsageError
from .tensor import ArrayTensor, TensorRef
from .views import record_views, restore_views

TREE_KEY = "ckptconv.tree"
ALIASES_KEY = "ckptconv.aliases"
SOURCE_KEY = "ckptconv.source"


class ObjectRecord:
    """An object from a pickle, recorded inertly: never imported nor called.

    ``kind`` says how it was built: ``"newobj"`` (``cls.__new__(cls, *args)`` then
    ``__setstate__``/``__dict__`` update with ``state``), ``"reduce"`` (an
    allowlisted call such as ``torch.Size((2, 3))``, an Enum member
    ``IntervalStrategy("steps")``; a dict subclass such as ``defaultdict(list)``
    keeps its items in ``state``), ``"global"`` (a bare reference such as
    ``torch.float32``) or ``"parent"`` (an OmegaConf node's link back to the
    container it sits in: the one place where a pickle's cycle is kept, as a
    marker). The known framework classes: ``adapters/torch/known_globals.py``.
    """

    cls: str
    state: Any
    args: tuple
    kind: str

    def __init__(self, cls: str, state: Any = None, args: tuple = (), kind: str = "newobj"):
        self.cls, self.state, self.args, self.kind = cls, state, args, kind

    def __eq__(self, other):
        return (isinstance(other, ObjectRecord) and self.cls == other.cls
                and self.kind == other.kind and _eq(self.args, other.args)
                and _eq(self.state, other.state))

    def __hash__(self):
        return hash((self.cls, self.kind))

    def __repr__(self):
        if self.kind == "global":
            return f"<{self.cls}>"
        if self.kind == "parent":
            return f"<the enclosing {self.cls}>"
        inner = ", ".join(repr(a) for a in self.args) if self.kind == "reduce" else repr(self.state)
        return f"<{self.cls}({inner})>"


def _eq(a, b) -> bool:
    try:
        r = a == b
        return bool(r) if not isinstance(r, np.ndarray) else bool(r.all())
    except Exception:
        return a is b


def is_container(node) -> bool:
    """Whether ``node`` has children in the tree: dicts, lists, tuples, the
    records of objects built with ``__new__`` (``kind == "newobj"``) and of
    calls that got a state (a ``defaultdict``'s items). A record of a plain
    call (``torch.Size((2, 3))``, an Enum member) or a bare global is a leaf."""
    return isinstance(node, (dict, list, tuple)) or (
        isinstance(node, ObjectRecord) and (
            node.kind == "newobj" or (node.kind == "reduce" and node.state is not None)))


def children(node) -> Iterator[tuple[Any, Any]]:
    """(key, child) of a tree node, in order: the one walker of the canonical
    tree (readers' trees, writers, mapping, select, load_into).

    A container record's children are its state's entries when the state is a
    dict (``rec.state["w"]`` has the path ``...rec.w``), else ``"__state__"``,
    then ``"__args__"`` (the ``__new__`` or call arguments) when it has any. Leaves
    (tensors, plain values, other records) have none.
    """
    if isinstance(node, dict):
        yield from node.items()
    elif isinstance(node, (list, tuple)):
        yield from enumerate(node)
    elif isinstance(node, ObjectRecord) and is_container(node):
        if isinstance(node.state, dict):
            yield from node.state.items()
        elif node.state is not None:
            yield "__state__", node.state
        if node.args:
            yield "__args__", node.args


def join_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def iter_leaves(tree, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every leaf (tensor or plain value) with its path, depth first, in order."""
    if is_container(tree):
        items = list(children(tree))
        if not items:
            yield path, tree
        for k, v in items:
            yield from iter_leaves(v, path + (k,))
    else:
        yield path, tree


def iter_tensors(tree) -> Iterator[tuple[str, TensorRef]]:
    """(dotted name, tensor) for every tensor leaf, in ``iter_leaves`` order.

    The same names as ``join_path`` of ``iter_leaves``' paths, built as
    strings on the way down: writers walk trees of 100,000s of tensors.
    """
    out: list[tuple[str, TensorRef]] = []
    _collect_tensors(tree, None, out)
    return iter(out)


def _collect_tensors(node, prefix: str | None, out: list) -> None:
    if isinstance(node, TensorRef):
        out.append(("" if prefix is None else prefix, node))
        return
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, (list, tuple)):
        items = enumerate(node)
    elif isinstance(node, ObjectRecord) and is_container(node):
        items = children(node)
    else:
        return
    tensor = TensorRef
    for k, v in items:
        name = str(k) if prefix is None else f"{prefix}.{k}"
        if isinstance(v, tensor):
            out.append((name, v))
        elif isinstance(v, (dict, list, tuple, ObjectRecord)):
            _collect_tensors(v, name, out)


class Checkpoint:
    """A lazily loaded checkpoint: ``tree`` plus ``metadata`` (str -> str).

    This module's two records are plain classes, not dataclasses: every load
    imports them, and creating a dataclass costs ~0.7 ms."""

    tree: Any
    metadata: dict[str, str]
    format: str | None
    path: str | None
    info: dict[str, Any]   # reader notes (object paths, writer...)

    def __init__(self, tree: Any, metadata: dict[str, str] | None = None,
                 format: str | None = None, path: str | None = None,
                 info: dict[str, Any] | None = None):
        self.tree = tree
        self.metadata = {} if metadata is None else metadata
        self.format, self.path = format, path
        self.info = {} if info is None else info

    def _fields(self) -> tuple:
        return (self.tree, self.metadata, self.format, self.path, self.info)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None   # mutable

    def close(self) -> None:
        """Release the files this checkpoint holds open, now.

        Files are also released when the checkpoint is garbage-collected;
        ``close`` (or ``with ckptconv.load(...) as ck:``) does it at once. A
        tensor read afterwards opens its file again.
        """
        for ref in self.unique_tensors().values():
            source = getattr(ref, "source", None)
            fr = source.file_range() if source is not None else None
            if fr is not None:
                fr[0].close()
        closer = self.info.get("close")
        if callable(closer):
            closer()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tensors(self) -> dict[str, TensorRef]:
        """Flat name -> tensor, every name (tied tensors appear under each)."""
        out: dict[str, TensorRef] = {}
        for name, ref in iter_tensors(self.tree):
            if name in out:
                raise FormatError(f"two tensors flatten to the same name '{name}'")
            out[name] = ref
        return out

    def unique_tensors(self) -> dict[str, TensorRef]:
        """Flat name -> tensor, each tied group once, under its first name."""
        seen: set[int] = set()
        out = {}
        for name, ref in iter_tensors(self.tree):
            if id(ref) not in seen:
                seen.add(id(ref))
                out[name] = ref
        return out

    @property
    def aliases(self) -> dict[str, str]:
        """Tied tensors: name -> the first name holding the same tensor."""
        first: dict[int, str] = {}
        out = {}
        for name, ref in iter_tensors(self.tree):
            if id(ref) in first:
                out[name] = first[id(ref)]
            else:
                first[id(ref)] = name
        return out

    def leaves(self) -> list[tuple[str, Any]]:
        return [(join_path(p), v) for p, v in iter_leaves(self.tree)]

    @property
    def is_flat(self) -> bool:
        """True for a plain state dict: a dict of str keys -> tensors only."""
        return isinstance(self.tree, dict) and all(
            isinstance(k, str) and isinstance(v, TensorRef) for k, v in self.tree.items())

    def select(self, tree_path: str) -> "Checkpoint":
        """The subtree at ``tree_path`` (``model_state_dict`` or ``a.b.0``)."""
        node = self.tree
        if not tree_path:
            return self
        rest = tree_path
        while rest:
            found = False
            for k, v in children(node):
                ks = str(k)
                if rest == ks or rest.startswith(ks + "."):
                    node, rest, found = v, rest[len(ks) + 1:], True
                    break
            if not found:
                tops = [str(k) for k, _ in children(node)][:12]
                raise UsageError(f"--select '{tree_path}': no '{rest}' in the checkpoint; "
                                 f"subtrees here: {', '.join(tops) or '(none)'}")
        return Checkpoint(node, dict(self.metadata), self.format, self.path, dict(self.info))

    def map_tensors(self, fn) -> "Checkpoint":
        """A copy whose tensors are ``fn(ref)`` (ties kept: each ref mapped once)."""
        memo: dict[int, TensorRef] = {}

        def one(ref):
            if id(ref) not in memo:
                memo[id(ref)] = fn(ref)
            return memo[id(ref)]

        return Checkpoint(map_tree(self.tree, one), dict(self.metadata), self.format,
                          self.path, dict(self.info))

    @classmethod
    def from_state_dict(cls, tensors: dict, metadata: dict | None = None) -> "Checkpoint":
        """A checkpoint from name -> tensor (TensorRef, numpy array or torch tensor)."""
        return cls(to_canonical(dict(tensors)), dict(metadata or {}))

    def __repr__(self):
        t = self.unique_tensors()
        return (f"<Checkpoint {self.format or ''} {len(t)} tensors, "
                f"{sum(r.nbytes for r in t.values())} bytes>")


def _copy_container(node, fn):
    """A dict (of its own kind), list or tuple with each child replaced by
    ``fn(child)``; any other node as it is."""
    if isinstance(node, OrderedDict):     # with its attributes (a state dict's _metadata)
        return _with_attrs(OrderedDict((k, fn(v)) for k, v in node.items()), node)
    if isinstance(node, dict):
        return {k: fn(v) for k, v in node.items()}
    if isinstance(node, list):
        return [fn(v) for v in node]
    if isinstance(node, tuple):
        return tuple(fn(v) for v in node)
    return node


def map_tree(tree, fn):
    """Copy ``tree`` with every tensor replaced by ``fn(tensor)``."""
    if isinstance(tree, TensorRef):
        return fn(tree)
    if isinstance(tree, ObjectRecord):
        return ObjectRecord(tree.cls, map_tree(tree.state, fn), map_tree(tree.args, fn), tree.kind)
    return _copy_container(tree, lambda v: map_tree(v, fn))


def _with_attrs(new: OrderedDict, old: OrderedDict) -> OrderedDict:
    """``new`` with ``old``'s instance attributes (a state dict's ``_metadata``:
    the per-module versions ``load_state_dict`` hands to each module's hooks)."""
    for k, v in vars(old).items():
        setattr(new, k, v)
    return new


def set_attributes(od: OrderedDict, attrs: dict, display: str = "") -> OrderedDict:
    """Instance attributes on an OrderedDict, as pickle's BUILD sets them; a
    name that would shadow a method (``items``, ``keys``...) is refused."""
    for k, v in attrs.items():
        if not isinstance(k, str) or not k.isidentifier() or hasattr(OrderedDict, k) \
                or k.startswith("__"):
            raise FormatError(f"{display}: attribute {k!r} on an OrderedDict is not a plain "
                              "attribute")
        setattr(od, k, v)
    return od


def to_canonical(obj, _memo=None):
    """Turn torch tensors / numpy arrays in a user's tree into TensorRefs (ties kept)."""
    memo = {} if _memo is None else _memo
    if isinstance(obj, TensorRef):
        return obj
    mod = type(obj).__module__
    if mod.startswith("torch") and hasattr(obj, "untyped_storage") and hasattr(obj, "dtype"):
        from .tensor import from_torch

        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape),
               tuple(obj.stride()), obj.dtype) if obj.numel() else id(obj)
        if key not in memo:
            memo[key] = from_torch(obj)
        return memo[key]
    if isinstance(obj, np.ndarray):
        if id(obj) not in memo:
            memo[id(obj)] = (ArrayTensor(obj), obj)  # keep obj alive so its id stays unique
        return memo[id(obj)][0]
    return _copy_container(obj, lambda v: to_canonical(v, memo))


# --- JSON encoding of the structure --------------------------------------------

def encode_tree(tree, names: dict[int, str]) -> Any:
    """JSON-able structure of ``tree``; tensors become ``{"$t": name}``."""
    if isinstance(tree, TensorRef):
        return {"$t": names[id(tree)]}
    if tree is None or isinstance(tree, (bool, str)):
        return tree
    if isinstance(tree, int) and type(tree) is int:
        return tree
    if isinstance(tree, float) and type(tree) is float:
        return tree if math.isfinite(tree) else {"$f": repr(tree)}
    if isinstance(tree, OrderedDict):
        out = {"$od": [[encode_tree(k, names), encode_tree(v, names)] for k, v in tree.items()]}
        if vars(tree):
            out["attrs"] = encode_tree(dict(vars(tree)), names)
        return out
    if isinstance(tree, dict):
        if all(type(k) is str and not k.startswith("$") for k in tree):
            return {k: encode_tree(v, names) for k, v in tree.items()}
        return {"$d": [[encode_tree(k, names), encode_tree(v, names)] for k, v in tree.items()]}
    if isinstance(tree, list):
        return [encode_tree(v, names) for v in tree]
    if isinstance(tree, tuple):
        return {"$tuple": [encode_tree(v, names) for v in tree]}
    if isinstance(tree, (bytes, bytearray)):
        return {"$b": base64.b64encode(bytes(tree)).decode()}
    if isinstance(tree, complex):
        return {"$c": [repr(tree.real), repr(tree.imag)]}
    if isinstance(tree, np.ndarray):
        from . import dtypes as _dt

        return {"$nd": _dt.from_numpy(tree.dtype).name, "shape": list(tree.shape),
                "data": base64.b64encode(np.ascontiguousarray(tree).tobytes()).decode()}
    if isinstance(tree, np.generic):
        return {"$np": str(tree.dtype), "v": base64.b64encode(tree.tobytes()).decode()}
    if isinstance(tree, np.dtype):
        return {"$npdtype": tree.str}
    if isinstance(tree, (set, frozenset)):
        return {"$set" if isinstance(tree, set) else "$frozenset": [encode_tree(v, names) for v in tree]}
    if isinstance(tree, ObjectRecord):
        return {"$obj": tree.cls, "kind": tree.kind, "args": encode_tree(tree.args, names),
                "state": encode_tree(tree.state, names)}
    if isinstance(tree, (int, float)):  # bool/int/float subclasses (IntEnum, ...)
        return encode_tree(type(tree).__mro__[-2](tree), names)
    raise FormatError(f"cannot encode a value of type {type(tree).__name__} in the checkpoint tree")


def decode_tree(obj, tensors: dict[str, TensorRef]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        raise FormatError(f"bad tree node {obj!r}")
    if "$t" in obj:
        name = obj["$t"]
        if name not in tensors:
            raise FormatError(f"tree refers to tensor '{name}' that is not in the file")
        return tensors[name]
    if "$od" in obj:
        od = OrderedDict((_hashable(decode_tree(k, tensors)), decode_tree(v, tensors))
                         for k, v in obj["$od"])
        return set_attributes(od, decode_tree(obj.get("attrs"), tensors) or {})
    if "$flat" in obj:       # a state dict: its keys are the tensor names, in this order
        kind = OrderedDict if obj.get("type") == "OrderedDict" else dict
        missing = [n for n in obj["$flat"] if n not in tensors]
        if missing:
            raise FormatError(f"tree refers to tensor '{missing[0]}' that is not in the file")
        flat = kind((n, tensors[n]) for n in obj["$flat"])
        return set_attributes(flat, decode_tree(obj.get("attrs"), tensors) or {}) \
            if kind is OrderedDict else flat
    if "$d" in obj:
        return {_hashable(decode_tree(k, tensors)): decode_tree(v, tensors) for k, v in obj["$d"]}
    if "$tuple" in obj:
        return tuple(decode_tree(v, tensors) for v in obj["$tuple"])
    if "$f" in obj:
        return float(obj["$f"])
    if "$b" in obj:
        return base64.b64decode(obj["$b"])
    if "$c" in obj:
        return complex(float(obj["$c"][0]), float(obj["$c"][1]))
    if "$nd" in obj:
        from . import dtypes as _dt

        dt = _dt.numpy_dtype(obj["$nd"])
        return np.frombuffer(base64.b64decode(obj["data"]), dtype=dt).reshape(obj["shape"]).copy()
    if "$np" in obj:
        return np.frombuffer(base64.b64decode(obj["v"]), dtype=np.dtype(obj["$np"]))[0]
    if "$npdtype" in obj:
        return np.dtype(obj["$npdtype"])
    if "$set" in obj:
        return {_hashable(decode_tree(v, tensors)) for v in obj["$set"]}
    if "$frozenset" in obj:
        return frozenset(_hashable(decode_tree(v, tensors)) for v in obj["$frozenset"])
    if "$obj" in obj:
        return ObjectRecord(obj["$obj"], decode_tree(obj.get("state"), tensors),
                            tuple(decode_tree(obj.get("args"), tensors) or ()), obj.get("kind", "newobj"))
    return {k: decode_tree(v, tensors) for k, v in obj.items()}


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


def unique_named(tree, names: dict[int, str] | None = None) -> list[tuple[str, TensorRef]]:
    """(name, tensor) of each distinct tensor, in order, under ``names[id]``
    (a writer's choice of name for tied tensors) or its first name."""
    seen: set[int] = set()
    out = []
    for name, ref in iter_tensors(tree):
        if id(ref) not in seen:
            seen.add(id(ref))
            out.append(((names or {}).get(id(ref), name), ref))
    return out


def tree_to_metadata(ckpt: Checkpoint, names: dict[int, str] | None = None,
                     keeps_order: bool = True) -> dict[str, str]:
    """Namespaced metadata keys that let a flat format restore the whole tree.

    A plain ``dict`` state dict needs nothing (its keys are the whole story)
    unless the format does not keep the order of its names
    (``keeps_order=False``: TF sorts them); an ``OrderedDict`` one records
    its type, key order and attributes (``_metadata``) compactly. Storage
    sharing and strides go to ``ckptconv.views`` (see ``views.py``).
    """
    if names is None:
        names = {}
        for name, ref in iter_tensors(ckpt.tree):
            names.setdefault(id(ref), name)
    out = {}
    tree = ckpt.tree
    if not ckpt.is_flat:
        out[TREE_KEY] = json.dumps(encode_tree(tree, names), separators=(",", ":"))
    elif type(tree) is not dict or (not keeps_order and list(tree) != sorted(tree)):
        flat: dict[str, Any] = {"$flat": list(tree)}
        if isinstance(tree, OrderedDict):
            flat["type"] = "OrderedDict"
            if vars(tree):
                flat["attrs"] = encode_tree(dict(vars(tree)), names)
        out[TREE_KEY] = json.dumps(flat, separators=(",", ":"))
    al = ckpt.aliases
    if al:
        out[ALIASES_KEY] = json.dumps(al, separators=(",", ":"))
    out.update(record_views(unique_named(ckpt.tree, names))[0])
    if ckpt.format:
        # origin: the first format in a chain of conversions (a Keras file through
        # safetensors is still Keras: target choice and layouts go by it)
        out[SOURCE_KEY] = json.dumps({"format": ckpt.format,
                                      "file": ckpt.path and str(ckpt.path).rsplit("/", 1)[-1],
                                      "origin": ckpt.info.get("origin") or ckpt.format})
    return out


def tree_from_metadata(tensors: dict[str, TensorRef], metadata: dict[str, str],
                       display: str = "", info: dict | None = None) -> tuple[Any, dict[str, str]]:
    """Rebuild the tree from flat named tensors + our metadata keys.

    Returns (tree, the metadata left for the user). Tied names listed in
    ``ckptconv.aliases`` point at one TensorRef again; storages and strides
    of ``ckptconv.views`` are rebuilt. ``info`` (the reader's
    ``Checkpoint.info``) gets ``origin``: the format the checkpoint first
    came from, as ``ckptconv.source`` records it.
    """
    md = dict(metadata)
    tensors = restore_views(dict(tensors), md, display)
    try:
        aliases = json.loads(md.pop(ALIASES_KEY)) if ALIASES_KEY in md else {}
        for name, target in aliases.items():
            if target in tensors:
                tensors[name] = tensors[target]
        source = md.pop(SOURCE_KEY, None)
        if source is not None and info is not None:
            src = json.loads(source)
            origin = src.get("origin") or src.get("format") if isinstance(src, dict) else None
            if isinstance(origin, str):
                info["origin"] = origin
        if TREE_KEY in md:
            tree = decode_tree(json.loads(md.pop(TREE_KEY)), tensors)
            return tree, md
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise FormatError(f"{display}: bad ckptconv metadata: {e}") from e
    return dict(tensors), md
