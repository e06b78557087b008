"""``ls`` / ``pick`` / ``prune``: runs of checkpoints written by torch.save the way
training scripts write them (``checkpoint_<YYYYmmdd_HHMMSS>.pth`` with epoch,
model/optimizer state and loss), with a truncated and an unsafe one among
them, a sharded safetensors set, an ``np.savez`` archive and Hugging Face
Trainer-like ``checkpoint-N/`` folders. torch is the oracle for what the
files hold and for ``weights_only`` loading."""
from __future__ import annotations

import io
import json
import os
import shutil
import sys

import numpy as np
import pytest

import ckptconv
from ckptconv.errors import FormatError, UsageError
from ckptconv.verbs.runs import find_checkpoints, name_time

from conftest import assert_one_line_error, run_cli
from malicious_corpus import _system_p2, torch_zip

torch = pytest.importorskip("torch")

# (name stamp, epoch, loss, accuracy); file times are set in the opposite order
GOOD = [("20261130_142501", 0, 0.90, 0.50), ("20261130_152501", 1, 0.40, 0.61),
        ("20261130_162501", 2, 0.55, 0.72), ("20261130_172501", 3, 0.60, 0.70)]
TRUNCATED = "checkpoint_20261130_182501.pth"   # newer than all the good ones
UNSAFE = "checkpoint_20261130_192501.pth"


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 3)
        self.fc2 = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())


