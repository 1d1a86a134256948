"""Weight sync: the learner's rank 0 ships a full state dict to every actor, one version at a time.

Contract
--------
- Who sends what: the learner's rank 0 owns one ``WeightSender`` and calls
  ``send(state, version)`` after each update, ``state`` a ``{name: tensor}`` dict or an
  iterable of ``(name, tensor)`` of full tensors (sharded parameters are gathered by the
  learner first). Each actor owns one ``WeightReceiver``; ``receive(timeout_s)`` returns
  ``(version, {name: tensor})``, whose ``.items()`` is the ``(name, tensor)`` iterator that
  vLLM's ``reload_weights(weights_iterator=...)`` takes. Build them with
  ``make_sender(backend, ...)`` / ``make_receiver(backend, ...)`` (or ``*_from_config``), and
  ``close()`` both. Backends: ``nccl`` (GPU), ``gloo`` (CPU, across hosts), ``shm`` (same host).
- Wire format, one for all backends: tensors packed into byte buckets (64-byte-aligned offsets,
  at most ``bucket_mb`` per bucket, a bigger tensor alone in its own), one collective or one
  file region per bucket, never one per tensor. A JSON header (never pickle) comes first:
  version, sender incarnation, each tensor's (name, dtype, shape, bucket, offset, nbytes) or
  the name it is tied to, each bucket's size and checksum. Tied tensors (same memory, dtype,
  shape, strides) travel once and come back as one tensor under both names.
- Invariants. Versions strictly increase per sender incarnation (the sender refuses anything
  else, the receiver rejects it). Checksum: the wrapping 64-bit sum of each bucket's bytes read
  as int64 words (order-independent, so any split of the work gives the same value), computed
  by the sender as it packs (on CPU in the copy's own pass) and recomputed by the receiver,
  which raises ``WeightSyncChecksumError`` on a mismatch and never returns unverified tensors.
  A flipped byte always changes it; reordered 8-byte words would not (it guards against
  damage and torn reads, not an adversary). Deadlines: every blocking step is bounded by
  ``timeout_s``; a dead, stuck or missing peer becomes ``WeightSyncTimeout`` or
  ``WeightSyncPeerLost`` within it, never a hang.
  ``send`` returns once ``num_receivers`` receivers have verified the update and acknowledged
  it (shm with ``num_receivers=0``: once published).
- nccl/gloo: a process group of the learner's rank 0 (rank 0) and the actors (ranks 1..N),
  separate from the training group, on its own TCPStore hosted by the sender at ``addr``. Every
  receiver takes every update; header and acknowledgements go through the store, buckets are
  broadcast from rank 0, each with the op's own timeout, a bounded wait, and a watchdog thread
  that aborts the group past the deadline. After a transport error the channel is broken: close
  it and build a new one on every peer.
- shm: one file per version in ``<shm_dir>/prime-ws-<channel>/``, filled under a temporary name
  and renamed to ``v<version>.bin`` when complete (the atomic publish); receivers verify 8 MiB
  segments as soon as the sender has stamped them, so verifying overlaps writing, but return
  only after the publish. A receiver takes the newest version (it may skip some), verifies the
  mapped file in place and returns views of it, valid until its next ``receive``/``close``
  (``copy=True``: private tensors). Old files are recycled unless a receiver's lease still
  holds them; older ones are deleted.

Not covered: loading into vLLM (the actor's worker extension calls ``reload_weights`` with the
returned items, re-ties a tied ``lm_head``, resets the prefix cache), telling actors when to
call ``receive`` (the control channel), resharding, and authentication of peers.
"""

from __future__ import annotations

import bisect
import json
import math
import mmap
import os
import re
import struct
import threading
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

__all__ = [
    "WeightSyncError",
    "WeightSyncTimeout",
    "WeightSyncPeerLost",
    "WeightSyncChecksumError",
    "SyncStats",
    "WeightSender",
    "WeightReceiver",
    "make_sender",
    "make_receiver",
    "sender_from_config",
    "receiver_from_config",
    "checksum64",
    "BACKENDS",
]

BACKENDS = ("nccl", "gloo", "shm")
WIRE_SCHEMA = "prime-weight-sync/1"
ALIGN = 64  # byte alignment of every tensor inside a bucket (all dtypes' views stay aligned)
PAGE = 4096
_CHUNK = 2 << 20  # smallest piece of a bucket handed to one copy/checksum thread
_MASK64 = (1 << 64) - 1
_MAX_HEADER = 64 << 20

# dtypes allowed on the wire, by their JSON name
_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        torch.complex64, torch.complex128,
    )
}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _DTYPES[_name] = getattr(torch, _name)
_ITEMSIZE = {name: d.itemsize for name, d in _DTYPES.items()}


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ layout and checksum


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket: int = -1
    offset: int = 0
    nbytes: int = 0
    tied_to: str | None = None

    def to_json(self) -> list:
        if self.tied_to is not None:
            return [self.name, self.tied_to]
        return [self.name, self.dtype, list(self.shape), self.bucket, self.offset, self.nbytes]


def _as_pairs(state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    items = list(state.items()) if isinstance(state, Mapping) else list(state)
    seen: set[str] = set()
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError("state must be a dict of tensors or an iterable of (name, tensor)")
        name, t = item
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"state entry {name!r}: expected (str, Tensor), got ({type(name).__name__}, {type(t).__name__})")
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        if t.dtype not in _DTYPES.values():
            raise TypeError(f"{name}: dtype {t.dtype} cannot be sent")
        if t.is_sparse or t.layout != torch.strided or t.device.type == "meta":
            raise TypeError(f"{name}: only dense strided tensors with data can be sent")
        seen.add(name)
    return items


def _plan(pairs: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> tuple[list[_Entry], list[int], list[torch.Tensor | None]]:
    """Lay the tensors out in buckets. Returns (entries, bucket sizes, source tensor per entry;
    None for a tied entry). Every bucket size is a multiple of ALIGN (so of 8)."""
    entries: list[_Entry] = []
    sources: list[torch.Tensor | None] = []
    sizes: list[int] = []
    first_of: dict[tuple, str] = {}
    for name, t in pairs:
        dtype = str(t.dtype).removeprefix("torch.")
        key = (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())  # same memory, same view: tied
        if t.numel() > 0 and key in first_of:
            entries.append(_Entry(name, dtype, tuple(t.shape), tied_to=first_of[key]))
            sources.append(None)
            continue
        if t.numel() > 0:
            first_of[key] = name
        nbytes = t.numel() * t.element_size()
        span = _align(nbytes)
        if not sizes or (sizes[-1] > 0 and sizes[-1] + span > bucket_bytes):
            sizes.append(0)
        entries.append(_Entry(name, dtype, tuple(t.shape), len(sizes) - 1, sizes[-1], nbytes))
        sources.append(t)
        sizes[-1] += span
    return entries, sizes, sources


def checksum64(buf: torch.Tensor) -> int:
    """The wire checksum of a byte buffer: the sum of its bytes read as little-endian int64
    words, modulo 2**64 (returned unsigned). Order-independent, so deterministic however torch
    splits the reduction; any change confined to one 8-byte word changes it. ``buf`` must be a
    contiguous uint8 tensor whose length is a multiple of 8."""
    if buf.numel() == 0:
        return 0
    return int(buf.view(torch.int64).sum()) & _MASK64


def _src_bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8)


# numpy has no bfloat16/float8: such tensors are viewed as integers of the same width first
_NP_ALIAS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _NP_ALIAS[getattr(torch, _name)] = torch.uint8


