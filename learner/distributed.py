"""The learner's torch.distributed helpers: the process group, who holds what, and the
collectives the step needs, kept apart from the algorithm.

Contract
--------
- ``init_dist`` makes the process group under torchrun (NCCL for CUDA tensors and gloo for
  the CPU-side bookkeeping on GPUs, gloo on CPU) and returns this rank's device;
  ``close_dist`` ends it cleanly. Without torchrun (no ``RANK``) there is no group and
  ``world()`` is (0, 1): every helper here is then the identity or a no-op.
- Rank r holds the step's groups r, r+W, ... (``shard_groups``); rank 0's groups reach the
  others in their stored encoding (``broadcast_groups``; never unpickled).
- FSDP2 (``is_sharded``) runs collectives inside every forward and backward, so every rank
  must make the same number of them: ``pad_count`` says how many dummy forwards a rank adds
  (``dummy_forward``: one token, its result multiplied by 0 by the caller: zero gradient).
  DDP all-reduces once per optimiser step (``no_sync`` on all but the last micro-batch).
Not covered: building or wrapping the models (``learner.models``), the step (``learner.step``).
"""

from __future__ import annotations

import contextlib
import gc
import os

import torch
import torch.distributed as dist

from common import schema

__all__ = ["all_gather_rows", "all_reduce", "broadcast_groups", "close_dist", "dummy_forward", "init_dist",
           "is_sharded", "no_sync", "pad_count", "shard_groups", "world"]


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(model) -> bool:
    """True for an FSDP2 (``fully_shard``) module: its forward/backward are collectives."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_groups(num_groups: int, rank: int, world_size: int) -> list[int]:
    """Global group indices held by ``rank``: rank, rank+W, ..."""
    return list(range(rank, num_groups, world_size))


def init_dist(device: str = "auto") -> torch.device:
    """The process group (under torchrun) and this rank's device, per ``run.device``."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = cuda but torch sees no CUDA GPU (use run.device=cpu or auto)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ and not dist.is_initialized():
        # GPUs: NCCL for CUDA tensors, gloo for the CPU-side bookkeeping collectives
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    if use_cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def close_dist() -> None:
    """End this rank's process group cleanly: wait for every rank (a barrier), then destroy
    the group while the interpreter is fully alive. Call it after the last collective and
    after dropping every module that holds the group: DDP's reducer keeps a group alive past
    ``destroy_process_group``, and a gloo group torn down during interpreter finalisation
    can abort the process (SIGABRT, "terminate called without an active exception"; seen
    once in CI on a 2-rank gloo test), which torchrun reports as a failed rank. A no-op
    without a process group."""
    if not dist.is_initialized():
        return
    gc.collect()  # modules dropped by the caller release their references to the group now
    dist.barrier()
    dist.destroy_process_group()


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's [b, T_r] (equal b) padded to the widest T, in rank order."""
    _, W = world()
    if W == 1:
        return x
    width = torch.tensor([x.shape[1]], dtype=torch.long)
    widths = [torch.zeros_like(width) for _ in range(W)]
    dist.all_gather(widths, width)
    T = int(max(w.item() for w in widths))
    x = torch.nn.functional.pad(x, (0, T - x.shape[1]))
    out = [torch.empty_like(x) for _ in range(W)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def pad_count(model, n: int, at_least: int = 0) -> int:
    """Dummy micro-batches this rank adds so that every rank runs max(n over ranks,
    at_least) forwards of an FSDP2 module. A collective for sharded models when world > 1;
    0 for anything else (DDP and plain modules need no padding)."""
    if not is_sharded(model):
        return 0
    if world()[1] == 1:
        return max(at_least - n, 0)
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return max(int(t), at_least) - n


def dummy_forward(model, like: torch.Tensor) -> torch.Tensor:
    """A real forward of one token (id 0) through ``model``: it runs the same collectives
    as any micro-batch. Callers multiply the result by 0."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=like.device)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().sum()  # FSDP2 only: no autocast


def no_sync(model, last: bool):
    if hasattr(model, "no_sync") and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def broadcast_groups(groups: list | None) -> list:
    """Rank 0's groups to every rank, in their stored encoding (``schema.encode_group``) in one
    uint8 tensor."""
    _, W = world()
    if W == 1:
        return groups
    if dist.get_rank() == 0:
        blobs = [schema.encode_group(g) for g in groups]
        sizes = torch.tensor([len(b) for b in blobs], dtype=torch.long)
        n = torch.tensor([len(blobs)], dtype=torch.long)
        payload = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
    else:
        n = torch.zeros(1, dtype=torch.long)
    dist.broadcast(n, 0)
    if dist.get_rank() != 0:
        sizes = torch.zeros(int(n), dtype=torch.long)
    dist.broadcast(sizes, 0)
    if dist.get_rank() != 0:
        payload = torch.empty(int(sizes.sum()), dtype=torch.uint8)
    dist.broadcast(payload, 0)
    if dist.get_rank() == 0:
        return groups
    raw, out, off = payload.numpy().tobytes(), [], 0
    for s in sizes.tolist():
        out.append(schema.decode_group(raw[off : off + s]))
        off += s
    return out
