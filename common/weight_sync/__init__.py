"""Weight sync: the learner's rank 0 ships a full state dict to the actors, one version at a time.

Contract
--------
- Who sends what: the learner's rank 0 owns one ``WeightSender`` and calls
  ``send(state, version)`` after each update, ``state`` a ``{name: tensor}`` dict or an
  iterable of ``(name, tensor)`` of full tensors (sharded parameters are gathered by the
  learner first). Each actor (and the evaluator) owns one ``WeightReceiver``;
  ``receive(timeout_s)`` returns ``(version, {name: tensor})``, whose ``.items()`` is the
  ``(name, tensor)`` iterator that vLLM's ``reload_weights(weights_iterator=...)`` takes.
  Build them with ``make_sender(backend, ...)`` / ``make_receiver(backend, ...)`` (or
  ``*_from_config``), and ``close()`` both.
- Backends: ``gloo`` (CPU, any hosts) and ``nccl`` (GPUs, any hosts) in ``collective``:
  receivers join and leave at any time, each has its own pair group with the sender, a dead
  or stalled one is dropped within one update's deadline and rejoins as a new member;
  ``shm`` (one host) in ``shm``: one file per version in /dev/shm.
- Wire format, one for all backends (``wire``): packed 64-byte-aligned buckets, a JSON
  header (never pickle), a 64-bit checksum per bucket that the receiver verifies before it
  returns anything (``WeightSyncChecksumError`` otherwise). Versions strictly increase per
  sender incarnation. Every blocking step is bounded by ``timeout_s``: a dead, stuck or
  missing peer becomes ``WeightSyncTimeout`` / ``WeightSyncPeerLost`` or a dropped member,
  never a hang.

Modules: ``base`` (errors, stats, interface, deadlines), ``wire`` (layout, header,
checksum), ``kernels`` (pack/verify copies, numba), ``collective`` (gloo/nccl), ``shm``.

Not covered: loading into an engine (the actor's worker extension calls ``reload_weights``
with the returned items, re-ties a tied ``lm_head``, resets the prefix cache), telling
actors which version exists (the control channel's ``PolicyUpdate``), resharding, and
authentication of peers.
"""

from __future__ import annotations

import torch

from common.weight_sync.base import (SyncStats, WeightReceiver, WeightSender, WeightSyncChecksumError,
                                     WeightSyncError, WeightSyncPeerLost, WeightSyncTimeout)
from common.weight_sync.collective import CollectiveReceiver, CollectiveSender
from common.weight_sync.shm import ShmReceiver, ShmSender
from common.weight_sync.wire import ALIGN, checksum64

__all__ = [
    "WeightSyncError",
    "WeightSyncTimeout",
    "WeightSyncPeerLost",
    "WeightSyncChecksumError",
    "SyncStats",
    "WeightSender",
    "WeightReceiver",
    "CollectiveSender",
    "CollectiveReceiver",
    "ShmSender",
    "ShmReceiver",
    "make_sender",
    "make_receiver",
    "sender_from_config",
    "receiver_from_config",
    "checksum64",
    "BACKENDS",
]

BACKENDS = ("nccl", "gloo", "shm")