def _src_np(t: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor as a flat uint8 numpy array (a view when it is contiguous)."""
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    alias = _NP_ALIAS.get(t.dtype)
    if alias is not None:
        t = t.view(alias)
    try:
        return t.numpy().reshape(-1).view(np.uint8)
    except (TypeError, RuntimeError):  # a dtype numpy lacks
        return t.reshape(-1).view(torch.uint8).numpy()


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < n:
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="weight-sync-copy")
        return _POOL


def _segments(size: int, threads: int) -> list[tuple[int, int]]:
    """[0, size) cut into about ``threads`` pieces of whole chunks (at least one chunk each)."""
    n = max(1, min(threads, size // _CHUNK))
    step = _align(-(-size // n), _CHUNK) if n > 1 else size
    return [(lo, min(lo + step, size)) for lo in range(0, size, step)] or [(0, 0)]


def _run_segments(work: Callable[[int, int], int], size: int, threads: int) -> int:
    """Run ``work(lo, hi)`` over segments of [0, size) on up to ``threads`` threads (numpy and
    torch release the GIL while copying/summing); the partial sums add up mod 2**64."""
    segs = _segments(size, threads)
    if len(segs) == 1:
        return work(*segs[0]) & _MASK64
    futs = [_pool(len(segs)).submit(work, lo, hi) for lo, hi in segs]
    return sum(f.result() for f in futs) & _MASK64


def _cpu_words_sum(a: np.ndarray, kernels: Any = None) -> int:
    """Checksum of a uint8 array (length a multiple of 8): numpy, or the numba kernel when given
    and the array is big and 8-byte aligned (it reads a page-cache mapping ~1.5x faster)."""
    if not a.size:
        return 0
    if kernels is not None and a.size >= _KERNEL_MIN_BYTES and a.ctypes.data % 8 == 0:
        return int(kernels.sum_words(a.view(np.uint64)))
    return int(a.view(np.int64).sum(dtype=np.int64)) & _MASK64


# The CPU copy and its checksum in one pass: a numba kernel that loads 32 bytes, stores them
# with a streaming (non-temporal) store -- what glibc's memcpy does for large copies, so no cache
# line is read for ownership first -- and adds them to a running vector sum. Measured on the
# SmolLM2-135M shape it runs at plain memcpy speed, so the sender's checksum costs next to nothing
# (a copy then a separate sum pass costs ~1.6x, and small tensors copied one by one with ordinary
# stores ~1.5x). Used for large updates only (importing numba and compiling take about a second,
# once per process); numpy's copy + sum otherwise, or where numba or the kernel is unavailable.
_FUSED_MIN_BYTES = 64 << 20
_KERNEL_MIN_BYTES = 1 << 20  # below this the call overhead outweighs the gain
_fused_kernel: Any = None  # None: not loaded yet; False: unavailable; else _Kernels


@dataclass(frozen=True)
class _Kernels:
    copy_sum: Callable  # (dst u64[], src u64[]) -> uint64: copy with streaming stores + sum
    sum_words: Callable  # (a u64[]) -> uint64: the sum alone (2x4-word vector accumulators)


def _build_fused() -> _Kernels:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def nt_copy_sum4(typingctx, dst, src, n4):
        # dst[:4*n4] = src[:4*n4] with 32-byte streaming stores (dst 32-byte aligned); returns the
        # wrapping uint64 sum of the words copied; ends with a fence so the stores are visible
        sig = types.uint64(dst, src, n4)

        def codegen(context, builder, signature, args):
            d = context.make_array(signature.args[0])(context, builder, args[0])
            s_ = context.make_array(signature.args[1])(context, builder, args[1])
            i64 = ir.IntType(64)
            vec = ir.VectorType(i64, 4)
            acc = cgutils.alloca_once_value(builder, ir.Constant(vec, None))
            nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
            with cgutils.for_range(builder, args[2]) as loop:
                i = builder.mul(loop.index, ir.Constant(i64, 4))
                v = builder.load(builder.bitcast(builder.gep(s_.data, [i], inbounds=True), vec.as_pointer()), align=8)
                st = builder.store(v, builder.bitcast(builder.gep(d.data, [i], inbounds=True), vec.as_pointer()), align=32)
                st.set_metadata("nontemporal", nontemporal)
                builder.store(builder.add(builder.load(acc), v), acc)
            a = builder.load(acc)
            total = builder.extract_element(a, ir.Constant(ir.IntType(32), 0))
            for k in (1, 2, 3):
                total = builder.add(total, builder.extract_element(a, ir.Constant(ir.IntType(32), k)))
            builder.fence("seq_cst")
            return total

        return sig, codegen

    @intrinsic
    def sum8(typingctx, arr, n8):
        # wrapping uint64 sum of arr[:8*n8] with two 4-word vector accumulators
        sig = types.uint64(arr, n8)

        def codegen(context, builder, signature, args):
            a = context.make_array(signature.args[0])(context, builder, args[0])
            i64 = ir.IntType(64)
            vec = ir.VectorType(i64, 4)
            acc = [cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(2)]
            with cgutils.for_range(builder, args[1]) as loop:
                i = builder.mul(loop.index, ir.Constant(i64, 8))
                for k in range(2):
                    ptr = builder.gep(a.data, [builder.add(i, ir.Constant(i64, 4 * k))], inbounds=True)
                    v = builder.load(builder.bitcast(ptr, vec.as_pointer()), align=8)
                    builder.store(builder.add(builder.load(acc[k]), v), acc[k])
            v = builder.add(builder.load(acc[0]), builder.load(acc[1]))
            total = builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
            for k in (1, 2, 3):
                total = builder.add(total, builder.extract_element(v, ir.Constant(ir.IntType(32), k)))
            return total

        return sig, codegen

    @numba.njit(nogil=True, boundscheck=False)
    def sum_words(a):  # pragma: no cover - runs compiled
        n8 = a.shape[0] // 8
        total = sum8(a, n8)
        for i in range(8 * n8, a.shape[0]):
            total += a[i]
        return total

    @numba.njit(nogil=True, boundscheck=False)
    def copy_sum(dst, src):  # pragma: no cover - runs compiled
        n = src.shape[0]
        head = min(n, ((32 - dst.ctypes.data % 32) % 32) // 8)  # words until dst is 32-byte aligned
        total = np.uint64(0)
        for i in range(head):
            v = src[i]
            dst[i] = v
            total += v
        n4 = (n - head) // 4
        total += nt_copy_sum4(dst[head:], src[head:], n4)
        for i in range(head + 4 * n4, n):
            v = src[i]
            dst[i] = v
            total += v
        return total

    # check it before trusting it: odd lengths, every head alignment, a misaligned source
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 2**63, 64, dtype=np.uint64)
    for head in range(4):
        for n in (0, 1, 3, 4, 5, 13, 40):
            src = raw[1:1 + n]
            dst = np.zeros(64, dtype=np.uint64)[head:head + n]
            if (int(copy_sum(dst, src)) != int(src.sum(dtype=np.uint64)) or not np.array_equal(dst, src)
                    or int(sum_words(dst)) != int(src.sum(dtype=np.uint64))):
                raise RuntimeError("weight-sync copy/checksum kernels failed their self-test")
    return _Kernels(copy_sum, sum_words)


def _load_fused() -> _Kernels | None:
    global _fused_kernel
    if _fused_kernel is None:
        with _POOL_LOCK:
            if _fused_kernel is None:
                try:
                    _fused_kernel = _build_fused()
                except Exception:  # noqa: BLE001 - numpy does the same job, slower
                    _fused_kernel = False
    return _fused_kernel or None


def _copy_sum(dst: np.ndarray, src: np.ndarray, kernels: _Kernels | None) -> int:
    """Copy src into dst (uint8, same length, a multiple of 8, both 8-byte aligned if ``kernels``)
    and return the checksum of the words."""
    if kernels is not None:
        return int(kernels.copy_sum(dst.view(np.uint64), src.view(np.uint64)))
    np.copyto(dst, src)
    return _cpu_words_sum(dst)


class _Packer:
    """Copies one bucket's tensors into its buffer, range by range, returning each range's
    checksum (the ranges' sums add up to the bucket's, mod 2**64). Padding is zeroed."""

    def __init__(self, bucket: torch.Tensor, entries: list[_Entry], sources: list[torch.Tensor | None], index: int,
                 fused: bool | None = None):
        self.bucket = bucket
        self.on_cpu = bucket.device.type == "cpu"
        mine = [(e, src) for e, src in zip(entries, sources) if src is not None and e.bucket == index]
        if not self.on_cpu:
            self.pieces = [(e.offset, e.nbytes, _align(e.nbytes), _src_bytes(src) if e.nbytes else None) for e, src in mine]
            return
        if fused is None:
            fused = bucket.numel() >= _FUSED_MIN_BYTES
        fused_kernel = _load_fused() if fused else None
        self.dst = bucket.numpy()
        self.pieces, self.src_np, self.fused = [], [], []
        for e, src in mine:
            cpu = src.device.type == "cpu"
            self.pieces.append((e.offset, e.nbytes, _align(e.nbytes), None if cpu or not e.nbytes else _src_bytes(src)))
            self.src_np.append(_src_np(src) if cpu and e.nbytes else None)
            # the kernel needs 8-byte aligned words on both sides (the bucket's are)
            self.fused.append(fused_kernel if cpu and src.data_ptr() % 8 == 0 and src.is_contiguous() else None)
        self.ends = [off + span for off, _, span, _ in self.pieces]

    def fill_all_gpu(self) -> int:
        b = self.bucket
        for off, nbytes, span, sb in self.pieces:
            if nbytes:
                b[off:off + nbytes].copy_(sb, non_blocking=True)
            if span > nbytes:
                b[off + nbytes:off + span].zero_()
        return checksum64(b)

    def fill(self, lo: int, hi: int) -> int:
        """CPU: fill bytes [lo, hi) of the bucket (both multiples of 8) and return their checksum."""
        dst, pieces, total = self.dst, self.pieces, 0
        k = bisect.bisect_right(self.ends, lo)
        while k < len(pieces) and pieces[k][0] < hi:
            off, nbytes, span, sb = pieces[k]
            a, b = max(off, lo), min(off + nbytes, hi)
            b8 = a + (b - a) // 8 * 8 if a < b else a
            if b8 > a:
                if self.src_np[k] is not None:
                    total += _copy_sum(dst[a:b8], self.src_np[k][a - off:b8 - off], self.fused[k])
                else:  # on another device: torch does the transfer
                    self.bucket[a:b8].copy_(sb[a - off:b8 - off])
                    total += _cpu_words_sum(dst[a:b8])
            if b > b8:  # the tensor's last bytes: b == off + nbytes here, and the word ends before hi
                if self.src_np[k] is not None:
                    dst[b8:b] = self.src_np[k][b8 - off:b - off]
                else:
                    self.bucket[b8:b].copy_(sb[b8 - off:b - off])
            z0, z1 = max(off + nbytes, lo), min(off + span, hi)
            if z0 < z1:
                dst[z0:z1] = 0
            if b > b8:
                total += _cpu_words_sum(dst[b8:b8 + 8])
            if off + span > hi:
                break  # continues past hi
            k += 1
        return total & _MASK64


def _pack(bucket: torch.Tensor, entries: list[_Entry], sources: list[torch.Tensor | None], index: int,
          threads: int = 1) -> int:
    """Write bucket ``index``'s tensors into ``bucket`` (uint8, its exact size) and return the
    bucket's checksum; CPU work split over ``threads`` threads."""
    packer = _Packer(bucket, entries, sources, index)
    if not packer.on_cpu:
        return packer.fill_all_gpu()
    return _run_segments(packer.fill, bucket.numel(), threads)


def _sum_range(src: np.ndarray, dst: np.ndarray | None, lo: int, hi: int, kernels: _Kernels | None = None) -> int:
    """Checksum of src[lo:hi]; with ``dst``, copy into dst[lo:hi] on the way (one pass)."""
    if dst is None:
        return _cpu_words_sum(src[lo:hi], kernels)
    if src[lo:].ctypes.data % 8:
        kernels = None
    return _copy_sum(dst[lo:hi], src[lo:hi], kernels) & _MASK64


def _verify_copy(dst: torch.Tensor | None, src: torch.Tensor, threads: int = 1) -> int:
    """Checksum of ``src``; when ``dst`` is given, copy into it on the way."""
    if src.device.type != "cpu":
        if dst is not None:
            dst.copy_(src)
            src = dst
        return checksum64(src)
    s, d = src.numpy(), (dst.numpy() if dst is not None else None)
    kernels = _load_fused() if src.numel() >= _FUSED_MIN_BYTES else None
    return _run_segments(lambda lo, hi: _sum_range(s, d, lo, hi, kernels), src.numel(), threads)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _decode_header(raw: bytes) -> tuple[dict, list[_Entry]]:
    """Parse and validate a header; anything malformed is a WeightSyncChecksumError."""
    def bad(msg: str):
        return WeightSyncChecksumError(f"bad weight-sync header: {msg}")

    try:
        h = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(h, dict) or h.get("schema") != WIRE_SCHEMA:
        raise bad(f"schema is {h.get('schema') if isinstance(h, dict) else type(h).__name__!r}, want {WIRE_SCHEMA!r}")
    version, buckets, tensors = h.get("version"), h.get("buckets"), h.get("tensors")
    if not _is_int(version) or version < 0 or not isinstance(h.get("incarnation"), str):
        raise bad(f"version {version!r} / incarnation {h.get('incarnation')!r}")
    if not isinstance(buckets, list) or not isinstance(tensors, list):
        raise bad("buckets/tensors are not lists")
    for b in buckets:
        if not (isinstance(b, list) and len(b) == 2 and all(_is_int(x) for x in b)
                and b[0] >= 0 and b[0] % 8 == 0 and 0 <= b[1] <= _MASK64):
            raise bad(f"bucket {b!r}")
    entries: list[_Entry] = []
    names: set[str] = set()
    for t in tensors:
        if not isinstance(t, list) or not t or not isinstance(t[0], str) or t[0] in names:
            raise bad(f"tensor entry {t!r}")
        if len(t) == 2:
            if t[1] not in names:
                raise bad(f"{t[0]} is tied to unknown {t[1]!r}")
            first = next(e for e in entries if e.name == t[1])
            entries.append(_Entry(t[0], first.dtype, first.shape, tied_to=t[1]))
        elif len(t) == 6:
            name, dtype, shape, bucket, offset, nbytes = t
            if dtype not in _DTYPES:
                raise bad(f"{name}: dtype {dtype!r}")
            if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
                raise bad(f"{name}: shape {shape!r}")
            if not all(_is_int(x) for x in (bucket, offset, nbytes)) or not 0 <= bucket < len(buckets):
                raise bad(f"{name}: bucket {bucket!r}")
            itemsize = _ITEMSIZE[dtype]
            if nbytes != math.prod(shape) * itemsize or offset % ALIGN or offset < 0 or offset + nbytes > buckets[bucket][0]:
                raise bad(f"{name}: offset/nbytes {offset}/{nbytes} do not fit shape {shape} or bucket {bucket}")
            entries.append(_Entry(name, dtype, tuple(shape), bucket, offset, nbytes))
        else:
            raise bad(f"tensor entry {t!r}")
        names.add(t[0])
    return h, entries


def _tensors_json(entries: list[_Entry]) -> str:
    return json.dumps([e.to_json() for e in entries], separators=(",", ":"))


def _header_bytes(version: int, incarnation: str, entries: list[_Entry], sizes: list[int], sums: list[int],
                  tensors_json: str | None = None, **extra) -> bytes:
    """The JSON header; ``tensors_json`` (``_tensors_json(entries)``) may be passed in pre-encoded,
    since it is the same for every update of a model."""
    head = {
        "schema": WIRE_SCHEMA,
        "version": version,
        "incarnation": incarnation,
        "buckets": [[s, c] for s, c in zip(sizes, sums)],
        **extra,
    }
    tj = tensors_json if tensors_json is not None else _tensors_json(entries)
    return (json.dumps(head, separators=(",", ":"), allow_nan=False)[:-1] + ',"tensors":' + tj + "}").encode()


def _unpack(buckets: list[torch.Tensor], entries: list[_Entry]) -> dict[str, torch.Tensor]:
    """Views of the tensors inside verified buckets (tied names share one tensor)."""
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        if e.tied_to is not None:
            out[e.name] = out[e.tied_to]
            continue
        raw = buckets[e.bucket][e.offset:e.offset + e.nbytes]
        out[e.name] = raw.view(_DTYPES[e.dtype]).view(e.shape)
    return out


def _verify(buckets: list[torch.Tensor], header: dict, copy_into: list[torch.Tensor] | None = None,
            threads: int = 1) -> None:
    for i, (buf, (size, want)) in enumerate(zip(buckets, header["buckets"])):
        got = _verify_copy(copy_into[i] if copy_into is not None else None, buf, threads)
        if got != want:
            raise WeightSyncChecksumError(
                f"version {header['version']}: bucket {i} ({size} bytes) checksum {got:#018x} != sender's {want:#018x}"
            )


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


def make_sender(
    backend: str,
    *,
    num_receivers: int,
    timeout_s: float = 120.0,
    addr: str = "127.0.0.1:29555",
    channel: str = "default",
    shm_dir: str = "/dev/shm",
    bucket_mb: float = 512,
    device: str | torch.device | None = None,
    connect_timeout_s: float | None = None,
    threads: int | None = None,
) -> WeightSender:
    """The learner's sender. ``num_receivers``: actors that must take (collectives) or
    acknowledge (shm; 0 = publish without waiting) every update. ``addr`` (host:port) is where
    the sender hosts the channel's TCPStore (nccl/gloo); ``channel``/``shm_dir`` name the shm
    folder. ``timeout_s`` is the deadline of one update; ``connect_timeout_s`` (default
    ``timeout_s``) the deadline for every receiver to join the group (nccl/gloo; actors may
    still be starting their engines). ``threads``: CPU threads that pack and checksum (default 1)."""
    bucket_bytes = max(ALIGN, int(bucket_mb * (1 << 20)) // ALIGN * ALIGN)
    if backend == "shm":
        return ShmSender(channel, num_receivers=num_receivers, timeout_s=timeout_s, shm_dir=shm_dir, bucket_bytes=bucket_bytes,
                         threads=threads)
    if backend in ("gloo", "nccl"):
        return PGSender(backend, addr, num_receivers=num_receivers, timeout_s=timeout_s, bucket_bytes=bucket_bytes,
                        device=device, connect_timeout_s=connect_timeout_s, threads=threads)
    raise ValueError(f"unknown weight-sync backend {backend!r}; choose one of {BACKENDS}")


def make_receiver(
    backend: str,
    *,
    rank: int,
    num_receivers: int,
    timeout_s: float = 120.0,
    addr: str = "127.0.0.1:29555",
    channel: str = "default",
    shm_dir: str = "/dev/shm",
    device: str | torch.device | None = None,
    connect_timeout_s: float | None = None,
    threads: int | None = None,
) -> WeightReceiver:
    """An actor's receiver; ``rank`` in 1..num_receivers (its rank in the sync group, or its
    lease id for shm). ``timeout_s`` is the per-update deadline once an update has started;
    ``connect_timeout_s`` (default ``timeout_s``) bounds joining the group (nccl/gloo);
    ``threads``: CPU threads that verify checksums (default 1)."""
    if not 1 <= rank <= max(num_receivers, 1):
        raise ValueError(f"rank must be in 1..{num_receivers}, got {rank}")
    if backend == "shm":
        return ShmReceiver(channel, rank=rank, timeout_s=timeout_s, shm_dir=shm_dir, threads=threads)
    if backend in ("gloo", "nccl"):
        return PGReceiver(backend, addr, rank=rank, num_receivers=num_receivers, timeout_s=timeout_s, device=device,
                          connect_timeout_s=connect_timeout_s, threads=threads)
    raise ValueError(f"unknown weight-sync backend {backend!r}; choose one of {BACKENDS}")


def sender_from_config(cfg, *, num_receivers: int, channel: str = "default", **kw) -> WeightSender:
    """``make_sender`` with the ``async.weight_sync*`` fields of a run config (or of its
    ``async_`` section); ``channel`` names the shm folder (e.g. the run's name)."""
    a = getattr(cfg, "async_", cfg)
    return make_sender(a.weight_sync, num_receivers=num_receivers, timeout_s=a.weight_sync_timeout_s,
                       addr=a.weight_sync_addr, channel=channel, bucket_mb=a.weight_sync_bucket_mb,
                       connect_timeout_s=a.weight_sync_connect_timeout_s, **kw)


def receiver_from_config(cfg, *, rank: int, num_receivers: int, channel: str = "default", **kw) -> WeightReceiver:
    """``make_receiver`` with the ``async.weight_sync*`` fields of a run config (or of its ``async_`` section)."""
    a = getattr(cfg, "async_", cfg)
    return make_receiver(a.weight_sync, rank=rank, num_receivers=num_receivers, timeout_s=a.weight_sync_timeout_s,
                         addr=a.weight_sync_addr, channel=channel, connect_timeout_s=a.weight_sync_connect_timeout_s, **kw)


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


# ------------------------------------------------------------ nccl / gloo process groups


def _split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"addr must be host:port, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _gloo_device(host: str):
    from torch._C._distributed_c10d import ProcessGroupGloo

    if host in ("127.0.0.1", "localhost", "::1"):
        return ProcessGroupGloo.create_device(hostname="127.0.0.1")
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return ProcessGroupGloo.create_device(interface=os.environ["GLOO_SOCKET_IFNAME"].split(",")[0])
    return ProcessGroupGloo.create_default_device()


class _PGChannel:
    """What the nccl and gloo sides share: the store, the group, deadlines on collectives."""

    def __init__(self, backend: str, addr: str, rank: int, world_size: int, timeout_s: float, device,
                 connect_timeout_s: float | None = None, threads: int | None = None):
        import torch.distributed as dist

        self.threads = max(1, threads or 1)
        if backend not in ("gloo", "nccl"):
            raise ValueError(backend)
        if backend == "nccl" and not torch.cuda.is_available():
            raise WeightSyncError("weight_sync=nccl needs CUDA; use gloo or shm on CPU")
        self.backend, self.rank, self.world_size, self.timeout_s = backend, rank, world_size, float(timeout_s)
        if backend == "nccl":
            self.device = torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")
        else:
            self.device = torch.device("cpu")
        self._broken: WeightSyncError | None = None
        self._pg = None
        host, port = _split_addr(addr)
        self.connect_timeout_s = float(connect_timeout_s if connect_timeout_s is not None else timeout_s)
        deadline = time.monotonic() + self.connect_timeout_s
        what = f"weight-sync {backend} rank {rank}: joining the group at {addr}"

        def build():
            store = dist.TCPStore(host, port, world_size, rank == 0, timedelta(seconds=self.connect_timeout_s),
                                  wait_for_workers=False)
            pg_store = dist.PrefixStore("ws-pg/", store)
            return store, self._make_pg(pg_store, host)

        try:
            self._store, self._pg = _run_with_deadline(build, deadline, what)
        except Exception as e:
            raise _classify(e, what) from e
        # one tiny collective now, so that communicator creation (blocking for NCCL) happens
        # here under the deadline and not inside the first update
        self._broadcast(torch.zeros(8, dtype=torch.uint8, device=self.device), deadline, "warm-up")

    def _make_pg(self, store, host: str):
        if self.backend == "gloo":
            from torch._C._distributed_c10d import ProcessGroupGloo

            opts = ProcessGroupGloo._Options()
            opts._timeout = timedelta(seconds=self.connect_timeout_s)  # connecting; each op gets its own
            opts._devices = [_gloo_device(host)]
            return ProcessGroupGloo(store, self.rank, self.world_size, opts)
        from torch._C._distributed_c10d import ProcessGroupNCCL

        opts = ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=self.timeout_s)  # NCCL's watchdog aborts an op running longer
        # On a timeout NCCL's own watchdog must abort the communicator, not kill the learner
        # (torch's default mode tears the process down): mode 2 = clean up only. The variable is
        # read when the group is built, so it is set only around this constructor.
        key, old = "TORCH_NCCL_ASYNC_ERROR_HANDLING", os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
        os.environ[key] = "2"
        try:
            with torch.cuda.device(self.device):  # without changing the caller's current device
                return ProcessGroupNCCL(store, self.rank, self.world_size, opts)
        finally:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old

    def _check_usable(self):
        if self._broken is not None:
            raise WeightSyncError(f"weight-sync {self.backend} channel is broken by an earlier error "
                                  f"({self._broken}); close it and build a new one on every peer")
        if self._pg is None:
            raise WeightSyncError("weight-sync channel is closed")

    def _abort(self):
        pg = self._pg
        if pg is not None:
            pg.abort()

    def _broadcast(self, buf: torch.Tensor, deadline: float, what: str) -> None:
        """One broadcast from rank 0 of the sync group, finished or failed by ``deadline``.
        Layers: the op's own timeout (gloo honours it; NCCL's watchdog aborts), a bounded
        ``work.wait``, and a watchdog thread that aborts the group if even that blocks."""
        from torch._C._distributed_c10d import BroadcastOptions

        self._check_usable()
        what = f"weight-sync {self.backend} rank {self.rank}: {what}"
        left = _remaining(deadline)
        if left <= 0:
            self._broken = WeightSyncTimeout(f"{what}: deadline passed before the broadcast")
            raise self._broken
        opts = BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        opts.timeout = timedelta(seconds=left)

        def op():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            work = self._pg.broadcast([buf], opts)
            ok = work.wait(timedelta(seconds=max(0.001, _remaining(deadline))))
            if ok is False:
                raise WeightSyncTimeout(f"{what}: timed out")

        try:
            _run_with_deadline(op, deadline, what, on_expire=self._abort)
        except Exception as e:
            err = _classify(e, what)
            self._broken = err
            raise err from e

    def _close_pg(self):
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                _run_with_deadline(pg.abort if self._broken else pg.shutdown, time.monotonic() + 5.0, "close",
                                   on_expire=pg.abort)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._store = None


class PGSender(_PGChannel, WeightSender):
    """nccl / gloo sender: rank 0 of the sync group; hosts its TCPStore at ``addr``."""

    def __init__(self, backend: str, addr: str, *, num_receivers: int, timeout_s: float, bucket_bytes: int, device=None,
                 connect_timeout_s: float | None = None, threads: int | None = None):
        if num_receivers < 1:
            raise ValueError("a collective weight-sync channel needs num_receivers >= 1")
        self.num_receivers = num_receivers
        self.bucket_bytes = bucket_bytes
        self.incarnation = uuid.uuid4().hex[:12]
        self._seq = 0
        self._last_version: int | None = None
        self._buffers: list[torch.Tensor] = []
        super().__init__(backend, addr, 0, num_receivers + 1, timeout_s, device, connect_timeout_s, threads)

    def _bucket(self, i: int, size: int) -> torch.Tensor:
        # buffers are reused across updates (a returned send means every receiver has them)
        while len(self._buffers) <= i:
            self._buffers.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        if self._buffers[i].numel() != size:
            self._buffers[i] = torch.empty(size, dtype=torch.uint8, device=self.device)
        return self._buffers[i]

    def send(self, state, version: int) -> SyncStats:
        self._check_usable()
        _check_version(version, self._last_version)
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        pairs = _as_pairs(state)
        entries, sizes, sources = _plan(pairs, self.bucket_bytes)
        bufs = [self._bucket(i, s) for i, s in enumerate(sizes)]
        sums = [_pack(b, entries, sources, i, self.threads) for i, b in enumerate(bufs)]
        del self._buffers[len(sizes):]
        t_pack = time.monotonic()
        seq = self._seq
        header = _header_bytes(version, self.incarnation, entries, sizes, sums, seq=seq)
        what = f"weight-sync {self.backend} send v{version}"
        try:
            self._store.set(f"ws/hdr/{seq}", header)
        except Exception as e:
            self._broken = _classify(e, what)
            raise self._broken from e
        for i, b in enumerate(bufs):
            self._broadcast(b, deadline, f"send v{version} bucket {i}/{len(bufs)} ({b.numel()} bytes)")
        t_sent = time.monotonic()
        # the collectives are done: whatever the receivers say, this update is behind everyone
        self._seq += 1
        self._last_version = version
        try:
            self._wait_acks(seq, version, deadline, what)
        finally:
            if self._broken is None:
                for k in (f"ws/hdr/{seq}", f"ws/ack/{seq}", f"ws/nack/{seq}"):
                    try:
                        self._store.delete_key(k)
                    except Exception:  # noqa: BLE001 - the key is garbage either way
                        pass
        t1 = time.monotonic()
        return SyncStats(self.backend, "send", version, len(entries), sum(sizes), len(sizes), t1 - t0,
                         wait_s=t1 - t_sent, pack_s=t_pack - t0, transfer_s=t_sent - t_pack, incarnation=self.incarnation)

    def _wait_acks(self, seq: int, version: int, deadline: float, what: str) -> None:
        pause = 0.0002
        while True:
            try:
                acks = self._store.add(f"ws/ack/{seq}", 0)
                nacks = self._store.check([f"ws/nack/{seq}"])
                msg = self._store.get(f"ws/nack/{seq}").decode(errors="replace") if nacks else ""
            except Exception as e:
                self._broken = _classify(e, what)
                raise self._broken from e
            if nacks:
                # the group itself is still consistent: the next update may go ahead
                raise WeightSyncChecksumError(f"{what}: a receiver rejected it: {msg}")
            if acks >= self.num_receivers:
                return
            if _remaining(deadline) <= 0:
                self._broken = WeightSyncTimeout(f"{what}: {acks}/{self.num_receivers} receivers acknowledged within the deadline")
                raise self._broken
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def close(self) -> None:
        self._buffers = []
        self._close_pg()


class PGReceiver(_PGChannel, WeightReceiver):
    """nccl / gloo receiver: rank ``rank`` (1..N) of the sync group."""

    def __init__(self, backend: str, addr: str, *, rank: int, num_receivers: int, timeout_s: float, device=None,
                 connect_timeout_s: float | None = None, threads: int | None = None):
        self._seq = 0
        self._last: tuple[str, int] | None = None
        super().__init__(backend, addr, rank, num_receivers + 1, timeout_s, device, connect_timeout_s, threads)

    def receive(self, timeout_s: float | None = None, copy: bool = False) -> tuple[int, dict[str, torch.Tensor]]:
        """Wait up to ``timeout_s`` (default: the channel's) for the next update to start, then
        take it under the channel's deadline. Returned tensors are freshly allocated (``copy``
        changes nothing here)."""
        self._check_usable()
        t0 = time.monotonic()
        seq = self._seq
        key = f"ws/hdr/{seq}"
        wait_until = t0 + (self.timeout_s if timeout_s is None else timeout_s)
        what = f"weight-sync {self.backend} rank {self.rank} receive #{seq}"
        pause = 0.0002
        while True:
            try:
                if self._store.check([key]):
                    raw = self._store.get(key)
                    break
            except Exception as e:
                # the store lives in the sender's process: an error here means it is gone
                self._broken = WeightSyncPeerLost(f"{what}: sender unreachable ({_classify(e, what)})")
                raise self._broken from e
            if time.monotonic() >= wait_until:
                raise WeightSyncTimeout(f"{what}: no update started within {timeout_s if timeout_s is not None else self.timeout_s:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.002)
        t_start = time.monotonic()
        deadline = t_start + self.timeout_s
        try:
            header, entries = _decode_header(raw)
        except WeightSyncChecksumError as e:
            self._broken = e  # cannot take part in the broadcasts without a header
            raise
        version, inc = header["version"], header["incarnation"]
        if header.get("seq") != seq:
            self._broken = WeightSyncError(f"{what}: header is for update #{header.get('seq')!r}")
            raise self._broken
        if self._last is not None and self._last[0] == inc and version <= self._last[1]:
            self._broken = WeightSyncError(f"{what}: version {version} is not newer than {self._last[1]}")
            raise self._broken
        bufs = [torch.empty(size, dtype=torch.uint8, device=self.device) for size, _ in header["buckets"]]
        for i, b in enumerate(bufs):
            self._broadcast(b, deadline, f"receive v{version} bucket {i}/{len(bufs)} ({b.numel()} bytes)")
        t_recv = time.monotonic()
        self._seq += 1  # this update's collectives are done whatever the checksum says
        try:
            _verify(bufs, header, threads=self.threads)
        except WeightSyncChecksumError as e:
            try:
                self._store.set(f"ws/nack/{seq}", f"rank {self.rank}: {e}".encode())
            except Exception:  # noqa: BLE001 - the checksum error is what matters
                pass
            raise
        try:
            self._store.add(f"ws/ack/{seq}", 1)
        except Exception as e:
            self._broken = _classify(e, what)
            raise self._broken from e
        self._last = (inc, version)
        t1 = time.monotonic()
        self.last_stats = SyncStats(self.backend, "receive", version, len(entries), sum(s for s, _ in header["buckets"]),
                                    len(bufs), t1 - t0, wait_s=t_start - t0, pack_s=t1 - t_recv,
                                    transfer_s=t_recv - t_start, incarnation=inc)
        return version, _unpack(bufs, entries)

    def close(self) -> None:
        self._close_pg()


# -------------------------------------------------------------------------- shared memory


# One file per version:
#   [preamble, 64 B][segment table: (stamp i64, checksum u64) per segment][header JSON, room for
#   its final length][zero pad to a page][bucket 0][bucket 1]...   (buckets start on pages)
# Buckets are cut into segments of _SEG bytes. The sender makes the file visible as
# ".w<version>.bin" (state WRITING, layout header) before it fills it, and after writing each
# segment stores the segment's checksum, then the version as its stamp, so a receiver verifies
# segment j while segment j+1 is being written. Then it writes the final header (each bucket's
# checksum, the sum of its segments'), sets state PUBLISHED and renames the file to
# "v<version>.bin": the atomic publish. A receiver returns only after it has seen that publish
# and checked every segment against the final table and header; a segment read too early is
# read again then, so no ordering between the two processes' memory writes is relied upon.
_PRE = struct.Struct("<8sqqqqqI")  # magic, version, state, header_len, payload_off, n_segments, header_crc32
_MAGIC = b"PRIMEWS2"
_PRE_SIZE = 64  # _PRE + crc32 of it + zero pad
_ST_INVALID, _ST_WRITING, _ST_PUBLISHED = 0, 1, 2
_SEG = 8 << 20
_VFILE = re.compile(r"^v(\d{20})\.bin$")
_WFILE = re.compile(r"^\.w(\d{20})\.bin$")


def _preamble(version: int, state: int, header_len: int, payload: int, nseg: int, header_crc: int) -> bytes:
    body = _PRE.pack(_MAGIC, version, state, header_len, payload, nseg, header_crc)
    return (body + struct.pack("<I", zlib.crc32(body))).ljust(_PRE_SIZE, b"\0")


def _read_preamble(fd: int) -> tuple[int, int, int, int, int, int] | None:
    """(version, state, header_len, payload_off, n_segments, header_crc), or None if torn or damaged."""
    raw = os.pread(fd, _PRE_SIZE, 0)
    if len(raw) < _PRE.size + 4:
        return None
    (crc,) = struct.unpack_from("<I", raw, _PRE.size)
    if zlib.crc32(raw[:_PRE.size]) != crc:
        return None
    magic, *rest = _PRE.unpack_from(raw)
    return tuple(rest) if magic == _MAGIC else None


def _shm_segments(sizes: list[int], seg: int) -> list[tuple[int, int, int]]:
    """(bucket, lo, hi) of every segment, in file order."""
    return [(b, lo, min(lo + seg, size)) for b, size in enumerate(sizes) for lo in range(0, size, seg)]


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int, pidns: str) -> bool | None:
    """True/False if the process can be checked from here, None if it lives in another pid namespace."""
    if not isinstance(pid, int) or pid <= 0 or pidns != _pidns():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(obj).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode())
        return obj if isinstance(obj, dict) else None
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None


