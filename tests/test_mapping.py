"""The mapping DSL: parsing (errors with line:column), matching, lazy transforms,
ties, inversion, reports, result trees, presets and the CLI's --map.

The presets against the frameworks themselves are at the end: a Google BERT
TF1 checkpoint written by TensorFlow -> Hugging Face BertModel (and back), a
Keras model -> its torch twin (and back), timm ViT names -> ViTModel. They
skip when TensorFlow / transformers / keras / h5py are absent.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptconv
from ckptconv import Checkpoint, MappingError
from ckptconv.mapping import ConcatTensor, Mapping, presets_report
from ckptconv.tensor import ArrayTensor, LazyTensor, StoredTensor


def ck_of(**arrays) -> Checkpoint:
    return Checkpoint.from_state_dict({k.replace("__", "."): v for k, v in arrays.items()})


def arr(*shape, dtype=np.float32, start=0):
    n = int(np.prod(shape)) if shape else 1
    return (np.arange(start, start + n) % 251).astype(dtype).reshape(shape)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ckptconv", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


# --- parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, where, what", [
    ("a.b -> c | tranpose", "1:12", "unknown transform 'tranpose'"),
    ("a.b  c", "1:7", "expected '->'"),
    ("a.{x -> b", "1:3", "unbalanced '{'"),
    ("a.{1x} -> b", "1:3", "bad capture"),
    ("a.{x} -> b.{y}", "1:10", "no source captures"),
    ("\n\n# c\nq, k -> qkv | split(0)", "4:15", "split takes one tensor"),
    ("a -> b | permute(0, 0)", "1:10", "permutation"),
    ("a -> b | cast(float99)", "1:10", "unknown dtype"),
    ("re:a(b -> c", "1:5", "bad regular expression"),
    ("a, b -> c, d, e", "1:9", "makes 2 tensors for 3 targets"),
    ("a -> b | scale(2, 3)", "1:10", "scale takes one number"),
    ("a -> b | reshape(2, [3)", "1:23", "expected"),
    ("a -> b  if ndim = 2", "1:12", "bad condition"),
    ("a.{x}, b -> c.{x} | concat(0)", "1:8", "same captures"),
    ("a -> drop | transpose", "1:13", "takes no transforms"),
])
def test_parse_errors_point_to_line_and_column(text, where, what):
    with pytest.raises(MappingError) as e:
        Mapping.parse(text, "rules.map")
    msg = str(e.value)
    assert msg.startswith(f"rules.map:{where}: "), msg
    assert what in msg


def test_rules_file_errors_name_the_file(tmp_path):
    p = tmp_path / "rules.map"
    p.write_text("# my rules\nmodule.{rest*} -> {rest}\nfc.weight -> head.weight | cast(bf99)\n")
    with pytest.raises(MappingError, match=r"^rules\.map:3:28: unknown dtype"):
        Mapping.load(str(p))


def test_comments_blank_lines_and_render_round_trip():
    text = """
    # a comment
    module.{rest*} -> {rest}   # trailing comment
    {p*}/kernel{t?} -> {p}.weight | permute(3, 2, 0, 1)  if ndim == 4 and dtype == float32
    q.weight, k.weight, v.weight -> qkv.weight | concat(0)
    qkv.bias -> q.bias, k.bias, v.bias | split(0, [2, 3, 4])
    re:^layers\\.(\\d+)\\.w$ -> blocks.\\1.weight
    {p*}/adam_{m} -> drop
    add {p*}/bias -> {p}.extra | zeros
    add counter = zeros(shape=[], dtype=int64)
    """
    m = Mapping.parse(text)
    assert len(m.rules) == 8
    again = Mapping.parse(m.to_text())
    assert again.to_text() == m.to_text()


# --- matching ----------------------------------------------------------------------------

def test_one_and_multi_segment_captures_and_separators():
    m = Mapping.parse("""
    bert/encoder/layer_{i}/{rest*}/kernel -> encoder.layer.{i}.{rest}.weight
    {a}.{b}.x -> {b}/{a}/y
    keep/{rest*} -> {rest}
    """)
    ck = ck_of(**{"bert/encoder/layer_3/attention/self/query/kernel": arr(2),
                  "p__q__x": arr(2), "keep/a/b.c": arr(2), "zz/top": arr(2)})
    out = list(m.apply(ck).tensors())
    assert out == ["encoder.layer.3.attention.self.query.weight", "q/p/y", "keep/a/b.c"[5:], "zz/top"]
    # '/' and '.' both separate segments in sources
    ck2 = ck_of(**{"bert.encoder.layer_0.output.dense.kernel": arr(2)})
    assert list(m.apply(ck2).tensors()) == ["encoder.layer.0.output.dense.weight"]


def test_optional_capture_and_repeated_capture():
    m = Mapping.parse("""
    {l}/{l}/kernel{t?} -> {l}.weight
    """)
    ck = ck_of(**{"dense/dense/kernel:0": arr(2), "d2/d2/kernel": arr(2), "a/b/kernel": arr(2)})
    assert list(m.apply(ck).tensors()) == ["dense.weight", "d2.weight", "a/b/kernel"]


def test_first_match_wins_and_report():
    m = Mapping.parse("""
    fc.weight -> head.weight
    {p*}.weight -> {p}.w
    {p*}.never -> x
    """, "r.map")
    ck = ck_of(fc__weight=arr(2), conv__weight=arr(2), conv__bias=arr(2))
    out = m.apply(ck)
    assert list(out.tensors()) == ["head.weight", "conv.w", "conv.bias"]
    rep = m.report
    assert [r["used"] for r in rep.rules] == [1, 1, 0]
    assert rep.matched == 2 and rep.unmatched == ["conv.bias"]
    assert rep.unused_rules == ["r.map:4: {p*}.never -> x"]
    d = rep.to_dict()
    json.dumps(d)
    assert d["unused_rules"] == rep.unused_rules and d["renamed"]["fc.weight"] == ["head.weight"]
    assert "1 unmatched" not in str(rep) and "conv.bias" in str(rep)


def test_strict_makes_unmatched_keys_an_error():
    m = Mapping.parse("fc.{x} -> head.{x}")
    ck = ck_of(fc__weight=arr(2), other=arr(1))
    with pytest.raises(MappingError, match="1 keys match no rule.*other"):
        m.apply(ck, strict=True)
    assert list(m.apply(ck).tensors()) == ["head.weight", "other"]


def test_regex_rules():
    m = Mapping.parse(r"re:^layers\.(\d+)\.w$ -> blocks.\1.weight" "\n"
                      r"re:^(?P<n>\w+)\.gamma$ -> \g<n>.weight")
    ck = ck_of(layers__12__w=arr(2), ln__gamma=arr(2), layers__1__w2=arr(2))
    assert list(m.apply(ck).tensors()) == ["blocks.12.weight", "ln.weight", "layers.1.w2"]


# --- laziness and ties ------------------------------------------------------------------------

@pytest.fixture
def st_file(tmp_path):
    path = tmp_path / "w.safetensors"
    ckptconv.save({"enc.qkv.weight": arr(6, 4), "enc.q.w": arr(2, 3), "enc.k.w": arr(2, 3, start=7),
                   "enc.v.w": arr(2, 3, start=50), "emb.weight": arr(5, 4), "big": arr(3, 4)}, path)
    return path


def test_rename_and_drop_touch_no_bytes(st_file):
    ck = ckptconv.load(st_file)
    before = ck.tensors()
    m = Mapping.parse("enc.{rest*} -> encoder.{rest}\nbig -> drop")
    after = m.apply(ck).tensors()
    assert "big" not in after
    for name in ("qkv.weight", "q.w", "k.w", "v.w"):
        assert after[f"encoder.{name}"] is before[f"enc.{name}"]  # the same lazy ref, no copy
    assert after["emb.weight"] is before["emb.weight"]
    assert m.report.dropped == ["big"]


def test_split_gives_file_views_and_concat_streams(st_file, tmp_path):
    ck = ckptconv.load(st_file)
    m = Mapping.parse("enc.qkv.weight -> q.weight, k.weight, v.weight | split(0)\n"
                      "{p*}.q.w, {p*}.k.w, {p*}.v.w -> {p}.qkv.w | concat(1)\n"
                      "big -> b1, b2 | split(1, [1, 3])")
    out = m.apply(ck).tensors()
    q = out["q.weight"]
    assert isinstance(q, StoredTensor) and q.file_span() is not None  # still bytes in the file
    whole = arr(6, 4)
    for i, n in enumerate(("q", "k", "v")):
        np.testing.assert_array_equal(out[f"{n}.weight"].numpy(), whole[2 * i:2 * i + 2])
    fused = out["enc.qkv.w"]
    assert isinstance(fused, ConcatTensor)
    np.testing.assert_array_equal(fused.numpy(), np.concatenate(
        [arr(2, 3), arr(2, 3, start=7), arr(2, 3, start=50)], axis=1))
    np.testing.assert_array_equal(out["b2"].numpy(), arr(3, 4)[:, 1:])
    # written through a converter, values survive
    dst = tmp_path / "out.safetensors"
    ckptconv.save(m.apply(ck), dst)
    from safetensors.numpy import load_file

    got = load_file(dst)
    np.testing.assert_array_equal(got["k.weight"], whole[2:4])
    np.testing.assert_array_equal(got["b1"], arr(3, 4)[:, :1])


def test_concat_along_outer_dim_streams_inputs_in_order():
    parts = [ArrayTensor(arr(2, 3, start=s)) for s in (0, 10)]
    t = ckptconv.mapping.concat(parts, 0)
    assert b"".join(bytes(c) for c in t.iter_bytes()) == np.concatenate([p.array for p in parts]).tobytes()


@pytest.mark.parametrize("rule, fn", [
    ("transpose", lambda x: x.T),
    ("transpose(0, 2)", lambda x: np.swapaxes(x, 0, 2)),
    ("permute(2, 0, 1)", lambda x: np.transpose(x, (2, 0, 1))),
    ("reshape(4, -1)", lambda x: x.reshape(4, -1)),
    ("cast(float16)", lambda x: x.astype(np.float16)),
    ("cast(bf16)", lambda x: x.astype(ckptconv.dtypes.numpy_dtype("bfloat16"))),
    ("slice(1, 1, -1)", lambda x: x[:, 1:-1]),
    ("slice(0, 1)", lambda x: x[1:]),
    ("pad(2, 1, 2, 7)", lambda x: np.pad(x, [(0, 0), (0, 0), (1, 2)], constant_values=7)),
    ("scale(0.5)", lambda x: x * 0.5),
    ("reorder(1, [2, 0, 1])", lambda x: np.concatenate([x[:, 2:3], x[:, 0:1], x[:, 1:2]], 1)),
    ("zeros", lambda x: np.zeros_like(x)),
    ("ones", lambda x: np.ones_like(x)),
    ("transpose | scale(2) | cast(float64)", lambda x: (x.T * 2).astype(np.float64)),
])
def test_transform_values(rule, fn):
    x = arr(2, 3, 4)
    m = Mapping.parse(f"x -> y | {rule}")
    out = m.apply(ck_of(x=x)).tensors()["y"]
    assert isinstance(out, (LazyTensor, StoredTensor, ArrayTensor))
    want = fn(x)
    got = out.numpy()
    assert got.shape == want.shape == out.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_stack_unstack_and_sum():
    a, b = arr(3), arr(3, start=5)
    m = Mapping.parse("a, b -> s | stack(0)\nc -> c0, c1 | unstack(1)\nd, e -> de | sum")
    out = m.apply(ck_of(a=a, b=b, c=arr(3, 2), d=a, e=b)).tensors()
    np.testing.assert_array_equal(out["s"].numpy(), np.stack([a, b]))
    np.testing.assert_array_equal(out["c1"].numpy(), arr(3, 2)[:, 1])
    np.testing.assert_array_equal(out["de"].numpy(), a + b)


def test_transform_errors_name_rule_and_keys():
    m = Mapping.parse("x -> a, b | split(0)", "r.map")
    with pytest.raises(MappingError, match=r"r\.map:1: 'x': split\(0\): dimension 0 of size 3"):
        m.apply(ck_of(x=arr(3)))


def test_ties_survive_renames_and_transforms():
    w = np.ones((2, 3), np.float32)
    ck = Checkpoint.from_state_dict({"emb.weight": w, "head.weight": w, "fc.weight": arr(2, 2)})
    assert ck.aliases == {"head.weight": "emb.weight"}
    out = Mapping.parse("{m}.weight -> {m}.w").apply(ck)
    assert out.aliases == {"head.w": "emb.w"}
    out2 = Mapping.parse("{m}.weight -> {m}.w | transpose").apply(ck)
    t = out2.tensors()
    assert t["head.w"] is t["emb.w"] and out2.aliases == {"head.w": "emb.w"}
    # a one-source rule with two targets ties them
    out3 = Mapping.parse("fc.weight -> a.weight, b.weight").apply(ck)
    assert out3.tensors()["a.weight"] is out3.tensors()["b.weight"]


# --- many-to-one ----------------------------------------------------------------------------

def test_many_to_one_with_captures_and_incomplete_groups():
    m = Mapping.parse("{p*}.q.weight, {p*}.k.weight, {p*}.v.weight -> {p}.qkv.weight | concat(0)")
    ck = ck_of(l0__q__weight=arr(1, 2), l0__k__weight=arr(1, 2, start=3), l0__v__weight=arr(1, 2, start=6),
               l1__q__weight=arr(1, 2), l1__k__weight=arr(1, 2))  # l1 has no v: stays
    out = m.apply(ck).tensors()
    assert list(out) == ["l0.qkv.weight", "l1.q.weight", "l1.k.weight"]
    np.testing.assert_array_equal(out["l0.qkv.weight"].numpy(), [[0, 1], [3, 4], [6, 7]])
    assert m.report.unmatched == ["l1.q.weight", "l1.k.weight"]


def test_group_member_claimed_by_earlier_rule_breaks_the_group():
    m = Mapping.parse("k.weight -> key.weight\nq.weight, k.weight -> qk.weight | concat(0)")
    out = m.apply(ck_of(q__weight=arr(2), k__weight=arr(2))).tensors()
    assert list(out) == ["q.weight", "key.weight"]


def test_group_found_from_any_member_in_any_order():
    m = Mapping.parse("a.q, a.k -> a.qk | concat(0)")
    out = m.apply(ck_of(a__k=arr(1), a__q=arr(1, start=5))).tensors()
    np.testing.assert_array_equal(out["a.qk"].numpy(), [5, 0])  # source order, not key order


# --- add ------------------------------------------------------------------------------------

def test_add_rules():
    m = Mapping.parse("{l}/bias -> {l}.bias_ih\nadd {l}/bias -> {l}.bias_hh | zeros\n"
                      "add steps = zeros(shape=[], dtype=int64)\nadd ones4 = ones(4) | cast(float16)")
    out = m.apply(ck_of(**{"lstm/bias": arr(4)})).tensors()
    assert list(out) == ["lstm.bias_ih", "lstm.bias_hh", "steps", "ones4"]
    np.testing.assert_array_equal(out["lstm.bias_hh"].numpy(), np.zeros(4, np.float32))
    assert out["steps"].shape == () and out["steps"].dtype.name == "int64"
    assert out["ones4"].numpy().dtype == np.float16
    assert m.report.added == ["lstm.bias_hh", "steps", "ones4"]


def test_collisions_are_errors():
    with pytest.raises(MappingError, match="both map to 'x'"):
        Mapping.parse("a -> x\nb -> x").apply(ck_of(a=arr(1), b=arr(1)))
    with pytest.raises(MappingError, match="also kept unchanged"):
        Mapping.parse("a -> b").apply(ck_of(a=arr(1), b=arr(1)))


# --- trees ---------------------------------------------------------------------------------

def test_nested_tree_keeps_structure_and_non_tensor_leaves():
    tree = {"step": 7, "model_state": OrderedDict([("lstm.w", arr(2)), ("fc.weight", arr(2, 3))]),
            "optimizer_state": {"state": {0: {"exp_avg": arr(2), "step": 3}},
                                "param_groups": [{"lr": 0.1, "params": [0]}]}}
    ck = Checkpoint.from_state_dict(tree)
    m = Mapping.parse("model_state.fc.weight -> model_state.head.weight | transpose\n"
                      "optimizer_state.state.{i}.exp_avg -> drop")
    out = m.apply(ck)
    t = out.tree
    assert t["step"] == 7
    assert isinstance(t["model_state"], OrderedDict)
    assert list(t["model_state"]) == ["lstm.w", "head.weight"]  # in place of its source
    assert t["model_state"]["head.weight"].shape == (3, 2)
    assert t["optimizer_state"]["state"][0] == {"step": 3}
    assert t["optimizer_state"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert t["model_state"]["lstm.w"] is ck.tree["model_state"]["lstm.w"]


def test_moving_tensors_out_of_a_subtree():
    tree = {"model": {"a.weight": arr(2), "b.weight": arr(2)}, "epoch": 3}
    out = Mapping.parse("model.{k*} -> {k}").apply(Checkpoint.from_state_dict(tree))
    assert list(out.tree) == ["epoch", "a.weight", "b.weight"]  # the emptied dict is gone


def test_flat_state_dict_keeps_order():
    ck = ck_of(a=arr(1), b=arr(1), c=arr(1))
    out = Mapping.parse("b -> z").apply(ck)
    assert list(out.tree) == ["a", "z", "c"] and out.is_flat


def test_tensor_onto_non_tensor_leaf_is_an_error():
    ck = Checkpoint.from_state_dict({"w": arr(1), "step": 1})
    with pytest.raises(MappingError, match="collides"):
        Mapping.parse("w -> step").apply(ck)


# --- inversion -----------------------------------------------------------------------------

def test_inverse_round_trips_values_and_names():
    m = Mapping.parse("""
    {p*}/kernel -> {p}.weight | permute(3, 2, 0, 1)  if ndim == 4
    {p*}/kernel -> {p}.weight | transpose
    {p*}/qkv -> {p}.q, {p}.k, {p}.v | split(0)
    {p*}/gate -> {p}.gate | reorder(0, [1, 0, 2]) | scale(2)
    {p*}/b16 -> {p}.b32 | cast(float32)
    {p*}/flat -> {p}.grid | reshape(2, -1)
    {p*}/bn -> {p}.bn | pad(0, 1, 2)
    {p*}/pair -> {p}.p0, {p}.p1 | unstack(0)
    add {p*}/gate -> {p}.extra | zeros
    """)
    ck = ck_of(**{"c/kernel": arr(3, 3, 2, 4), "d/kernel": arr(5, 6), "a/qkv": arr(6, 2),
                  "g/gate": arr(6, 1), "h/b16": arr(4, dtype=np.float16), "f/flat": arr(6),
                  "n/bn": arr(3), "r/pair": arr(2, 3), "other": arr(1)})
    fwd = m.apply(ck)
    assert fwd.tensors()["c.weight"].shape == (4, 2, 3, 3)
    back = m.inverse().apply(fwd)
    want, got = ck.tensors(), back.tensors()
    assert list(got) == list(want)
    for n in want:
        assert got[n].dtype == want[n].dtype
        np.testing.assert_array_equal(got[n].numpy(), want[n].numpy())


def test_inverse_of_pure_renames_gives_the_same_objects():
    m = Mapping.parse("module.{rest*} -> {rest}\nold/{a}/{b} -> new.{b}.{a}")
    ck = ck_of(**{"module.fc.weight": arr(2), "module.old/x/y": arr(1)})
    m = Mapping.parse("module.old/{a}/{b} -> new.{b}.{a}\nmodule.{rest*} -> {rest}")
    fwd = m.apply(ck)
    assert list(fwd.tensors()) == ["fc.weight", "new.y.x"]
    back = m.inverse().apply(fwd)
    assert list(back.tensors()) == list(ck.tensors())
    assert all(back.tensors()[n] is r for n, r in ck.tensors().items())


@pytest.mark.parametrize("rule, why", [
    ("a -> drop", "cannot be brought back"),
    ("a -> b | scale(0)", "cannot be inverted"),
    ("a -> b | slice(0, 1, 2)", "cannot be inverted"),
    ("a, c -> b | sum", "cannot be inverted"),
    ("re:a(.*) -> b\\1", "re: rule"),
    ("{x}.{y} -> {x}", "do not use {y}"),
    ("a -> b, c", "tie"),
])
def test_irreversible_rules_refuse_to_invert(rule, why):
    with pytest.raises(MappingError, match=why):
        Mapping.parse(rule).inverse()


def test_inverse_of_cast_needs_a_lossless_cast():
    down = Mapping.parse("a -> b | cast(float16)")
    with pytest.raises(MappingError, match="unknown"):
        down.inverse()
    down.apply(ck_of(a=arr(2)))
    with pytest.raises(MappingError, match="loses precision"):
        down.inverse()
    up = Mapping.parse("a -> b | cast(float32)")
    up.apply(ck_of(a=arr(2, dtype=np.float16)))
    assert str(up.inverse().rules[0]) == "b -> a | cast(float16)"


def test_inverse_of_concat_uses_the_sizes_it_saw():
    m = Mapping.parse("x, y -> xy | concat(0)")
    ck = ck_of(x=arr(2), y=arr(3, start=2))
    fwd = m.apply(ck)
    back = m.inverse().apply(fwd).tensors()
    np.testing.assert_array_equal(back["y"].numpy(), arr(3, start=2))


# --- chains and stages ------------------------------------------------------------------

def test_chain_and_stages():
    staged = Mapping.parse("module.{r*} -> {r}\n---\nfc.{x} -> head.{x}", "s.rules")
    assert staged.stages and len(staged.stages) == 2
    ck = ck_of(module__fc__weight=arr(2), module__x=arr(1), y=arr(1))
    assert list(staged.apply(ck).tensors()) == ["head.weight", "x", "y"]
    assert staged.report.unmatched == ["y"]
    assert "---" in staged.to_text()
    chained = Mapping.chain([Mapping.preset("strip-module-prefix"), Mapping.parse("fc.{x} -> head.{x}")])
    assert list(chained.apply(ck).tensors()) == ["head.weight", "x", "y"]
    inv = staged.inverse()
    assert list(inv.apply(staged.apply(ck)).tensors()) == ["module.fc.weight", "module.x", "module.y"]


# --- presets and CLI --------------------------------------------------------------------

PRESETS = ["bert-tf-to-hf", "hf-to-bert-tf", "keras-to-torch", "torch-to-keras",
           "strip-module-prefix", "add-module-prefix", "timm-vit-to-hf"]


def test_presets_listed_and_parse():
    rep = presets_report(None)
    names = [p["name"] for p in rep.to_dict()["presets"]]
    for n in PRESETS:
        assert n in names
        Mapping.preset(n)
    assert all(p["description"] for p in rep.to_dict()["presets"])
    one = presets_report("strip-module-prefix")
    assert "module.{rest*} -> {rest}" in str(one)
    assert one.to_dict()["name"] == "strip-module-prefix"
    with pytest.raises(ckptconv.UsageError, match="unknown preset 'nope'"):
        presets_report("nope")


def test_cli_presets():
    r = cli("presets")
    assert r.returncode == 0 and "bert-tf-to-hf" in r.stdout and "keras-to-torch" in r.stdout
    r = cli("presets", "hf-to-bert-tf", "--json")
    assert r.returncode == 0 and "bert/encoder/layer_{i}" in json.loads(r.stdout)["rules"]


def google_bert_names(layers=2):
    """A few Google-layout BERT TF1 names with TF shapes (hidden 4, intermediate 6)."""
    names = {"bert/embeddings/word_embeddings": (10, 4), "bert/embeddings/token_type_embeddings": (2, 4),
             "bert/embeddings/position_embeddings": (8, 4), "bert/embeddings/LayerNorm/gamma": (4,),
             "bert/embeddings/LayerNorm/beta": (4,), "bert/pooler/dense/kernel": (4, 4),
             "bert/pooler/dense/bias": (4,), "cls/predictions/output_bias": (10,),
             "cls/predictions/transform/dense/kernel": (4, 4), "cls/predictions/transform/dense/bias": (4,),
             "cls/predictions/transform/LayerNorm/gamma": (4,), "cls/predictions/transform/LayerNorm/beta": (4,),
             "cls/seq_relationship/output_weights": (2, 4), "cls/seq_relationship/output_bias": (2,)}
    for i in range(layers):
        p = f"bert/encoder/layer_{i}"
        for sub in ("attention/self/query", "attention/self/key", "attention/self/value",
                    "attention/output/dense"):
            names[f"{p}/{sub}/kernel"], names[f"{p}/{sub}/bias"] = (4, 4), (4,)
        names[f"{p}/intermediate/dense/kernel"], names[f"{p}/intermediate/dense/bias"] = (4, 6), (6,)
        names[f"{p}/output/dense/kernel"], names[f"{p}/output/dense/bias"] = (6, 4), (4,)
        for sub in ("attention/output/LayerNorm", "output/LayerNorm"):
            names[f"{p}/{sub}/gamma"], names[f"{p}/{sub}/beta"] = (4,), (4,)
    return names


def test_bert_presets_round_trip_on_google_names():
    shapes = google_bert_names()
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    slots = {f"{n}/adam_{x}": np.zeros(s, np.float32) for n, s in list(shapes.items())[:3] for x in "mv"}
    ck = Checkpoint.from_state_dict({**tensors, **slots, "global_step": np.array(5, np.int64)})
    fwd = Mapping.preset("bert-tf-to-hf")
    hf = fwd.apply(ck).tensors()
    assert not fwd.report.unmatched
    assert len(fwd.report.dropped) == len(slots) + 1
    assert hf["encoder.layer.1.intermediate.dense.weight"].shape == (6, 4)
    assert hf["encoder.layer.0.attention.output.LayerNorm.weight"].shape == (4,)
    np.testing.assert_array_equal(hf["cls.seq_relationship.weight"].numpy(),
                                  tensors["cls/seq_relationship/output_weights"])
    back_m = Mapping.preset("hf-to-bert-tf")
    back = back_m.apply(Checkpoint(hf)).tensors()
    assert not back_m.report.unmatched
    assert list(back) == list(tensors)
    for n, v in tensors.items():
        np.testing.assert_array_equal(back[n].numpy(), v)


def test_keras2_names_and_the_way_back_without_keras():
    """Keras 2 names (':0' suffixes) map to torch and torch-to-keras brings them back."""
    rng = np.random.default_rng(0)
    shapes = {"dense/dense/kernel:0": (6, 3), "dense/dense/bias:0": (3,),
              "conv/conv/kernel:0": (3, 3, 2, 4), "conv/conv/bias:0": (4,),
              "conv1d/conv1d/kernel:0": (2, 8, 3), "embed/embed/embeddings:0": (20, 8),
              "bn/bn/gamma:0": (4,), "bn/bn/beta:0": (4,), "bn/bn/moving_mean:0": (4,),
              "bn/bn/moving_variance:0": (4,), "lstm/lstm/lstm_cell/kernel:0": (8, 20),
              "lstm/lstm/lstm_cell/recurrent_kernel:0": (5, 20), "lstm/lstm/lstm_cell/bias:0": (20,),
              "gru/gru/gru_cell/kernel:0": (8, 12), "gru/gru/gru_cell/recurrent_kernel:0": (4, 12),
              "gru/gru/gru_cell/bias:0": (2, 12)}
    keras = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    fwd = Mapping.preset("keras-to-torch")
    torch_names = fwd.apply(Checkpoint.from_state_dict(keras)).tensors()
    assert not fwd.report.unmatched
    want = {"dense.weight": (3, 6), "conv.weight": (4, 2, 3, 3), "conv1d.weight": (3, 8, 2),
            "embed.weight": (20, 8), "bn.running_var": (4,), "bn.num_batches_tracked": (),
            "lstm.weight_ih_l0": (20, 8), "lstm.bias_hh_l0": (20,), "gru.weight_hh_l0": (12, 4),
            "gru.bias_ih_l0": (12,), "gru.bias_hh_l0": (12,)}
    for n, s in want.items():
        assert torch_names[n].shape == s, n
    gru_z, gru_r, gru_h = np.split(keras["gru/gru/gru_cell/kernel:0"], 3, axis=1)
    np.testing.assert_array_equal(torch_names["gru.weight_ih_l0"].numpy(),
                                  np.concatenate([gru_r, gru_z, gru_h], 1).T)
    back_m = Mapping.preset("torch-to-keras")
    back = back_m.apply(Checkpoint(torch_names)).tensors()
    assert not back_m.report.unmatched
    assert list(back) == list(keras)
    for n, v in keras.items():
        np.testing.assert_array_equal(back[n].numpy(), v)


def test_cli_convert_with_rules_file_and_strict(tmp_path):
    src = tmp_path / "a.safetensors"
    ckptconv.save({"module.fc.weight": arr(2, 3), "module.fc.bias": arr(2), "extra": arr(1)}, src)
    rules = tmp_path / "r.map"
    rules.write_text("fc.weight -> head.weight | transpose\n")
    dst = tmp_path / "b.safetensors"
    r = cli("convert", src, dst, "--map", "strip-module-prefix", "--map", rules, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["mapping"]
    assert rep["unmatched"] == ["extra"]
    got = ckptconv.load(dst).tensors()
    assert list(got) == ["head.weight", "fc.bias", "extra"]
    np.testing.assert_array_equal(got["head.weight"].numpy(), arr(2, 3).T)
    r = cli("convert", src, tmp_path / "c.safetensors", "--map", "strip-module-prefix",
            "--map", rules, "--strict")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "match no rule" in r.stderr and "extra" in r.stderr
    rules.write_text("# x\n\nfc.weight -> head.weight | transpose(1)\n")
    r = cli("convert", src, tmp_path / "d.safetensors", "--map", rules)
    assert r.returncode == 1 and r.stderr.startswith("ckptconv: error: r.map:3:28: transpose takes")
    r = cli("convert", src, tmp_path / "e.safetensors", "--map", "no-such-preset")
    assert r.returncode == 2 and "presets:" in r.stderr


# --- property tests -------------------------------------------------------------------------

_seg = st.text("abcdefgh", min_size=1, max_size=4)


@st.composite
def rename_case(draw):
    """Rules with distinct literal prefixes, keys under them and keys under none."""
    n = draw(st.integers(1, 4))
    rules, keys = [], []
    for i in range(n):
        sep = draw(st.sampled_from("./"))
        tsep = draw(st.sampled_from("./"))
        kind = draw(st.sampled_from(["multi", "one", "two"]))
        if kind == "multi":
            rules.append(f"p{i}{sep}{{x*}} -> q{i}{tsep}{{x}}")
            for _ in range(draw(st.integers(0, 3))):
                keys.append(f"p{i}{sep}" + sep.join(draw(st.lists(_seg, min_size=1, max_size=3))))
        elif kind == "one":
            rules.append(f"p{i}{sep}{{a}}{sep}w -> q{i}{tsep}{{a}}{tsep}weight")
            for _ in range(draw(st.integers(0, 3))):
                keys.append(f"p{i}{sep}{draw(_seg)}{sep}w")
        else:
            rules.append(f"p{i}{sep}{{a}}{sep}{{b}} -> q{i}{tsep}{{b}}{tsep}{{a}}")
            for _ in range(draw(st.integers(0, 3))):
                keys.append(f"p{i}{sep}{draw(_seg)}{sep}{draw(_seg)}")
    keys += ["u" + "." + ".".join(draw(st.lists(_seg, min_size=1, max_size=2)))
             for _ in range(draw(st.integers(0, 3)))]
    keys = list(dict.fromkeys(keys))
    draw(st.randoms()).shuffle(keys)
    return "\n".join(rules), keys


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rename_case())
def test_property_inverse_of_renames_is_identity(case):
    text, keys = case
    ck = Checkpoint.from_state_dict({k: np.zeros(1, np.float32) for k in keys})
    m = Mapping.parse(text)
    fwd = m.apply(ck)
    assert len(fwd.tensors()) == len(keys)
    back = m.inverse().apply(fwd)
    assert list(back.tensors()) == keys
    assert all(back.tensors()[k] is ck.tensors()[k] for k in keys)


@settings(max_examples=60, deadline=None)
@given(rename_case())
def test_property_render_parse_round_trip(case):
    text, keys = case
    m = Mapping.parse(text)
    again = Mapping.parse(m.to_text())
    assert again.to_text() == m.to_text()
    ck = Checkpoint.from_state_dict({k: np.zeros(1, np.float32) for k in keys})
    assert list(m.apply(ck).tensors()) == list(again.apply(ck).tensors())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=4), st.data())
def test_property_permute_and_split_invert(shape, data):
    perm = data.draw(st.permutations(range(len(shape))))
    parts = data.draw(st.integers(1, 3))
    x = np.arange(int(np.prod(shape)) * parts, dtype=np.float32).reshape([shape[0] * parts] + shape[1:])
    text = (f"x -> y | permute({', '.join(map(str, perm))})\n"
            f"z -> {', '.join(f'z{i}' for i in range(parts))} | split(0)")
    m = Mapping.parse(text)
    ck = ck_of(x=x, z=x)
    back = m.inverse().apply(m.apply(ck)).tensors()
    np.testing.assert_array_equal(back["x"].numpy(), x)
    np.testing.assert_array_equal(back["z"].numpy(), x)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab.{}*?/->|,()[]=0123 #re:\\\n", max_size=40))
def test_property_garbage_gives_mapping_errors_with_positions(text):
    try:
        Mapping.parse(text, "g.rules")
    except MappingError as e:
        import re

        assert re.match(r"^g\.rules:\d+:\d+: \S", str(e)), str(e)


# --- frameworks: Google BERT TF1 checkpoint <-> Hugging Face BertModel ------------------------

def _google_name(hf_key: str) -> tuple[str, bool]:
    """Google's TF1 name for a BertModel key, and whether TF stores it transposed
    (written out here, independently of the presets under test)."""
    *path, leaf = hf_key.split(".")
    if path[0] == "encoder":  # encoder.layer.3.x -> encoder/layer_3/x
        path = ["encoder", f"layer_{path[2]}"] + path[3:]
    if path[0] == "embeddings" and path[1].endswith("_embeddings"):
        return "bert/embeddings/" + path[1], False
    if path[-1] == "LayerNorm":
        return "bert/" + "/".join(path) + "/" + {"weight": "gamma", "bias": "beta"}[leaf], False
    return "bert/" + "/".join(path) + "/" + {"weight": "kernel", "bias": "bias"}[leaf], leaf == "weight"


@pytest.fixture(scope="module")
def google_bert(tmp_path_factory):
    """A small random BertModel and the Google-layout TF1 checkpoint TensorFlow
    writes for it (tf.compat.v1 variables + Saver), with Adam slots and global_step."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tf = pytest.importorskip("tensorflow")
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37,
                                  max_position_embeddings=64, type_vocab_size=2)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    state = model.state_dict()
    prefix = tmp_path_factory.mktemp("google_bert") / "bert_model.ckpt"
    graph = tf.Graph()
    with graph.as_default():
        for key, value in state.items():
            name, transposed = _google_name(key)
            v = value.numpy().T if transposed else value.numpy()
            tf.compat.v1.get_variable(name, initializer=tf.constant(v))
            for slot in ("adam_m", "adam_v"):
                tf.compat.v1.get_variable(f"{name}/{slot}", initializer=tf.zeros_like(v))
        tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix), write_meta_graph=False)
    names = [n for n, _ in tf.train.list_variables(str(prefix))]
    assert "bert/encoder/layer_1/attention/self/query/kernel" in names and "global_step" in names
    return cfg, model, prefix


