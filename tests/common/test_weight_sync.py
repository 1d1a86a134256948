"""Weight sync (common/weight_sync/): bit-exact delivery of mixed dtypes, odd shapes and a
tied tensor between real processes over shm; versions in order; a flipped byte caught
by the checksum; a receiver or sender killed with SIGKILL turns into an error within the
deadline on the other side; plus the shared packing/header/checksum code in-process."""

import json
import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from common.weight_sync import kernels, wire
from common.weight_sync import shm as wshm
from common.weight_sync import (
    WeightSyncChecksumError,
    WeightSyncError,
    WeightSyncPeerLost,
    WeightSyncTimeout,
    make_receiver,
    make_sender,
)

DEADLINE = 3.0  # per-update deadline in the failure tests [s]
MARGIN = 3.0  # slack on a busy shared 2-core box [s]
START = 120.0  # a spawned child imports torch: generous on a loaded machine [s]
CTX = mp.get_context("spawn")


def model_state(version: int, big: bool = False) -> dict[str, torch.Tensor]:
    """Small model-like state, different per version: fp32, bf16, int64, bool, odd shapes, a
    scalar, an empty tensor, a non-contiguous view and a tied (shared) tensor."""
    g = torch.Generator().manual_seed(1000 + version)
    emb = torch.randn(37, 11, generator=g)
    return {
        "embed.weight": emb,
        "layer.0.attn.bf16": torch.randn(3, 5, 7, generator=g).to(torch.bfloat16),
        "layer.0.odd_bf16": torch.randn(13, generator=g).to(torch.bfloat16),  # 26 bytes: not a multiple of 8
        "layer.0.ids": torch.randint(-(2**62), 2**62, (5, 3), generator=g, dtype=torch.int64),
        "layer.0.big": torch.randn(300, 257 if big else 3, generator=g),
        "mask": torch.rand(9, generator=g) > 0.5,
        "scale": torch.tensor(1.5 + version),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(6, 4, generator=g).t(),
        "lm_head.weight": emb,  # tied to embed.weight
    }


def check_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        # bit for bit: compare the raw bytes
        assert torch.equal(g.contiguous().view(-1).view(torch.uint8) if g.numel() else g,
                           w.contiguous().view(-1).view(torch.uint8) if w.numel() else w), name
    assert got["lm_head.weight"] is got["embed.weight"]  # the tie survives


