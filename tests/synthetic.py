"""Synthetic trajectory groups and tiny models for learner tests (no engine needed)."""

import numpy as np
import torch

from common.schema import Array, Response, TrajectoryGroup


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
