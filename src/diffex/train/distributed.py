"""Several processes, one training: ``accelerate launch`` or ``torchrun`` start them, Accelerate's
``PartialState`` joins them (NCCL on GPUs, gloo on CPUs), and the training loop averages
gradients across them. One process without a launcher never touches ``torch.distributed``.

Each rank takes its share of every global batch (``batch[rank::world]``), so a run on N
processes sees the same global batch as a run on one; gradients are averaged with one
all-reduce of a flat buffer per step, so every rank keeps identical weights. Only rank 0 writes
checkpoints and files; the others wait for it.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch


def world_size() -> int:
    """Number of processes of this training (1 without a launcher)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def rank() -> int:
    """This process's index (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that writes files and prints."""
    return rank() == 0


def state(device: torch.device) -> Any:
    """Accelerate's process state (initialises the process group once), or None alone."""
    if world_size() == 1:
        return None
    from accelerate import PartialState

    joined = PartialState(cpu=device.type == "cpu")
    _leave_at_exit()
    return joined


_LEAVING = False


def _leave_at_exit() -> None:
    """Register :func:`leave` once, to run before the interpreter tears itself down."""
    global _LEAVING
    if not _LEAVING:
        atexit.register(leave)
        _LEAVING = True


def leave() -> None:
    """Leave the process group. Run at exit: a gloo group still alive while Python finalises can
    abort the process (SIGABRT) after all work is done, so a finished run would read as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_device(device: torch.device) -> torch.device:
    """The device of this process: with several processes on GPUs, its own GPU."""
    if device.type == "cuda" and world_size() > 1:
        return state(device).device
    return device


def training_pool(x: torch.Tensor, device: torch.device, max_gib: float = 2.0) -> torch.Tensor:
    """Where a stage keeps its training images: on the GPU itself when they fit in ``max_gib``
    (no copy per step at all), else in page-locked memory; on a CPU, as they are. The data set is
    decoded into memory once, so no loader workers are needed."""
    if device.type != "cuda":
        return x
    if x.numel() * x.element_size() <= max_gib * 2**30:
        return x.to(device)
    return x.pin_memory()


def shard(batch: Any, index: int, parts: int) -> Any:
    """Every ``parts``-th item of a batch from ``index`` on (tensors, tuples and lists of them)."""
    if parts == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch[index::parts]
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(b, index, parts) for b in batch)
    return batch


def batch_len(batch: Any) -> int:
    """Number of items in a batch (the first tensor's first dimension)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return batch_len(batch[0])
    return 1


def average_gradients(params: list[torch.nn.Parameter], device: torch.device) -> None:
    """Replace each gradient by its mean over all processes (one all-reduce)."""
    if world_size() == 1:
        return
    from accelerate.utils import reduce

    state(device)  # joins the process group on first use
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def barrier(device: torch.device) -> None:
    """Wait until every process gets here (no-op alone)."""
    if world_size() > 1:
        state(device).wait_for_everyone()


def average_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over all processes, so
    every rank keeps the same model, not only the same weights."""
    if world_size() == 1:
        return
    from accelerate.utils import reduce

    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    state(device)
    flat = reduce(torch.cat([b.reshape(-1).float() for b in bufs]), reduction="mean")
    offset = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b))
        offset += n
