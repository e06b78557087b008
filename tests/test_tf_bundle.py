"""TensorFlow checkpoints: read and written without TensorFlow, checked with it.

Fixtures are written by TensorFlow itself (graph-mode ``tf.compat.v1`` Saver,
``tf.train.Checkpoint`` of a Keras model, ``tf.saved_model.save``, sharded
saves) once per session; conversions run in a subprocess where TensorFlow
cannot be imported, and every value is compared with
``tf.train.load_checkpoint(...).get_tensor``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import ckptconv
from ckptconv.adapters import _io
from ckptconv.adapters.tf import bundle as tf_bundle
from ckptconv.adapters.tf import object_graph as tf_object_graph
from ckptconv.adapters.tf import records as tf_records
from ckptconv.adapters.tf import table as tf_table
from ckptconv.errors import FormatError, IntegrityError, UnsupportedError
from ckptconv.registry import detect_format

NO_TF = ("import sys; sys.modules['tensorflow'] = None; "
         "from ckptconv.cli import main; sys.exit(main(sys.argv[1:]))")


def cli(*args, block_tf: bool = True) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, with TensorFlow made unimportable."""
    cmd = [sys.executable, "-c", NO_TF] if block_tf else [sys.executable, "-m", "ckptconv"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          timeout=120)


# --- helpers that need no TensorFlow ----------------------------------------------

def test_crc32c_known_values_and_chunking():
    # RFC 3720 B.4 test vectors and the usual check value
    assert _io.crc32c(b"123456789") == 0xE3069283
    assert _io.crc32c(bytes(32)) == 0x8A9136AA
    assert _io.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert _io.crc32c(bytes(range(32))) == 0x46DD794E
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 2047, 2048, 2049, 70001, 1 << 20):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        ref = _io._raw_small(0xFFFFFFFF, data) ^ 0xFFFFFFFF      # plain byte-at-a-time loop
        assert _io.crc32c_pure(data) == ref, n
        cut = n // 3
        assert _io.crc32c_pure(data[cut:], _io.crc32c_pure(data[:cut])) == ref, n
        assert _io.crc32c(data) == ref
    for v in (0, 1, 0xFFFFFFFF, 0xE3069283):
        assert _io.unmask_crc(_io.mask_crc(v)) == v
    assert _io.mask_crc(0) == 0xA282EAD8


@pytest.mark.slow
def test_crc32c_numpy_speed():
    data = np.random.default_rng(2).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    _io.crc32c_pure(data[: 8 << 20])
    t0 = time.perf_counter()
    for i in range(0, len(data), 8 << 20):
        _io.crc32c_pure(memoryview(data)[i:i + (8 << 20)])
    rate = len(data) / (time.perf_counter() - t0) / 1e6
    assert rate > 200, f"{rate:.0f} MB/s"


def test_protobuf_and_entry_codec():
    e = tf_records.BundleEntry(b"a/b", 14, (3, 0, 7), shard_id=2, offset=1 << 40, size=42,
                       crc32c=0xDEADBEEF, slices=[[(0, -1), (5, 2)]])
    back = tf_records.parse_entry(b"a/b", tf_records.encode_entry(e))
    assert back == e
    assert _io.as_int64(_io.read_varint(_io.encode_varint(-1))[0]) == -1
    with pytest.raises(_io.DecodeError):
        _io.read_varint(b"\x80\x80")
    with pytest.raises(_io.DecodeError):
        list(_io.iter_fields(_io.field_bytes(1, b"abc")[:-1]))
    h = tf_records.parse_header(tf_records.encode_header(3))
    assert (h.num_shards, h.big_endian, h.producer) == (3, False, 1)


def test_snappy_literal_and_overlapping_copy():
    # 11 bytes: literal "abc", then copy(len 8, offset 3) which overlaps itself
    block = b"\x0b" + b"\x08abc" + bytes([((8 - 4) << 2) | 1, 3])
    assert _io.snappy_decompress(block) == b"abcabcabcab"
    with pytest.raises(_io.DecodeError):
        _io.snappy_decompress(b"\x0b\x08abc" + bytes([((8 - 4) << 2) | 1, 9]))


