"""Workers for the distributed-checkpoint tests, run as separate processes.

``launch("fsdp2_save", out)`` starts two gloo CPU ranks of this file (no
network: 127.0.0.1 and a free port); each runs the named function. The real
libraries write the fixtures: FSDP2 ``fully_shard`` + ``dcp.save``, DeepSpeed
ZeRO stages 1-3 with ``DS_ACCELERATOR=cpu``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys


def launch(func: str, *args: str, nproc: int = 2, timeout: int = 300, env: dict | None = None):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    procs = []
    for rank in range(nproc):
        e = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                 LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                 OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **(env or {}))
        procs.append(subprocess.Popen([sys.executable, __file__, func, *map(str, args)], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{func} failed:\n" + "\n---\n".join(o[-4000:] for o in outputs))
    return outputs


def peak_rss_mib(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run ``cmd``; (its peak RSS in MiB from ``wait4``, seconds). Raises on failure."""
    import time

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if p.returncode:
        raise RuntimeError(f"{cmd} failed ({p.returncode}): {err[-2000:]}")
    return usage.ru_maxrss / 1024, seconds


_HWM_WRAPPER = """
import runpy, sys
sys.argv = ["ckptconv"] + sys.argv[1:]
try:
    runpy.run_module("ckptconv", run_name="__main__", alter_sys=True)
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    sys.stderr.write("\\nckptconv-peak-rss-kib " + hwm.split()[1] + "\\n")
"""


def ckptconv_peak_rss_mib(args: list[str]) -> float:
    """Peak RSS (MiB) of ``ckptconv ARGS`` as the process itself saw it
    (``VmHWM``). ``wait4``'s figure would count the pages of the process that
    forked it (Linux records the old memory's high-water mark at ``exec``),
    and a pytest process with torch imported holds hundreds of MiB."""
    out = subprocess.run([sys.executable, "-c", _HWM_WRAPPER, *map(str, args)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"ckptconv {args} failed: {out.stderr[-2000:]}")
    return int(out.stderr.rsplit("ckptconv-peak-rss-kib ", 1)[1].split()[0]) / 1024


def dcp_big_save(out: str, mib: str = "1024") -> None:
    """A ``mib`` MiB DCP folder from two ranks: 16 fp32 tensors of 1024
    columns, rows split over the ranks (DTensor ``Shard(0)``); element
    (i, r, c) of tensor t is ``t * 1000 + r % 997`` (checkable without the
    whole tensor)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank, world = dist.get_rank(), dist.get_world_size()
    tensors = 16
    rows = int(mib) * (1 << 20) // (tensors * 1024 * 4)
    local_rows = rows // world
    sd = {}
    for t in range(tensors):
        r = torch.arange(rank * local_rows, (rank + 1) * local_rows, dtype=torch.float32)
        local = (t * 1000 + r % 997).unsqueeze(1).expand(local_rows, 1024).contiguous()
        sd[f"layers.{t}.weight"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    dcp.save({"model": sd, "step": 1}, checkpoint_id=out)
    dist.destroy_process_group()


def deepspeed_big_save(out: str, layers: str = "22") -> None:
    """ZeRO-3 on two ranks with ``layers`` Linear(2048, 2048) layers (16 MiB of
    fp32 each; weights + Adam's two moments: 22 layers make a 1.03 GiB folder)."""
    import deepspeed
    import deepspeed.ops
    import torch

    deepspeed.ops.__compatible_ops__ = {}
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(2048, 2048, bias=False)
                                for _ in range(int(layers))))
    cfg = {"train_batch_size": 2, "steps_per_print": 1000,
           "zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": False,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}}}
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    loss = engine(torch.randn(1, 2048)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out)
    engine.destroy()


def _model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))


def fsdp2_save(out: str) -> None:
    """FSDP2 model + AdamW state + scheduler + extras, and one DTensor sharded
    on dim 1 (chunks interleave by rows), saved with ``dcp.save``."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    m = _model()
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    torch.manual_seed(1)
    for _ in range(2):
        m(torch.randn(4, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    msd, osd = get_state_dict(m, opt)
    cols = distribute_tensor(torch.arange(5 * 7, dtype=torch.bfloat16).reshape(5, 7), mesh,
                             [Shard(1)])
    dcp.save({"model": msd, "optim": osd, "epoch": 3, "sched": sched.state_dict(),
              "extra": {"loss": 0.25, "tags": ["a", "b"], "cols": cols}}, checkpoint_id=out)
    dist.destroy_process_group()


def fsdp2_load(folder: str, reference: str) -> None:
    """Load a DCP folder (written by ckptconv) into an FSDP2 model on each rank
    and compare the gathered parameters with ``reference`` (a torch.save)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(123)  # different initial weights: the load must replace them
    m = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    sd = m.state_dict()
    dcp.load(sd, checkpoint_id=folder)
    m.load_state_dict(sd)
    ref = torch.load(reference, weights_only=True)
    for name, p in m.state_dict().items():
        full = p.full_tensor()
        if not torch.equal(full, ref[name]):
            raise SystemExit(f"rank {dist.get_rank()}: {name} differs after dcp.load")
    dist.barrier()
    dist.destroy_process_group()


def deepspeed_save(out: str, stages: str = "1,2,3", bf16: str = "0") -> None:
    """A small model with a frozen layer, a tied (shared) weight, a buffer and
    odd-sized parameters (partitions need padding), trained two steps with
    Adam (torch_adam) and saved by ``save_checkpoint`` under ``out/zero<N>``
    for each ZeRO stage."""
    import deepspeed
    import deepspeed.ops
    import torch

    # no C++ ops: probing them runs the compiler, and the shared-memory
    # allreduce op is built on first use (minutes on a busy machine); gloo does
    deepspeed.ops.__compatible_ops__ = {}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.frozen = torch.nn.Linear(6, 5)
            self.body = torch.nn.Linear(6, 7)
            self.norm = torch.nn.LayerNorm(7)
            self.proj = torch.nn.Linear(7, 6, bias=False)
            self.head = torch.nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight          # tied
            self.register_buffer("counter", torch.arange(3, dtype=torch.float32))
            for p in self.frozen.parameters():
                p.requires_grad = False

        def forward(self, x):
            h = self.emb(x)
            h = h + self.frozen(h).sum(-1, keepdim=True)
            return self.head(self.proj(self.norm(self.body(h))))

    for stage in map(int, stages.split(",")):
        torch.manual_seed(0)
        net = Net()
        cfg = {"train_batch_size": 2, "steps_per_print": 1000,
               "zero_optimization": {"stage": stage}, "zero_force_ds_cpu_optimizer": False,
               "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
               "bf16": {"enabled": bf16 == "1"}}
        engine, _, _, _ = deepspeed.initialize(
            model=net, model_parameters=[p for p in net.parameters() if p.requires_grad],
            config=cfg)
        torch.manual_seed(1)
        for _ in range(2):
            loss = engine(torch.randint(0, 11, (1, 4))).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(f"{out}/zero{stage}", client_state={"epoch": 2})
        # DeepSpeed's own per-parameter view of the optimizer state: the oracle
        # for the consolidated optimizer state (collectives: every rank calls)
        from deepspeed.utils import safe_get_full_optimizer_state

        reference = {name: {key: safe_get_full_optimizer_state(p, key).clone()
                            for key in ("exp_avg", "exp_avg_sq")}
                     for name, p in engine.module.named_parameters() if p.requires_grad}
        if torch.distributed.get_rank() == 0:
            torch.save(reference, f"{out}/zero{stage}-optimizer-reference.pt")
        engine.destroy()


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
