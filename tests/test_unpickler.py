"""The restricted unpickler's two engines agree.

``RestrictedUnpickler.load`` runs a pickle held in memory through a fused
loop that decodes and runs the opcodes torch pickles are made of inline, and
a stream through a plain loop that runs every opcode with ``_step``. Both
must build the same value, and refuse the same pickles, for anything: plain
values in every protocol, real torch checkpoints, the malicious corpus and
random corruptions of them.
"""
from __future__ import annotations

import io
import pickle
import random
import zipfile
from collections import OrderedDict

import pytest

import malicious_corpus as mc
from ckptconv.adapters.torch import TorchUnpickler
from ckptconv.errors import CkptconvError, UnsafePickleError
from ckptconv.tensor import BufferSource, TensorRef
from ckptconv.tree import ObjectRecord
from ckptconv.unpickler import RestrictedUnpickler

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _sources(key, dtype, numel, untyped):
    return BufferSource(bytes(numel * (1 if untyped else dtype.itemsize)))


def _torch_unpickler():
    return TorchUnpickler("test.pkl", _sources)


def canonical(v):
    """A comparable form of a loaded value (tensors by dtype/shape/strides/offset)."""
    if isinstance(v, TensorRef):
        return ("tensor", v.dtype.name, v.shape, getattr(v, "strides", None),
                getattr(v, "offset", None), v.requires_grad, v.is_parameter)
    if isinstance(v, ObjectRecord):
        return ("record", v.cls, v.kind, canonical(v.args), canonical(v.state))
    if isinstance(v, OrderedDict):
        return ("odict", [(canonical(k), canonical(x)) for k, x in v.items()],
                sorted((k, canonical(x)) for k, x in vars(v).items()))
    if isinstance(v, dict):
        return ("dict", [(canonical(k), canonical(x)) for k, x in v.items()])
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [canonical(x) for x in v])
    if isinstance(v, (set, frozenset)):
        return (type(v).__name__, sorted(map(repr, v)))
    if isinstance(v, float) and v != v:
        return ("nan",)
    if isinstance(v, (str, bytes, int, float, complex, type(None))):
        return (type(v).__name__, v)
    slots = getattr(type(v), "__slots__", ())  # e.g. a bare storage: compare its fields
    return (type(v).__name__,) + tuple(
        canonical(getattr(v, s, None)) if isinstance(getattr(v, s, None), (str, int, tuple))
        else type(getattr(v, s, None)).__name__ for s in slots)


def both(make, data: bytes):
    """Run the fused and the plain engine; return their outcomes."""
    fast = slow = None
    for engine in ("fast", "plain"):
        up = make()
        try:
            with_errors = _engine_load(up, data, engine)
            res = ("ok", canonical(with_errors))
        except UnsafePickleError:
            res = ("unsafe", None)
        except CkptconvError:
            res = ("error", None)
        if engine == "fast":
            fast = res
        else:
            slow = res
    return fast, slow


def _engine_load(up: RestrictedUnpickler, data: bytes, engine: str):
    if engine == "fast":
        return up.load(data, whole=False)    # bytes: the first pickle, whatever follows
    return up.load(io.BytesIO(data))         # a stream: its first pickle, read into memory


plain_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.tuples(children, children)
    | st.tuples(children) | st.tuples(children, children, children)
    | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=5)
    | st.builds(frozenset, st.lists(st.integers() | st.text(max_size=5), max_size=3)),
    max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(value=plain_values, protocol=st.integers(min_value=0, max_value=5))
def test_plain_values_in_every_protocol(value, protocol):
    data = pickle.dumps(value, protocol=protocol)  # our own value: dumping is not loading
    fast, slow = both(_torch_unpickler, data)
    assert fast == slow
    assert fast == ("ok", canonical(value))


def _torch_pickles(torch_files) -> list[bytes]:
    import torch

    out = []
    with zipfile.ZipFile(torch_files["zip"]) as z:
        out.append(z.read(next(n for n in z.namelist() if n.endswith("/data.pkl"))))
    buf = io.BytesIO()
    sd = OrderedDict((f"layer.{i}.weight", torch.randn(3, i + 1)) for i in range(40))
    sd["tied"] = sd["layer.3.weight"]
    sd["view"] = sd["layer.5.weight"][1:, ::2]
    sd["param"] = torch.nn.Parameter(torch.ones(2))
    sd["bf16"] = torch.zeros(4, dtype=torch.bfloat16)
    sd._metadata = {"": {"version": 1}}
    torch.save(sd, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        out.append(z.read(next(n for n in z.namelist() if n.endswith("/data.pkl"))))
    return out


def test_torch_checkpoints_agree(torch_files):
    for data in _torch_pickles(torch_files):
        fast, slow = both(_torch_unpickler, data)
        assert fast[0] == "ok" and fast == slow


def test_malicious_corpus_refused_alike():
    for p in mc.corpus():
        fast, slow = both(_torch_unpickler, p.data)
        assert fast[0] in ("unsafe", "error"), p.name
        assert fast == slow, p.name


def test_random_corruptions_agree(torch_files):
    rng = random.Random(7)
    seeds = _torch_pickles(torch_files) + [
        pickle.dumps({"a": [1, 2.5, "x", (3, 4)], "b": {1: None}}, protocol=p) for p in range(6)]
    checked = 0
    for data in seeds:
        for _ in range(150):
            b = bytearray(data)
            how = rng.randrange(3)
            if how == 0:
                b = b[:rng.randrange(len(b))]
            elif how == 1:
                for _ in range(rng.randint(1, 3)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
            else:
                i = rng.randrange(len(b))
                b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            fast, slow = both(_torch_unpickler, bytes(b))
            assert fast == slow, bytes(b)
            checked += 1
    assert checked == 150 * len(seeds)