def test_google_bert_tf_checkpoint_to_hf_bertmodel(google_bert, tmp_path):
    import torch
    import transformers
    from safetensors.torch import load_file

    cfg, model, prefix = google_bert
    out = tmp_path / "bert.safetensors"
    r = cli("convert", prefix, out, "--map", "bert-tf-to-hf", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["mapping"]
    assert rep["unmatched"] == [] and "global_step" in rep["dropped"]
    assert len(rep["dropped"]) == 2 * len(model.state_dict()) + 1
    weights = load_file(out)
    fresh = transformers.BertModel(cfg).eval()
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    assert [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))] == []
    assert unexpected == []
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    types = torch.randint(0, 2, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(ids, token_type_ids=types), fresh(ids, token_type_ids=types)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=0, atol=1e-5)
    # transformers' own TF -> PT loader gives the same tensors
    bert_mod = pytest.importorskip("transformers.models.bert.modeling_bert")
    loader = getattr(bert_mod, "load_tf_weights_in_bert", None)
    if loader is not None:
        ref = transformers.BertForPreTraining(cfg)
        loader(ref, cfg, str(prefix))
        for k, v in ref.bert.state_dict().items():
            if k in weights:
                assert torch.equal(weights[k], v), k


def test_hf_bertmodel_back_to_google_names(google_bert, tmp_path):
    tf = pytest.importorskip("tensorflow")
    cfg, model, prefix = google_bert
    src = tmp_path / "hf.safetensors"
    ckptconv.save(dict(model.state_dict()), src)
    back = tmp_path / "back" / "bert_model.ckpt"
    back.parent.mkdir()
    r = cli("convert", src, back, "--to", "tf", "--map", "hf-to-bert-tf")
    assert r.returncode == 0, r.stderr
    want = {n for n, _ in tf.train.list_variables(str(prefix))
            if not n.endswith(("adam_m", "adam_v")) and n != "global_step"}
    got = {n for n, _ in tf.train.list_variables(str(back))} - {"_CKPTCONV_METADATA"}
    assert got == want
    for n in want:
        np.testing.assert_array_equal(tf.train.load_variable(str(back), n),
                                      tf.train.load_variable(str(prefix), n))


