"""The weight-sync wire format, shared by every backend: tensors laid out in packed byte
buckets, the JSON header that describes them, and the bucket checksum.

Layout: tensors packed into byte buckets at 64-byte-aligned offsets, at most ``bucket_bytes``
per bucket (a bigger tensor alone in its own). Tied tensors (same memory, dtype, shape,
strides) travel once and come back as one tensor under both names. The header (JSON, never
pickle): schema, version, sender incarnation, each bucket's (size, checksum), each tensor's
(name, dtype, shape, bucket, offset, nbytes) or (name, tied-to name). Checksum: the wrapping
64-bit sum of a bucket's bytes read as int64 words (order-independent, so any split of the
work gives the same value); a flipped byte always changes it.

Not covered: copying bytes in and out (``kernels``), moving them (``collective``, ``shm``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from common.weight_sync.base import WeightSyncChecksumError

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


def tie_key(t: torch.Tensor) -> tuple:
    """Tensors with equal keys are one tensor under several names (same memory, dtype, view):
    they travel once and come back tied."""
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())


def _plan(pairs: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> tuple[list[_Entry], list[int], list[torch.Tensor | None]]:
    """Lay the tensors out in buckets. Returns (entries, bucket sizes, source tensor per entry;
    None for a tied entry). Every bucket size is a multiple of ALIGN (so of 8)."""
    entries: list[_Entry] = []
    sources: list[torch.Tensor | None] = []
    sizes: list[int] = []
    first_of: dict[tuple, str] = {}
    for name, t in pairs:
        dtype = str(t.dtype).removeprefix("torch.")
        key = tie_key(t)
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

