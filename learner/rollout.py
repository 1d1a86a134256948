"""Trajectory groups -> padded training tensors.

Contract
--------
- Input: ``TrajectoryGroup`` wire structs (common/schema.py), already validated by the
  transport. Output: a ``RolloutBatch`` whose rows are responses, the K responses of a
  group as K consecutive rows, prompt + response right-padded to one length L.
- Next-token alignment: column t of every [B, L-1] tensor describes token t+1 of
  ``input_ids``, exactly like ``learner.logprobs.token_logprobs``. ``mask`` is 1.0 on the
  response tokens only (EOS included), so behaviour log-probs, versions and the model's
  log-probs line up column for column.
- ``take(rows)`` / ``concat`` keep that layout, so a batch can be split across ranks and
  into mini-batches group-aligned.
Not covered: filtering, staleness (the ingest side), model forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, L] int64, prompt + response, right-padded with 0
    attention_mask: torch.Tensor  # [B, L] int64
    mask: torch.Tensor  # [B, L-1] float32, 1 on response-token positions
    behav_logp: torch.Tensor  # [B, L-1] float32, log μ of each response token (0 elsewhere)
    token_version: torch.Tensor  # [B, L-1] int64, policy version per response token (-1 elsewhere)
    outcome: torch.Tensor  # [B] float32, verifier reward in [0, 1]
    truncated: torch.Tensor  # [B] bool, finish_reason == "length"
    group_size: int

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_groups(self) -> int:
        return self.num_rows // self.group_size

    def response_lengths(self) -> torch.Tensor:
        return self.mask.sum(-1).long()

    def seq_lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(-1).long()

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """The same batch with every tensor on ``device``."""
        t = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name != "group_size"}
        return RolloutBatch(**t, group_size=self.group_size)

    def take(self, rows: torch.Tensor | list[int]) -> "RolloutBatch":
        """Rows by index, trimmed to the longest kept sequence."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        L = int(self.attention_mask[rows].sum(-1).max()) if len(rows) else 1
        L = max(L, 2)
        t = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "group_size"}
        out = {}
        for name, v in t.items():
            v = v[rows]
            if v.dim() == 2:
                v = v[:, : (L if name in ("input_ids", "attention_mask") else L - 1)]
            out[name] = v
        return RolloutBatch(**out, group_size=self.group_size)

    def groups(self, group_ids) -> "RolloutBatch":
        """Whole groups by group index (keeps the K-consecutive-rows layout)."""
        K = self.group_size
        rows = [g * K + k for g in group_ids for k in range(K)]
        return self.take(rows)


def build_batch(groups, group_size: int | None = None) -> RolloutBatch:
    """Pack trajectory groups into a RolloutBatch.

    Args: groups: TrajectoryGroup structs, each with K responses (K equal for all).
    Raises ValueError for unequal K or an empty list.
    """
    if not groups:
        raise ValueError("build_batch needs at least one group")
    K = group_size or len(groups[0].responses)
    rows = []
    for g in groups:
        if len(g.responses) != K:
            raise ValueError(f"group {g.prompt_id!r} has {len(g.responses)} responses, expected {K}")
        prompt = g.prompt_tokens.to_numpy()
        for r in g.responses:
            rows.append((prompt, r))
    L = max(len(p) + r.token_ids.shape[0] for p, r in rows)
    L = max(L, 2)
    B = len(rows)
    input_ids = torch.zeros(B, L, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L - 1)
    behav = torch.zeros(B, L - 1)
    version = torch.full((B, L - 1), -1, dtype=torch.long)
    outcome = torch.zeros(B)
    truncated = torch.zeros(B, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        P, T = len(p), r.token_ids.shape[0]
        input_ids[i, :P] = torch.from_numpy(p.astype("int64"))
        input_ids[i, P : P + T] = torch.from_numpy(r.token_ids.to_numpy().astype("int64"))
        attn[i, : P + T] = 1
        # token P+j is predicted at position P+j-1
        mask[i, P - 1 : P + T - 1] = 1.0
        behav[i, P - 1 : P + T - 1] = torch.from_numpy(r.behav_logp.to_numpy().astype("float32"))
        version[i, P - 1 : P + T - 1] = torch.from_numpy(r.policy_version.to_numpy().astype("int64"))
        outcome[i] = r.outcome_reward
        truncated[i] = r.finish_reason == "length"
    return RolloutBatch(input_ids, attn, mask, behav, version, outcome, truncated, K)


def concat(batches: list[RolloutBatch]) -> RolloutBatch:
    """Stack batches row-wise, re-padding to the longest."""
    K = batches[0].group_size
    L = max(b.input_ids.shape[1] for b in batches)

    def pad(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    return RolloutBatch(
        torch.cat([pad(b.input_ids, L, 0) for b in batches]),
        torch.cat([pad(b.attention_mask, L, 0) for b in batches]),
        torch.cat([pad(b.mask, L - 1, 0.0) for b in batches]),
        torch.cat([pad(b.behav_logp, L - 1, 0.0) for b in batches]),
        torch.cat([pad(b.token_version, L - 1, -1) for b in batches]),
        torch.cat([b.outcome for b in batches]),
        torch.cat([b.truncated for b in batches]),
        K,
    )