def make_sender(
    backend: str,
    *,
    num_receivers: int = 0,
    timeout_s: float = 120.0,
    addr: str = "127.0.0.1:29555",
    channel: str = "default",
    shm_dir: str = "/dev/shm",
    bucket_mb: float = 512,
    device: str | torch.device | None = None,
    connect_timeout_s: float | None = None,
    threads: int | None = None,
    liveness_s: float = 10.0,
) -> WeightSender:
    """The learner's sender. ``num_receivers``: shm, receivers that must acknowledge every
    update (0 = publish without waiting); gloo/nccl, members to wait for (up to
    ``connect_timeout_s``) before each send (0 = deliver to whoever is there). ``addr``
    (host:port): where the sender hosts the gloo/nccl store; ``channel``/``shm_dir`` name the
    shm folder. ``timeout_s``: deadline of one update; ``connect_timeout_s`` (default
    ``timeout_s``): of one receiver's join; ``liveness_s``: a gloo/nccl member whose
    heartbeat stops this long is dropped. ``threads``: CPU threads that pack and checksum."""
    bucket_bytes = max(ALIGN, int(bucket_mb * (1 << 20)) // ALIGN * ALIGN)
    if backend == "shm":
        return ShmSender(channel, num_receivers=num_receivers, timeout_s=timeout_s, shm_dir=shm_dir,
                         bucket_bytes=bucket_bytes, threads=threads)
    if backend in ("gloo", "nccl"):
        return CollectiveSender(backend, addr, num_receivers=num_receivers, timeout_s=timeout_s,
                                bucket_bytes=bucket_bytes, device=device, connect_timeout_s=connect_timeout_s,
                                threads=threads, liveness_s=liveness_s)
    raise ValueError(f"unknown weight-sync backend {backend!r}; choose one of {BACKENDS}")


def make_receiver(
    backend: str,
    *,
    rank: int = 1,
    num_receivers: int = 1,
    timeout_s: float = 120.0,
    addr: str = "127.0.0.1:29555",
    channel: str = "default",
    shm_dir: str = "/dev/shm",
    device: str | torch.device | None = None,
    connect_timeout_s: float | None = None,
    threads: int | None = None,
    label: str = "",
) -> WeightReceiver:
    """An actor's receiver. shm: ``rank`` in 1..num_receivers is its lease id. gloo/nccl: it
    joins the sender at ``addr`` in the background (ids are handed out on joining; ``rank``
    and ``num_receivers`` are not used) and ``label`` names it in the sender's logs.
    ``timeout_s``: deadline of one update once started; ``connect_timeout_s`` (default
    ``timeout_s``): of joining; ``threads``: CPU threads that verify checksums."""
    if backend == "shm":
        if not 1 <= rank <= max(num_receivers, 1):
            raise ValueError(f"rank must be in 1..{num_receivers}, got {rank}")
        return ShmReceiver(channel, rank=rank, timeout_s=timeout_s, shm_dir=shm_dir, threads=threads)
    if backend in ("gloo", "nccl"):
        return CollectiveReceiver(backend, addr, timeout_s=timeout_s, device=device,
                                  connect_timeout_s=connect_timeout_s, threads=threads, label=label or f"rank-{rank}")
    raise ValueError(f"unknown weight-sync backend {backend!r}; choose one of {BACKENDS}")


def sender_from_config(cfg, *, num_receivers: int = 0, channel: str = "default", **kw) -> WeightSender:
    """``make_sender`` with the ``async.weight_sync*`` fields of a run config (or of its
    ``async_`` section); ``channel`` names the shm folder (e.g. the run's name)."""
    a = getattr(cfg, "async_", cfg)
    return make_sender(a.weight_sync, num_receivers=num_receivers, timeout_s=a.weight_sync_timeout_s,
                       addr=a.weight_sync_addr, channel=channel, bucket_mb=a.weight_sync_bucket_mb,
                       connect_timeout_s=a.weight_sync_connect_timeout_s,
                       liveness_s=a.weight_sync_liveness_s, **kw)


def receiver_from_config(cfg, *, rank: int = 1, num_receivers: int = 1, channel: str = "default",
                         **kw) -> WeightReceiver:
    """``make_receiver`` with the ``async.weight_sync*`` fields of a run config (or of its ``async_`` section)."""
    a = getattr(cfg, "async_", cfg)
    return make_receiver(a.weight_sync, rank=rank, num_receivers=num_receivers, timeout_s=a.weight_sync_timeout_s,
                         addr=a.weight_sync_addr, channel=channel,
                         connect_timeout_s=a.weight_sync_connect_timeout_s, **kw)