def to_device(state: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """``state`` moved to ``device``, keeping tied tensors tied."""
    moved: dict[int, torch.Tensor] = {}
    return {k: moved[id(t)] if id(t) in moved else moved.setdefault(id(t), t.to(device)) for k, t in state.items()}


def expect(q, kind, timeout=START):
    msg = q.get(timeout=timeout)
    assert msg[0] == kind, msg
    return msg[1:]


def kill_later(proc, after_s):
    timer = threading.Timer(after_s, lambda: os.kill(proc.pid, signal.SIGKILL))
    timer.start()
    return timer


# ----------------------------------------------------------------- children (spawned)


def slow_down_sending(backend):
    """Make every later shm update crawl (so a test can kill the sender in the middle of one):
    sleep before each segment it writes."""
    assert backend == "shm"
    wshm._SEG = 4096  # many small segments
    fill = kernels._Packer.fill
    kernels._Packer.fill = lambda self, lo, hi: (time.sleep(0.2), fill(self, lo, hi))[1]


def child_sender(backend, kw, versions, q, cmds):
    """Sends each version when told to ("go", or "slow": crawling, to be killed in the middle);
    reports ("sent", v) or ("send_error", v, class name)."""
    torch.set_num_threads(1)
    try:
        s = make_sender(backend, num_receivers=1, **kw)
        q.put(("ready",))
        for v in versions:
            cmd = cmds.get(timeout=START)
            if cmd == "slow":
                slow_down_sending(backend)
                q.put(("slow", v))
            try:
                s.send(model_state(v, big=cmd == "slow"), v)
                q.put(("sent", v))
            except WeightSyncError as e:
                q.put(("send_error", v, type(e).__name__))
        q.put(("idle",))
        time.sleep(600)  # until killed
    except BaseException as e:  # noqa: BLE001
        q.put(("crash", repr(e)))


def child_receiver(backend, kw, n, q):
    """Receives ``n`` updates, checks them, then idles without receiving (until killed)."""
    torch.set_num_threads(1)
    try:
        r = make_receiver(backend, rank=1, num_receivers=1, **kw)
        q.put(("ready",))
        for _ in range(n):
            v, tensors = r.receive(timeout_s=START)
            try:
                check_equal(tensors, model_state(v))
                q.put(("received", v, True))
            except AssertionError as e:
                q.put(("received", v, repr(e)))
        time.sleep(600)
    except BaseException as e:  # noqa: BLE001
        q.put(("crash", repr(e)))


# --------------------------------------------------------------- in-process: shared code


def test_pack_unpack_roundtrip_bit_exact_across_buckets():
    state = model_state(3, big=True)
    pairs = wire._as_pairs(state)
    entries, sizes, sources = wire._plan(pairs, bucket_bytes=4096)  # forces several buckets
    assert len(sizes) > 2 and all(s % wire.ALIGN == 0 for s in sizes)
    assert [e.tied_to for e in entries if e.name == "lm_head.weight"] == ["embed.weight"]
    bufs = [torch.full((s,), 0xAB, dtype=torch.uint8) for s in sizes]  # garbage padding must be zeroed
    sums = [kernels._pack(b, entries, sources, i) for i, b in enumerate(bufs)]
    assert sums == [wire.checksum64(b) for b in bufs]
    header = json.loads(wire._header_bytes(3, "inc", entries, sizes, sums))
    h, decoded = wire._decode_header(json.dumps(header).encode())
    assert decoded == entries
    kernels._verify(bufs, h)
    check_equal(wire._unpack(bufs, decoded), state)


def test_fused_copy_checksum_kernel_matches_numpy():
    fused_kernels = kernels._load_fused()
    if fused_kernels is None:
        pytest.skip("numba kernel unavailable; the numpy path is used")
    state = model_state(5, big=True)
    entries, sizes, sources = wire._plan(wire._as_pairs(state), bucket_bytes=1 << 30)
    (size,) = sizes
    a = torch.empty(size, dtype=torch.uint8)
    b = torch.empty(size, dtype=torch.uint8)
    fused = kernels._Packer(a, entries, sources, 0, fused=True)
    plain = kernels._Packer(b, entries, sources, 0, fused=False)
    cuts = sorted({0, size, *(int(x) * 8 for x in np.random.default_rng(0).integers(0, size // 8, 9))})
    got = [fused.fill(lo, hi) for lo, hi in zip(cuts, cuts[1:])]
    want = [plain.fill(lo, hi) for lo, hi in zip(cuts, cuts[1:])]
    assert got == want and torch.equal(a, b)
    assert sum(got) & wire._MASK64 == wire.checksum64(a)
    assert int(fused_kernels.sum_words(a.numpy().view(np.uint64))) == wire.checksum64(a)


def test_checksum_catches_a_flipped_byte_anywhere():
    state = model_state(4)
    entries, sizes, sources = wire._plan(wire._as_pairs(state), bucket_bytes=1 << 20)
    bufs = [torch.empty(s, dtype=torch.uint8) for s in sizes]
    sums = [kernels._pack(b, entries, sources, i) for i, b in enumerate(bufs)]
    h, _ = wire._decode_header(wire._header_bytes(4, "inc", entries, sizes, sums))
    for pos in (0, 1, 7, 8, sizes[0] // 2, sizes[0] - 1):
        bufs[0][pos] ^= 0x10
        with pytest.raises(WeightSyncChecksumError, match="checksum"):
            kernels._verify(bufs, h)
        bufs[0][pos] ^= 0x10
    kernels._verify(bufs, h)


@pytest.mark.parametrize("mutate, match", [
    (lambda h: h.update(schema="pickle"), "schema"),
    (lambda h: h.update(version=True), "version"),
    (lambda h: h["tensors"][0].__setitem__(1, "object"), "dtype"),
    (lambda h: h["tensors"][0].__setitem__(4, 1 << 40), "offset"),
    (lambda h: h["tensors"].append(["ghost", "nowhere"]), "tied"),
    (lambda h: h["buckets"][0].__setitem__(1, -1), "bucket"),
])
def test_header_is_validated_json(mutate, match):
    entries, sizes, sources = wire._plan(wire._as_pairs(model_state(1)), bucket_bytes=1 << 20)
    h = json.loads(wire._header_bytes(1, "inc", entries, sizes, [0] * len(sizes)))
    mutate(h)
    with pytest.raises(WeightSyncChecksumError, match=match):
        wire._decode_header(json.dumps(h).encode())
    with pytest.raises(WeightSyncChecksumError, match="not JSON"):
        wire._decode_header(b"\x80\x04\x95pickled")


def test_shm_in_process_versions_recycling_and_copy(shm_channel):
    shm_dir, channel = shm_channel
    s = make_sender("shm", num_receivers=0, channel=channel, shm_dir=shm_dir, timeout_s=10)
    r = make_receiver("shm", rank=1, num_receivers=1, channel=channel, shm_dir=shm_dir, timeout_s=10)
    try:
        with pytest.raises(WeightSyncTimeout):
            r.receive(timeout_s=0.2)  # nothing published yet
        inodes = set()
        for v in (2, 5, 6, 9, 12, 13):
            s.send(model_state(v), v)
            got_v, tensors = r.receive(timeout_s=10, copy=(v == 9))
            assert got_v == v
            check_equal(tensors, model_state(v))
            inodes.add(os.stat(s.dir / f"v{v:020d}.bin").st_ino)
            names = sorted(os.listdir(s.dir))
            assert sum(n.endswith(".bin") for n in names) <= 2, names  # newest + one spare
            assert not any(n.startswith((".tmp", ".w")) for n in names), names
        assert len(inodes) <= 3  # files are recycled, not created per version
        with pytest.raises(ValueError, match="not newer"):
            s.send(model_state(13), 13)
        s.send(model_state(20), 20)
        s.send(model_state(21), 21)  # the receiver skips to the newest
        assert r.receive(timeout_s=10)[0] == 21
    finally:
        r.close()
        s.close()


def test_shm_held_version_is_never_overwritten(shm_channel):
    shm_dir, channel = shm_channel
    s = make_sender("shm", num_receivers=0, channel=channel, shm_dir=shm_dir, timeout_s=10)
    slow = make_receiver("shm", rank=1, num_receivers=2, channel=channel, shm_dir=shm_dir, timeout_s=10)
    try:
        s.send(model_state(1), 1)
        _, held = slow.receive(timeout_s=10)  # views of v1's file, held by the lease
        for v in range(2, 7):
            s.send(model_state(v), v)  # the sender recycles other files, never the held one
        check_equal(held, model_state(1))
        assert slow.receive(timeout_s=10)[0] == 6
    finally:
        slow.close()
        s.close()


def test_shm_stuck_receiver_is_a_timeout_within_the_deadline(shm_channel):
    shm_dir, channel = shm_channel
    s = make_sender("shm", num_receivers=1, channel=channel, shm_dir=shm_dir, timeout_s=1.0)
    idle = make_receiver("shm", rank=1, num_receivers=1, channel=channel, shm_dir=shm_dir)  # alive, never reads
    try:
        t0 = time.monotonic()
        with pytest.raises(WeightSyncTimeout, match="0/1"):
            s.send(model_state(1), 1)
        assert 1.0 <= time.monotonic() - t0 <= 1.0 + MARGIN
    finally:
        idle.close()
        s.close()


# ------------------------------------------------------------- across real processes


def test_shm_roundtrip_corruption_recovery_then_sender_killed(shm_channel):
    kw = dict(channel=shm_channel[1], shm_dir=shm_channel[0], timeout_s=30)
    q, cmds = CTX.Queue(), CTX.Queue()
    p = CTX.Process(target=child_sender, args=("shm", kw, [1, 2, 3, 4, 6, 7], q, cmds), daemon=True)
    p.start()
    r = make_receiver("shm", rank=1, num_receivers=1, channel=kw["channel"], shm_dir=kw["shm_dir"], timeout_s=DEADLINE)
    try:
        expect(q, "ready")
        for v in (1, 2, 3):
            cmds.put("go")
            got_v, tensors = r.receive(timeout_s=START)
            assert got_v == v
            check_equal(tensors, model_state(v))
            assert expect(q, "sent") == (v,)
        # v4: flip one payload byte in the published file before reading it
        cmds.put("go")
        path = r.dir / f"v{4:020d}.bin"
        t_end = time.monotonic() + START
        while not path.exists():
            assert time.monotonic() < t_end
            time.sleep(0.01)
        with open(path, "r+b") as f:
            pre = f.read(wshm._PRE_SIZE)
            payload = wshm._PRE.unpack_from(pre)[4]
            f.seek(payload + 40)
            byte = f.read(1)
            f.seek(payload + 40)
            f.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(WeightSyncChecksumError, match="checksum"):
            r.receive(timeout_s=START)
        assert expect(q, "send_error") == (4, "WeightSyncChecksumError")  # the sender hears of it
        # the channel goes on: the next version arrives intact
        cmds.put("go")
        got_v, tensors = r.receive(timeout_s=START)
        assert got_v == 6
        check_equal(tensors, model_state(6))
        assert expect(q, "sent") == (6,)
        # v7 crawls segment by segment (the receiver follows it); the sender is killed mid-write
        cmds.put("slow")
        expect(q, "slow")
        kill_later(p, 0.7)
        t0 = time.monotonic()
        with pytest.raises(WeightSyncPeerLost, match="died while writing"):
            r.receive(timeout_s=DEADLINE)
        assert time.monotonic() - t0 <= DEADLINE + MARGIN
        # and asked again, a dead sender is reported at once
        t0 = time.monotonic()
        with pytest.raises(WeightSyncPeerLost, match="sender"):
            r.receive(timeout_s=DEADLINE)
        assert time.monotonic() - t0 <= 1.0
    finally:
        p.kill()
        r.close()


def test_shm_receiver_killed_mid_update_fails_sender_within_deadline(shm_channel):
    kw = dict(channel=shm_channel[1], shm_dir=shm_channel[0], timeout_s=30)
    q = CTX.Queue()
    p = CTX.Process(target=child_receiver, args=("shm", kw, 1, q), daemon=True)
    p.start()
    s = make_sender("shm", num_receivers=1, channel=kw["channel"], shm_dir=kw["shm_dir"], timeout_s=START)
    try:
        expect(q, "ready")
        s.send(model_state(1), 1)
        assert expect(q, "received") == (1, True)
        s.timeout_s = DEADLINE
        kill_later(p, 0.5)
        t0 = time.monotonic()
        with pytest.raises(WeightSyncPeerLost, match="gone"):
            s.send(model_state(2), 2)  # published; the receiver dies before acknowledging it
        assert time.monotonic() - t0 <= DEADLINE + MARGIN
        # with nobody left to wait for, a stuck (not dead) receiver would be a timeout instead
        s.num_receivers = 0
        s.send(model_state(3), 3)
    finally:
        p.kill()
        s.close()


# ---------------------------------------------------------------------------- GPU only