def _channel_dir(shm_dir: str, channel: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", channel):
        raise ValueError(f"shm channel name {channel!r}: use letters, digits, '_', '.', '-'")
    return Path(shm_dir) / f"prime-ws-{channel}"



class ShmSender(WeightSender):
    """Same-host sender: publishes each version as one file in ``<shm_dir>/prime-ws-<channel>``."""

    backend = "shm"

    def __init__(self, channel: str = "default", *, num_receivers: int = 0, timeout_s: float = 120.0,
                 shm_dir: str = "/dev/shm", bucket_bytes: int = 512 << 20, spare_files: int = 1, threads: int | None = None):
        self.dir = _channel_dir(shm_dir, channel)
        self.num_receivers, self.timeout_s, self.bucket_bytes = num_receivers, float(timeout_s), bucket_bytes
        self.spare_files = spare_files
        self.threads = max(1, threads or 1)
        self.incarnation = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._last_version: int | None = None
        self._maps: dict[int, tuple[mmap.mmap, torch.Tensor]] = {}  # inode -> writable shared mapping
        self._tensors_json: tuple[tuple, str] = ((), "")
        self._tmp_n = 0
        self._closed = False
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # a new incarnation owns the channel: versions of an earlier sender are withdrawn
        for p in self.dir.iterdir():
            if _VFILE.match(p.name) or _WFILE.match(p.name) or p.name.startswith(".tmp-") or p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
            elif p.name.startswith("lease-"):
                lease = _read_json(p) or {}
                if lease.get("closed") or _pid_alive(lease.get("pid"), lease.get("pidns", "")) is False:
                    p.unlink(missing_ok=True)
        _write_json_atomic(self.dir / "sender.json", {"pid": os.getpid(), "pidns": _pidns(), "incarnation": self.incarnation})

    # -- files
    def _published(self) -> list[tuple[int, Path]]:
        out = []
        for name in os.listdir(self.dir):
            m = _VFILE.match(name)
            if m:
                out.append((int(m.group(1)), self.dir / name))
        return sorted(out)

    def _leases(self) -> list[dict]:
        out = []
        for name in os.listdir(self.dir):
            if name.startswith("lease-") and name.endswith(".json"):
                lease = _read_json(self.dir / name)
                if lease is not None:
                    out.append(lease)
        return out

    def _held_versions(self) -> set[int]:
        held = set()
        for lease in self._leases():
            if lease.get("incarnation") == self.incarnation and _pid_alive(lease.get("pid"), lease.get("pidns", "")) is not False:
                held.add(lease.get("holding"))
        return held

    def _acquire(self, size: int) -> tuple[Path, torch.Tensor, mmap.mmap]:
        """A file of ``size`` bytes under a private temporary name, mapped writable and marked
        invalid: a retired version nobody holds (its pages are reused), or a new one."""
        self._tmp_n += 1
        tmp = self.dir / f".tmp-{os.getpid()}-{self._tmp_n}.bin"
        for version, path in self._published()[:-1]:  # never the newest
            try:
                os.rename(path, tmp)  # unpublished first: nobody can open it by name any more
            except FileNotFoundError:
                continue
            # a receiver writes its lease *before* it opens a version by name, so any reader
            # that got this file shows up now
            if version in self._held_versions():
                self._forget(tmp)
                tmp.unlink(missing_ok=True)  # the reader keeps its pages until it lets go
                continue
            break
        else:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        fd = os.open(tmp, os.O_RDWR)
        try:
            return tmp, *self._prepare(fd, size)
        except BaseException:
            self._forget(tmp)
            tmp.unlink(missing_ok=True)  # e.g. no room left in /dev/shm
            raise
        finally:
            os.close(fd)

    def _prepare(self, fd: int, size: int) -> tuple[torch.Tensor, mmap.mmap]:
        """Mark the file invalid, size and allocate it, and map it (cached per inode)."""
        os.pwrite(fd, _preamble(-1, _ST_INVALID, 0, 0, 0, 0), 0)
        st = os.fstat(fd)
        if st.st_size != size or st.st_blocks * 512 < size:
            self._maps.pop(st.st_ino, None)
            os.ftruncate(fd, size)
            # every page allocated now: a receiver's private mapping must never map a hole
            os.posix_fallocate(fd, 0, size)
        cached = self._maps.get(st.st_ino)
        if cached is None or len(cached[0]) != size:
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            cached = (mm, torch.frombuffer(mm, dtype=torch.uint8))
            self._maps[st.st_ino] = cached
        return cached[1], cached[0]

    def _forget(self, path: Path) -> None:
        try:
            self._maps.pop(os.stat(path).st_ino, None)
        except FileNotFoundError:
            pass

    def _cleanup(self) -> None:
        # keep the newest version and the `spare_files` newest retired ones (recycled once no
        # receiver holds them); delete older ones -- a reader still holding one keeps its pages
        retired = self._published()[:-1]
        for _, p in retired[:max(0, len(retired) - self.spare_files)]:
            self._forget(p)
            p.unlink(missing_ok=True)

    # -- interface
    def send(self, state, version: int) -> SyncStats:
        """Publish ``version``; then wait (up to ``timeout_s``) until ``num_receivers`` receivers
        acknowledged it. A receiver found dead or closed meanwhile is a WeightSyncPeerLost."""
        if self._closed:
            raise WeightSyncError("weight-sync shm sender is closed")
        _check_version(version, self._last_version)
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        pairs = _as_pairs(state)
        entries, sizes, sources = _plan(pairs, self.bucket_bytes)
        starts, pos = [], 0
        for sz in sizes:
            starts.append(pos)
            pos += _align(sz, PAGE)
        segs = _shm_segments(sizes, _SEG)
        key = tuple(entries)
        if self._tensors_json[0] != key:
            self._tensors_json = (key, _tensors_json(entries))
        extra = dict(starts=starts, seg=_SEG, tensors_json=self._tensors_json[1])
        # room for the final header: checksums written at full width are its longest form
        room = len(_header_bytes(version, self.incarnation, entries, sizes, [_MASK64] * len(sizes), final=True, **extra))
        header_off = _PRE_SIZE + 16 * len(segs)
        payload = _align(header_off + room, PAGE)
        tmp, mem, mm = self._acquire(payload + pos)
        wpath = self.dir / f".w{version:020d}.bin"
        final_path = self.dir / f"v{version:020d}.bin"
        table = None
        try:
            table = np.frombuffer(mm, dtype=np.int64, count=2 * len(segs), offset=_PRE_SIZE)
            table[0::2] = -1  # stamps: nothing written yet
            table[1::2] = 0
            layout = _header_bytes(version, self.incarnation, entries, sizes, [0] * len(sizes), final=False, **extra)
            mm[header_off:header_off + len(layout)] = layout
            mm[0:_PRE_SIZE] = _preamble(version, _ST_WRITING, len(layout), payload, len(segs), zlib.crc32(layout))
            os.rename(tmp, wpath)  # visible, in progress
            packers = [_Packer(mem[payload + st: payload + st + sz], entries, sources, i)
                       for i, (st, sz) in enumerate(zip(starts, sizes))]
            sums = [0] * len(sizes)

            def do(j: int) -> int:
                b, lo, hi = segs[j]
                c = packers[b].fill(lo, hi)
                table[2 * j + 1] = _signed64(c)  # checksum first,
                table[2 * j] = version  # then the stamp that says it is there
                return c

            results = map(do, range(len(segs))) if self.threads == 1 else _pool(self.threads).map(do, range(len(segs)))
            for (b, _, _), c in zip(segs, results):
                sums[b] = (sums[b] + c) & _MASK64
            header = _header_bytes(version, self.incarnation, entries, sizes, sums, final=True, **extra)
            assert len(header) <= room
            mm[header_off:header_off + len(header)] = header
            mm[0:_PRE_SIZE] = _preamble(version, _ST_PUBLISHED, len(header), payload, len(segs), zlib.crc32(header))
            t_pack = time.monotonic()
            os.rename(wpath, final_path)  # the atomic publish
        except BaseException:
            for p in (tmp, wpath):
                self._forget(p)
                p.unlink(missing_ok=True)
            raise
        finally:
            table = None  # noqa: F841 - drop the export of the mapping
        self._last_version = version
        self._cleanup()
        t_pub = time.monotonic()
        self._wait_acks(version, deadline)
        t1 = time.monotonic()
        return SyncStats("shm", "send", version, len(entries), sum(sizes), len(sizes), t1 - t0,
                         wait_s=t1 - t_pub, pack_s=t_pack - t0, transfer_s=t_pub - t_pack, incarnation=self.incarnation)

    def _wait_acks(self, version: int, deadline: float) -> None:
        if self.num_receivers <= 0:
            return
        pause = 0.0002
        while True:
            acked, gone = 0, []
            for lease in self._leases():
                ours = lease.get("incarnation") == self.incarnation
                if not ours and lease.get("acked", -1) >= 0:
                    continue  # a receiver of an earlier sender that has not looked at us yet
                if ours and lease.get("acked", -1) >= version:
                    acked += 1
                elif ours and lease.get("error") and lease.get("error_version") == version:
                    raise WeightSyncChecksumError(f"weight-sync shm v{version}: rank {lease.get('rank')} rejected it: {lease['error']}")
                elif lease.get("closed") or _pid_alive(lease.get("pid"), lease.get("pidns", "")) is False:
                    gone.append(f"rank {lease.get('rank')} (pid {lease.get('pid')}, {'closed' if lease.get('closed') else 'exited'})")
            if acked >= self.num_receivers:
                return
            if gone:
                raise WeightSyncPeerLost(f"weight-sync shm v{version}: receiver {', '.join(gone)} is gone before acknowledging")
            if _remaining(deadline) <= 0:
                raise WeightSyncTimeout(f"weight-sync shm v{version}: {acked}/{self.num_receivers} receivers acknowledged "
                                        f"within {self.timeout_s:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def close(self, remove: bool = True) -> None:
        """Drop the mappings; ``remove``: delete the channel's files (readers keep what they
        mapped) and its folder once no live receiver's lease is left in it."""
        if self._closed:
            return
        self._closed = True
        self._maps.clear()
        if not remove:
            return
        for p in self.dir.glob("*"):
            if _VFILE.match(p.name) or _WFILE.match(p.name) or p.name.startswith(".tmp-") or p.name == "sender.json":
                p.unlink(missing_ok=True)
            elif p.name.startswith("lease-"):
                lease = _read_json(p) or {}
                if lease.get("closed") or _pid_alive(lease.get("pid"), lease.get("pidns", "")) is False:
                    p.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass  # a receiver is still registered there


class _Abandoned(Exception):
    """The version being read went away (recycled, or its write was abandoned): look again."""


class ShmReceiver(WeightReceiver):
    """Same-host receiver: maps the newest version and verifies it in place, segment by
    segment while the sender is still writing it."""

    backend = "shm"
    _MAX_MAPS = 4

    def __init__(self, channel: str = "default", *, rank: int = 1, timeout_s: float = 120.0, shm_dir: str = "/dev/shm",
                 threads: int | None = None):
        self.dir = _channel_dir(shm_dir, channel)
        self.rank, self.timeout_s = rank, float(timeout_s)
        self.threads = max(1, threads or 1)
        self._incarnation: str | None = None
        self._last_version = -1
        self._rejected = -1  # a version that failed its checksum is not taken again
        self._seen_sender = False
        self._maps: dict[tuple[int, int], tuple[int, mmap.mmap, torch.Tensor]] = {}
        self._views: dict[tuple, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self._lease_path = self.dir / f"lease-{rank}.json"
        self._lease = {"rank": rank, "pid": os.getpid(), "pidns": _pidns(), "incarnation": None, "holding": -1, "acked": -1}
        self._closed = False
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._write_lease()

    def _write_lease(self, **kw) -> None:
        self._lease.update(kw)
        _write_json_atomic(self._lease_path, self._lease)

    def _mapping(self, fd: int, st: os.stat_result) -> torch.Tensor:
        key = (st.st_dev, st.st_ino)
        cached = self._maps.get(key)
        if cached is not None and cached[0] == st.st_size:
            self._maps[key] = self._maps.pop(key)  # most recent last
            return cached[2]
        # private + writable: the tensors handed out are writable without touching the file
        # (a write copies that page), and unwritten pages keep showing the file's content
        mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        t = torch.frombuffer(mm, dtype=torch.uint8)
        self._maps[key] = (st.st_size, mm, t)
        while len(self._maps) > self._MAX_MAPS:
            self._maps.pop(next(iter(self._maps)))  # unmapped when the last tensor using it goes
        return t

    def _sender_state(self) -> tuple[str | None, bool | None]:
        info = _read_json(self.dir / "sender.json")
        if info is None:
            return None, (False if self._seen_sender else None)
        self._seen_sender = True
        return info.get("incarnation"), _pid_alive(info.get("pid"), info.get("pidns", ""))

    def _scan(self) -> tuple[int, int]:
        """(newest published version, newest version being written), -1 for none."""
        pub = wip = -1
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return -1, -1
        for name in names:
            m = _VFILE.match(name)
            if m:
                pub = max(pub, int(m.group(1)))
                continue
            m = _WFILE.match(name)
            if m:
                wip = max(wip, int(m.group(1)))
        return pub, wip

    def receive(self, timeout_s: float | None = None, copy: bool = False) -> tuple[int, dict[str, torch.Tensor]]:
        """The newest version newer than the last one returned, verified. Waits up to
        ``timeout_s`` (default: the channel's) for one to appear; once it has, reading it has the
        channel's deadline. Raises WeightSyncPeerLost as soon as the sender is seen to be gone.
        Without ``copy`` the tensors are views of the shared file, valid until the next
        ``receive``/``close``."""
        if self._closed:
            raise WeightSyncError("weight-sync shm receiver is closed")
        t0 = time.monotonic()
        wait_until = t0 + (self.timeout_s if timeout_s is None else timeout_s)
        what = f"weight-sync shm rank {self.rank}"
        pause = 0.0001
        while True:
            now = time.monotonic()
            inc, alive = self._sender_state()
            if inc is not None and inc != self._incarnation:
                self._incarnation, self._last_version, self._rejected = inc, -1, -1  # a new sender: versions restart
            pub, wip = self._scan()
            if os.environ.get("WS_NOSTREAM"): wip = -1  # TEMP experiment
            newest = max(pub, wip)
            if newest > max(self._last_version, self._rejected):
                try:
                    return self._take(newest, newest == pub, t0, copy, what)
                except _Abandoned:
                    pause = 0.0001
            elif alive is False:
                raise WeightSyncPeerLost(f"{what}: the sender is gone (no new version after v{self._last_version})")
            if now >= wait_until:
                raise WeightSyncTimeout(f"{what}: no version newer than v{self._last_version} within "
                                        f"{timeout_s if timeout_s is not None else self.timeout_s:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def _open(self, version: int, published: bool) -> int:
        names = [f"v{version:020d}.bin", f".w{version:020d}.bin"]
        for name in names if published else names[::-1]:
            try:
                return os.open(self.dir / name, os.O_RDONLY)
            except FileNotFoundError:
                continue
        raise _Abandoned

    def _preamble(self, fd: int, what: str) -> tuple[int, int, int, int, int, int]:
        for _ in range(50):  # a torn read (the sender rewriting it) passes; a damaged one does not
            pre = _read_preamble(fd)
            if pre is not None:
                return pre
            time.sleep(0.001)
        raise WeightSyncChecksumError(f"{what}: damaged file preamble")

    def _check_alive(self, fd: int, what: str) -> None:
        if os.fstat(fd).st_nlink == 0:
            raise _Abandoned  # deleted: abandoned by its writer, or recycled after we got too slow
        _, alive = self._sender_state()
        if alive is False:
            raise WeightSyncPeerLost(f"{what}: the sender died while writing")

    def _wait(self, fd: int, ready: Callable[[], Any], deadline: float, what: str) -> Any:
        pause, next_check = 0.00005, time.monotonic() + 0.05
        while True:
            got = ready()
            if got is not None:
                return got
            now = time.monotonic()
            if now >= next_check:
                self._check_alive(fd, what)
                next_check = now + 0.05
            if now >= deadline:
                raise WeightSyncTimeout(f"{what}: not complete within the deadline ({self.timeout_s:g} s)")
            time.sleep(pause)
            pause = min(pause * 2, 0.001)

    def _take(self, version: int, published: bool, t0: float, copy: bool, what: str):
        t_start = time.monotonic()
        what = f"{what} v{version}"
        # lease first, then open by name: the sender renames a file away before it reads leases
        self._write_lease(incarnation=self._incarnation, holding=version)
        fd = self._open(version, published)
        try:
            deadline = time.monotonic() + self.timeout_s
            st = os.fstat(fd)
            pre = self._preamble(fd, what)
            p_version, state, hlen, payload, nseg, hcrc = pre
            if p_version != version or state not in (_ST_WRITING, _ST_PUBLISHED):
                raise _Abandoned  # being recycled
            table_off, header_off = _PRE_SIZE, _PRE_SIZE + 16 * nseg
            if hlen > _MAX_HEADER or nseg < 0 or payload < header_off + hlen or payload > st.st_size:
                raise WeightSyncChecksumError(f"{what}: bad preamble")
            raw = os.pread(fd, hlen, header_off)
            if zlib.crc32(raw) != hcrc:
                if self._preamble(fd, what) != pre:
                    raise _Abandoned  # changed under us
                raise WeightSyncChecksumError(f"{what}: header checksum mismatch")
            header, entries = _decode_header(raw)
            if header["incarnation"] != self._incarnation:
                raise _Abandoned  # a new sender took over since we looked
            sizes = [size for size, _ in header["buckets"]]
            starts, seg = header.get("starts"), header.get("seg")
            if (header["version"] != version or not isinstance(starts, list) or len(starts) != len(sizes)
                    or not isinstance(seg, int) or seg <= 0 or seg % 8):
                raise WeightSyncChecksumError(f"{what}: header does not match its file")
            for s_, size in zip(starts, sizes):
                if not isinstance(s_, int) or s_ < 0 or payload + s_ + size > st.st_size:
                    raise WeightSyncChecksumError(f"{what}: bucket outside the file")
            segs = _shm_segments(sizes, seg)
            if len(segs) != nseg:
                raise WeightSyncChecksumError(f"{what}: {nseg} segments in the preamble, {len(segs)} in the header")
            mem = self._mapping(fd, st)
            t_map = time.monotonic()
            views = [mem[payload + s_: payload + s_ + size] for s_, size in zip(starts, sizes)]
            dst = [torch.empty(size, dtype=torch.uint8) for size in sizes] if copy else None
            kernels = _load_fused() if sum(sizes) >= _FUSED_MIN_BYTES else None

            def stamped(j: int):
                stamp = struct.unpack("<q", os.pread(fd, 8, table_off + 16 * j))[0]
                if stamp != version:
                    return None
                return struct.unpack("<Q", os.pread(fd, 8, table_off + 16 * j + 8))[0]

            # 1. follow the writer: verify each segment as soon as it is stamped
            computed = []
            for j, (b, lo, hi) in enumerate(segs):
                want = stamped(j)
                if want is None:
                    want = self._wait(fd, lambda j=j: stamped(j), deadline, what)
                computed.append(self._sum(views[b], dst[b] if dst else None, lo, hi, kernels))
            # 2. the publish: state PUBLISHED, final header, and the final name on this very file
            pre2 = pre if pre[1] == _ST_PUBLISHED else self._wait(
                fd, lambda: (lambda p: p if p is not None and p[1] == _ST_PUBLISHED else None)(_read_preamble(fd)),
                deadline, what)
            if pre2[0] != version:
                raise _Abandoned
            raw = os.pread(fd, pre2[2], header_off)
            if zlib.crc32(raw) != pre2[5]:
                raise WeightSyncChecksumError(f"{what}: final header checksum mismatch")
            try:
                final = json.loads(raw.decode())
            except (UnicodeDecodeError, json.JSONDecodeError):
                final = None
            # the layout part was validated above; the final header must repeat it exactly
            if (not isinstance(final, dict) or final.get("final") is not True
                    or any(final.get(k) != header.get(k) for k in ("schema", "version", "tensors", "starts", "seg", "incarnation"))
                    or not isinstance(final.get("buckets"), list) or len(final["buckets"]) != len(sizes)
                    or any(not (isinstance(b, list) and len(b) == 2 and b[0] == size and _is_int(b[1]) and 0 <= b[1] <= _MASK64)
                           for b, size in zip(final["buckets"], sizes))):
                raise WeightSyncChecksumError(f"{what}: final header does not match the layout")
            table = np.frombuffer(os.pread(fd, 16 * nseg, table_off), dtype=np.uint64).reshape(-1, 2) if nseg else np.zeros((0, 2), np.uint64)
            if nseg and bool((table[:, 0] != version).any()):
                raise WeightSyncChecksumError(f"{what}: a segment is not stamped in a published file")
            bucket_sums = [0] * len(sizes)
            for (b, _, _), c in zip(segs, table[:, 1].tolist()):
                bucket_sums[b] = (bucket_sums[b] + c) & _MASK64
            for i, (got, (_, want)) in enumerate(zip(bucket_sums, final["buckets"])):
                if got != want:
                    raise WeightSyncChecksumError(f"{what}: segment table does not add up to bucket {i}'s checksum")
            # 3. any segment that disagrees is read again now that the file is final (a read that
            #    raced the writer passes then; damage does not), once through a fresh mapping
            bad = [j for j, c in enumerate(computed) if c != int(table[j, 1])]
            if bad:
                self._maps.pop((st.st_dev, st.st_ino), None)
                mem = self._mapping(fd, st)
                views = [mem[payload + s_: payload + s_ + size] for s_, size in zip(starts, sizes)]
                for j in bad:
                    b, lo, hi = segs[j]
                    c = self._sum(views[b], dst[b] if dst else None, lo, hi, kernels)
                    if c != int(table[j, 1]):
                        err = WeightSyncChecksumError(
                            f"{what}: bucket {b} bytes [{lo}, {hi}) checksum {c:#018x} != sender's {int(table[j, 1]):#018x}")
                        self._write_lease(error=str(err), error_version=version)
                        self._rejected = version
                        raise err
            if _read_preamble(fd) != pre2:
                raise _Abandoned  # rewritten while we read it (we were too slow)
        finally:
            os.close(fd)
        self._last_version = version
        self._write_lease(acked=version, error=None, error_version=None)
        t1 = time.monotonic()
        if copy:
            tensors = _unpack(dst, entries)
        else:
            # the same file with the same layout gives the same views: reuse them (they show the
            # file's current bytes) instead of building ~2 views per tensor again
            key = (st.st_dev, st.st_ino, payload, tuple(starts), tuple(entries))
            cached = self._views.get(key)
            if cached is None or cached[0] is not mem:
                cached = (mem, _unpack(views, entries))
                self._views[key] = cached
                while len(self._views) > self._MAX_MAPS:
                    self._views.pop(next(iter(self._views)))
            tensors = dict(cached[1])
        self.last_stats = SyncStats("shm", "receive", version, len(entries), sum(sizes), len(sizes), t1 - t0,
                                    wait_s=t_start - t0, pack_s=t1 - t_map, transfer_s=t_map - t_start,
                                    incarnation=self._incarnation or "")
        return version, tensors

    def _sum(self, view: torch.Tensor, dst: torch.Tensor | None, lo: int, hi: int, kernels: _Kernels | None) -> int:
        s = view.numpy()
        d = dst.numpy() if dst is not None else None
        if self.threads == 1 or hi - lo <= _CHUNK:
            return _sum_range(s, d, lo, hi, kernels)
        return _run_segments(lambda a, b: _sum_range(s, d, lo + a, lo + b, kernels), hi - lo, self.threads)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._maps.clear()
        self._views.clear()
        # the lease stays (marked closed): a sender may not have seen this receiver's last ack yet
        try:
            self._write_lease(closed=True)
        except OSError:
            pass
