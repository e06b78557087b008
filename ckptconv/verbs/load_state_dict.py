"""``load_state_dict``: any checkpoint as a dict of torch tensors.

The shape of safetensors' ``load_file``: flat tensor names (a training
checkpoint's ``model_state.fc.weight``; ``select=`` picks a subtree and keeps
its own names) to torch tensors, from every format ckptconv reads, without
running a pickle. With ``mmap=True`` (the default) tensors on the CPU view a
private, copy-on-write map of the file, as torch's loader with ``mmap=True`` and
``load_file`` give them; with ``mmap=False`` they are read into fresh memory.
Another ``device`` is filled through bounded pinned staging buffers. Tied
tensors are one tensor; views of one storage share it.
"""
from __future__ import annotations

from ..tree import Checkpoint
from .torch_fill import TorchMaterializer, gc_paused


def load_state_dict(ck: Checkpoint, device="cpu", mmap: bool = True, select: str | None = None,
                    mapping=None) -> dict:
    """``{name: torch.Tensor}`` of every tensor in ``ck`` (after ``select`` and ``mapping``)."""
    materialize = TorchMaterializer(mmap=mmap, device=device)   # checks the device first
    if select:
        ck = ck.select(select)
    if mapping is not None:
        ck = mapping.apply(ck)
    try:
        with gc_paused():
            return {name: materialize(ref) for name, ref in ck.tensors().items()}
    finally:
        materialize.close()
