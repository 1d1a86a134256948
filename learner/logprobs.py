"""Per-token log-probs of given sequences under a causal LM (teacher forcing).

Contract: ``token_logprobs(model, input_ids, attention_mask, temperature)`` returns, for
every position t >= 1, log softmax(logits_{t-1} / temperature)[input_ids_t], in float32,
shape [B, L-1]. The same temperature as the sampler must be used, or the values are not
the behaviour log-probs the actors report. Not covered: packing, sharding.
"""

from __future__ import annotations

import torch


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Args: input_ids, attention_mask: [B, L] (right-padded). Returns: [B, L-1] float32;
    entry t is the log-prob of input_ids[:, t+1]. Padding positions hold finite garbage."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