def _train_state(epoch: int):
    torch.manual_seed(epoch)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    return net, opt


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import argparse

    d = tmp_path_factory.mktemp("run")
    for i, (stamp, epoch, loss, acc) in enumerate(GOOD):
        net, opt = _train_state(epoch)
        obj = {"epoch": epoch, "model_state_dict": net.state_dict(),
               "optimizer_state_dict": opt.state_dict(), "loss": torch.tensor(loss),
               "metrics": {"val_acc": acc}}
        if epoch == 2:   # hyper-parameters as a Namespace: weights_only=True refuses it
            obj["args"] = argparse.Namespace(lr=1e-3, batch_size=32)
        path = d / f"checkpoint_{stamp}.pth"
        torch.save(obj, path)
        os.utime(path, (2e9 - i * 1000, 2e9 - i * 1000))   # mtimes say the opposite
    good = (d / f"checkpoint_{GOOD[-1][0]}.pth").read_bytes()
    (d / TRUNCATED).write_bytes(good[: len(good) // 2])
    (d / UNSAFE).write_bytes(torch_zip(_system_p2()))
    (d / "notes.txt").write_text("lr sweep, see wandb\n")
    (d / "config.json").write_text(json.dumps({"lr": 1e-3}))
    return d


def cli(capsys, *args):
    """The CLI in this process (no interpreter start): (exit code, stdout, stderr)."""
    from ckptconv.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def fresh_copy(src, dst):
    shutil.copytree(src, dst)
    for s, t in zip(sorted(src.rglob("*")), sorted(dst.rglob("*"))):
        shutil.copystat(s, t)
    return dst


def _count_tensors(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


def _weights_only_loads(path) -> bool:
    try:
        torch.load(path, weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - torch's own verdict is the oracle
        return False


# --- ls ------------------------------------------------------------------------------------

def test_ls_rows_match_what_torch_saved(run_dir):
    rows = ckptconv.ls(run_dir).to_dict()
    names = [os.path.basename(r["path"]) for r in rows]
    assert names == [f"checkpoint_{s}.pth" for s, *_ in GOOD] + [TRUNCATED, UNSAFE]
    assert "notes.txt" not in names and "config.json" not in names
    for row, (stamp, epoch, loss, acc) in zip(rows, GOOD):
        path = row["path"]
        want = torch.load(path, weights_only=False) if epoch == 2 else \
            torch.load(path, weights_only=True)
        assert row["status"] == "ok" and row["format"] == "torch"
        assert row["time"] == f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T" \
                              f"{stamp[9:11]}:{stamp[11:13]}:{stamp[13:]}"
        assert row["time_from"] == "name"
        assert row["epoch"] == want["epoch"] == epoch
        assert row["loss"] == pytest.approx(float(want["loss"]))
        assert row["metrics"] == {"metrics.val_acc": acc}
        assert row["tensors"] == _count_tensors(want)
        assert row["size"] == os.path.getsize(path)
        assert row["weights_only"] == _weights_only_loads(path) == (epoch != 2)
        assert row["min_torch"] == ckptconv.check(path).min_torch
    bad, evil = rows[-2], rows[-1]
    assert bad["status"] == "corrupt" and "zip" in bad["reason"]
    assert evil["status"] == "unsafe" and "posix.system" in evil["reason"]
    assert set(rows[0]) >= {"path", "format", "size", "time", "epoch", "step", "loss", "metrics",
                            "tensors", "min_torch", "weights_only", "status"}


def test_ls_sort_and_cli(run_dir, capsys):
    by_loss = [r["loss"] for r in ckptconv.ls(run_dir, sort="loss").to_dict()[:4]]
    assert by_loss == sorted(by_loss)
    code, out, err = cli(capsys, "ls", run_dir, "--sort", "val_acc", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["metrics"].get("metrics.val_acc") for r in rows[:4]] == [0.5, 0.61, 0.7, 0.72]
    assert_one_line_error(run_cli("ls", run_dir, "--sort", "accuracy"), 2, "accuracy", "val_acc")
    code, out, err = cli(capsys, "ls", run_dir / "checkpoint_2026*.pth")  # a glob; not a tty
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["path", "format", "size"] and len(lines) == 7
    assert lines[-1].endswith("unsafe") and lines[-2].endswith("corrupt")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_table_rich_on_a_terminal_plain_without_it(run_dir, monkeypatch):
    pytest.importorskip("rich")
    report = ckptconv.ls(run_dir)
    out = _Terminal()
    report.print_table(out, width=400)
    assert "checkpoint_20261130_142501.pth" in out.getvalue() and "unsafe" in out.getvalue()
    assert "\x1b[" in out.getvalue()   # rich's colours
    monkeypatch.setitem(sys.modules, "rich", None)   # rich not installed: plain columns
    monkeypatch.setitem(sys.modules, "rich.console", None)
    plain = _Terminal()
    report.print_table(plain, width=400)
    assert plain.getvalue().rstrip("\n") == str(report)


def test_name_timestamps():
    assert name_time("checkpoint_20261130_142501.pth").isoformat() == "2026-11-30T14:25:01"
    assert name_time("ckpt-2026-11-30T14-25-01.pt").isoformat() == "2026-11-30T14:25:01"
    assert name_time("model_2025-01-02.safetensors").isoformat() == "2025-01-02T00:00:00"
    assert name_time("checkpoint-20000") is None and name_time("epoch_12345678.pt") is None


# --- pick ----------------------------------------------------------------------------------

def test_pick_latest_and_best_skip_corrupt_and_unsafe(run_dir, capsys):
    newest_intact = str(run_dir / f"checkpoint_{GOOD[-1][0]}.pth")
    assert ckptconv.pick(run_dir, latest=True) == newest_intact      # not the truncated one
    assert ckptconv.pick(run_dir, best="loss") == str(run_dir / f"checkpoint_{GOOD[1][0]}.pth")
    assert ckptconv.pick(run_dir, best="val_acc", maximize=True) == \
        str(run_dir / f"checkpoint_{GOOD[2][0]}.pth")
    code, out, _ = cli(capsys, "pick", run_dir, "--latest")
    assert code == 0 and out.strip() == newest_intact
    code, out, _ = cli(capsys, "pick", run_dir, "--best", "val_acc", "--max", "--json")
    assert json.loads(out) == str(run_dir / f"checkpoint_{GOOD[2][0]}.pth")
    code, _, err = cli(capsys, "pick", run_dir, "--best", "bleu")
    assert code == 2 and "bleu" in err and "loss" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:   # --latest or --best is required
        cli(capsys, "pick", run_dir)
    assert e.value.code == 2


def test_pick_in_a_run_with_nothing_intact(tmp_path, run_dir):
    shutil.copy(run_dir / TRUNCATED, tmp_path)
    shutil.copy(run_dir / UNSAFE, tmp_path)
    with pytest.raises(FormatError, match="no intact checkpoint"):
        ckptconv.pick(tmp_path)
    assert_one_line_error(run_cli("pick", tmp_path, "--latest"), 1, "no intact checkpoint")


def test_load_into_picks_from_the_folder(run_dir):
    net = Net()
    report = ckptconv.load_into(net, run_dir, pick="latest")
    want = torch.load(run_dir / f"checkpoint_{GOOD[-1][0]}.pth", weights_only=True)
    assert len(report.loaded) == 4 and report.source_subtree == "model_state_dict"
    for k, v in net.state_dict().items():
        assert torch.equal(v, want["model_state_dict"][k])
    ckptconv.load_into(net, run_dir, pick="best:loss")
    want = torch.load(run_dir / f"checkpoint_{GOOD[1][0]}.pth", weights_only=True)
    assert torch.equal(net.fc1.weight, want["model_state_dict"]["fc1.weight"])
    with pytest.raises(UsageError, match="latest"):
        ckptconv.load_into(net, run_dir, pick="newest")


# --- prune ---------------------------------------------------------------------------------

def test_prune_dry_run_then_for_real(tmp_path, run_dir, capsys):
    d = fresh_copy(run_dir, tmp_path / "run")
    ckptconv.save({"w": np.ones((64, 64), np.float32), "b": np.ones(64, np.float32)},
                  d / "model_20261201_000000.safetensors.index.json", shard_size=8000)
    shards = sorted(d.glob("model_20261201_000000-*.safetensors"))
    assert len(shards) == 2
    before = sorted(p.name for p in d.iterdir())
    code, out, err = cli(capsys, "prune", d, "--keep-last", "1", "--keep-best", "loss", "--dry-run")
    assert code == 0, err
    assert sorted(p.name for p in d.iterdir()) == before               # nothing removed
    assert out.count("would remove") == 3
    report = ckptconv.prune(d, keep_last=1, keep_best="loss")
    after = sorted(p.name for p in d.iterdir())
    removed = {os.path.basename(r["path"]) for r in report.removed}
    assert removed == {f"checkpoint_{GOOD[i][0]}.pth" for i in (0, 2, 3)}
    # kept: the newest (the sharded set, as a unit) and the best loss; never the rest
    assert set(after) == set(before) - removed
    assert all(s.name in after for s in shards)
    assert {TRUNCATED, UNSAFE, "notes.txt", "config.json"} <= set(after)
    assert {x["status"] for x in report.left} == {"corrupt", "unsafe"}
    # the set goes as a unit, and the only intact checkpoint stays
    report = ckptconv.prune(d, keep_last=1)
    assert [os.path.basename(r["path"]) for r in report.removed] == [f"checkpoint_{GOOD[1][0]}.pth"]
    assert not any("model_2026" in r["path"] for r in report.removed)
    with pytest.raises(UsageError, match="val_acc"):  # a metric nobody records: nothing goes
        ckptconv.prune(d, keep_last=0, keep_best="val_acc", maximize=True)
    report = ckptconv.prune(d, keep_last=0)
    assert report.removed == [] and len(report.kept) == 1
    assert len(find_checkpoints(d)) == 3   # the set, the truncated and the unsafe one
    (d / "model_20261201_000000.safetensors.index.json").rename(d / "x.json")  # a set no more
    with pytest.raises(FormatError, match="no intact"):    # shards alone are not a checkpoint
        ckptconv.prune(d, keep_last=0, dry_run=True)
    (row,) = [r for r in ckptconv.ls(d).to_dict() if "shards" in (r["reason"] or "")]
    assert len(row["files"]) == 2 and row["status"] == "corrupt"


def test_sharded_set_is_one_row_and_npz_scalars(tmp_path):
    ckptconv.save({"w": np.ones((64, 64), np.float32), "b": np.ones(64, np.float32)},
                  tmp_path / "model.safetensors.index.json", shard_size=8000)
    np.savez(tmp_path / "weights_epoch.npz", w=np.ones(3, np.float32), epoch=np.int64(5),
             step=np.int64(1200), val_loss=np.float32(0.25))
    rows = ckptconv.ls(tmp_path).to_dict()
    assert len(rows) == 2
    (npz,) = [r for r in rows if r["format"] == "npz"]
    assert npz["epoch"] == 5 and npz["step"] == 1200 and npz["metrics"] == {"val_loss": 0.25}
    (st,) = [r for r in rows if r["format"] == "safetensors"]
    assert len(st["files"]) == 3 and st["tensors"] == 2
    assert st["size"] == sum(os.path.getsize(f) for f in st["files"])


# --- Hugging Face Trainer folders ---------------------------------------------------------

@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("hf_run")
    for step, loss, eval_loss in ((500, 0.9, 0.8), (1000, 0.6, 0.5), (1500, 0.4, 0.55)):
        c = d / f"checkpoint-{step}"
        c.mkdir()
        net, opt = _train_state(step)
        save_file(net.state_dict(), c / "model.safetensors")
        torch.save(opt.state_dict(), c / "optimizer.pt")
        (c / "trainer_state.json").write_text(json.dumps({
            "epoch": step / 500, "global_step": step, "best_metric": 0.5,
            "log_history": [{"epoch": step / 500, "loss": loss, "learning_rate": 1e-4, "step": step},
                            {"epoch": step / 500, "eval_loss": eval_loss, "step": step}]}))
        os.utime(c, (1e9, 1e9))
    (d / "runs").mkdir()   # tensorboard logs: not a checkpoint
    (d / "runs" / "events.out").write_text("x")
    return d


def test_hf_trainer_folders(hf_run, tmp_path):
    rows = ckptconv.ls(hf_run).to_dict()
    assert [os.path.basename(r["path"]) for r in rows] == ["checkpoint-500", "checkpoint-1000",
                                                           "checkpoint-1500"]
    for r, step, loss in zip(rows, (500, 1000, 1500), (0.9, 0.6, 0.4)):
        assert r["step"] == step and r["epoch"] == step / 500 and r["loss"] == loss
        assert r["format"] == "safetensors" and r["tensors"] == 4 and r["status"] == "ok"
        assert r["metrics"]["best_metric"] == 0.5 and "eval_loss" in r["metrics"]
    assert ckptconv.pick(hf_run) == str(hf_run / "checkpoint-1500")   # by step, not by name
    assert ckptconv.pick(hf_run, best="eval_loss") == str(hf_run / "checkpoint-1000")
    net = Net()
    ckptconv.load_into(net, hf_run, pick="best:eval_loss")
    from safetensors.torch import load_file

    want = load_file(hf_run / "checkpoint-1000" / "model.safetensors")
    assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
    assert len(ckptconv.ls(hf_run / "checkpoint-500").entries) == 1    # the folder itself
    d = fresh_copy(hf_run, tmp_path / "hf")
    report = ckptconv.prune(d, keep_last=1, keep_best="eval_loss")
    assert [os.path.basename(r["path"]) for r in report.removed] == ["checkpoint-500"]
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint-1000", "checkpoint-1500", "runs"]


def test_prune_never_follows_an_index_out_of_its_folder(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    elsewhere.mkdir()
    ckptconv.save({"w": np.ones(4, np.float32)}, elsewhere / "precious.safetensors")
    (run / "evil.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "../elsewhere/precious.safetensors"}}))
    for i in range(2):
        ckptconv.save({"w": np.ones(4, np.float32)}, run / f"m_2026010{i + 1}_000000.safetensors")
    report = ckptconv.prune(run, keep_last=1)
    assert [os.path.basename(r["path"]) for r in report.removed] == ["m_20260101_000000.safetensors"]
    assert (elsewhere / "precious.safetensors").exists()
    assert report.left[0]["status"] == "corrupt" and "beside the index" in report.left[0]["reason"]


def test_dcp_folders_are_one_row_each(tmp_path):
    """A torch.distributed.checkpoint folder per step: one row each, pruned as a unit."""
    from ckptconv.registry import FORMATS

    if "dcp" not in FORMATS:
        pytest.skip("the dcp format is not registered in this build")
    import warnings

    import torch.distributed.checkpoint as dcp

    for step in (100, 200):
        net, _ = _train_state(step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "no process group: saving as one rank"
            dcp.save({"model": net.state_dict()}, checkpoint_id=str(tmp_path / f"step_{step}"))
    rows = ckptconv.ls(tmp_path).to_dict()
    assert [(os.path.basename(r["path"]), r["format"], r["status"]) for r in rows] == \
        [("step_100", "dcp", "ok"), ("step_200", "dcp", "ok")]
    assert rows[0]["tensors"] == 4 and len(rows[0]["files"]) >= 2   # .metadata + *.distcp
    report = ckptconv.prune(tmp_path, keep_last=1)
    assert [os.path.basename(r["path"]) for r in report.removed] == ["step_100"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_200"]


def test_tensorflow_prefixes_are_rows_of_their_folder(tmp_path):
    for i in (1, 2, 3):
        ckptconv.save({"w": np.full(3, i, np.float32)}, tmp_path / f"ckpt-{i}", format="tf")
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-3"\n')
    rows = ckptconv.ls(tmp_path).to_dict()
    assert [(os.path.basename(r["path"]), r["format"], len(r["files"])) for r in rows] == \
        [(f"ckpt-{i}", "tf", 2) for i in (1, 2, 3)]
    report = ckptconv.prune(tmp_path, keep_last=2)
    assert [os.path.basename(r["path"]) for r in report.removed] == ["ckpt-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index",
        "ckpt-3.data-00000-of-00001", "ckpt-3.index"]


def test_unsafe_pickle_hidden_beside_the_weights_is_unsafe(tmp_path):
    from malicious_corpus import torch_zip_extra

    torch.save({"epoch": 1, "model_state_dict": Net().state_dict()}, tmp_path / "ok_1.pt")
    (tmp_path / "hidden_2.pt").write_bytes(torch_zip_extra(_system_p2()))
    rows = {os.path.basename(r["path"]): r for r in ckptconv.ls(tmp_path).to_dict()}
    assert rows["ok_1.pt"]["status"] == "ok"
    assert rows["hidden_2.pt"]["status"] == "unsafe" and "posix.system" in rows["hidden_2.pt"]["reason"]
    assert ckptconv.pick(tmp_path) == str(tmp_path / "ok_1.pt")


# --- a run in object storage (moto's S3 server) ------------------------------------------------

def _upload(s3, local_dir, bucket: str, prefix: str) -> str:
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            s3.fs.put_file(str(f), f"{bucket}/{prefix}/{f.relative_to(local_dir).as_posix()}")
    return f"s3://{bucket}/{prefix}"


_SAME = ("format", "size", "epoch", "step", "loss", "metrics", "tensors", "min_torch",
         "weights_only", "status")


def test_ls_pick_prune_a_run_in_s3(s3, run_dir, hf_run, capsys):
    """ls/pick/prune of URLs: an S3 prefix, a glob of URLs, Trainer folders under a
    prefix; the same rows as for the local folder (times from the names), paths as URLs."""
    pytest.importorskip("s3fs")
    bucket = s3.bucket()
    url = _upload(s3, run_dir, bucket, "run")
    local = ckptconv.ls(run_dir).to_dict()
    remote = ckptconv.ls(url).to_dict()
    assert [r["path"] for r in remote] == [f"{url}/{os.path.basename(r['path'])}" for r in local]
    for r, want in zip(remote, local):
        assert {k: r[k] for k in _SAME} == {k: want[k] for k in _SAME}, r["path"]
        assert r["time"] == want["time"] and r["time_from"] == "name"
    globbed = ckptconv.ls([f"{url}/*.pth"]).to_dict()
    assert [r["path"] for r in globbed] == [r["path"] for r in remote]
    assert ckptconv.pick(url, best="loss") == f"{url}/checkpoint_{GOOD[1][0]}.pth"
    code, out, err = cli(capsys, "pick", f"{url}/*.pth", "--latest", "--storage-option",
                         f"endpoint_url={s3.endpoint}")
    assert code == 0 and out.strip() == f"{url}/checkpoint_{GOOD[-1][0]}.pth", err
    # Trainer checkpoint folders under a prefix: one row each, trainer_state.json read
    hf = ckptconv.ls(_upload(s3, hf_run, bucket, "hf"), sort="step").to_dict()
    assert [(os.path.basename(r["path"]), r["step"], r["format"]) for r in hf] == [
        (f"checkpoint-{s}", s, "safetensors") for s in (500, 1000, 1500)]
    # prune removes the objects of what it does not keep, and nothing else
    report = ckptconv.prune(url, keep_last=1, keep_best="loss")
    assert {os.path.basename(r["path"]) for r in report.removed} == {
        f"checkpoint_{GOOD[i][0]}.pth" for i in (0, 2)}
    left = sorted(p.rsplit("/", 1)[1] for p in s3.fs.ls(f"{bucket}/run", detail=False))
    assert left == sorted(["config.json", "notes.txt", TRUNCATED, UNSAFE,
                           f"checkpoint_{GOOD[1][0]}.pth", f"checkpoint_{GOOD[3][0]}.pth"])