def test_snappy_compressed_index_block(tmp_path):
    """TF never compresses bundle indexes, but the table format allows snappy blocks."""
    values = np.array([1.0, 2.0], np.float32)
    prefix = tmp_path / "snap"
    Path(str(prefix) + ".data-00000-of-00001").write_bytes(values.tobytes())
    entry = tf_records.BundleEntry(b"w", 1, (2,), size=8, crc32c=_io.mask_crc(_io.crc32c(values.tobytes())))
    block = tf_table.BlockBuilder(16)
    block.add(b"", tf_records.encode_header(1))
    block.add(b"w", tf_records.encode_entry(entry))
    raw = block.finish()
    n = len(raw) - 1                          # one snappy literal covering the whole block
    nbytes = (n.bit_length() + 7) // 8
    compressed = _io.encode_varint(len(raw)) + bytes([(59 + nbytes) << 2]) + \
        n.to_bytes(nbytes, "little") + raw
    table = bytearray()

    def put(contents: bytes, kind: int) -> bytes:
        handle = _io.encode_varint(len(table)) + _io.encode_varint(len(contents))
        trailer = bytes([kind])
        table.extend(contents + trailer
                     + _io.mask_crc(_io.crc32c(contents + trailer)).to_bytes(4, "little"))
        return handle

    data_handle = put(compressed, tf_table.SNAPPY)
    meta_handle = put(tf_table.BlockBuilder(16).finish(), tf_table.NO_COMPRESSION)
    index = tf_table.BlockBuilder(1)
    index.add(b"x", data_handle)
    index_handle = put(index.finish(), tf_table.NO_COMPRESSION)
    table += (meta_handle + index_handle).ljust(40, b"\0") + tf_table.TABLE_MAGIC.to_bytes(8, "little")
    Path(str(prefix) + ".index").write_bytes(bytes(table))
    np.testing.assert_array_equal(ckptconv.load(prefix).tree["w"].numpy(), values)


def test_table_many_blocks_roundtrip(tmp_path):
    items = [(b"", b"header")] + [(f"layer_{i:05d}/kernel".encode(), os.urandom(i % 50))
                                  for i in range(3000)]
    p = tmp_path / "t.index"
    p.write_bytes(tf_table.build_table(items, block_size=1024))
    got = tf_table.read_table(ckptconv.tensor.FileHandle(p))
    assert [(k, bytes(v)) for k, v in got] == items


# --- fixtures written by TensorFlow -------------------------------------------------

@pytest.fixture(scope="session")
def tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def _keras_model():
    import keras

    inner = keras.Sequential([keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)],
                             name="inner")
    inp = keras.Input((4,))
    return keras.Model(inp, keras.layers.Dense(2, name="head")(inner(inp)))


