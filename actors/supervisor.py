"""Supervisor of the actor processes of one machine: start M, restart the crashed, stop all.

Who calls it: ``launch/actors.py`` (supervisor mode) and ``launch/run.py`` (the one-machine
launcher, through the same entry). Each slot runs ``python launch/actors.py --slot I`` with the
same config file.

Contract
--------
- Every actor runs in its own session (process group), so a stop reaches its helpers too
  (vLLM engine core, verifier workers) and a Ctrl-C on the terminal reaches only the
  launcher, which then stops everything in order.
- A slot whose process exits 0 is done (the learner said stop, or its prompts ran out) and is
  not restarted. Any other exit (a crash, SIGKILL) restarts it after a back-off of
  ``restart_backoff_s * 2**(n-1)`` (capped at ``restart_backoff_max_s``), n = consecutive
  crashes; a process that lived over 60 s resets n. After ``max_restarts`` the slot is
  given up (logged). The new process is a new transport incarnation and resumes the slot's
  prompt cursor.
- ``stop()``: SIGTERM to every process group, ``stop_grace_s + 15`` s to exit, then SIGKILL;
  nothing is left running when it returns. With ``gpu_ids`` (``actors.gpus``) slot i gets
  ``CUDA_VISIBLE_DEVICES=gpu_ids[i % len]``.
Not covered: remote hosts (run one supervisor per node), health checks beyond exit codes
(the learner's transport detects silent actors).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "launch" / "actors.py"


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.crashes = 0  # consecutive
        self.restarts = 0
        self.restart_at: float | None = None
        self.done = False
        self.given_up = False


class Supervisor:
    """See the module docstring."""

    def __init__(self, cfg, config_path: str | os.PathLike, *, log_dir: str | os.PathLike | None = None,
                 gpu_ids: list[str] | None = None, python: str = sys.executable, command=None):
        self.cfg = cfg
        self.config_path = str(config_path)
        self.log_dir = Path(log_dir or Path(cfg.run.output_dir) / "logs")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.gpu_ids = gpu_ids
        # slot -> argv; the default runs this config's actor slot
        self.command = command or (lambda i: [self.python, str(ENTRY), "--config", self.config_path, "--slot", str(i)])
        self.slots = [_Slot(i) for i in range(cfg.actors.num)]
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ processes
    def _spawn(self, slot: _Slot) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.gpu_ids is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_ids[slot.index % len(self.gpu_ids)]
        out = open(self.log_dir / f"actor-{slot.index}.log", "ab")
        try:
            slot.proc = subprocess.Popen(self.command(slot.index), stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True, cwd=str(ROOT))
        finally:
            out.close()
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("actor-%d started (pid %d)", slot.index, slot.proc.pid)

    def start(self) -> "Supervisor":
        with self._lock:
            for slot in self.slots:
                self._spawn(slot)
        return self

    def poll(self) -> bool:
        """Reap exits, schedule and perform restarts. Returns True while any slot is active."""
        now = time.monotonic()
        with self._lock:
            if self._stop.is_set():
                return False
            for slot in self.slots:
                if slot.done or slot.given_up:
                    continue
                if slot.proc is None:
                    if slot.restart_at is not None and now >= slot.restart_at:
                        self._spawn(slot)
                    continue
                rc = slot.proc.poll()
                if rc is None:
                    continue
                _killpg(slot.proc.pid, signal.SIGKILL)  # its helpers, if any outlived it
                slot.proc = None
                if rc == 0:
                    slot.done = True
                    log.info("actor-%d finished", slot.index)
                    continue
                slot.crashes = 1 if now - slot.started > 60 else slot.crashes + 1
                if slot.restarts >= self.cfg.actors.max_restarts:
                    slot.given_up = True
                    log.error("actor-%d exited with %s; %d restarts used: giving up on it", slot.index, rc,
                              slot.restarts)
                    continue
                a = self.cfg.actors
                delay = min(a.restart_backoff_s * 2 ** (slot.crashes - 1), a.restart_backoff_max_s)
                slot.restarts += 1
                slot.restart_at = now + delay
                log.warning("actor-%d exited with %s (crash %d in a row): restart %d in %.1f s", slot.index, rc,
                            slot.crashes, slot.restarts, delay)
            return any(not (s.done or s.given_up) for s in self.slots)

    def run(self, poll_s: float = 0.2) -> None:
        """Supervise until every slot is done or given up, or ``stop()`` is called."""
        while not self._stop.is_set() and self.poll():
            self._stop.wait(poll_s)

    def pids(self) -> dict[int, int]:
        with self._lock:
            return {s.index: s.proc.pid for s in self.slots if s.proc is not None}

    def restarts(self) -> int:
        return sum(s.restarts for s in self.slots)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop every actor (SIGTERM, then SIGKILL after the grace period)."""
        self._stop.set()
        grace = (self.cfg.actors.stop_grace_s + 15.0) if grace_s is None else grace_s
        with self._lock:
            procs = [s.proc for s in self.slots if s.proc is not None]
            for p in procs:
                _killpg(p.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in procs:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("actor pid %d did not stop in %.0f s: SIGKILL", p.pid, grace)
                _killpg(p.pid, signal.SIGKILL)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
                    log.error("actor pid %d survived SIGKILL", p.pid)
            for s in self.slots:
                s.proc = None


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_supervisor(cfg, config_path: str | os.PathLike) -> int:
    """Start ``actors.num`` actors and supervise them until done; SIGTERM/SIGINT stop them all.
    Returns the number of slots given up (0 = all ended normally)."""
    sup = Supervisor(cfg, config_path, gpu_ids=cfg.actors.gpus.split(",") if cfg.actors.gpus else None)
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: stopping the actors", signum)
        stop.set()
        sup._stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        sup.start()
        sup.run()
    finally:
        sup.stop()
        for s, h in old.items():
            signal.signal(s, h)
    return sum(s.given_up for s in sup.slots)
