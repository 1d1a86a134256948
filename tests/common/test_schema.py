"""The wire schema: every message type round-trips exactly (arrays bit for bit), and decode
rejects each kind of malformed input with the reason it names, never unpickling."""

import copy
import math
import pickle

import msgspec
import numpy as np
import pytest

from common import schema as S
from common.schema import (
    SCHEMA_VERSION,
    Ack,
    ActorMetrics,
    Array,
    Credit,
    Float32Vector,
    Goodbye,
    Heartbeat,
    Hello,
    Int32Vector,
    PolicyUpdate,
    ProtocolError,
    Response,
    Shutdown,
    TrajectoryGroup,
    check_logprobs,
    decode,
    decode_group,
    encode,
    encode_group,
    encode_into,
    make_envelope,
    peek_identity,
)


def make_group(lengths=(5, 7, 0, 9), prompt_len=6, seed=0, version=3) -> TrajectoryGroup:
    rng = np.random.default_rng(seed)
    responses = [
        Response.from_numpy(
            token_ids=rng.integers(0, 50_000, t),
            behav_logp=-rng.exponential(2.0, t).astype(np.float32),
            policy_version=rng.integers(version, version + 2, t),
            finish_reason=("stop", "length", "abort")[i % 3],
            outcome_reward=float(i % 2),
            verifier_status="correct" if i % 2 else "wrong")
        for i, t in enumerate(lengths)
    ]
    return TrajectoryGroup(prompt_id=f"p{seed}", prompt_tokens=Int32Vector.from_numpy(rng.integers(0, 50_000, prompt_len)),
                           responses=responses, policy_version=version, gen_s=1.25, verify_s=0.5)


def env_of(body, seq=0):
    return make_envelope(body, "actor-0", "a" * 32, seq, sent_at=1_700_000_000.5)


def wire(env) -> dict:
    """The envelope as plain msgpack-able data (bytes kept), for hand-made mutations."""
    return msgspec.to_builtins(env, builtin_types=(bytes,))


def reason_of(obj) -> str:
    raw = obj if isinstance(obj, (bytes, bytearray)) else msgspec.msgpack.encode(obj)
    with pytest.raises(ProtocolError) as e:
        decode(raw, max_bytes=1 << 20)
    return e.value.reason


def arrays_of(group):
    out = [group.prompt_tokens]
    for r in group.responses:
        out += [r.token_ids, r.behav_logp, r.policy_version]
    return out


# ------------------------------------------------------------------------ round trips

ALL_BODIES = [
    make_group(),
    make_group(lengths=(1,), prompt_len=1, seed=3, version=0),
    Hello(policy_version=4, pid=1234, host="node-7"),
    Heartbeat(policy_version=4, in_flight=2, groups_sent=17, metrics={"tokens_per_s": 812.5, "gpu_util": 0.9}),
    ActorMetrics(metrics={"verify_s_mean": 0.12}),
    Goodbye(groups_sent=9, reason="done"),
    PolicyUpdate(policy_version=12, backend="shm", handle="/dev/shm/prime/policy-12", step=48),
    Credit(n=3, granted_total=11, policy_version=12, max_staleness=2),
    Ack(seq=9),
    Shutdown(reason="training finished"),
]


@pytest.mark.parametrize("body", ALL_BODIES, ids=lambda b: type(b).__name__)
def test_every_message_round_trips_exactly(body):
    env = env_of(body, seq=41)
    raw = encode(env)
    back = decode(raw)
    assert back == env
    assert type(back.body) is type(body)
    assert (back.schema_version, back.actor_id, back.incarnation, back.seq, back.sent_at) == (
        SCHEMA_VERSION, "actor-0", "a" * 32, 41, 1_700_000_000.5)
    if isinstance(body, TrajectoryGroup):
        for a, b in zip(arrays_of(body), arrays_of(back.body)):
            assert bytes(a.data) == bytes(b.data)  # bit for bit
            assert a.shape == b.shape and a.dtype == b.dtype
            assert np.array_equal(a.to_numpy(), b.to_numpy())
        # a second trip through the decoded object gives the same bytes
        assert encode(back) == raw


