"""Weights to actors on any host over torch.distributed (gloo on CPU, NCCL on GPU), with
members that come and go: receivers join late, die, stall, and come back as new members,
and the learner is never held past one update's deadline by any of them.

Design: a star of pair groups, one per member incarnation
---------------------------------------------------------
- The sender (the learner's rank 0) hosts a TCPStore at ``addr``: the rendezvous and
  control plane. Keys live under ``ws/``: ``incarnation`` (the sender's), ``members`` (a
  counter), and per member ``m/<id>/``: ``info`` (JSON: host, pid, label), ``hb`` (a
  heartbeat counter), ``hdr/<seq>`` (an update's header), ``ack/<seq>``/``nack/<seq>``,
  ``drop`` (the sender dropped it), ``bye`` (it left).
- A receiver registers (``id = add(members, 1)``), writes its info, starts a heartbeat
  thread (its own store connection) and builds a 2-rank process group with the sender
  (rank 0 = sender, rank 1 = it) under the store prefix ``m/<id>/pg/``.
- The sender's service thread notices new ids, builds its side of each pair group (one
  thread per joiner, bounded by ``connect_timeout_s``), and catches the member up with the
  newest published version at once: a late or restarted actor does not wait for the next
  update, and a learner that is waiting for data is not needed for it.
- ``send(state, version)`` packs the state once into buckets (``wire``/``kernels``) and
  delivers them to every live member in parallel: header to ``m/<id>/hdr/<seq>``, each
  bucket as a broadcast in that member's pair group, then its ack. It returns when every
  member has acknowledged or been dropped, by the update's deadline. A send with no
  members returns at once (``num_receivers`` > 0 first waits, up to ``connect_timeout_s``,
  for that many members).
- Dropping: a member whose transfer fails or misses the deadline, or whose heartbeat has
  not moved for ``liveness_s``, is dropped: its pair group is aborted and ``m/<id>/drop``
  set. A checksum nack fails that one delivery but keeps the member.
- The receiver takes every update in a background thread as it comes (so an actor busy
  generating never holds the learner), verifies it, acknowledges it and keeps the newest;
  ``receive(timeout_s)`` returns the newest version not yet returned, waiting up to
  ``timeout_s``. When its group fails or it finds itself dropped it registers again as a
  new member (and is caught up). When the sender's store goes away (learner crash) it keeps
  reconnecting; a restarted learner (a new incarnation, possibly an older version after a
  resume) is joined like any other.

Failure cases: a SIGKILLed member breaks only its own pair group (the sender's transfer to
it fails fast on the closed socket, or at the deadline); a stalled (SIGSTOP) member costs
at most one update's deadline, then is dropped, and when resumed it finds ``drop``, and
rejoins; a slow joiner never blocks updates to the others (joins run in their own threads
and take the buffer lock only to catch up); a dead sender is seen by receivers as a store
error and they reconnect until ``close``.

Cost: the sender sends the bytes once per member (gloo broadcasts root->peer anyway; for
NCCL this is N pair transfers rather than one ring broadcast). Many actors per host: one
receiver per host that republishes over ``shm`` is the way to cut this (not built yet).

Not covered: loading into an engine (the actor does that), authentication of peers (the
store and gloo/NCCL sockets are unauthenticated: keep ``addr`` on a private network).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch

from common.weight_sync.base import (SyncStats, WeightReceiver, WeightSender, WeightSyncChecksumError,
                                     WeightSyncError, WeightSyncPeerLost, WeightSyncTimeout, _check_version,
                                     _classify, _remaining, _run_with_deadline)
from common.weight_sync.kernels import _pack, _verify
from common.weight_sync.wire import _as_pairs, _decode_header, _header_bytes, _plan, _unpack

log = logging.getLogger(__name__)

_POLL_S = 0.005  # longest pause between store polls (receiver: next header; sender: acks)
_SERVICE_S = 0.05  # the sender's membership scan period [s]
_HEARTBEAT_S = 0.5  # receiver heartbeat period [s]
_WAIT_S = 0.25  # receiver: how often it looks whether the sender dropped it [s]
_IDLE_POLL_S = 0.01  # receiver: longest pause between looks for the next header [s]
_KEEP_SETS = 3  # receiver: bucket buffer sets kept for reuse (the newest is held until replaced)


def _unshared(t: torch.Tensor) -> bool:
    """True when nothing but ``t`` itself references its storage (no view handed out lives)."""
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2  # t's + this temporary's
    except Exception:  # noqa: BLE001 - a private API: without it, never reuse
        return False


# ------------------------------------------------------------------ store and pair group


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"addr must be host:port, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _client(host: str, port: int, timeout_s: float):
    """A new connection to the sender's store (each blocking user gets its own)."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s), wait_for_workers=False)


