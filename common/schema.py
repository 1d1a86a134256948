"""Wire schema of the actor <-> learner messages: typed, versioned msgpack (msgspec Structs).

Contract
--------
- Every message on the wire is one msgpack-encoded ``Envelope`` (one ZeroMQ frame):
  ``schema_version`` (== ``SCHEMA_VERSION``), the sender's ``actor_id`` and ``incarnation``
  (a fresh uuid hex each time a process starts), ``seq`` (per incarnation and per channel,
  from 0, +1 for every envelope the sender puts on that channel), ``sent_at`` (unix
  seconds) and a ``body`` that is exactly one of the tagged message types below (tag
  field ``kind``). Every struct rejects unknown fields.
- Actor -> learner: ``Hello`` (joins), ``Heartbeat`` (alive + state), ``ActorMetrics``,
  ``TrajectoryGroup`` (K responses to one prompt, scored) and ``Goodbye`` (clean exit).
  Learner -> actor: ``PolicyUpdate`` (a new ``policy_version`` is published and where to
  fetch it), ``Credit`` (flow control + admission state), ``Ack`` (of a ``Goodbye``),
  ``Shutdown``.
  ``policy_version`` always counts published weight updates; it is not the learner's
  optimiser ``step`` (a ``PolicyUpdate`` carries both).
- Token-level data travels as ``Array`` (dtype from an allow-list, shape, raw little-endian
  bytes), never as lists of ints. In a response: token ids ``Int32Vector [T]``, behaviour
  log-probs ``Float32Vector [T]``, per-token policy versions ``Int32Vector [T]``.
- ``decode`` is the only way network bytes become objects. It never unpickles, and it
  rejects anything malformed with ``ProtocolError(reason)``; ``reason`` is one of
  ``REASONS`` (a short, stable code for counters): too large, not msgpack, wrong schema
  version, unknown/missing fields, wrong types, unknown message kind, out-of-range values,
  wrong array dtype or rank, arrays whose byte size disagrees with dtype x shape,
  responses whose three arrays differ in length, NaN/inf or positive (> ``LOGP_TOL``)
  log-probs, rewards outside [0, 1], groups with no responses or an empty prompt.
  ``encode(..., validate=True)`` runs exactly the receiver's checks before sending.
- Decoding copies no token data: a decoded ``Array.data`` is a read-only memoryview into
  the received buffer (see ``Array``).

Not covered here: sockets, credits, sequence accounting (``common/transport/``), how
weights are fetched (the ``PolicyUpdate`` handle is opaque), token ids against the
vocabulary size (only the learner knows it), what the learner does with a group.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, ClassVar, Literal, Union

import msgspec
import numpy as np
from msgspec import Meta, Struct

__all__ = [
    "SCHEMA_VERSION",
    "MAX_MESSAGE_BYTES",
    "LOGP_TOL",
    "DTYPES",
    "REASONS",
    "ProtocolError",
    "Array",
    "Int32Vector",
    "Float32Vector",
    "Response",
    "TrajectoryGroup",
    "Hello",
    "Heartbeat",
    "ActorMetrics",
    "Goodbye",
    "PolicyUpdate",
    "Credit",
    "Ack",
    "Shutdown",
    "Body",
    "Envelope",
    "make_envelope",
    "encode",
    "encode_into",
    "decode",
    "decode_batch",
    "check_logprobs",
    "peek_identity",
    "validate",
]

SCHEMA_VERSION = 4
# 1 -> 2: Hello.generates, Heartbeat.groups_started/groups_dropped, Credit.admit_total (the
# learner's capacity-based admission). 2 -> 3: Credit.incarnation and Ack.incarnation (an
# actor that rejoins a restarted learner as a new incarnation ignores what was meant for its
# old one). 3 -> 4: Envelope.run_id (a learner refuses actors of another run on its address).
# A peer of another version is rejected by name.
MAX_MESSAGE_BYTES = 64 << 20  # default bound of one encoded envelope [bytes]
LOGP_TOL = 1e-4  # a log-prob above this is not a log-prob (float32 rounding slack) [nats]

# allowed dtypes -> numpy dtype, always little-endian on the wire
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in (
        ("int32", "<i4"), ("int64", "<i8"), ("float32", "<f4"), ("float64", "<f8"),
        ("float16", "<f2"), ("uint8", "|u1"), ("int8", "|i1"), ("bool", "|b1"),
    )
}
DType = Literal["int32", "int64", "float32", "float64", "float16", "uint8", "int8", "bool"]
_ITEMSIZE = {k: v.itemsize for k, v in DTYPES.items()}
_F32 = DTYPES["float32"]

# every reason ``decode`` can give, for counters and docs
REASONS = (
    "too_large",        # over the configured maximum size
    "malformed",        # not (complete, single) msgpack
    "schema_version",   # schema_version != SCHEMA_VERSION
    "unknown_field",    # a field this schema does not define
    "missing_field",    # a required field is absent
    "unknown_kind",     # body.kind is not a known message type
    "wrong_type",       # a field has the wrong msgpack type
    "bad_value",        # out-of-range number/string, bad enum value, too many entries
    "array_dtype",      # dtype outside the allow-list or not the one a field requires
    "array_shape",      # wrong number of dimensions, negative dimension
    "array_size",       # len(data) != prod(shape) * itemsize
    "length_mismatch",  # token_ids / behav_logp / policy_version lengths differ
    "empty_group",      # a trajectory group with no responses
    "empty_prompt",     # a trajectory group with no prompt tokens
    "nonfinite_logp",   # NaN or +-inf behaviour log-prob
    "positive_logp",    # log-prob > LOGP_TOL
    "reward_range",     # outcome reward NaN or outside [0, 1]
)


class ProtocolError(ValueError):
    """A message that does not follow the schema; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# ----------------------------------------------------------------------------- types