@pytest.fixture(scope="session")
def fixtures(tf, tmp_path_factory):
    """name -> (path handed to ckptconv, prefix handed to tf.train.load_checkpoint)."""
    root = tmp_path_factory.mktemp("tf")
    out: dict[str, tuple[Path, str]] = {}
    v1 = tf.compat.v1

    # TF1 name-based, graph mode: Adam slots, global_step, a partitioned variable,
    # and BERT-style adam_m / adam_v slots created by name.
    (root / "tf1").mkdir()
    with tf.Graph().as_default():
        v1.set_random_seed(1)
        x = v1.placeholder(tf.float32, [None, 4])
        with v1.variable_scope("bert/encoder/layer_0/attention/self/query"):
            w = v1.get_variable("kernel", [4, 3])
            b = v1.get_variable("bias", [3], initializer=v1.ones_initializer())
            v1.get_variable("kernel/adam_m", [4, 3], initializer=v1.constant_initializer(0.5))
            v1.get_variable("kernel/adam_v", [4, 3], dtype=tf.float64)
        emb = v1.get_variable("emb", [200, 3], partitioner=v1.fixed_size_partitioner(3))
        loss = tf.reduce_mean(tf.square(tf.matmul(x, w) + b + tf.reduce_sum(emb)))
        step = v1.train.get_or_create_global_step()
        train = v1.train.AdamOptimizer(0.01).minimize(loss, global_step=step)
        saver = v1.train.Saver()
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            for _ in range(3):
                sess.run(train, {x: np.ones((2, 4), np.float32)})
            prefix = saver.save(sess, str(root / "tf1" / "model.ckpt"), global_step=step)
    out["tf1"] = (root / "tf1", prefix)

    # Two data shards: a sharded Saver with variables on two CPU devices.
    (root / "v1shards").mkdir()
    with tf.Graph().as_default():
        with tf.device("/cpu:0"):
            v1.get_variable("a", [64, 8])
        with tf.device("/cpu:1"):
            v1.get_variable("b", [5], dtype=tf.float64)
        saver = v1.train.Saver(sharded=True)
        with v1.Session(config=v1.ConfigProto(device_count={"CPU": 2})) as sess:
            sess.run(v1.global_variables_initializer())
            prefix = saver.save(sess, str(root / "v1shards" / "model.ckpt"))
    out["v1shards"] = (Path(prefix), prefix)

    # TF2 object-based checkpoint of a Keras model with a nested Sequential.
    model = _keras_model()
    prefix = tf.train.Checkpoint(model=model).write(str(root / "keras" / "ckpt"))
    out["keras"] = (Path(prefix), prefix)
    out["keras_weights"] = [w.numpy() for w in model.weights]

    # SavedModel: its variables/ bundle, with a bfloat16 variable
    m = tf.Module()
    m.v = tf.Variable(np.arange(6, dtype=np.float32))
    m.inner = tf.Module()
    m.inner.w = tf.Variable(tf.constant([[1.5, -2.0], [0.25, 3.0]], tf.bfloat16))
    tf.saved_model.save(m, str(root / "savedmodel"))
    out["savedmodel"] = (root / "savedmodel", str(root / "savedmodel" / "variables" / "variables"))

    # TF2 sharding policy: four data files, variables split into slices across them.
    vs = {f"v{i}": tf.Variable(np.arange(1000, dtype=np.float32) * i) for i in range(4)}
    opts = tf.train.CheckpointOptions(
        experimental_sharding_callback=tf.train.experimental.MaxShardSizePolicy(max_shard_size=5000))
    prefix = tf.train.Checkpoint(**vs).write(str(root / "tf2shards" / "ckpt"), options=opts)
    out["tf2shards"] = (Path(prefix), prefix)

    # Strings and the other dtypes TF variables take
    vs = {"s": tf.Variable(b"hello"), "sv": tf.Variable([b"a", b"", b"\xff\x00z"]),
          "s2": tf.Variable([[b"x", b"y"], [b"zz", b"w"]]),
          "c128": tf.Variable(np.array([1 + 2j, -3j])), "u8": tf.Variable(np.arange(5, dtype=np.uint8)),
          "i16": tf.Variable(np.array([-3, 300], np.int16)), "h": tf.Variable(np.float16(0.5)),
          "step": tf.Variable(np.int64(7))}
    prefix = tf.train.Checkpoint(**vs).write(str(root / "strings" / "ckpt"))
    out["strings"] = (Path(prefix), prefix)

    # An empty basename: tf.train.Checkpoint.write("dir/") writes dir/.index, dir/.data-*
    prefix = tf.train.Checkpoint(v=tf.Variable(np.arange(3, dtype=np.float32))).write(
        str(root / "emptybase") + "/")
    out["emptybase"] = (root / "emptybase", prefix)

    # A tf.data iterator: its state is a DT_VARIANT tensor
    it = iter(tf.data.Dataset.range(10))
    next(it), next(it)
    prefix = tf.train.Checkpoint(it=it).write(str(root / "iterator" / "ckpt"))
    out["iterator"] = (Path(prefix), prefix)
    return out