def _gloo_device(host: str):
    from torch._C._distributed_c10d import ProcessGroupGloo

    if host in ("127.0.0.1", "localhost", "::1"):
        return ProcessGroupGloo.create_device(hostname="127.0.0.1")
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return ProcessGroupGloo.create_device(interface=os.environ["GLOO_SOCKET_IFNAME"].split(",")[0])
    return ProcessGroupGloo.create_default_device()


class _PairGroup:
    """A 2-rank process group (sender rank 0, one receiver rank 1) whose every broadcast
    finishes or fails by a deadline: the op's own timeout (gloo honours it; NCCL's watchdog
    aborts), a bounded ``work.wait``, and a watchdog thread that aborts the group if even
    that blocks. After any error the group is broken; the member must rejoin."""

    def __init__(self, backend: str, host: str, port: int, prefix: str, rank: int, device: torch.device,
                 op_timeout_s: float, deadline: float, what: str):
        import torch.distributed as dist

        self.backend, self.rank, self.device, self.what = backend, rank, device, what
        self.broken: WeightSyncError | None = None
        self._pg = None
        left = max(0.1, _remaining(deadline))

        def build():
            store = dist.PrefixStore(prefix, _client(host, port, left))
            return store, self._make_pg(store, host, left, op_timeout_s)

        try:
            self._store, self._pg = _run_with_deadline(build, deadline, what)
        except Exception as e:
            raise _classify(e, what) from e
        # one tiny collective now, so that communicator creation (lazy for NCCL) happens
        # here under the join deadline and not inside the first update
        self.broadcast(torch.zeros(8, dtype=torch.uint8, device=device), deadline, "warm-up")

    def _make_pg(self, store, host: str, connect_s: float, op_timeout_s: float):
        if self.backend == "gloo":
            from torch._C._distributed_c10d import ProcessGroupGloo

            opts = ProcessGroupGloo._Options()
            opts._timeout = timedelta(seconds=connect_s)  # connecting; each op gets its own
            opts._devices = [_gloo_device(host)]
            return ProcessGroupGloo(store, self.rank, 2, opts)
        from torch._C._distributed_c10d import ProcessGroupNCCL

        opts = ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=op_timeout_s)  # NCCL's watchdog aborts an op running longer
        # On a timeout NCCL's own watchdog must abort the communicator, not kill the process
        # (torch's default tears it down): mode 2 = clean up only. Read when the group is built.
        key, old = "TORCH_NCCL_ASYNC_ERROR_HANDLING", os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
        os.environ[key] = "2"
        try:
            with torch.cuda.device(self.device):  # without changing the caller's current device
                return ProcessGroupNCCL(store, self.rank, 2, opts)
        finally:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old

    def broadcast(self, buf: torch.Tensor, deadline: float, what: str) -> None:
        """``buf`` from rank 0 to rank 1, finished or failed by ``deadline``."""
        from torch._C._distributed_c10d import BroadcastOptions

        if self.broken is not None:
            raise self.broken
        if self._pg is None:
            raise WeightSyncError(f"{self.what}: group is closed")
        what = f"{self.what}: {what}"
        left = _remaining(deadline)
        if left <= 0:
            self.broken = WeightSyncTimeout(f"{what}: deadline passed before the broadcast")
            raise self.broken
        opts = BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, timedelta(seconds=left)

        def op():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            work = self._pg.broadcast([buf], opts)
            if work.wait(timedelta(seconds=max(0.001, _remaining(deadline)))) is False:
                raise WeightSyncTimeout(f"{what}: timed out")

        try:
            _run_with_deadline(op, deadline, what, on_expire=self.abort)
        except Exception as e:
            self.broken = _classify(e, what)
            raise self.broken from e

    def abort(self) -> None:
        pg = self._pg
        if pg is not None:
            try:
                pg.abort()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def close(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                _run_with_deadline(pg.abort if self.broken else pg.shutdown, time.monotonic() + 5.0, "close",
                                   on_expire=pg.abort)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._store = None


def _device(backend: str, device) -> torch.device:
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"collective weight sync needs backend gloo or nccl, got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise WeightSyncError("weight_sync=nccl needs CUDA; use gloo or shm on CPU")
        return torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")
    return torch.device("cpu")


# ---------------------------------------------------------------------------- sender


class _Member:
    """The sender's view of one receiver incarnation."""

    def __init__(self, mid: int, info: dict):
        self.id, self.info = mid, info
        self.group: _PairGroup | None = None
        self.state = "joining"  # joining -> ready -> dropped
        self.seq = 0  # next header number
        self.version: tuple[str, int] | None = None  # (sender incarnation, version) it holds
        self.hb, self.hb_seen = -1, time.monotonic()
        self.busy = False  # a transfer to it is running (heartbeat liveness is not judged then)

    def label(self) -> str:
        return f"member {self.id} ({self.info.get('label', '?')} pid {self.info.get('pid', '?')} on {self.info.get('host', '?')})"


class CollectiveSender(WeightSender):
    """Learner side: hosts the store at ``addr``, serves joins, delivers every update to every
    live member in parallel. Thread-safe ``send``; ``members()`` / ``counts`` for metrics."""

    def __init__(self, backend: str, addr: str, *, num_receivers: int = 0, timeout_s: float = 120.0,
                 bucket_bytes: int = 512 << 20, device=None, connect_timeout_s: float | None = None,
                 threads: int | None = None, liveness_s: float = 10.0):
        import torch.distributed as dist

        self.backend = backend
        self.device = _device(backend, device)
        self.host, self.port = _split_addr(addr)
        self.addr = addr
        self.num_receivers = int(num_receivers)
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s if connect_timeout_s is not None else timeout_s)
        self.bucket_bytes, self.threads, self.liveness_s = bucket_bytes, max(1, threads or 1), float(liveness_s)
        self.incarnation = uuid.uuid4().hex[:12]
        self.counts = {"joined": 0, "dropped": 0, "delivered": 0, "failed": 0, "catch_ups": 0}
        self._members: dict[int, _Member] = {}
        self._mlock = threading.Lock()  # members dict + counts
        self._buf_lock = threading.Lock()  # the packed buckets + latest header (pack vs transfer)
        self._buffers: list[torch.Tensor] = []
        self._latest: tuple[int, bytes, list[torch.Tensor]] | None = None  # (version, header, buckets)
        self._last_version: int | None = None
        self._scanned = 0  # member ids seen so far (they are handed out 1, 2, ...)
        self._pending_since: dict[int, float] = {}
        self._closed = threading.Event()
        try:
            # the master binds every interface; clients reach it at ``addr``
            self._store = dist.TCPStore(self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1",
                                        self.port, None, True, timedelta(seconds=self.connect_timeout_s),
                                        wait_for_workers=False)
        except Exception as e:
            raise WeightSyncError(f"weight-sync {backend}: cannot host the store at {addr} ({e}); "
                                  "is another learner using async.weight_sync_addr's port?") from e
        self.port = self._store.port  # the port it bound: ``addr`` may say 0 (any free port)
        self.addr = f"{self.host}:{self.port}"
        self._store.set("ws/incarnation", self.incarnation)
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="weight-sync-send")
        self._service = threading.Thread(target=self._serve, name="weight-sync service", daemon=True)
        self._service.start()

    # ------------------------------------------------------------- membership

    def members(self) -> list[dict]:
        with self._mlock:
            return [{"id": m.id, "state": m.state, **m.info,
                     "version": m.version[1] if m.version else None} for m in self._members.values()]

    def _ready(self) -> list[_Member]:
        with self._mlock:
            return [m for m in self._members.values() if m.state == "ready"]

    def _serve(self) -> None:
        """Service thread: admit new members, judge heartbeats, catch members up."""
        while not self._closed.wait(_SERVICE_S):
            try:
                self._admit_new()
                self._judge_liveness()
            except Exception as e:  # noqa: BLE001 - the service must outlive a bad scan
                if not self._closed.is_set():
                    log.warning("weight-sync service: %s", e)

    def _admit_new(self) -> None:
        n = int(self._store.add("ws/members", 0))
        while self._scanned < n:
            mid = self._scanned + 1
            key = f"ws/m/{mid}/info"
            if not self._store.check([key]):
                # registered, info not written yet: look again next scan, but a receiver that
                # died between the two writes must not block every later joiner
                first = self._pending_since.setdefault(mid, time.monotonic())
                if time.monotonic() - first < self.connect_timeout_s:
                    return
                log.warning("weight-sync %s: member %d registered but never said who it is; skipped",
                            self.backend, mid)
                self._scanned = mid
                continue
            self._pending_since.pop(mid, None)
            try:
                info = json.loads(self._store.get(key).decode())
                info = info if isinstance(info, dict) else {}
            except (ValueError, UnicodeDecodeError):
                info = {}
            self._scanned = mid
            m = _Member(mid, info)
            with self._mlock:
                self._members[mid] = m
            threading.Thread(target=self._join, args=(m,), name=f"weight-sync join {mid}", daemon=True).start()

    def _join(self, m: _Member) -> None:
        what = f"weight-sync {self.backend}: {m.label()}"
        try:
            m.group = _PairGroup(self.backend, self.host, self.port, f"ws/m/{m.id}/pg/", 0, self.device,
                                 self.timeout_s, time.monotonic() + self.connect_timeout_s, what)
        except WeightSyncError as e:
            self._drop(m, f"could not join: {e}")
            return
        with self._mlock:
            if m.state != "joining":
                return
            m.state, m.hb_seen = "ready", time.monotonic()
            self.counts["joined"] += 1
        log.info("%s joined", what)
        with self._buf_lock:  # catch up with the newest version (unless a send already did)
            latest = self._latest
            if latest is not None and m.state == "ready" and m.version != (self.incarnation, latest[0]):
                self._count("catch_ups")
                self._deliver(m, *latest, time.monotonic() + self.timeout_s)

    def _judge_liveness(self) -> None:
        now = time.monotonic()
        for m in self._ready():
            try:
                hb = int(self._store.add(f"ws/m/{m.id}/hb", 0))
                bye = self._store.check([f"ws/m/{m.id}/bye"])
            except Exception:  # noqa: BLE001 - the next scan retries
                continue
            if bye:
                self._drop(m, "left", quiet=True)
            elif hb != m.hb or m.busy:
                m.hb, m.hb_seen = hb, now
            elif now - m.hb_seen > self.liveness_s:
                self._drop(m, f"no heartbeat for {now - m.hb_seen:.1f} s")

    def _drop(self, m: _Member, why: str, quiet: bool = False) -> None:
        with self._mlock:
            if m.state == "dropped":
                return
            m.state = "dropped"
            self._members.pop(m.id, None)
            if not quiet:
                self.counts["dropped"] += 1
        (log.info if quiet else log.warning)("weight-sync %s: dropped %s: %s", self.backend, m.label(), why)
        try:
            self._store.set(f"ws/m/{m.id}/drop", why[:500])
        except Exception:  # noqa: BLE001 - it will find out from its broken group
            pass
        g, m.group = m.group, None
        if g is not None:
            g.abort()
            if self._closed.is_set():
                g.close()
            else:  # never hold the caller (a send, the service thread) on a dead peer's teardown
                threading.Thread(target=g.close, name=f"weight-sync close {m.id}", daemon=True).start()

    # --------------------------------------------------------------- delivery

    def _deliver(self, m: _Member, version: int, header: bytes, bufs: list[torch.Tensor], deadline: float) -> bool:
        """One update to one member (caller holds ``_buf_lock``). False: it was dropped, or
        it rejected the bytes (checksum nack)."""
        seq = m.seq
        base = f"ws/m/{m.id}"
        what = f"weight-sync {self.backend} v{version} to {m.label()}"
        m.busy = True
        try:
            group = m.group
            if group is None or m.state != "ready":
                return False
            self._store.set(f"{base}/hdr/{seq}", header)
            for i, b in enumerate(bufs):
                group.broadcast(b, deadline, f"bucket {i}/{len(bufs)} ({b.numel()} bytes)")
            m.seq += 1
            pause = 0.0002
            while True:
                if self._store.check([f"{base}/ack/{seq}"]):
                    break
                if self._store.check([f"{base}/nack/{seq}"]):
                    msg = self._store.get(f"{base}/nack/{seq}").decode(errors="replace")
                    log.warning("%s: rejected: %s", what, msg)
                    self._count("failed")
                    return False
                if _remaining(deadline) <= 0:
                    raise WeightSyncTimeout(f"{what}: no acknowledgement within the deadline")
                time.sleep(pause)
                pause = min(pause * 2, _POLL_S)
            m.version = (self.incarnation, version)
            self._count("delivered")
            for k in (f"{base}/hdr/{seq}", f"{base}/ack/{seq}"):
                self._store.delete_key(k)
            return True
        except Exception as e:  # noqa: BLE001 - any failure of a member drops it, never the learner
            self._count("failed")
            self._drop(m, f"{what}: {_classify(e, what)}")
            return False
        finally:
            m.busy = False
            m.hb_seen = time.monotonic()

    def _count(self, key: str) -> None:
        with self._mlock:  # deliveries to members run in parallel threads
            self.counts[key] += 1

    def _bucket(self, i: int, size: int) -> torch.Tensor:
        while len(self._buffers) <= i:
            self._buffers.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self._buffers[i].numel() != size:
            self._buffers[i] = torch.empty(size, dtype=torch.uint8, device=self.device)
        return self._buffers[i]

    def _wait_members(self, deadline: float) -> None:
        while len(self._ready()) < self.num_receivers and time.monotonic() < deadline and not self._closed.is_set():
            time.sleep(0.01)

    def send(self, state, version: int) -> SyncStats:
        """Pack ``state`` once and deliver it to every live member; returns when all have
        acknowledged or been dropped, within ``timeout_s``. Raises only for the sender's own
        errors (closed, a version not newer than the last); members' failures are counted."""
        if self._closed.is_set():
            raise WeightSyncError("weight-sync sender is closed")
        _check_version(version, self._last_version)
        t0 = time.monotonic()
        if self.num_receivers:
            self._wait_members(t0 + self.connect_timeout_s)
        pairs = _as_pairs(state)
        entries, sizes, sources = _plan(pairs, self.bucket_bytes)
        with self._buf_lock:
            t_lock = time.monotonic()
            deadline = t_lock + self.timeout_s
            bufs = [self._bucket(i, s) for i, s in enumerate(sizes)]
            sums = [_pack(b, entries, sources, i, self.threads) for i, b in enumerate(bufs)]
            del self._buffers[len(sizes):]
            header = _header_bytes(version, self.incarnation, entries, sizes, sums)
            self._latest = (version, header, bufs)
            self._last_version = version
            t_pack = time.monotonic()
            members = self._ready()
            oks = list(self._pool.map(lambda m: self._deliver(m, version, header, bufs, deadline), members))
        t1 = time.monotonic()
        return SyncStats(self.backend, "send", version, len(entries), sum(sizes), len(sizes), t1 - t0,
                         wait_s=t_lock - t0, pack_s=t_pack - t_lock, transfer_s=t1 - t_pack,
                         incarnation=self.incarnation, receivers=sum(oks), failed=len(oks) - sum(oks))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._service.join(timeout=2.0)
        with self._mlock:
            members = list(self._members.values())
        for m in members:
            self._drop(m, "sender closing", quiet=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._buffers, self._latest = [], None
        self._store = None


# -------------------------------------------------------------------------- receiver


class CollectiveReceiver(WeightReceiver):
    """Actor side: joins the sender at ``addr`` and takes every update in a background
    thread; ``receive`` hands out the newest one not yet returned."""

    def __init__(self, backend: str, addr: str, *, timeout_s: float = 120.0, device=None,
                 connect_timeout_s: float | None = None, threads: int | None = None, label: str = ""):
        self.backend = backend
        self.device = _device(backend, device)
        self.host, self.port = _split_addr(addr)
        self.addr = addr
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s if connect_timeout_s is not None else timeout_s)
        self.threads = max(1, threads or 1)
        self.label = label or f"receiver-{os.getpid()}"
        self.member_id: int | None = None
        self.joins = 0  # registrations so far (1 + rejoins)
        self.updates = 0  # updates taken (including ones never handed out by receive)
        self.last_error: str = ""
        self._newest: tuple[str, int, dict[str, torch.Tensor], SyncStats] | None = None
        self._returned: tuple[str, int] | None = None
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._failing_since: float | None = None
        self._sets: list[list[torch.Tensor]] = []  # recent bucket buffer sets, for reuse
        self._thread = threading.Thread(target=self._run, name=f"weight-sync rx {self.label}", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- interface

    def receive(self, timeout_s: float | None = None, copy: bool = False) -> tuple[int, dict[str, torch.Tensor]]:
        """The newest verified update not returned before, waiting up to ``timeout_s``
        (default ``timeout_s`` of the channel) for one. Tensors are private to this update
        (``copy`` changes nothing)."""
        wait = self.timeout_s if timeout_s is None else float(timeout_s)
        until = time.monotonic() + wait
        with self._cond:
            while True:
                n = self._newest
                if n is not None and (n[0], n[1]) != self._returned:
                    self._returned = (n[0], n[1])
                    self.last_stats = n[3]
                    return n[1], n[2]
                if self._closed.is_set():
                    raise WeightSyncError("weight-sync receiver is closed")
                failing = self._failing_since
                if failing is not None and time.monotonic() - failing > self.connect_timeout_s:
                    raise WeightSyncPeerLost(f"weight-sync {self.backend}: sender at {self.addr} unreachable for "
                                             f"{time.monotonic() - failing:.0f} s ({self.last_error})")
                left = until - time.monotonic()
                if left <= 0:
                    raise WeightSyncTimeout(f"weight-sync {self.backend}: no new update within {wait:g} s"
                                            + (f" (last error: {self.last_error})" if self.last_error else ""))
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    # ------------------------------------------------------------ background

    def _run(self) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            try:
                self._session()
                backoff = 0.1
            except Exception as e:  # noqa: BLE001 - every failure ends in a rejoin
                if self._closed.is_set():
                    break
                self.last_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                log.info("weight-sync %s %s: %s; joining again in %.1f s", self.backend, self.label,
                         self.last_error, backoff)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _session(self) -> None:
        """Register as a new member, build the pair group, take updates until it breaks."""
        store = _client(self.host, self.port, self.connect_timeout_s)
        store.get("ws/incarnation")  # waits (up to connect_timeout_s) for a sender to be up
        mid = int(store.add("ws/members", 1))
        base = f"ws/m/{mid}"
        info = {"label": self.label, "pid": os.getpid(), "host": socket.gethostname()}
        store.set(f"{base}/info", json.dumps(info))
        self.member_id = mid
        self.joins += 1
        stop_hb = threading.Event()
        hb = threading.Thread(target=self._heartbeat, args=(base, stop_hb), daemon=True,
                              name=f"weight-sync hb {self.label}")
        hb.start()
        group = None
        try:
            what = f"weight-sync {self.backend} {self.label} (member {mid})"
            group = _PairGroup(self.backend, self.host, self.port, f"{base}/pg/", 1, self.device, self.timeout_s,
                               time.monotonic() + self.connect_timeout_s, what)
            self._failing_since = None
            log.info("%s joined the sender at %s", what, self.addr)
            seq = 0
            while not self._closed.is_set():
                raw = self._wait_header(store, base, seq)
                if raw is None:
                    return  # closed
                self._take(store, group, base, seq, raw)
                seq += 1
        finally:
            stop_hb.set()
            if group is not None:
                group.close()
            if self._closed.is_set():
                try:
                    store.set(f"{base}/bye", "closed")
                except Exception:  # noqa: BLE001
                    pass

    def _heartbeat(self, base: str, stop: threading.Event) -> None:
        try:
            store = _client(self.host, self.port, self.connect_timeout_s)
            while not stop.wait(_HEARTBEAT_S):
                store.add(f"{base}/hb", 1)
        except Exception:  # noqa: BLE001 - a dead store is noticed by the session
            pass

    def _wait_header(self, store, base: str, seq: int) -> bytes | None:
        """The next header (polled; the store's blocking wait would log a warning on every
        timeout), with a look every ``_WAIT_S`` at whether the sender dropped this member."""
        key, drop = f"{base}/hdr/{seq}", f"{base}/drop"
        pause, last_drop_check = 0.0002, time.monotonic()
        while not self._closed.is_set():
            if store.check([key]):
                return store.get(key)
            now = time.monotonic()
            if now - last_drop_check > _WAIT_S:
                last_drop_check = now
                if store.check([drop]):
                    raise WeightSyncPeerLost(f"dropped by the sender: {store.get(drop).decode(errors='replace')}")
            time.sleep(pause)
            pause = min(pause * 2, _IDLE_POLL_S)
        return None

    def _buckets(self, sizes: list[int]) -> list[torch.Tensor]:
        """Buffers for the next update: a set from an earlier update that nobody holds any more
        (its pages are already mapped: a fresh allocation page-faults its way through the
        transfer, measured at ~3x slower on loopback), else a new set. Sets handed out by
        ``receive`` and still referenced are never reused, so returned tensors stay private."""
        for bset in self._sets:
            if [b.numel() for b in bset] == sizes and all(_unshared(b) for b in bset):
                return bset
        bset = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in sizes]
        self._sets = [bset, *self._sets][:_KEEP_SETS]
        return bset

    def _prepare_spare(self, sizes: list[int]) -> None:
        """After the first update of a shape, while idle: a second, already touched set, so
        that the next transfer does not pay page faults (the newest set stays held until it
        is replaced; two sets suffice when the caller drops what it took before its next
        ``receive``)."""
        if sum([b.numel() for b in bset] == sizes for bset in self._sets) >= 2:
            return
        spare = [torch.empty(n, dtype=torch.uint8, device=self.device).zero_() for n in sizes]
        self._sets = [*self._sets, spare][-_KEEP_SETS:]

    def _take(self, store, group: _PairGroup, base: str, seq: int, raw: bytes) -> None:
        t_start = time.monotonic()
        deadline = t_start + self.timeout_s
        header, entries = _decode_header(raw)  # a bad header breaks the session (we cannot follow the bytes)
        version = header["version"]
        bufs = self._buckets([size for size, _ in header["buckets"]])
        for i, b in enumerate(bufs):
            group.broadcast(b, deadline, f"v{version} bucket {i}/{len(bufs)} ({b.numel()} bytes)")
        t_recv = time.monotonic()
        try:
            _verify(bufs, header, threads=self.threads)
        except WeightSyncChecksumError as e:
            store.set(f"{base}/nack/{seq}", f"{self.label}: {e}")
            log.warning("weight-sync %s %s: %s", self.backend, self.label, e)
            return  # the group is consistent: the next update may go ahead
        store.set(f"{base}/ack/{seq}", "1")
        t1 = time.monotonic()
        stats = SyncStats(self.backend, "receive", version, len(entries), sum(s for s, _ in header["buckets"]),
                          len(bufs), t1 - t_start, pack_s=t1 - t_recv, transfer_s=t_recv - t_start,
                          incarnation=header["incarnation"])
        state = _unpack(bufs, entries)
        with self._cond:
            self._newest = (header["incarnation"], version, state, stats)
            self.updates += 1
            self._cond.notify_all()
        del state, bufs
        self._prepare_spare([size for size, _ in header["buckets"]])
