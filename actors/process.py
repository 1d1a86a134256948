"""One actor process: engine + verifier pool + transport client + prompt shard -> ``Actor.run``.

Who calls it: ``launch/actors.py`` (through ``actors.supervisor``) starts one process per
actor slot with ``python launch/actors.py --slot I ...``, which calls ``run_actor_process``.

Contract
--------
- Local slot ``i`` of ``actors.num`` is global slot ``g = actors.first_slot + i`` of
  ``actors.total_slots`` (default ``num``): actor id ``actor-g``, shard ``g`` of the training
  prompts (``actors.prompts_path``, looped), cursor in
  ``<run.output_dir>/actors/actor-g.cursor.json``, so a restarted process (a new transport
  incarnation) resumes after the last handled prompt.
- The model is ``model.policy_path`` (tokenizer: ``model.tokenizer_path`` or the same dir);
  the engine is ``generation.engine``. Weights arrive from where each ``PolicyUpdate`` says
  (``AnnouncedReceiver``: backend + handle of the announcement; a new handle, e.g. after a
  learner restart, opens a new receiver).
- Exit code 0 when the run ends normally (learner shutdown, prompts exhausted, SIGTERM);
  an exception propagates (non-zero exit) so the supervisor restarts the slot.
- gloo/nccl weight sync: the receiver joins the learner's sender at
  ``async.weight_sync_addr`` as soon as the first ``PolicyUpdate`` is heard, is caught up
  with the newest weights, then takes every update in the background; a restarted process is
  a new member (no fixed group size, nothing to restart on the learner).
Not covered: choosing GPUs (the supervisor sets ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common import placement

log = logging.getLogger(__name__)


def load_newest(receiver, engine, timeout_s: float) -> int:
    """Bring ``engine`` to the newest weights of ``receiver`` and return its version: through
    ``receiver.update_engine`` where it has one (``AnnouncedReceiver``: into the engine itself
    where it can), else ``receive`` + ``engine.load_weights`` when the version is newer."""
    if hasattr(receiver, "update_engine"):
        return receiver.update_engine(engine, timeout_s)
    return _receive_into(receiver, engine, timeout_s)


def _receive_into(receiver, engine, timeout_s: float) -> int:
    """``receiver.receive`` in this process, then ``engine.load_weights`` if it is newer."""
    version, state = receiver.receive(timeout_s=timeout_s, copy=True)
    if version > engine.policy_version or engine.rewinding:
        engine.load_weights(state, version)
    return engine.policy_version


class AnnouncedReceiver:
    """A weight receiver that follows the newest ``PolicyUpdate``'s backend and handle.

    ``update_engine(engine, timeout_s)`` brings an engine to the newest weights: an engine
    with ``in_engine_sync`` (vLLM) under gloo/nccl and ``async.weight_sync_into_engine``
    joins the sender from inside its workers and reloads from their own buffers; otherwise
    this process receives (``receive``) and hands the tensors to ``engine.load_weights``."""

    def __init__(self, cfg, client, rank: int, num_receivers: int, label: str = ""):
        self.cfg, self.client = cfg, client
        self.rank, self.num_receivers = int(rank), int(num_receivers)  # shm lease ids
        self.label = label
        self._rx = None
        self._key: tuple[str, str] | None = None
        self._engine_key: tuple[str, str] | None = None  # the announcement the engine joined for

    def _announced(self) -> tuple[str, str]:
        upd = self.client.latest_update
        if upd is None:
            raise RuntimeError("no PolicyUpdate announced yet")
        return upd.backend, upd.handle

    def receive(self, timeout_s: float | None = None, copy: bool = False):
        from common.weight_sync import receiver_from_config

        key = self._announced()
        if self._rx is None or key != self._key:
            self.close()
            a = self.cfg.async_.model_copy(update={"weight_sync": key[0]})
            self._rx = receiver_from_config(a, rank=self.rank, num_receivers=self.num_receivers, channel=key[1],
                                            label=self.label)
            self._key = key
        return self._rx.receive(timeout_s=timeout_s, copy=copy)

    def update_engine(self, engine, timeout_s: float) -> int:
        """Load the newest weights into ``engine`` (if newer than its version); returns the
        version the engine holds afterwards."""
        key = self._announced()
        a = self.cfg.async_
        if key[0] in ("gloo", "nccl") and a.weight_sync_into_engine and getattr(engine, "in_engine_sync", False):
            if self._engine_key != key:  # first time, or a new learner incarnation
                engine.join_weight_sync(key[0], a.weight_sync_addr, timeout_s=a.weight_sync_timeout_s,
                                        connect_timeout_s=a.weight_sync_connect_timeout_s, label=self.label)
                self._engine_key = key
            return engine.load_synced_weights(timeout_s)
        return _receive_into(self, engine, timeout_s)

    def close(self) -> None:
        if self._rx is not None:
            try:
                self._rx.close()
            finally:
                self._rx = None


def engine_options(cfg, kind: str) -> dict:
    """Backend options from the config: vLLM gets a context length that fits prompt + response."""
    if kind.startswith("vllm"):
        return {"max_model_len": cfg.generation.max_prompt_tokens + cfg.generation.max_tokens,
                "seed": cfg.run.seed}
    import torch

    return {"device": "cuda" if torch.cuda.is_available() else "cpu", "seed": cfg.run.seed}


def run_actor_process(cfg, slot: int) -> dict:
    """Build everything for actor slot ``slot`` and run it to the end; returns its summary."""
    from transformers import AutoTokenizer

    from actors.actor import Actor
    from actors.engines import make_engine
    from actors.prompts import PromptSource
    from actors.verifiers.pool import VerifierPool
    from common.transport import ActorClient

    acfg = cfg.actors
    if not 0 <= slot < acfg.num:
        raise ValueError(f"slot {slot} not in 0..{acfg.num - 1}")
    total = acfg.total_slots or acfg.num
    g = acfg.first_slot + slot  # global slot: actor id, prompt shard, weight-sync rank
    if g >= total:
        raise ValueError(f"global slot {g} (actors.first_slot + {slot}) >= actors.total_slots {total}")
    if acfg.prompts_path is None:
        raise ValueError("actors.prompts_path is not set (the launcher sets it for task.kind=arithmetic)")
    placement.apply(cfg.placement, "actor", slot, acfg.num)
    actor_id = f"actor-{g}"
    run_dir = Path(cfg.run.output_dir)
    (run_dir / "actors").mkdir(parents=True, exist_ok=True)
    model_dir = cfg.model.policy_path
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or model_dir)
    prompts = PromptSource(acfg.prompts_path, shard=g, num_shards=total,
                           cursor_file=run_dir / "actors" / f"{actor_id}.cursor.json", loop=True)
    engine = make_engine(cfg.generation.engine, model_dir, **engine_options(cfg, cfg.generation.engine))
    client = receiver = None
    try:
        with VerifierPool.from_config(cfg.verifier) as pool:
            client = ActorClient(cfg.transport, actor_id).start()
            receiver = AnnouncedReceiver(cfg, client, rank=g + 1, num_receivers=total, label=actor_id)
            actor = Actor(cfg, actor_id, engine, pool, client, prompts, tokenizer=tokenizer, weight_receiver=receiver,
                          prompts_per_batch=acfg.prompts_per_batch, verifier_kind=acfg.verifier_kind,
                          stop_grace_s=acfg.stop_grace_s)
            log.info("%s (pid %d): engine %s on %s, shard %d/%d from cursor %d", actor_id, os.getpid(),
                     cfg.generation.engine, model_dir, g, total, prompts.committed)
            return actor.run()
    finally:
        if receiver is not None:
            receiver.close()
        engine.close()