NonNeg = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
Seconds = Annotated[float, Meta(ge=0.0, le=1e9)]  # bounds reject NaN and inf
Timestamp = Annotated[float, Meta(ge=0.0, le=1e11)]
Reward = Annotated[float, Meta(ge=0.0, le=1.0)]
ShortStr = Annotated[str, Meta(max_length=256)]
Id = Annotated[str, Meta(min_length=1, max_length=256)]
Metrics = Annotated[dict[Annotated[str, Meta(max_length=128)], float], Meta(max_length=256)]


class _S(Struct, forbid_unknown_fields=True, gc=False):
    """Base of every wire struct: unknown fields are errors; no GC tracking (no cycles)."""


class _Body(_S, tag_field="kind"):
    pass


class Array(_S):
    """A dense n-d array: ``dtype`` from ``DTYPES``, ``shape`` (a tuple, numpy-style; a
    msgpack array on the wire), ``data``: the C-order little-endian bytes.

    ``data`` is bytes-like: ``bytes`` when built here (``from_numpy``); after ``decode`` a
    read-only ``memoryview`` into the received message, so receiving copies no token data
    (in an A/B on the dev machine ~15% more groups/s than copying it). Equality, ``to_numpy``,
    ``to_torch``, pickling and re-encoding work the same for both; ``bytes(a.data)``
    detaches one (a view keeps its whole message alive).
    """

    dtype: DType
    shape: Annotated[tuple[Annotated[int, Meta(ge=0, le=1 << 40)], ...], Meta(max_length=8)]
    data: memoryview  # msgpack bin (bytes when built locally)

    _fixed_dtype: ClassVar[str | None] = None

    def __reduce__(self):  # pickle/copy: a memoryview cannot be pickled, its bytes can
        return (type(self), (self.dtype, tuple(self.shape), bytes(self.data)))

    @classmethod
    def from_numpy(cls, arr: Any, dtype: str | None = None):
        """Copy ``arr`` (numpy / list / CPU torch tensor) into an array of this class;
        ``dtype`` casts (integers are checked to fit)."""
        if hasattr(arr, "detach"):  # torch tensor
            arr = arr.detach().cpu().numpy()
        a = np.asarray(arr)
        name = cls._fixed_dtype or dtype or a.dtype.name
        if dtype is not None and dtype != name:
            raise ValueError(f"{cls.__name__} holds {name}, not {dtype}")
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r} is not allowed on the wire (allowed: {sorted(DTYPES)})")
        want = DTYPES[name]
        if a.dtype != want:
            if a.size and want.kind in "iu" and a.dtype.kind in "iub":
                info = np.iinfo(want)
                if a.min() < info.min or a.max() > info.max:
                    raise ValueError(f"values out of range for {name}")
            a = a.astype(want)
        if cls._fixed_dtype is not None and a.ndim != 1:
            raise ValueError(f"{cls.__name__} is 1-d, got shape {a.shape}")
        return cls(dtype=name, shape=tuple(a.shape), data=np.ascontiguousarray(a).tobytes())

    def check(self) -> int:
        """Validate dtype and byte size; return the element count."""
        if self.dtype not in _ITEMSIZE:
            raise ProtocolError("array_dtype", f"dtype {self.dtype!r} not allowed")
        n = math.prod(self.shape)
        if len(self.data) != n * _ITEMSIZE[self.dtype]:
            raise ProtocolError("array_size", f"{len(self.data)} bytes for shape {self.shape} of {self.dtype}")
        return n

    def to_numpy(self, copy: bool = False) -> np.ndarray:
        """A numpy view of the data (read-only unless ``copy``); checks dtype and size first."""
        self.check()
        a = np.frombuffer(self.data, dtype=DTYPES[self.dtype]).reshape(self.shape)
        return a.copy() if copy else a

    def to_torch(self):
        """A (writable, copied) CPU torch tensor."""
        import torch

        return torch.from_numpy(self.to_numpy(copy=True))