# --- frameworks: Keras <-> torch --------------------------------------------------------------

def _keras_model(seed: int):
    """Conv2D, BatchNorm, Embedding, LSTM, GRU, Conv1D, LayerNorm, Dense; every
    weight (moving statistics and biases too) random. Layer names are Keras'
    class-derived defaults, which Keras 3 weight files use whatever the names."""
    import keras

    L = keras.layers
    img = keras.Input((9, 9, 3))
    tok = keras.Input((7,), dtype="int32")
    x = L.Conv2D(4, 3, name="conv2d")(img)
    x = L.BatchNormalization(name="batch_normalization")(x)
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    e = L.Embedding(20, 8, name="embedding")(tok)
    h = L.LSTM(5, name="lstm")(e)
    g = L.GRU(4, name="gru")(e)
    c = L.Conv1D(3, 2, name="conv1d")(e)
    c = L.GlobalAveragePooling1D()(L.LayerNormalization(name="layer_normalization")(c))
    y = L.Dense(3, name="dense")(L.Concatenate()([x, h, g, c]))
    model = keras.Model([img, tok], y)
    rng = np.random.default_rng(seed)
    for w in model.weights:
        v = rng.standard_normal(tuple(w.shape)).astype(np.float32) * 0.5
        w.assign(np.abs(v) + 0.5 if "variance" in w.path else v)
    return model


