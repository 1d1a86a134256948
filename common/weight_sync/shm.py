"""The shared-memory weight-sync backend (one host): one file per version in
``<shm_dir>/prime-ws-<channel>/``, filled under a temporary name and renamed to
``v<version>.bin`` when complete (the atomic publish); receivers verify 8 MiB segments as soon
as the sender has stamped them, so verifying overlaps writing, but return only after the
publish. A receiver takes the newest version (it may skip some), verifies the mapped file in
place and returns views of it, valid until its next ``receive``/``close`` (``copy=True``:
private tensors). Old files are recycled unless a receiver's lease still holds them; older
ones are deleted. ``send`` returns once ``num_receivers`` receivers have acknowledged the
update (0: once published).

Not covered: other hosts (``collective``), loading into an engine.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.weight_sync.base import (SyncStats, WeightReceiver, WeightSender, WeightSyncChecksumError,
                                     WeightSyncError, WeightSyncPeerLost, WeightSyncTimeout, _check_version,
                                     _remaining)
from common.weight_sync.kernels import _FUSED_MIN_BYTES, _Kernels, _load_fused, _Packer, _pool, _run_segments, _sum_range
from common.weight_sync.wire import (_CHUNK, _MASK64, _MAX_HEADER, PAGE, _align, _as_pairs, _decode_header,
                                     _header_bytes, _is_int, _plan, _tensors_json, _unpack)


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