_Dim1 = tuple[Annotated[int, Meta(ge=0, le=1 << 40)]]


class Int32Vector(Array):
    """A 1-d int32 Array (token ids, per-token policy versions)."""

    dtype: Literal["int32"]
    shape: _Dim1
    _fixed_dtype: ClassVar[str | None] = "int32"


class Float32Vector(Array):
    """A 1-d float32 Array (behaviour log-probs)."""

    dtype: Literal["float32"]
    shape: _Dim1
    _fixed_dtype: ClassVar[str | None] = "float32"


class Response(_S):
    """One sampled response: per-token arrays of equal length T, scored by a verifier."""

    token_ids: Int32Vector        # [T]
    behav_logp: Float32Vector     # [T]: log mu(token) under the behaviour policy
    policy_version: Int32Vector   # [T]: version of the weights that produced each token
    finish_reason: Literal["stop", "length", "abort"]
    outcome_reward: Reward        # in [0, 1]
    verifier_status: ShortStr

    @classmethod
    def from_numpy(cls, token_ids, behav_logp, policy_version, finish_reason="stop",
                   outcome_reward=0.0, verifier_status="") -> "Response":
        """Build from array-likes; a scalar ``policy_version`` is broadcast to every token."""
        t = Int32Vector.from_numpy(token_ids)
        pv = np.asarray(policy_version)
        if pv.ndim == 0:
            pv = np.full(t.shape[0], int(pv), dtype=np.int32)
        return cls(token_ids=t, behav_logp=Float32Vector.from_numpy(behav_logp),
                   policy_version=Int32Vector.from_numpy(pv), finish_reason=finish_reason,
                   outcome_reward=float(outcome_reward), verifier_status=verifier_status)


class TrajectoryGroup(_Body, tag="trajectory_group"):
    """Actor -> learner: the K scored responses to one prompt."""

    prompt_id: ShortStr
    prompt_tokens: Int32Vector                                         # [P], P >= 1
    responses: Annotated[list[Response], Meta(min_length=1, max_length=1 << 16)]
    policy_version: NonNeg    # weights version the actor held when the group was admitted
    gen_s: Seconds            # wall time of generation
    verify_s: Seconds         # wall time of verification


class Hello(_Body, tag="hello"):
    """Actor -> learner (control): joining; identity is the envelope's actor_id/incarnation."""

    policy_version: NonNeg    # weights version the actor holds now
    pid: NonNeg = 0
    host: ShortStr = ""
    generates: bool = True    # starts trajectory groups (False: e.g. the evaluator, which only follows versions)


class Heartbeat(_Body, tag="heartbeat"):
    """Actor -> learner (control), every heartbeat_s: alive, and its state."""

    policy_version: NonNeg    # weights version held
    in_flight: NonNeg         # groups admitted but not yet sent
    groups_sent: NonNeg       # trajectory-channel envelopes sent so far (= next trajectory seq)
    metrics: Metrics = {}     # e.g. {"tokens_per_s": ...}
    groups_started: NonNeg = 0  # groups this incarnation has started generating, cumulative
    groups_dropped: NonNeg = 0  # of those, never to be sent (verifier errors, stop), cumulative


