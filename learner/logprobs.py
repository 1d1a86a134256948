"""Per-token log-probs of given sequences under a causal LM (teacher forcing).

Contract: ``token_logprobs(model, input_ids, attention_mask, temperature, compute_dtype)``
returns, for every position t >= 1, log softmax(logits_{t-1} / temperature)[input_ids_t],
in float32, shape [B, L-1]. The same temperature as the sampler must be used, or the values
are not the behaviour log-probs the actors report. ``compute_dtype`` (bfloat16/float16)
runs the forward under ``torch.autocast`` (``compute_context``: fp32 master parameters,
low-precision matmuls); the logits are upcast to float32 before the log-softmax, which
always runs in float32 outside autocast. Not covered: packing, sharding.
"""

from __future__ import annotations

import contextlib

import torch


def compute_context(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None):
    """The context a forward of ``model`` runs in: ``torch.autocast(device.type, dtype)``
    for a low-precision ``dtype``; a null context for None/float32, and for FSDP2
    (``fully_shard``) modules, whose ``MixedPrecisionPolicy`` already casts the parameters."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    compute_dtype: torch.dtype | None = None,
    with_entropy: bool = False,
    entropy_grad: bool = True,
):
    """Args: input_ids, attention_mask: [B, L] (right-padded). Returns: [B, L-1] float32;
    entry t is the log-prob of input_ids[:, t+1]. Padding positions hold finite garbage.
    With ``with_entropy`` returns ``(logp, entropy)``, entropy [B, L-1] the entropy of each
    next-token distribution (at ``temperature``), differentiable like ``logp`` unless
    ``entropy_grad`` is False (a metric only: autograd then keeps no [B, L, V] tensor for it)."""
    with compute_context(model, input_ids.device, compute_dtype):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, :-1].float() / temperature  # fp32 from here on (outside autocast)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
