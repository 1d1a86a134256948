"""A learner rank's second thread: PRM work that the policy update does not wait for.

Contract
--------
- ``prime_step`` (``learner.step``) hands this thread two jobs when ``placement.prm_thread``
  is on and ``overlap_ok`` holds: the frozen reference's forward (it runs while the main
  thread runs the PRM's forward), and, with ``prime.prm_update: after``, the backward passes
  and the optimiser step of the PRM's last mini-batch (they run while the main thread does
  the advantages, π_old and the policy update: the process rewards came from the forward, so
  nothing there needs the updated PRM). The step waits for the thread before it returns, so
  the models, the optimisers and a checkpoint after the step are those of the sequential
  order, and the results are identical to it (same operations on the same tensors, one
  thread each; tested in tests/learner/test_side_thread.py).
- One worker thread per process, started at first use with the caller's torch intra-op
  thread count and CUDA device; jobs run in submission order. An exception in a job is
  raised where its ``Future`` is waited on.
- ``overlap_ok`` refuses what two threads cannot share safely: FSDP2 modules (their forwards
  and backwards run collectives on one mesh: two threads would interleave them differently
  on different ranks), and a DDP-wrapped PRM on the default process group (its gradient
  all-reduce would race the policy's). ``build_models`` gives the PRM its own group.
Not covered: overlap across steps (the next batch's PRM forward beside this step's policy
update); CUDA streams (on a GPU the jobs run on the default stream, in order with the main
thread's kernels: correct, without the speed-up of two CPU cores).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from learner.distributed import is_sharded

__all__ = ["done", "overlap_ok", "side_executor", "wait"]

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _init(threads: int, cuda_device: int | None) -> None:
    torch.set_num_threads(threads)
    if cuda_device is not None:
        torch.cuda.set_device(cuda_device)


def side_executor() -> ThreadPoolExecutor:
    """The process's one side thread (started on first call)."""
    global _pool
    with _lock:
        if _pool is None:
            dev = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
            _pool = ThreadPoolExecutor(1, thread_name_prefix="prm-side", initializer=_init,
                                       initargs=(torch.get_num_threads(), dev))
        return _pool


def done(value) -> Future:
    """A Future already holding ``value`` (the sequential path's stand-in for a job)."""
    f: Future = Future()
    f.set_result(value)
    return f


def wait(f: Future | None):
    """``f``'s result (None for None); raises the job's exception."""
    return None if f is None else f.result()


def overlap_ok(models, enabled: bool) -> bool:
    """Whether this step may put PRM work on the side thread (see the contract)."""
    if not enabled or models.prm is None:
        return False
    if any(m is not None and is_sharded(m) for m in (models.policy, models.prm, models.ref)):
        return False
    group = getattr(models.prm, "process_group", None)  # DDP-wrapped
    if group is not None and dist.is_initialized() and group is dist.group.WORLD:
        return False
    return True