class ActorMetrics(_Body, tag="actor_metrics"):
    """Actor -> learner (control): free-form float metrics, latest wins."""

    metrics: Metrics


class Goodbye(_Body, tag="goodbye"):
    """Actor -> learner (trajectory channel, after its last group): clean exit."""

    groups_sent: NonNeg
    reason: ShortStr = ""


class PolicyUpdate(_Body, tag="policy_update"):
    """Learner -> actor: ``policy_version`` is available from ``backend`` via ``handle``."""

    policy_version: NonNeg
    backend: ShortStr          # e.g. "shm", "nccl", "gloo", "disk"
    handle: Annotated[str, Meta(max_length=4096)]  # backend-specific (path, group name, ...)
    step: NonNeg = 0           # learner optimiser step that produced it


class Credit(_Body, tag="credit"):
    """Learner -> actor: flow control and admission state.

    ``granted_total`` is cumulative for the actor's incarnation (it may send trajectory
    envelopes with seq < ``granted_total``); ``n`` is this message's increment.
    Admission: start a group only while ``policy_version - own_version <= max_staleness``
    and, when ``admit_total`` is not None, only while the incarnation's groups started
    (cumulative) stay below ``admit_total`` (the learner's capacity rule, see
    ``common.transport``); None = no capacity bound.
    """

    n: NonNeg
    granted_total: NonNeg
    policy_version: NonNeg
    max_staleness: NonNeg
    admit_total: NonNeg | None = None
    incarnation: ShortStr | None = None  # the actor incarnation it is for (None: any)


class Ack(_Body, tag="ack"):
    """Learner -> actor (trajectory channel): everything up to and including ``seq`` has
    been read, e.g. the ``Goodbye``; after it the learner sends nothing more there, so the
    actor may close without its closing racing anything in flight."""

    seq: NonNeg
    incarnation: ShortStr | None = None  # the actor incarnation it is for (None: any)


class Shutdown(_Body, tag="shutdown"):
    """Learner -> actor: stop generating and exit."""

    reason: ShortStr = ""


Body = Union[TrajectoryGroup, Hello, Heartbeat, ActorMetrics, Goodbye, PolicyUpdate, Credit, Ack, Shutdown]


class Envelope(_S):
    schema_version: int
    actor_id: Id               # the sender ("learner" for learner messages)
    incarnation: Annotated[str, Meta(min_length=1, max_length=64)]
    seq: NonNeg
    sent_at: Timestamp
    body: Body
    run_id: ShortStr = ""      # the run the sender belongs to (transport.run_id; "" = unnamed)


class _VersionProbe(Struct):
    schema_version: int


class _IdentityProbe(Struct):
    actor_id: str
    incarnation: str
    seq: int


# --------------------------------------------------------------------------- codec

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Envelope)
_PROBE = msgspec.msgpack.Decoder(_VersionProbe)
_ID_PROBE = msgspec.msgpack.Decoder(_IdentityProbe)
_min = np.minimum.reduce
_max = np.maximum.reduce


def make_envelope(body, actor_id: str, incarnation: str, seq: int, sent_at: float | None = None,
                  run_id: str = "") -> Envelope:
    """An Envelope of the current schema version (``sent_at`` defaults to now)."""
    return Envelope(SCHEMA_VERSION, actor_id, incarnation, seq, time.time() if sent_at is None else sent_at, body,
                    run_id)


def encode(env: Envelope, validate: bool = True) -> bytes:
    """Envelope -> msgpack bytes. With ``validate`` the bytes go through the receiver's
    ``decode`` first (raising its ``ProtocolError``), so a sender learns of its own bugs."""
    buf = _ENCODER.encode(env)
    if validate:
        decode(buf)
    return buf


def encode_into(env: Envelope, buf: bytearray, validate: bool = True) -> None:
    """Like ``encode`` but into a reusable ``buf`` (resized to the message), so hot paths
    allocate nothing per message."""
    _ENCODER.encode_into(env, buf)
    if validate:
        decode(bytes(buf))  # views into a bytearray would pin its size


