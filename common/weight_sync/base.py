"""What every weight-sync backend shares: the errors, ``SyncStats``, the sender/receiver
interface, version ordering, and deadlines on blocking calls (a watchdog thread).

Not covered: the wire format (``wire``), the backends (``collective``, ``shm``).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

# ------------------------------------------------------------------------------- errors


class WeightSyncError(RuntimeError):
    """A weight update that could not be delivered or verified."""


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    """A deadline passed: the peer is stuck, gone, or never came."""


class WeightSyncPeerLost(WeightSyncError):
    """The peer is known to be gone (connection closed, process exited)."""


class WeightSyncChecksumError(WeightSyncError):
    """The received bytes do not match the sender's checksum (or the header is damaged)."""


@dataclass
class SyncStats:
    """What one ``send`` or ``receive`` did. Times in seconds."""

    backend: str
    role: str  # "send" | "receive"
    version: int
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: float = 0.0  # whole call
    wait_s: float = 0.0  # send: waiting for acknowledgements; receive: waiting for the update to start
    pack_s: float = 0.0  # send: copy into buckets + checksum; receive: checksum (+ copy if copy=True)
    transfer_s: float = 0.0  # collectives / publishing
    incarnation: str = ""
    receivers: int = 0  # send over gloo/nccl: members that acknowledged this update
    failed: int = 0  # send over gloo/nccl: members that did not (dropped, or rejected the bytes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_version(version: int, last: int | None) -> None:
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"version must be a non-negative int, got {version!r}")
    if last is not None and version <= last:
        raise ValueError(f"version {version} is not newer than the last one sent ({last}); versions must increase")



# ------------------------------------------------------------------------------ interface


class WeightSender:
    """Learner side (rank 0). ``send`` blocks until the update is delivered and verified by
    ``num_receivers`` receivers or raises a WeightSyncError within ``timeout_s``."""

    backend = ""

    def send(self, state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], version: int) -> SyncStats:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class WeightReceiver:
    """Actor side. ``receive(timeout_s)`` returns ``(version, {name: tensor})`` of the next
    update, verified, or raises a WeightSyncError (WeightSyncTimeout if none started in time)."""

    backend = ""
    last_stats: SyncStats | None = None

    def receive(self, timeout_s: float | None = None, copy: bool = False) -> tuple[int, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------- deadlines (watchdog)


_GRACE_S = 0.5  # after a deadline, how long the watchdog waits for the transport's own timeout


def _run_with_deadline(fn: Callable[[], Any], deadline: float, what: str, on_expire: Callable[[], None] | None = None) -> Any:
    """Run ``fn`` in a daemon thread; if it has not finished ``_GRACE_S`` after ``deadline``
    (time.monotonic), call ``on_expire`` (abort the group) and raise WeightSyncTimeout. A
    thread stuck in C code cannot be killed, but it is a daemon, so it never holds up exit."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name=f"weight-sync {what}", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic()) + _GRACE_S):
        if on_expire is not None:
            try:
                on_expire()
            except Exception:  # noqa: BLE001 - best effort; the timeout is the error to report
                pass
        raise WeightSyncTimeout(f"{what}: no completion within the deadline")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _classify(e: BaseException, what: str) -> WeightSyncError:
    if isinstance(e, WeightSyncError):
        return e
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if re.search(r"time[d ]?\s*out|timeout|deadline", msg, re.I):
        return WeightSyncTimeout(f"{what}: {msg}")
    return WeightSyncPeerLost(f"{what}: {msg}")


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()

