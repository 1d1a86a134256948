"""A pool of verifier worker processes that scores responses without blocking the caller.

Contract
--------
- The actor calls ``submit(kind, response, target, timeout_s)`` and gets a
  ``concurrent.futures.Future[Verdict]`` at once; generation goes on while workers score.
  ``kind`` is ``"math"`` (target: reference answer) or ``"code"`` (target: tests dict), or
  a kind registered with ``extra_kinds={"name": "module:function"}``.
- The queue is bounded (``max_queue``): ``submit`` blocks while it is full (or raises
  ``queue.Full`` after ``block_timeout_s``), so a slow verifier applies back-pressure
  instead of growing memory.
- Every item has a deadline: ``timeout_s`` from the moment a worker starts it, plus
  ``grace_s``. A worker past its deadline is SIGKILLed (its sandboxed children die with it:
  bubblewrap runs with --die-with-parent) and replaced; the item's verdict is ``timeout``.
  A worker that crashes gets the item an ``error`` (math) / ``sandbox_error`` (code)
  verdict and is replaced. Every submitted item gets exactly one verdict; none is lost.
- Worker <-> pool messages are JSON over pipes; nothing is unpickled from a worker.
Not covered: what the verifiers do (``math_verifier``, ``code_verifier``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import multiprocessing as mp
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from actors.verifiers.verdict import Verdict

log = logging.getLogger(__name__)

BUILTIN_KINDS = {
    "math": "actors.verifiers.math_verifier:verify_math",
    "code": "actors.verifiers.code_verifier:verify_code",
}
# the verdict status an item gets when its worker dies under it
CRASH_STATUS = {"math": "error", "code": "sandbox_error"}


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_main(conn: Connection, kinds: dict[str, str], kind_kwargs: dict[str, dict]) -> None:
    """Worker loop: one JSON request in, one JSON verdict out, until the pipe closes."""
    fns = {k: _resolve(v) for k, v in kinds.items()}
    conn.send_bytes(b'{"ready": true}')  # imports done: deadlines may start counting
    while True:
        try:
            req = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        t0 = time.perf_counter()
        try:
            kw = kind_kwargs.get(req["kind"], {})
            v = fns[req["kind"]](req["response"], req["target"], timeout_s=req["timeout_s"], **kw)
            out = {"reward": v.reward, "status": v.status, "detail": v.detail, "elapsed_s": v.elapsed_s}
        except Exception as e:  # a verifier bug is an error verdict, never a reward
            status = CRASH_STATUS.get(req["kind"], "error")
            out = {"reward": 0.0, "status": status, "detail": f"verifier raised {type(e).__name__}: {e}",
                   "elapsed_s": time.perf_counter() - t0}
        conn.send_bytes(json.dumps(out).encode())


@dataclass
class _Item:
    kind: str
    response: str
    target: Any
    timeout_s: float
    future: Future
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: Connection
    item: _Item | None = None
    deadline: float = 0.0
    ready: bool = False  # set once the worker has imported its verifiers


@dataclass
class PoolStats:
    submitted: int = 0
    completed: int = 0
    killed_workers: int = 0
    crashed_workers: int = 0
    statuses: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["statuses"] = dict(self.statuses)
        return d


class VerifierPool:
    """See the module docstring. Use as a context manager or call ``close()``."""

    def __init__(
        self,
        num_workers: int = 2,
        max_queue: int = 256,
        default_timeout_s: float = 5.0,
        grace_s: float = 2.0,
        extra_kinds: dict[str, str] | None = None,
        kind_kwargs: dict[str, dict] | None = None,
        kind_timeouts_s: dict[str, float] | None = None,
        start_method: str = "spawn",
    ):
        """kind_kwargs: JSON-able keyword arguments passed to a kind's verifier on every
        call (e.g. ``{"code": {"limits": {...}, "allow_unsandboxed": False}}``);
        kind_timeouts_s: a kind's default time limit, else ``default_timeout_s``."""
        if num_workers < 1 or max_queue < 1:
            raise ValueError("num_workers and max_queue must be >= 1")
        self.kinds = {**BUILTIN_KINDS, **(extra_kinds or {})}
        self.kind_kwargs = dict(kind_kwargs or {})
        json.dumps(self.kind_kwargs)  # must travel to spawned workers as plain data
        self.kind_timeouts_s = dict(kind_timeouts_s or {})
        self.default_timeout_s = default_timeout_s
        self.grace_s = grace_s
        self.stats = PoolStats()
        self._ctx = mp.get_context(start_method)
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._workers = [self._spawn() for _ in range(num_workers)]
        self._thread = threading.Thread(target=self._run, name="verifier-pool", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, vcfg) -> "VerifierPool":
        """Build the pool from ``PrimeRunConfig.verifier``; checks the sandbox once at start
        and logs what code verification will do."""
        from actors.verifiers.sandbox import sandbox_available

        ok, why = sandbox_available()
        if not ok and vcfg.allow_unsandboxed:
            log.warning("bubblewrap unavailable (%s): model code runs UNSANDBOXED, rlimits only", why)
        elif not ok:
            log.error("bubblewrap unavailable (%s): every code item will get sandbox_error", why)
        limits = {
            "cpu_s": vcfg.sandbox_cpu_s, "memory_mb": vcfg.sandbox_memory_mb,
            "tmpfs_mb": vcfg.sandbox_tmpfs_mb, "max_output_bytes": vcfg.sandbox_max_output_bytes,
        }
        return cls(
            num_workers=vcfg.workers, max_queue=vcfg.max_queue, grace_s=vcfg.grace_s,
            kind_kwargs={"code": {"limits": limits, "allow_unsandboxed": vcfg.allow_unsandboxed}},
            kind_timeouts_s={"math": vcfg.math_timeout_s, "code": vcfg.code_timeout_s},
        )

    # ------------------------------------------------------------------ public API

    def submit(
        self, kind: str, response: str, target: Any, timeout_s: float | None = None,
        block_timeout_s: float | None = None,
    ) -> Future:
        """Queue one item; returns a Future resolving to its Verdict. Blocks while the queue
        is full (raises queue.Full after ``block_timeout_s`` if given)."""
        if self._closed.is_set():
            raise RuntimeError("VerifierPool is closed")
        if kind not in self.kinds:
            raise ValueError(f"unknown verifier kind {kind!r}; known: {sorted(self.kinds)}")
        json.dumps(target)  # fail here, in the caller, if the target cannot travel
        timeout_s = timeout_s or self.kind_timeouts_s.get(kind, self.default_timeout_s)
        item = _Item(kind, response, target, timeout_s, Future())
        item.future.set_running_or_notify_cancel()
        self._queue.put(item, timeout=block_timeout_s)
        with self._lock:
            self.stats.submitted += 1
        return item.future

    def qsize(self) -> int:
        return self._queue.qsize()

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (a replaced worker's are gone)."""
        return [w.proc.pid for w in list(self._workers) if w.proc.pid is not None]  # (a snapshot; no lock needed)

    def close(self) -> None:
        """Stop the workers; items not yet verified get an ``error`` verdict."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout=10)
        for w in self._workers:
            if w.item is not None:
                self._finish(w.item, Verdict(0.0, CRASH_STATUS.get(w.item.kind, "error"), "pool closed"))
            self._stop(w)
        while True:
            try:
                it = self._queue.get_nowait()
            except queue.Empty:
                break
            self._finish(it, Verdict(0.0, CRASH_STATUS.get(it.kind, "error"), "pool closed"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------- internals

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self.kinds, self.kind_kwargs), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _stop(self, w: _Worker, kill: bool = False) -> None:
        try:
            w.conn.close()
        except OSError:
            pass
        if kill:
            w.proc.kill()
        w.proc.join(timeout=5)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(timeout=5)

    def _finish(self, item: _Item, verdict: Verdict) -> None:
        with self._lock:
            self.stats.completed += 1
            self.stats.statuses[verdict.status] += 1
        if not item.future.done():
            item.future.set_result(verdict)

    def _replace(self, i: int, kill: bool) -> None:
        self._stop(self._workers[i], kill=kill)
        self._workers[i] = self._spawn()

    def _dispatch(self) -> None:
        for i, w in enumerate(self._workers):
            if w.item is not None or not w.ready:
                continue
            if not w.proc.is_alive():  # died while idle: replace before giving it work
                with self._lock:
                    self.stats.crashed_workers += 1
                self._replace(i, kill=True)
                continue
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            req = {"kind": item.kind, "response": item.response, "target": item.target, "timeout_s": item.timeout_s}
            w.item = item
            w.deadline = time.monotonic() + item.timeout_s + self.grace_s
            try:
                w.conn.send_bytes(json.dumps(req).encode())
            except OSError:
                pass  # a dead worker is noticed by the reaper below

    def _run(self) -> None:
        while not self._closed.is_set():
            self._dispatch()
            watched = [w for w in self._workers if w.item is not None or not w.ready]
            if not watched:
                time.sleep(0.005)
                continue
            deadlines = [w.deadline for w in watched if w.item is not None]
            wait_s = max(0.0, min(min(deadlines, default=math.inf) - time.monotonic(), 0.05))
            ready = set(wait([w.conn for w in watched] + [w.proc.sentinel for w in watched], timeout=wait_s))
            for i, w in enumerate(self._workers):
                if not w.ready:
                    if w.conn in ready:
                        try:
                            w.ready = json.loads(w.conn.recv_bytes()) == {"ready": True}
                        except (EOFError, OSError, ValueError):
                            pass
                    if not w.ready and w.proc.sentinel in ready:  # died while importing
                        log.error("verifier worker exited with code %s before it was ready; restarting",
                                  w.proc.exitcode)
                        with self._lock:
                            self.stats.crashed_workers += 1
                        time.sleep(0.5)  # no hot respawn loop if an import is broken
                        self._replace(i, kill=True)
                    continue
                if w.item is None:
                    continue
                if w.conn in ready:
                    try:
                        out = json.loads(w.conn.recv_bytes())
                        verdict = Verdict(**out)
                    except (EOFError, OSError, ValueError, TypeError) as e:
                        self._crashed(i, f"worker died or sent garbage: {e}")
                        continue
                    item, w.item = w.item, None
                    self._finish(item, verdict)
                elif w.proc.sentinel in ready:
                    self._crashed(i, f"worker exited with code {w.proc.exitcode}")
                elif time.monotonic() > w.deadline:
                    item, w.item = w.item, None
                    log.warning("verifier worker %d stuck past its deadline (%s item); killing it", w.proc.pid, item.kind)
                    with self._lock:
                        self.stats.killed_workers += 1
                    self._replace(i, kill=True)
                    self._finish(item, Verdict(0.0, "timeout", f"worker killed after {item.timeout_s + self.grace_s:.1f} s",
                                               elapsed_s=item.timeout_s + self.grace_s))

    def _crashed(self, i: int, why: str) -> None:
        w = self._workers[i]
        item, w.item = w.item, None
        with self._lock:
            self.stats.crashed_workers += 1
        self._replace(i, kill=True)
        self._finish(item, Verdict(0.0, CRASH_STATUS.get(item.kind, "error"), why))