def validate(env: Envelope) -> None:
    """Run the receiver's checks on an Envelope built in Python."""
    decode(_ENCODER.encode(env))


def decode(buf, max_bytes: int = MAX_MESSAGE_BYTES, check_values: bool = True) -> Envelope:
    """One wire message (bytes or any buffer) -> a validated Envelope, else
    ``ProtocolError(reason)``. Array data in the result are views of ``buf``.
    ``check_values=False`` leaves the log-prob values of a group unchecked: the caller
    must pass it to ``check_logprobs`` (which checks many groups in one vectorised pass)."""
    if len(buf) > max_bytes:
        raise ProtocolError("too_large", f"{len(buf)} bytes > {max_bytes}")
    try:
        env = _DECODER.decode(buf)
    except Exception as e:  # DecodeError, ValidationError, also e.g. UnicodeDecodeError
        # a newer/older sender may use fields this version lacks: report the version
        try:
            v = _PROBE.decode(buf).schema_version
        except Exception:
            v = SCHEMA_VERSION
        if v != SCHEMA_VERSION:
            raise ProtocolError("schema_version", f"got {v}, expected {SCHEMA_VERSION}") from None
        raise ProtocolError(_classify(e), f"{type(e).__name__}: {e}") from None
    if env.schema_version != SCHEMA_VERSION:
        raise ProtocolError("schema_version", f"got {env.schema_version}, expected {SCHEMA_VERSION}")
    if type(env.body) is TrajectoryGroup:
        logps = _check_group(env.body)
        if check_values:
            _check_logp_values(logps)
    return env


def encode_group(group: TrajectoryGroup) -> bytes:
    """The one stored form of a group (the learner's rank broadcast, its checkpointed buffer):
    the wire encoding of an envelope from the learner (incarnation ``"stored"``, seq 0), so
    a stored group is read back by the same decoder and checks as one that came over the wire."""
    return encode(make_envelope(group, "learner", "stored", 0), validate=False)


def decode_group(buf) -> TrajectoryGroup:
    """Inverse of ``encode_group`` (also reads what the wire carries): every ``decode`` check,
    and the body must be a group (else ``ProtocolError("unexpected_kind")``)."""
    env = decode(buf)
    if type(env.body) is not TrajectoryGroup:
        raise ProtocolError("unexpected_kind", f"a stored group holds a {type(env.body).__name__}")
    return env.body


def peek_identity(buf) -> tuple[str, str, int] | None:
    """(actor_id, incarnation, seq) of a message that ``decode`` rejected, if its envelope
    is readable that far (so a receiver can account the seq as received-but-invalid rather
    than lost); None otherwise. Untrusted: use only for accounting."""
    try:
        p = _ID_PROBE.decode(buf)
    except Exception:
        return None
    return p.actor_id, p.incarnation, p.seq


def decode_batch(bufs, max_bytes: int = MAX_MESSAGE_BYTES) -> list:
    """``decode`` for several wire messages at once (a receiver's queue): the same checks
    and reasons, but the log-probs of all their groups are checked in one vectorised pass.
    Returns, in order, ``(Envelope, None)`` or ``(None, ProtocolError)`` per message."""
    out = []
    parts = []   # log-prob buffers of every group that passed so far
    spans = []   # (index in out, first part, end part)
    dec = _DECODER.decode
    for buf in bufs:
        try:
            if len(buf) > max_bytes:
                raise ProtocolError("too_large", f"{len(buf)} bytes > {max_bytes}")
            try:
                env = dec(buf)
            except Exception:
                decode(buf, max_bytes)  # the slow path names the reason
                raise  # pragma: no cover  (decode raises whenever the fast decode did)
            if env.schema_version != SCHEMA_VERSION:
                raise ProtocolError("schema_version", f"got {env.schema_version}, expected {SCHEMA_VERSION}")
            g = env.body
            if type(g) is TrajectoryGroup:
                logps = _check_group(g)  # raises the group's ProtocolError
                first = len(parts)
                parts.extend(logps)
                spans.append((len(out), first, len(parts)))
        except ProtocolError as e:
            out.append((None, e))
            continue
        out.append((env, None))
    if parts:
        try:
            _check_logp_values(parts)
        except ProtocolError:  # find the culprits
            for i, a, b in spans:
                try:
                    _check_logp_values(parts[a:b])
                except ProtocolError as e:
                    out[i] = (None, e)
    return out


