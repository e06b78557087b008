"""Training-framework checkpoints whose pickles hold framework objects:
a Hugging Face Trainer ``checkpoint-N/`` folder written by ``transformers.Trainer``,
a Lightning ``.ckpt`` with OmegaConf hyper-parameters, and the known inert
globals (Enums, dataclasses, builtin types as values, ``defaultdict``,
``pathlib``, DCP metadata). Every file is made by the real library; every one
inspects and converts (to safetensors and back to .pt) without a refusal, and
torch loads the result equal to the original. Unknown callables are still
refused (exit 3) unless ``--allow-global`` names them.
"""
from __future__ import annotations

import enum
import json
import os
import pathlib
import pickle
from collections import OrderedDict, defaultdict

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli, tensor_bytes_equal

torch = pytest.importorskip("torch")

import ckptconv  # noqa: E402


class Color(enum.Enum):
    """Not in the shipped list: refused unless a run allows it."""

    RED = "red"


def torch_load(path):
    # Oracle only: files written by the frameworks or by ckptconv in this test.
    return torch.load(path, weights_only=False, map_location="cpu")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``checkpoint-2/`` of a 2-step ``transformers.Trainer`` run on CPU (tiny BERT)."""
    # transformers would also import TensorFlow (slow) when it is installed
    os.environ.setdefault("USE_TF", "0")
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": torch.tensor([1, 2, 3, i % 5 + 4]), "labels": torch.tensor(i % 2)}

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=2, save_steps=2, save_strategy="steps",
        per_device_train_batch_size=4, report_to=[], use_cpu=True, logging_steps=1,
        lr_scheduler_type="cosine", disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Data()).train()
    return out / "checkpoint-2"


@pytest.fixture(scope="session")
def lightning_ckpt(tmp_path_factory):
    """A ``lightning.Trainer`` checkpoint of a tiny model whose hyper-parameters
    are an OmegaConf DictConfig (``save_hyperparameters(cfg)``)."""
    L = pytest.importorskip("lightning")
    omegaconf = pytest.importorskip("omegaconf")
    out = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)

    class Tiny(L.LightningModule):
        def __init__(self, cfg):
            super().__init__()
            self.save_hyperparameters(cfg)
            self.lin = torch.nn.Linear(3, 2)

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x), y)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    cfg = omegaconf.OmegaConf.create({"lr": 0.01, "layers": [3, 2], "name": "tiny",
                                      "opt": {"betas": [0.9, 0.99], "path": "${name}"}})
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 2))
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        accelerator="cpu", default_root_dir=str(out))
    trainer.fit(Tiny(cfg), torch.utils.data.DataLoader(data, batch_size=4))
    path = out / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def _round_trip(src, tmp_path):
    """src -> safetensors -> .pt, and src -> .pt directly: both paths torch.load-ed."""
    st = tmp_path / (src.name + ".safetensors")
    ckptconv.convert(src, st)
    back = tmp_path / (src.name + ".back.pt")
    ckptconv.convert(st, back)
    direct = tmp_path / (src.name + ".direct.pt")
    ckptconv.convert(src, direct)
    return [torch_load(back), torch_load(direct)]


def _assert_same_values(got, want, path="root"):
    """Equal trees: tensors bit for bit, everything else by value (or by repr
    for objects without __eq__, e.g. an accelerate PartialState)."""
    if isinstance(want, torch.Tensor):
        assert tensor_bytes_equal(got, want), path
    elif isinstance(want, np.ndarray):
        assert type(got) is np.ndarray and got.dtype == want.dtype, path
        assert np.array_equal(got, want), path
    elif isinstance(want, dict):
        assert type(got) is type(want) and list(got) == list(want), path
        for k in want:
            _assert_same_values(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_values(g, w, f"{path}.{i}")
    else:
        assert type(got) is type(want), (path, type(got), type(want))
        assert got == want or repr(got) == repr(want), path


def test_hf_trainer_checkpoint_inspects_and_converts(hf_checkpoint, tmp_path):
    names = sorted(p.name for p in hf_checkpoint.iterdir())
    assert {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "model.safetensors", "trainer_state.json"} <= set(names)
    for name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "model.safetensors"):
        src = hf_checkpoint / name
        p = run_cli("inspect", src, "--json")
        assert p.returncode == 0, (name, p.stderr)
        if name == "model.safetensors":
            continue
        want = torch_load(src)
        for got in _round_trip(src, tmp_path):
            if name == "training_args.bin":
                assert type(got).__name__ == "TrainingArguments"
                assert got.to_dict() == want.to_dict()
                _assert_same_values(vars(got), vars(want))
            else:
                _assert_same_values(got, want)


def test_training_args_enums_are_inert_records(hf_checkpoint):
    ck = ckptconv.load(hf_checkpoint / "training_args.bin")
    args = ck.tree
    assert args.cls == "transformers.training_args.TrainingArguments"
    strategy = args.state["eval_strategy"]
    assert (strategy.cls, strategy.kind, strategy.args) == (
        "transformers.trainer_utils.IntervalStrategy", "reduce", ("no",))
    assert args.state["lr_scheduler_type"].args == ("cosine",)
    assert args.state["distributed_state"].state["distributed_type"].cls == \
        "accelerate.utils.dataclasses.DistributedType"
    p = run_cli("inspect", hf_checkpoint / "training_args.bin")
    assert p.returncode == 0 and "transformers.trainer_utils.SchedulerType('cosine')" in p.stdout


def test_lightning_checkpoint_with_omegaconf_round_trips(lightning_ckpt, tmp_path):
    from omegaconf import DictConfig, OmegaConf

    want = torch_load(lightning_ckpt)
    assert isinstance(want["hyper_parameters"], DictConfig)
    p = run_cli("inspect", lightning_ckpt, "--json")
    assert p.returncode == 0, p.stderr
    for got in _round_trip(lightning_ckpt, tmp_path):
        hp = got["hyper_parameters"]
        assert isinstance(hp, DictConfig)
        assert OmegaConf.to_container(hp) == OmegaConf.to_container(want["hyper_parameters"])
        assert hp.opt.path == "tiny"  # interpolation resolves: the parent links are back
        assert hp.opt._get_parent() is hp and hp.opt.betas._get_node(0)._get_parent() is hp.opt.betas
        assert got["hparams_type"] is DictConfig
        assert type(hp._metadata.resolver_cache) is defaultdict
        _assert_same_values(got["state_dict"], want["state_dict"])
        _assert_same_values(got["optimizer_states"], want["optimizer_states"])
        _assert_same_values(got["lr_schedulers"], want["lr_schedulers"])
        assert {k: repr(v) for k, v in got.items()} == {k: repr(v) for k, v in want.items()}


@pytest.fixture(scope="module")
def builtin_values_file(tmp_path_factory):
    """Builtin types named as values, defaultdicts with a type factory, paths,
    an OrderedDict, and DCP's metadata dataclasses (as torch's own pickle holds them)."""
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorProperties,
                                                       TensorStorageMetadata)

    meta = Metadata({"w": TensorStorageMetadata(
        TensorProperties(dtype=torch.float32), torch.Size([4, 2]),
        [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 2]))])},
        storage_data={MetadataIndex("w", torch.Size([0, 0]), 0): "__0_0.distcp"})
    obj = {"types": [list, dict, set, tuple, int, float, str, bool, object],
           "by_kind": defaultdict(list, {"a": [1, 2]}), "counts": defaultdict(int),
           "out": pathlib.PurePosixPath("runs/exp1"), "home": pathlib.Path("/tmp/x"),
           "ordered": OrderedDict(b=1, a=2), "dcp": meta, "w": torch.arange(4.0)}
    path = tmp_path_factory.mktemp("builtins") / "values.pt"
    torch.save(obj, path)
    return path, obj


def test_builtin_types_defaultdict_paths_and_dcp_metadata(builtin_values_file, tmp_path):
    path, want = builtin_values_file
    ck = ckptconv.load(path)
    assert [r.cls for r in ck.tree["types"]] == [f"builtins.{t.__name__}" for t in want["types"]]
    assert ck.tree["by_kind"].cls == "collections.defaultdict"
    assert ck.tree["dcp"].cls == "torch.distributed.checkpoint.metadata.Metadata"
    for got in _round_trip(path, tmp_path):
        assert got["types"] == want["types"]
        assert type(got["by_kind"]) is defaultdict and got["by_kind"].default_factory is list
        assert got["by_kind"] == want["by_kind"] and got["counts"].default_factory is int
        assert got["out"] == want["out"] and type(got["home"]) is type(want["home"])
        assert got["dcp"] == want["dcp"]
        assert list(got["ordered"]) == ["b", "a"] and torch.equal(got["w"], want["w"])
    # DCP writes .metadata with plain pickle (protocol 4/5, STACK_GLOBAL)
    bare = tmp_path / "metadata.pkl"
    bare.write_bytes(pickle.dumps(want["dcp"]))
    assert ckptconv.load(bare).tree.cls == "torch.distributed.checkpoint.metadata.Metadata"


def test_unknown_callable_refused_unless_allowed(tmp_path):
    path = tmp_path / "color.pt"
    torch.save({"c": Color.RED, "w": torch.ones(2)}, path)
    name = f"{__name__}.Color"
    assert_one_line_error(run_cli("inspect", path), 3, name)
    assert_one_line_error(run_cli("convert", path, tmp_path / "c.safetensors"), 3, name)
    with pytest.raises(ckptconv.UnsafePickleError, match="Color"):
        ckptconv.load(path)
    ck = ckptconv.load(path, allow_globals=[name])
    assert (ck.tree["c"].cls, ck.tree["c"].args) == (name, ("red",))
    p = run_cli("convert", path, tmp_path / "c.safetensors", "--allow-global", name)
    assert p.returncode == 0, p.stderr
    p = run_cli("convert", tmp_path / "c.safetensors", tmp_path / "c.pt")
    assert p.returncode == 0, p.stderr  # the record travels in the tree metadata
    assert torch_load(tmp_path / "c.pt")["c"] is Color.RED
    # a name that can run code is never allowed
    assert_one_line_error(run_cli("inspect", path, "--allow-global", "os.system"), 2, "os.system")


def test_known_enum_with_other_arguments_is_refused(tmp_path):
    """Only the construction a framework object really pickles is read: an
    Enum with two arguments, or a defaultdict whose factory is a function, is not."""
    evil = (b"\x80\x02}X\x01\x00\x00\x00dccollections\ndefaultdict\nc__builtin__\neval\n"
            b"\x85R(X\x01\x00\x00\x00kK\x01us.")
    path = tmp_path / "evil.pkl"
    path.write_bytes(evil)
    assert_one_line_error(run_cli("inspect", path), 3, "eval")
    two = (b"\x80\x02}X\x01\x00\x00\x00sctransformers.trainer_utils\nIntervalStrategy\n"
           b"X\x01\x00\x00\x00aX\x01\x00\x00\x00b\x86Rs.")
    path.write_bytes(two)
    assert_one_line_error(run_cli("inspect", path), 1, "IntervalStrategy")
    # a known dataclass is read only as pickle builds it (NEWOBJ), never as a call
    call = (b"\x80\x02}X\x01\x00\x00\x00actransformers.training_args\nTrainingArguments\n"
            b"X\x01\x00\x00\x00o\x85Rs.")
    path.write_bytes(call)
    assert_one_line_error(run_cli("inspect", path), 3, "TrainingArguments", "REDUCE")


def test_check_names_framework_blockers_and_sanitize_makes_plain_values(
        hf_checkpoint, lightning_ckpt, tmp_path):
    args = hf_checkpoint / "training_args.bin"
    report = ckptconv.check(args)
    blockers = {b.name for b in report.blockers}
    assert {"transformers.training_args.TrainingArguments",
            "transformers.trainer_utils.IntervalStrategy",
            "transformers.trainer_utils.SchedulerType"} <= blockers
    assert not report.weights_only
    out = tmp_path / "args_clean.pt"
    ckptconv.sanitize(args, out)
    clean = torch.load(out, weights_only=True)
    want = torch_load(args)
    assert clean["__class__"] == "transformers.training_args.TrainingArguments"
    assert clean["eval_strategy"] == want.eval_strategy.value
    assert clean["lr_scheduler_type"] == "cosine" and clean["output_dir"] == want.output_dir
    assert clean["learning_rate"] == want.learning_rate

    p = run_cli("check", lightning_ckpt, "--json")
    assert p.returncode == 0, p.stderr
    names = {b["name"] for b in json.loads(p.stdout)["blockers"]}
    assert {"omegaconf.dictconfig.DictConfig", "builtins.list", "collections.defaultdict"} <= names
    out = tmp_path / "tiny_clean.pt"
    assert run_cli("sanitize", lightning_ckpt, out).returncode == 0
    clean = torch.load(out, weights_only=True)
    assert clean["hyper_parameters"] == {"lr": 0.01, "layers": [3, 2], "name": "tiny",
                                         "opt": {"betas": [0.9, 0.99], "path": "${name}"}}
    assert clean["hparams_type"] == "omegaconf.dictconfig.DictConfig"
    _assert_same_values(clean["state_dict"], torch_load(lightning_ckpt)["state_dict"])


@pytest.mark.parametrize("to,ext", [("tf", "ckpt"), ("hdf5", "h5"), ("onnx", "onnx"),
                                    ("safetensors", "safetensors")])
def test_framework_objects_travel_through_every_format(lightning_ckpt, hf_checkpoint, to, ext,
                                                       tmp_path):
    """The records ride in each format's tree metadata and come back as the objects."""
    if to in ("hdf5", "onnx"):
        pytest.importorskip("h5py" if to == "hdf5" else "onnx")
    want = torch_load(lightning_ckpt)
    mid, back = tmp_path / f"mid.{ext}", tmp_path / "back.pt"
    ckptconv.convert(lightning_ckpt, mid, to=to)
    ckptconv.convert(mid, back, to="torch")
    got = torch_load(back)
    assert {k: repr(v) for k, v in got.items()} == {k: repr(v) for k, v in want.items()}
    assert got["hyper_parameters"].opt.path == "tiny"
    if to != "onnx":  # an ONNX file needs tensors; training_args.bin has none
        args = hf_checkpoint / "training_args.bin"
        ckptconv.convert(args, tmp_path / f"args.{ext}", to=to)
        ckptconv.convert(tmp_path / f"args.{ext}", tmp_path / "args.pt", to="torch")
        assert torch_load(tmp_path / "args.pt").to_dict() == torch_load(args).to_dict()