def assert_same_as_tf(tf, prefix: str, arrays: dict[str, np.ndarray]) -> None:
    reader = tf.train.load_checkpoint(prefix)
    names = [k for k, dt in reader.get_variable_to_dtype_map().items() if dt != tf.string]
    assert sorted(names) == sorted(k for k in arrays if not k.startswith("_CKPTCONV")), prefix
    for k in names:
        want, got = reader.get_tensor(k), arrays[k]
        assert np.dtype(got.dtype).name == np.dtype(want.dtype).name, k
        assert got.shape == want.shape, k
        assert got.tobytes() == want.tobytes(), k


# --- reading --------------------------------------------------------------------------

def test_dtype_table_matches_tensorflow(tf):
    for num, name in tf_records.TF_DTYPES.items():
        tfd = tf.dtypes.as_dtype(num)
        assert tfd.as_datatype_enum == num
        assert np.dtype(tfd.as_numpy_dtype) == ckptconv.dtypes.numpy_dtype(name), (num, name)
    for num, (qname, storage) in tf_records.TF_QUANTIZED.items():
        assert tf.dtypes.as_dtype(num).name == qname
        assert tf.dtypes.as_dtype(num).size == ckptconv.dtypes.get(storage).itemsize
    assert tf.string.as_datatype_enum == tf_records.DT_STRING
    assert tf.variant.as_datatype_enum == tf_records.DT_VARIANT


def test_detects_every_way_to_name_a_checkpoint(fixtures):
    tf1_dir, tf1_prefix = fixtures["tf1"]
    shard_prefix = fixtures["v1shards"][1]
    sm_dir = fixtures["savedmodel"][0]
    for p in (tf1_dir, tf1_prefix, tf1_prefix + ".index", shard_prefix + ".data-00001-of-00002",
              sm_dir, sm_dir / "variables"):
        assert detect_format(p) == "tf", p
    assert tf_bundle.find_prefix(tf1_dir) == tf1_prefix            # the state file's newest entry
    assert tf_bundle.find_prefix(sm_dir) == fixtures["savedmodel"][1]


@pytest.mark.parametrize("name", ["tf1", "keras", "savedmodel", "v1shards", "tf2shards"])
def test_tf_to_safetensors_without_tensorflow(tf, fixtures, tmp_path, name):
    from safetensors.numpy import load_file

    src, prefix = fixtures[name]
    dst = tmp_path / "out.safetensors"
    r = cli("convert", src, dst)
    assert r.returncode == 0, r.stderr
    assert_same_as_tf(tf, prefix, load_file(str(dst)))
    if name == "tf1":
        names = set(load_file(str(dst)))
        assert {"global_step", "emb", "emb/Adam", "beta1_power",
                "bert/encoder/layer_0/attention/self/query/kernel/adam_m",
                "bert/encoder/layer_0/attention/self/query/kernel/Adam_1"} <= names
    if name in ("v1shards", "tf2shards"):
        assert len(list(Path(prefix).parent.glob(Path(prefix).name + ".data-*"))) >= 2


def test_reading_is_lazy_and_partitioned_variables_assemble(tf, fixtures):
    ck = ckptconv.load(fixtures["tf1"][0])
    assert ck.info["checkpoint_kind"].startswith("name-based")
    assert ck.info["partitioned"]["emb"] == 3
    emb = ck.tree["emb"]
    assert isinstance(emb, tf_bundle.SlicedTensor) and emb.shape == (200, 3)
    ref = ck.tree["bert/encoder/layer_0/attention/self/query/kernel"]
    assert ref.file_span() is not None                         # bytes stay in the file
    reader = tf.train.load_checkpoint(fixtures["tf1"][1])
    np.testing.assert_array_equal(emb.numpy(), reader.get_tensor("emb"))
    assert b"".join(bytes(c) for c in emb.iter_bytes()) == reader.get_tensor("emb").tobytes()


