"""Copying tensors into packed buckets and checksumming them, fast: threads over segments
of a bucket (numpy and torch release the GIL), and on CPU a numba kernel that copies with
streaming stores and sums in the same pass. Also the receiver's verification.

Not covered: the layout and header (``wire``), transfers (``collective``, ``shm``).
"""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from common.weight_sync.base import WeightSyncChecksumError
from common.weight_sync.wire import _CHUNK, _MASK64, _align, _Entry, checksum64

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


def _verify(buckets: list[torch.Tensor], header: dict, copy_into: list[torch.Tensor] | None = None,
            threads: int = 1) -> None:
    for i, (buf, (size, want)) in enumerate(zip(buckets, header["buckets"])):
        got = _verify_copy(copy_into[i] if copy_into is not None else None, buf, threads)
        if got != want:
            raise WeightSyncChecksumError(
                f"version {header['version']}: bucket {i} ({size} bytes) checksum {got:#018x} != sender's {want:#018x}"
            )

