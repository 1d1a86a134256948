"""What both ends of the transport share: the learner's sender id, the errors, the wake-up pipe
of a control thread, and the monitor events counted as failed handshakes. No sockets of its own."""

from __future__ import annotations

import collections
import threading
import uuid

import zmq

LEARNER_ID = "learner"


class TransportError(RuntimeError):
    """The transport cannot do what was asked (closed, misconfigured)."""


class TransportSecurityError(TransportError, ValueError):
    """An endpoint would be exposed without CURVE, or the CURVE key files are unusable."""


class LearnerRestarted(TransportError):
    """The learner this client talked to was replaced by a new instance: call ``rejoin()``."""


class ShutdownRequested(TransportError):
    """The learner asked this actor to shut down; ``reason`` is the learner's."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"learner requested shutdown: {reason}")


class _Wakeup:
    """A queue of Python commands plus an inproc PAIR that wakes the owning thread's poll."""

    def __init__(self, ctx: zmq.Context):
        addr = f"inproc://wake-{uuid.uuid4().hex}"
        self.rx = ctx.socket(zmq.PAIR)
        self.rx.bind(addr)
        self.tx = ctx.socket(zmq.PAIR)
        self.tx.connect(addr)
        self.queue: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def put(self, item) -> None:
        self.queue.append(item)
        with self._lock:
            if not self.tx.closed:
                try:
                    self.tx.send(b"", zmq.NOBLOCK)
                except zmq.Again:  # wake-ups already pending
                    pass

    def drain(self) -> list:
        while True:
            try:
                self.rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        items = []
        while self.queue:
            items.append(self.queue.popleft())
        return items

    def close(self) -> None:
        with self._lock:
            self.tx.close(linger=0)
        self.rx.close(linger=0)


def _drain(sock: zmq.Socket, max_n: int = 1000):
    for _ in range(max_n):
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