def _torch_twin():
    import torch
    from torch import nn

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv2d = nn.Conv2d(3, 4, 3)
            self.batch_normalization = nn.BatchNorm2d(4, eps=1e-3)
            self.embedding = nn.Embedding(20, 8)
            self.lstm = nn.LSTM(8, 5, batch_first=True)
            self.gru = nn.GRU(8, 4, batch_first=True)
            self.conv1d = nn.Conv1d(8, 3, 2)
            self.layer_normalization = nn.LayerNorm(3, eps=1e-3)
            self.dense = nn.Linear(16, 3)

        def forward(self, img, tok):
            x = self.batch_normalization(self.conv2d(img.permute(0, 3, 1, 2))).relu().mean((2, 3))
            e = self.embedding(tok)
            _, (h, _) = self.lstm(e)
            _, g = self.gru(e)
            c = self.conv1d(e.transpose(1, 2)).transpose(1, 2)
            c = self.layer_normalization(c).mean(1)
            return self.dense(torch.cat([x, h[-1], g[-1], c], 1))

    return Twin().eval()


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    pytest.importorskip("h5py")
    pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    d = tmp_path_factory.mktemp("keras")
    model = _keras_model(0)
    full, weights = d / "model.h5", d / "model.weights.h5"
    model.save(full)
    model.save_weights(weights)
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((2, 9, 9, 3)).astype(np.float32), rng.integers(0, 20, (2, 7)).astype(np.int32)]
    want = keras.ops.convert_to_numpy(model(inputs, training=False))
    return keras, model, full, weights, inputs, want