def test_tf2_object_graph_gives_readable_paths(fixtures):
    ck = ckptconv.load(fixtures["keras"][0])
    paths = ck.info["object_paths"]
    tensors = ck.tensors()
    assert set(tensors) <= set(paths)
    for key in tensors:
        assert key.endswith("/.ATTRIBUTES/VARIABLE_VALUE")
        assert paths[key] == key[: -len("/.ATTRIBUTES/VARIABLE_VALUE")].replace("/", ".")
    assert isinstance(ck.tree[tf_object_graph.OBJECT_GRAPH_TENSOR], bytes)   # kept for TF -> TF
    r = cli("inspect", fixtures["keras"][0], "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["info"]["object_paths"] == paths
    assert all(t["object"] == paths[t["name"]] for t in rep["tensors"])


def test_tf2_optimizer_slots_get_paths(tf, tmp_path):
    v = tf.Variable([1.0, 2.0])
    opt = tf.compat.v1.train.AdamOptimizer(0.1)
    opt.minimize(lambda: tf.reduce_sum(v * v), var_list=[v])
    prefix = tf.train.Checkpoint(weights=v, optimizer=opt).write(str(tmp_path / "ckpt"))
    paths = ckptconv.load(prefix).info["object_paths"]
    assert paths["weights/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"] == \
        "optimizer.m[weights]"
    assert paths["optimizer/beta1_power/.ATTRIBUTES/VARIABLE_VALUE"] == "optimizer.beta1_power"


def test_string_tensors_are_values(tf, fixtures, tmp_path):
    src, prefix = fixtures["strings"]
    ck = ckptconv.load(src)
    key = "{}/.ATTRIBUTES/VARIABLE_VALUE".format
    assert ck.tree[key("s")] == b"hello"
    assert ck.tree[key("sv")] == [b"a", b"", b"\xff\x00z"]
    assert ck.tree[key("s2")] == [[b"x", b"y"], [b"zz", b"w"]]
    # TF -> TF keeps them as real DT_STRING tensors TF reads back
    dst = tmp_path / "again" / "model.ckpt"
    assert cli("convert", src, dst, "--to", "tf").returncode == 0
    reader = tf.train.load_checkpoint(str(dst))
    for name in ("s", "sv", "s2"):
        np.testing.assert_array_equal(reader.get_tensor(key(name)),
                                      tf.train.load_checkpoint(prefix).get_tensor(key(name)))
    assert tf_bundle.verify_bundle(dst) == []


def test_variant_tensor_kept_and_restored_by_tf(tf, fixtures, tmp_path):
    src, _ = fixtures["iterator"]
    ck = ckptconv.load(src)
    rec = ck.tree["it/.ATTRIBUTES/ITERATOR_STATE"]
    assert isinstance(rec, ckptconv.tree.ObjectRecord) and rec.state["dtype"] == "variant"
    # through safetensors metadata and back to TF: the iterator resumes where it was
    mid, dst = tmp_path / "mid.safetensors", tmp_path / "back" / "model.ckpt"
    assert cli("convert", src, mid).returncode == 0
    assert cli("convert", mid, dst, "--to", "tf").returncode == 0
    it = iter(tf.data.Dataset.range(10))
    tf.train.Checkpoint(it=it).read(str(dst)).assert_consumed()
    assert int(next(it)) == 2


def test_big_endian_bundle(tmp_path):
    """TF writes the host byte order and records it; BIG bundles read as values."""
    values = np.array([1.5, -2.0, 3.25], np.float32)
    raw = values.astype(">f4").tobytes()
    prefix = tmp_path / "be"
    Path(str(prefix) + ".data-00000-of-00001").write_bytes(raw)
    header = (_io.field_varint(1, 1) + _io.field_varint(2, 1)
              + _io.field_bytes(3, _io.field_varint(1, 1)))
    entry = tf_records.BundleEntry(b"w", 1, (3,), size=len(raw), crc32c=_io.mask_crc(_io.crc32c(raw)))
    Path(str(prefix) + ".index").write_bytes(
        tf_table.build_table([(b"", header), (b"w", tf_records.encode_entry(entry))]))
    ck = ckptconv.load(prefix)
    assert ck.info["byte_order"] == "big-endian"
    np.testing.assert_array_equal(ck.tree["w"].numpy(), values)
    assert tf_bundle.verify_bundle(prefix) == []
    out = tmp_path / "le.ckpt"
    ckptconv.save(ck, out, format="tf")
    assert ckptconv.load(out).tree["w"].tobytes() == values.tobytes()


# --- writing --------------------------------------------------------------------------

def _all_dtypes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "encoder.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "bf16": rng.standard_normal(9).astype(ml_dtypes.bfloat16),
        "half": np.array([0.5, -65504, np.inf], np.float16),
        "int8": np.array([-128, 0, 127], np.int8),
        "mask": np.array([[True, False], [False, True]]),
        "c64": np.array([1 + 2j, -3.5j], np.complex64),
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 4), np.int32),
        "ids": np.array([2 ** 62, -1], np.int64),
        "u16": np.array([65535], np.uint16),
        "big": rng.standard_normal((256, 512)).astype(np.float32),
    }


