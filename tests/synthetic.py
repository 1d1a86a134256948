"""Shared test helpers (tests/ is on the import path through tests/conftest.py): synthetic
trajectory groups, hostile ones, tiny models, a live transport link, free ports."""

import contextlib

import numpy as np
import torch

from common.config import TransportConfig
from common.schema import Array, Response, TrajectoryGroup
from common.transport import ActorClient, LearnerServer


def tiny_qwen2(seed=0, vocab=64, hidden=32, layers=2, tie=True):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg).float()


def make_groups(n_groups, k=4, vocab=64, seed=0, version=0, logp_noise=0.0, resp_len=(2, 10)):
    """Groups with random prompts/responses; each group has mixed outcomes (1 to k-1
    correct) so it survives the accuracy filter. Behaviour log-probs are random negative
    numbers (the learner recomputes π_old when the correction is on). Response lengths are
    drawn from ``resp_len`` (inclusive bounds)."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        prompt = rng.integers(3, vocab, size=int(rng.integers(3, 7)))
        n_correct = int(rng.integers(1, k))
        outcomes = [1.0] * n_correct + [0.0] * (k - n_correct)
        rng.shuffle(outcomes)
        responses = []
        for i in range(k):
            T = int(rng.integers(resp_len[0], resp_len[1] + 1))
            toks = rng.integers(3, vocab, size=T)
            lp = -rng.uniform(0.5, 5.0, size=T) + logp_noise * rng.standard_normal(T)
            responses.append(Response(
                token_ids=Array.from_numpy(toks, "int32"),
                behav_logp=Array.from_numpy(np.minimum(lp, 0.0), "float32"),
                policy_version=Array.from_numpy(np.full(T, version), "int32"),
                finish_reason="stop", outcome_reward=outcomes[i],
                verifier_status="correct" if outcomes[i] else "wrong"))
        groups.append(TrajectoryGroup(prompt_id=f"p{seed}-{g}", prompt_tokens=Array.from_numpy(prompt, "int32"),
                                      responses=responses, policy_version=version, gen_s=0.1, verify_s=0.01))
    return groups


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a test's store, transport or rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group(pid: str, outcomes, version: int) -> TrajectoryGroup:
    responses = [Response(token_ids=Array.from_numpy(np.array([5, 6, 7]), "int32"),
                          behav_logp=Array.from_numpy(np.full(3, -1.0), "float32"),
                          policy_version=Array.from_numpy(np.full(3, version), "int32"),
                          finish_reason="stop", outcome_reward=float(o),
                          verifier_status="correct" if o else "wrong") for o in outcomes]
    return TrajectoryGroup(prompt_id=pid, prompt_tokens=Array.from_numpy(np.array([3, 4]), "int32"),
                           responses=responses, policy_version=version, gen_s=0.1, verify_s=0.1)


MIXED, ALL_RIGHT = (1, 0, 0, 1), (1, 1, 1, 1)


@contextlib.contextmanager
def live_link(credit_window: int = 16, admission_budget: int | None = 0):
    """A real LearnerServer on ephemeral loopback ports and one connected ActorClient 'a'."""
    cfg = TransportConfig(trajectory_addr="tcp://127.0.0.1:*", control_addr="tcp://127.0.0.1:*",
                          heartbeat_s=0.05, peer_timeout_s=5.0, credit_window=credit_window)
    srv = LearnerServer(cfg, max_staleness=1, admission_budget=admission_budget).start()
    cli = ActorClient(cfg.model_copy(update=dict(trajectory_addr=srv.trajectory_endpoint,
                                                 control_addr=srv.control_endpoint)), "a").start()
    try:
        assert cli.wait_ready(10)
        yield srv, cli
    finally:
        cli.close(linger_s=0.2)
        srv.close()


def with_response(g: TrajectoryGroup, i: int = 0, **fields) -> TrajectoryGroup:
    """``g`` with response ``i``'s arrays replaced (numpy arrays or scalars broadcast)."""
    r = g.responses[i]
    arrays = {"token_ids": r.token_ids.to_numpy(), "behav_logp": r.behav_logp.to_numpy(),
              "policy_version": r.policy_version.to_numpy()}
    arrays.update(fields)
    new = Response(token_ids=Array.from_numpy(np.asarray(arrays["token_ids"]), "int32"),
                   behav_logp=Array.from_numpy(np.asarray(arrays["behav_logp"]), "float32"),
                   policy_version=Array.from_numpy(np.asarray(arrays["policy_version"]), "int32"),
                   finish_reason=r.finish_reason, outcome_reward=r.outcome_reward, verifier_status=r.verifier_status)
    return TrajectoryGroup(prompt_id=g.prompt_id + "-bad", prompt_tokens=g.prompt_tokens,
                           responses=[new if j == i else x for j, x in enumerate(g.responses)],
                           policy_version=g.policy_version, gen_s=g.gen_s, verify_s=g.verify_s)


def hostile(seed: int, version: int = 0) -> dict[str, TrajectoryGroup]:
    """One group per reason check_group gives, each otherwise like a good one."""
    g = make_groups(1, seed=seed, version=version, resp_len=(3, 6))[0]
    T = g.responses[1].token_ids.shape[0]
    empty = np.zeros(0)
    long_prompt = make_groups(1, seed=seed, version=version)[0]
    long_prompt.prompt_tokens = Array.from_numpy(np.arange(3, 3 + 9), "int32")
    return {
        "group_size": TrajectoryGroup(prompt_id="k3", prompt_tokens=g.prompt_tokens, responses=g.responses[:3],
                                      policy_version=version, gen_s=0.1, verify_s=0.1),
        "empty_response": with_response(g, 1, token_ids=empty, behav_logp=empty, policy_version=empty),
        "token_id": with_response(g, 2, token_ids=np.full(g.responses[2].token_ids.shape[0], 64)),  # vocab is 64
        "prompt_too_long": long_prompt,
        "response_too_long": with_response(g, 0, token_ids=np.full(13, 5), behav_logp=np.full(13, -1.0),
                                   policy_version=np.full(13, version)),
        "future_version": with_response(g, 3, policy_version=np.full(g.responses[3].token_ids.shape[0], version + 1)),
        "version_order": with_response(g, 1, policy_version=np.r_[np.full(T - 1, version), -1]),
        "implausible_logp": with_response(g, 1, behav_logp=np.r_[np.full(T - 1, -1.0), -80.0]),
    }