@pytest.mark.parametrize("which", ["full", "weights"])
def test_keras_to_torch_matches_keras_outputs(keras_files, which, tmp_path):
    import torch
    from safetensors.torch import load_file

    keras, model, full, weights, inputs, want = keras_files
    src = full if which == "full" else weights
    names = list(ckptconv.load(src).tensors())
    assert names[0].startswith("model_weights/" if which == "full" else "layers/")
    out = tmp_path / "torch.safetensors"
    r = cli("convert", src, out, "--map", "keras-to-torch", "--strict", "--json")
    assert r.returncode == 0, r.stderr
    twin = _torch_twin()
    twin.load_state_dict(load_file(out), strict=True)  # nothing missing, nothing extra
    with torch.no_grad():
        got = twin(torch.from_numpy(inputs[0]), torch.from_numpy(inputs[1]).long()).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_torch_to_keras_back(keras_files, tmp_path):
    import torch
    from safetensors.torch import load_file

    keras, model, full, weights, inputs, want = keras_files
    mid = tmp_path / "torch.safetensors"
    assert cli("convert", full, mid, "--map", "keras-to-torch").returncode == 0
    twin = _torch_twin()
    twin.load_state_dict(load_file(mid))
    with torch.no_grad():  # torch's two LSTM biases: make bias_hh count on the way back
        twin.lstm.bias_hh_l0.add_(0.25)
        twin.lstm.bias_ih_l0.sub_(0.25)
        got_torch = twin(torch.from_numpy(inputs[0]), torch.from_numpy(inputs[1]).long()).numpy()
    pt = tmp_path / "twin.pt"
    torch.save(twin.state_dict(), pt)
    back = tmp_path / "back.h5"
    r = cli("convert", pt, back, "--to", "keras-h5", "--map", "torch-to-keras", "--strict")
    assert r.returncode == 0, r.stderr
    other = _keras_model(1)
    assert not np.allclose(keras.ops.convert_to_numpy(other(inputs, training=False)), want, atol=1e-3)
    other.load_weights(str(back), by_name=True)
    got = keras.ops.convert_to_numpy(other(inputs, training=False))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, got_torch, rtol=0, atol=1e-5)