def test_safetensors_to_tf_read_back_by_tensorflow(tf, tmp_path):
    from safetensors.numpy import save_file

    arrays = _all_dtypes()
    src = tmp_path / "in.safetensors"
    save_file(arrays, str(src))
    out = tmp_path / "out" / "model.ckpt"
    r = cli("convert", src, out)                            # .ckpt: the target format is tf
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "checkpoint", "model.ckpt.data-00000-of-00001", "model.ckpt.index"]
    assert tf.train.latest_checkpoint(str(out.parent)) == str(out)
    reader = tf.train.load_checkpoint(str(out))
    for k, v in arrays.items():
        got = reader.get_tensor(k)
        assert np.dtype(got.dtype).name == v.dtype.name and got.shape == v.shape, k
        assert got.tobytes() == v.tobytes(), k
    assert tf_bundle.verify_bundle(out) == []
    back = ckptconv.load(out)
    for k, v in arrays.items():
        assert back.tree[k].numpy().tobytes() == v.tobytes()


def test_sharded_write(tf, tmp_path):
    from safetensors.numpy import save_file

    arrays = _all_dtypes()
    src = tmp_path / "in.safetensors"
    save_file(arrays, str(src))
    out = tmp_path / "sh" / "model.ckpt"
    r = cli("convert", src, out, "--to", "tf", "--shard-size", "200KB")
    assert r.returncode == 0, r.stderr
    shards = sorted(out.parent.glob("model.ckpt.data-*"))
    assert len(shards) >= 2 and shards[-1].name.endswith(f"-of-{len(shards):05d}")
    reader = tf.train.load_checkpoint(str(out))
    for k, v in arrays.items():
        assert reader.get_tensor(k).tobytes() == v.tobytes(), k
    assert tf_bundle.verify_bundle(out) == []


def test_tf2_checkpoint_survives_tf_to_tf(tf, fixtures, tmp_path):
    dst = tmp_path / "k" / "model.ckpt"
    assert cli("convert", fixtures["keras"][0], dst, "--to", "tf").returncode == 0
    model = _keras_model()
    tf.train.Checkpoint(model=model).read(str(dst)).assert_consumed()
    for got, want in zip(model.weights, fixtures["keras_weights"]):
        np.testing.assert_array_equal(got.numpy(), want)