def check_logprobs(groups: list[TrajectoryGroup]) -> list[ProtocolError | None]:
    """Log-prob value checks of groups decoded with ``check_values=False``: one vectorised
    pass over all of them; only if it fails, a pass per group to find the culprits.
    Returns, per group, None (valid) or its ProtocolError."""
    parts = [r.behav_logp.data for g in groups for r in g.responses]
    try:
        _check_logp_values(parts)
        return [None] * len(groups)
    except ProtocolError:
        out = []
        for g in groups:
            try:
                _check_logp_values([r.behav_logp.data for r in g.responses])
                out.append(None)
            except ProtocolError as e:
                out.append(e)
        return out


def _check_logp_values(parts: list) -> None:
    lp = np.frombuffer(b"".join(parts), dtype=_F32)
    if lp.size:
        lo, hi = float(_min(lp)), float(_max(lp))  # NaN propagates through min/max
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ProtocolError("nonfinite_logp", "behaviour log-prob is NaN or infinite")
        if hi > LOGP_TOL:
            raise ProtocolError("positive_logp", f"behaviour log-prob {hi} > 0")


def _classify(e: Exception) -> str:
    """A decoder error -> a reason code (msgspec's message names the path)."""
    if not isinstance(e, msgspec.ValidationError):
        return "malformed"  # not msgpack, truncated, trailing bytes, invalid UTF-8, ...
    m = str(e)
    if "unknown field" in m:
        return "unknown_field"
    if "missing required field" in m:
        return "missing_field"
    if "`, got `" in m:
        return "wrong_type"
    path = m.rpartition(" - at `")[2]
    if path.endswith(".kind`"):
        return "unknown_kind"
    if path.endswith(".dtype`"):
        return "array_dtype"
    if ".shape" in path:
        return "array_shape"
    if path.endswith(".outcome_reward`"):
        return "reward_range"
    if path == "$.body.responses`" and "length >=" in m:
        return "empty_group"
    return "bad_value"


def _check_group(g: TrajectoryGroup) -> list:
    # msgspec has checked the types, dtypes, ranks, reward range and K >= 1 in C. What is
    # left is sized for ~50 kB groups at ~10k groups/s: byte sizes and equal lengths in
    # one cheap pass over the K responses; the log-prob buffers it returns are then
    # checked as ONE buffer by two vectorised reductions (_check_logp_values).
    pt = g.prompt_tokens
    n = pt.shape[0]
    ok = n > 0 and len(pt.data) == 4 * n
    logps = []
    if ok:
        for r in g.responses:
            t, b, v = r.token_ids, r.behav_logp, r.policy_version
            n = t.shape[0]
            if not (len(t.data) == len(b.data) == len(v.data) == 4 * n and b.shape[0] == n == v.shape[0]):
                ok = False
                break
            logps.append(b.data)
    if not ok:
        _explain_group(g)
    return logps


def _explain_group(g: TrajectoryGroup) -> None:
    """Slow path: raise the ProtocolError that says exactly what is wrong with ``g``."""
    def length(a: Array, where: str) -> int:
        n = a.shape[0]
        if len(a.data) != 4 * n:
            raise ProtocolError("array_size", f"{where}: {len(a.data)} bytes for {n} x {a.dtype}")
        return n

    if length(g.prompt_tokens, "prompt_tokens") == 0:
        raise ProtocolError("empty_prompt", f"prompt {g.prompt_id!r} has no tokens")
    for i, r in enumerate(g.responses):
        n = length(r.token_ids, f"responses[{i}].token_ids")
        nb = length(r.behav_logp, f"responses[{i}].behav_logp")
        nv = length(r.policy_version, f"responses[{i}].policy_version")
        if not n == nb == nv:
            raise ProtocolError("length_mismatch",
                                f"responses[{i}]: token_ids {n}, behav_logp {nb}, policy_version {nv}")
    raise ProtocolError("bad_value", "inconsistent trajectory group")  # pragma: no cover