def test_a_stored_group_round_trips_and_is_checked_like_a_received_one():
    g = make_group(lengths=(5, 7, 3), seed=4)
    back = decode_group(encode_group(g))
    assert back == g and back.responses[1].behav_logp.to_numpy().tolist() == g.responses[1].behav_logp.to_numpy().tolist()
    assert decode_group(encode(env_of(g))) == g       # the wire form reads as well
    with pytest.raises(ProtocolError) as e:
        decode_group(encode(env_of(Ack(seq=1))))
    assert e.value.reason == "unexpected_kind"
    bad = wire(make_envelope(g, "learner", "stored", 0))
    bad["body"]["responses"][0]["behav_logp"]["data"] = np.float32([0.5] * 5).tobytes()  # a positive log-prob
    with pytest.raises(ProtocolError) as e:
        decode_group(msgspec.msgpack.encode(bad))
    assert e.value.reason == "positive_logp"


def test_arrays_travel_as_raw_bytes_not_int_lists():
    g = make_group(lengths=(1000,), prompt_len=10)
    raw = encode(env_of(g))
    # 1000 int32 + 1000 float32 + 1000 int32 + 10 int32 ~= 12 kB: raw, not msgpack ints
    assert 12_040 <= len(raw) < 12_040 + 1_000
    assert g.responses[0].token_ids.data in raw


def test_decoded_arrays_are_zero_copy_views_that_behave_like_bytes():
    raw = encode(env_of(make_group()))
    back = decode(raw)
    arr = back.body.responses[0].behav_logp
    assert isinstance(arr.data, memoryview) and arr.data.readonly and arr.shape == (5,)
    view = arr.to_numpy()
    assert not view.flags.writeable  # a view of the message, no copy
    np.testing.assert_array_equal(view, make_group().responses[0].behav_logp.to_numpy())
    t = arr.to_torch()
    t += 1  # a writable copy, the message is untouched
    assert bytes(arr.data) == make_group().responses[0].behav_logp.data
    # pickling and deep copies work despite the views
    again = pickle.loads(pickle.dumps(back))
    assert again == back and copy.deepcopy(back) == back
    assert type(again.body.responses[0].behav_logp.data) is bytes


def test_array_helpers():
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    a = Array.from_numpy(x)
    assert (a.dtype, a.shape, len(a.data)) == ("float64", (3, 4), 96)
    np.testing.assert_array_equal(a.to_numpy(), x)
    assert a.to_torch().shape == (3, 4)
    assert Array.from_numpy([1, 2, 3], "int32").to_numpy().dtype == np.int32
    with pytest.raises(ValueError, match="out of range"):
        Array.from_numpy([2**40], "int32")
    with pytest.raises(ValueError, match="not allowed"):
        Array.from_numpy(np.zeros(2, dtype=np.complex64))
    with pytest.raises(ValueError, match="1-d"):
        Int32Vector.from_numpy(np.zeros((2, 2), dtype=np.int32))
    assert Float32Vector.from_numpy([-0.5, -1.0]).dtype == "float32"
    bad = Array(dtype="int32", shape=(3,), data=b"\x00" * 8)
    with pytest.raises(ProtocolError) as e:
        bad.to_numpy()
    assert e.value.reason == "array_size"
    import torch

    tv = Int32Vector.from_numpy(torch.tensor([5, 6, 7]))
    assert tv.to_numpy().tolist() == [5, 6, 7]


def test_encode_into_reuses_a_buffer():
    buf = bytearray()
    for seq in range(3):
        env = env_of(make_group(seed=seq), seq=seq)
        encode_into(env, buf)
        assert bytes(buf) == encode(env)


# ------------------------------------------------------------------------ rejections


def good() -> dict:
    return wire(env_of(make_group()))


def mutate(fn):
    d = good()
    fn(d)
    return d


R0 = ("body", "responses", 0)


def at(d, path):
    for p in path:
        d = d[p]
    return d