def test_tree_metadata_and_ties_survive(tf, tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    tree = {"model": {"w": w, "w_tied": w, "b": np.ones(3, np.float16)},
            "epoch": 3, "opt": {"lr": 0.1, "betas": (0.9, 0.999)}, "tag": "run-1"}
    ck = ckptconv.tree.Checkpoint.from_state_dict(tree, {"author": "me"})
    dst = tmp_path / "t" / "model.ckpt"
    report = ckptconv.save(ck, dst, format="tf")
    assert any("ckptconv metadata" in n for n in report["notes"])
    # ckptconv's metadata is in the index's metaindex block: TF lists only the variables
    assert sorted(n for n, _ in tf.train.list_variables(str(dst))) == \
        ["model.b", "model.w", "model.w_tied"]
    reader = tf.train.load_checkpoint(str(dst))
    np.testing.assert_array_equal(reader.get_tensor("model.w"), w)
    np.testing.assert_array_equal(reader.get_tensor("model.w_tied"), w)   # TF sees both names
    back = ckptconv.load(dst)
    assert back.metadata == {"author": "me"}
    assert back.tree["model"]["w"] is back.tree["model"]["w_tied"]
    assert back.tree["epoch"] == 3 and back.tree["opt"] == {"lr": 0.1, "betas": (0.9, 0.999)}
    assert back.tree["tag"] == "run-1"


def test_unsupported_dtype_is_named(tmp_path):
    ck = ckptconv.tree.Checkpoint.from_state_dict(
        {"scale": np.ones(2, ml_dtypes.float8_e8m0fnu), "ok": np.ones(2, np.float32)})
    with pytest.raises(UnsupportedError, match="scale"):
        ckptconv.save(ck, tmp_path / "m.ckpt", format="tf")
    assert not list(tmp_path.iterdir())


def test_existing_target_needs_force(tmp_path):
    dst = tmp_path / "model.ckpt"
    ckptconv.save({"a": np.ones(2, np.float32)}, dst, format="tf")
    with pytest.raises(ckptconv.errors.UsageError):
        ckptconv.save({"a": np.zeros(2, np.float32)}, dst, format="tf")
    ckptconv.save({"a": np.zeros(2, np.float32)}, dst, format="tf", force=True)
    assert ckptconv.load(dst).tree["a"].numpy().tolist() == [0, 0]


# --- corrupt inputs -------------------------------------------------------------------

def _corrupt(kind: str, prefix: Path) -> None:
    index = Path(str(prefix) + ".index")
    data = Path(str(prefix) + ".data-00000-of-00001")
    if kind == "truncated index":
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    elif kind == "truncated data":
        data.write_bytes(data.read_bytes()[:-10])
    elif kind == "bad block handle":
        raw = bytearray(index.read_bytes())
        handles = (_io.encode_varint(0) + _io.encode_varint(8)
                   + _io.encode_varint(10 ** 6) + _io.encode_varint(100))
        raw[-48:-8] = handles.ljust(40, b"\0")
        index.write_bytes(bytes(raw))
    elif kind == "flipped index bit":
        raw = bytearray(index.read_bytes())
        raw[30] ^= 0x04
        index.write_bytes(bytes(raw))
    elif kind == "flipped data bit":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        data.write_bytes(bytes(raw))


@pytest.fixture()
def tf1_copy(fixtures, tmp_path) -> Path:
    src_dir, prefix = fixtures["tf1"]
    shutil.copytree(src_dir, tmp_path / "ck")
    return tmp_path / "ck" / Path(prefix).name


@pytest.mark.parametrize("kind,expected", [
    ("truncated index", "index"),
    ("truncated data", "data-00000-of-00001"),
    ("bad block handle", "bad block handle"),
    ("flipped index bit", "crc32c"),
])
def test_corrupt_input_is_one_line_exit_1(tf1_copy, tmp_path, kind, expected):
    _corrupt(kind, tf1_copy)
    dst = tmp_path / "out.safetensors"
    r = cli("convert", tf1_copy.parent, dst)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptconv: error: "), r.stderr
    assert tf1_copy.name in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr and not dst.exists()


def test_flipped_data_bit_caught_by_verification(tf1_copy, tmp_path):
    _corrupt("flipped data bit", tf1_copy)
    problems = tf_bundle.verify_bundle(tf1_copy)
    assert len(problems) == 1 and "fails its crc32c" in problems[0]
    assert "data-00000-of-00001" in problems[0]
    ckptconv.load(tf1_copy)                    # lazy: reading the index touches no data
    ck = ckptconv.load(tf1_copy, verify=True)
    with pytest.raises(IntegrityError, match="crc32c"):
        for ref in ck.tensors().values():
            ref.numpy()
    dst = tmp_path / "out.safetensors"
    with pytest.raises(IntegrityError):
        ckptconv.save(ckptconv.load(tf1_copy, verify=True), dst)
    assert not dst.exists()
    if importlib.util.find_spec("ckptconv.integrity") is None:
        return                                 # the core's verify verb is not there yet
    r = cli("verify", tf1_copy)
    assert r.returncode == 1 and "crc32c" in r.stdout + r.stderr


def test_truncated_index_direct_error(tmp_path):
    p = tmp_path / "m.ckpt"
    ckptconv.save({"a": np.ones(3, np.float32)}, p, format="tf")
    idx = Path(str(p) + ".index")
    idx.write_bytes(idx.read_bytes()[:20])
    with pytest.raises(FormatError, match=r"m\.ckpt\.index: truncated"):
        ckptconv.load(p)
    assert tf_bundle.verify_bundle(p) and "truncated" in tf_bundle.verify_bundle(p)[0]


def test_hostile_index_entries_give_clean_errors(tmp_path):
    """Random damage to the entries (behind valid block checksums) only ever
    ends in ckptconv's own errors."""
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    prefix = tmp_path / "m.ckpt"
    ckptconv.save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(0, np.int8),
                   "s": b"text"}, prefix, format="tf")
    pairs = [(k, bytes(v)) for k, v in tf_table.read_table(ckptconv.tensor.FileHandle(
        str(prefix) + ".index"))]
    index = Path(str(prefix) + ".index")

    @hyp.settings(max_examples=150, deadline=None, database=None)
    @hyp.given(st.integers(0, len(pairs) - 1), st.binary(max_size=40), st.integers(0, 60))
    def check(which, junk, cut):
        items = list(pairs)
        key, value = items[which]
        items[which] = (key, value[:cut] + junk)
        index.write_bytes(tf_table.build_table(items))
        try:
            for ref in ckptconv.load(prefix).tensors().values():
                ref.numpy()
            tf_bundle.verify_bundle(prefix)
        except ckptconv.errors.CkptconvError as e:
            assert "\n" not in str(e)

    check()