def test_timm_vit_to_hf_vitmodel_names_shapes_and_values():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=24, image_size=8, patch_size=4)
    torch.manual_seed(0)
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).state_dict()
    # the timm names for the same weights (timm's VisionTransformer attributes)
    timm = {"cls_token": hf["embeddings.cls_token"], "pos_embed": hf["embeddings.position_embeddings"],
            "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"]}
    for x in ("weight", "bias"):
        timm[f"patch_embed.proj.{x}"] = hf[f"embeddings.patch_embeddings.projection.{x}"]
        for i in range(2):
            e = f"encoder.layer.{i}"
            timm[f"blocks.{i}.attn.qkv.{x}"] = torch.cat(
                [hf[f"{e}.attention.attention.{p}.{x}"] for p in ("query", "key", "value")])
            for t, h in (("norm1", "layernorm_before"), ("attn.proj", "attention.output.dense"),
                         ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
                         ("mlp.fc2", "output.dense")):
                timm[f"blocks.{i}.{t}.{x}"] = hf[f"{e}.{h}.{x}"]
    m = Mapping.preset("timm-vit-to-hf")
    out = m.apply(Checkpoint.from_state_dict(timm)).tensors()
    assert not m.report.unmatched
    assert set(out) == set(hf)
    for k, v in hf.items():
        assert torch.equal(out[k].torch(), v), k