CASES = {
    "schema_version": [
        mutate(lambda d: d.update(schema_version=SCHEMA_VERSION + 1)),
        # a newer sender with a field this version lacks: named by version, not by field
        mutate(lambda d: d.update(schema_version=SCHEMA_VERSION + 1, trace_id="x")),
        mutate(lambda d: d.update(schema_version=SCHEMA_VERSION - 1)),  # an older peer
        mutate(lambda d: d.update(schema_version=0)),
    ],
    "malformed": [b"", b"\xc1", b"\x86", b"\xc1garbage bytes \x00\xff" * 3,
                  encode(env_of(Ack(seq=1)))[:-3], encode(env_of(Ack(seq=1))) + b"\x00"],
    "unknown_field": [
        mutate(lambda d: d.update(extra=1)),
        mutate(lambda d: d["body"].update(extra=1)),
        mutate(lambda d: at(d, R0).update(logits=b"")),
        mutate(lambda d: at(d, R0 + ("token_ids",)).update(stride=4)),
    ],
    "missing_field": [
        mutate(lambda d: d.pop("seq")),
        mutate(lambda d: at(d, R0).pop("behav_logp")),
        mutate(lambda d: d["body"].pop("kind")),
    ],
    "unknown_kind": [mutate(lambda d: d["body"].update(kind="pickle"))],
    "wrong_type": [
        mutate(lambda d: d.update(seq="7")),
        mutate(lambda d: d.update(body=[1, 2, 3])),
        mutate(lambda d: at(d, R0 + ("token_ids",)).update(data=[1, 2, 3])),  # ints, not bytes
        mutate(lambda d: at(d, R0).update(outcome_reward="1.0")),
        [1, 2, 3],
        42,
    ],
    "bad_value": [
        mutate(lambda d: d.update(seq=-1)),
        mutate(lambda d: d.update(actor_id="")),
        mutate(lambda d: d.update(sent_at=math.inf)),
        mutate(lambda d: d.update(sent_at=math.nan)),
        mutate(lambda d: at(d, R0).update(finish_reason="timeout")),
        mutate(lambda d: d["body"].update(gen_s=-1.0)),
    ],
    "array_dtype": [
        mutate(lambda d: at(d, R0 + ("behav_logp",)).update(dtype="float64")),
        mutate(lambda d: at(d, R0 + ("token_ids",)).update(dtype="object")),
    ],
    "array_shape": [
        mutate(lambda d: at(d, R0 + ("token_ids",)).update(shape=[5, 1])),
        mutate(lambda d: at(d, R0 + ("token_ids",)).update(shape=[])),
        mutate(lambda d: at(d, R0 + ("token_ids",)).update(shape=[-5])),
    ],
    "array_size": [
        mutate(lambda d: at(d, R0 + ("token_ids",)).update(data=at(d, R0 + ("token_ids", "data"))[:-1])),
        mutate(lambda d: d["body"]["prompt_tokens"].update(shape=[7])),
        mutate(lambda d: at(d, R0 + ("behav_logp",)).update(data=at(d, R0 + ("behav_logp", "data")) + b"\0\0\0\0")),
    ],
    "length_mismatch": [
        # both arrays consistent with their own shape, but of a different length
        mutate(lambda d: at(d, R0).update(behav_logp=wire(env_of(make_group(lengths=(6,))))["body"]["responses"][0]["behav_logp"])),
        mutate(lambda d: at(d, R0).update(policy_version=at(d, ("body", "responses", 1, "policy_version")))),
    ],
    "empty_group": [mutate(lambda d: d["body"].update(responses=[]))],
    "empty_prompt": [mutate(lambda d: d["body"].update(prompt_tokens={"dtype": "int32", "shape": [0], "data": b""}))],
    "nonfinite_logp": [
        mutate(lambda d: at(d, R0 + ("behav_logp",)).update(data=np.array([-1, np.nan, -2, -3, -4], np.float32).tobytes())),
        mutate(lambda d: at(d, R0 + ("behav_logp",)).update(data=np.array([-1, -np.inf, -2, -3, -4], np.float32).tobytes())),
        mutate(lambda d: at(d, R0 + ("behav_logp",)).update(data=np.array([-1, np.inf, -2, -3, -4], np.float32).tobytes())),
    ],
    "positive_logp": [
        mutate(lambda d: at(d, R0 + ("behav_logp",)).update(data=np.array([-1, 0.5, -2, -3, -4], np.float32).tobytes())),
        mutate(lambda d: at(d, R0 + ("behav_logp",)).update(data=np.array([-1, 1e-3, -2, -3, -4], np.float32).tobytes())),
    ],
    "reward_range": [
        mutate(lambda d: at(d, R0).update(outcome_reward=1.5)),
        mutate(lambda d: at(d, R0).update(outcome_reward=-0.1)),
        mutate(lambda d: at(d, R0).update(outcome_reward=math.nan)),
    ],
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_decode_rejects_with_the_named_reason(reason):
    assert reason in S.REASONS
    for case in CASES[reason]:
        assert reason_of(case) == reason, case if isinstance(case, bytes) else None


def test_every_reason_is_exercised():
    assert set(CASES) | {"too_large"} == set(S.REASONS)


def test_too_large_is_rejected_before_parsing():
    raw = encode(env_of(make_group(lengths=(3000,))))
    with pytest.raises(ProtocolError) as e:
        decode(raw, max_bytes=len(raw) - 1)
    assert e.value.reason == "too_large"
    assert decode(raw, max_bytes=len(raw)).body.responses[0].token_ids.shape == (3000,)


def test_tiny_rounding_above_zero_is_tolerated():
    d = mutate(lambda d: at(d, R0 + ("behav_logp",)).update(
        data=np.array([-1, 0.0, -0.0, 1e-7, -4], np.float32).tobytes()))
    decode(msgspec.msgpack.encode(d))


def test_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for payload in (pickle.dumps(Evil()), pickle.dumps({"schema_version": 1})):
        with pytest.raises(ProtocolError):
            decode(payload)
    assert not marker.exists()


def test_sender_side_validation_catches_own_bugs():
    g = make_group()
    g.responses[1].behav_logp = Float32Vector.from_numpy(np.full(7, np.nan, np.float32))
    with pytest.raises(ProtocolError) as e:
        encode(env_of(g))
    assert e.value.reason == "nonfinite_logp"
    encode(env_of(g), validate=False)  # and the receiver will reject it
    g2 = make_group()
    g2.responses[0].outcome_reward = 2.0
    with pytest.raises(ProtocolError) as e:
        S.validate(env_of(g2))
    assert e.value.reason == "reward_range"


def test_batch_logprob_check_finds_the_culprits():
    groups = [decode(encode(env_of(make_group(seed=i))), check_values=False).body for i in range(5)]
    assert check_logprobs(groups) == [None] * 5
    bad = make_group(seed=9)
    bad.responses[3].behav_logp = Float32Vector.from_numpy(np.array([-1] * 8 + [0.25], np.float32))
    groups[2] = decode(encode(env_of(bad), validate=False), check_values=False).body
    errs = check_logprobs(groups)
    assert [e is None for e in errs] == [True, True, False, True, True]
    assert errs[2].reason == "positive_logp"


def test_decode_batch_agrees_with_decode_message_by_message():
    msgs = [encode(env_of(make_group(seed=i), seq=i)) for i in range(4)]
    for cases in CASES.values():
        msgs += [c if isinstance(c, bytes) else msgspec.msgpack.encode(c) for c in cases]
    msgs.insert(2, b"\x00" * 2000)
    results = S.decode_batch(msgs, max_bytes=1000_000)
    assert len(results) == len(msgs)
    for m, (env, err) in zip(msgs, results):
        try:
            want = decode(m, max_bytes=1000_000)
        except ProtocolError as e:
            assert env is None and err.reason == e.reason
        else:
            assert err is None and env == want
    assert S.decode_batch([b"\x00" * 2000], max_bytes=1000)[0][1].reason == "too_large"


def test_peek_identity_of_rejected_messages():
    d = mutate(lambda d: at(d, R0).update(outcome_reward=7.0))
    assert peek_identity(msgspec.msgpack.encode(d)) == ("actor-0", "a" * 32, 0)
    assert peek_identity(b"\xc1 garbage") is None