def test_big_file_backed_tensors_are_copied_with_their_crc_beside(tf, tmp_path):
    """Tensors of >= 1 MiB lying in a file are copied in the kernel while their
    CRC-32C is read in a thread: TensorFlow reads the bundle back equal, and the
    checksums are the ones its own writer computes (``verify``)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    arrays = {"big.kernel": rng.standard_normal((700, 600)).astype(np.float32),   # 1.6 MiB
              "big.bf16": rng.standard_normal((1100, 500)).astype(ml_dtypes.bfloat16),
              "small.bias": np.arange(7, dtype=np.int64)}
    save_file(arrays, str(tmp_path / "w.safetensors"))
    ckptconv.convert(tmp_path / "w.safetensors", tmp_path / "out" / "model.ckpt")
    report = ckptconv.verify(tmp_path / "out" / "model.ckpt")
    assert report.problems == [] and report.checked["tf entries (crc32c)"] == 3
    reader = tf.train.load_checkpoint(str(tmp_path / "out" / "model.ckpt"))
    for name, arr in arrays.items():  # TensorFlow checks each tensor's crc32c as it reads
        assert reader.get_tensor(name).tobytes() == arr.tobytes(), name


def test_prefix_with_an_empty_basename_is_found(tf, fixtures):
    """tf.train.Checkpoint.write("dir/") names its files dir/.index and
    dir/.data-00000-of-00001; the folder, the index and the prefix all open."""
    folder, prefix = fixtures["emptybase"]
    assert prefix.endswith("/") and (folder / ".index").is_file()
    # (tf.train.load_checkpoint takes "dir/" for a folder: the raw reader opens the prefix)
    want = tf.compat.v1.train.NewCheckpointReader(prefix).get_tensor("v/.ATTRIBUTES/VARIABLE_VALUE")
    for path in (folder, folder / ".index", prefix):
        assert detect_format(path) == "tf"
        got = ckptconv.load(path).tensors()["v/.ATTRIBUTES/VARIABLE_VALUE"].numpy()
        np.testing.assert_array_equal(got, want)
    assert ckptconv.verify(folder).problems == []


def test_saved_model_pb_is_a_tf_savedmodel_not_onnx(fixtures):
    from ckptconv.adapters.sniffers import looks_like_onnx

    pb = fixtures["savedmodel"][0] / "saved_model.pb"
    assert not looks_like_onnx(pb.read_bytes()[:4096])
    assert detect_format(pb) == "tf"
    assert set(ckptconv.load(pb).tensors()) == set(ckptconv.load(pb.parent).tensors())
