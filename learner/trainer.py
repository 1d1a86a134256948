"""The torchrun PRIME learner: ingest -> PRIME step -> publish weights, step after step.

Contract
--------
- Started on every rank by ``torchrun launch/learner.py`` (or called in-process with world
  size 1). Process group: NCCL on GPUs, gloo on CPU.
- ``model.parallel`` picks how the models are spread (``build_models``):
  ``ddp``: the policy and the PRM are replicated with DDP (world > 1; plain modules at
  world 1); the reference model is frozen and replicated.
  ``fsdp2``: the policy, the PRM and the frozen reference are sharded with FSDP2
  (``apply_fsdp2``: ``fully_shard`` on every decoder layer, then on the root) over a 1-D
  mesh of all ranks, at any world size >= 1 with a process group; without one (in-process,
  world 1) the models stay plain, as with ``ddp``. Optimisers are built after sharding.
- Precision: the policy and the PRM are loaded in ``model.master_dtype`` (default float32:
  fp32 master weights, gradients and AdamW state, so lr 5e-7 updates are not rounded away)
  and compute in ``model.dtype``: autocast (``learner.step.compute_dtype``) for plain/DDP
  models, ``MixedPrecisionPolicy(param_dtype=model.dtype, reduce_dtype=float32)`` for FSDP2.
  The frozen reference is loaded in ``model.dtype`` (no optimiser). Weights published to
  the actors and the final HF model (``save_final``) are cast to ``model.dtype``, the
  serving dtype (``cast_weights``; tied weights stay tied); checkpoints hold the masters.
- Whole weights are needed by ``publish`` (to the actors), the checkpoints and
  ``save_final``. With FSDP2 they are gathered with torch.distributed.checkpoint's
  ``get_model_state_dict`` / ``get_optimizer_state_dict`` (full_state_dict, cpu_offload:
  only rank 0 receives them), which are collectives: ``publish``, ``save``, ``restore`` and
  ``save_final`` must be called on every rank (``train_step`` and ``run_learner`` do). With
  DDP they read rank 0's replica and the other ranks return at once.
- Checkpoints hold full (unsharded) weights under the models' own state-dict keys in both
  modes. Optimiser state is stored as the mode produces it: ``optimizer.state_dict()``
  (integer parameter ids) with DDP/plain, fully-qualified parameter names with FSDP2;
  ``restore`` converts between the two by parameter order, so a checkpoint resumes in
  either mode and at any world size.
- Rank 0 owns the transport (``LearnerServer``: trajectories in, credits/versions/admission
  out), the ``Ingest`` (staleness backstop, accuracy filter, surplus buffer), the weight
  sender, the metrics sinks and the checkpoints. Each step it broadcasts the chosen groups
  to all ranks as their msgpack encoding (decoded by the typed schema, never unpickled);
  rank r trains on groups r, r+W, ... (``learner.step``).
- Deterministic mode (``run.deterministic``): torch's deterministic algorithms, and
  ``publish`` also writes every ``eval.every``-th version for the evaluator
  (``common.lockstep.save_eval_weights``) before announcing it.
- ``policy_version`` counts published weight updates (0 = the starting weights, published
  before any data is accepted); ``step`` counts PRIME steps. After a resume both are
  restored and the weights are re-published before new data is accepted.
The pieces: the models and their precision (``learner.models``), the process group and its
collectives (``learner.distributed``), checkpoint state (``learner.checkpoint``), actor and
weight-sync metrics (``learner.metrics_log``), the step (``learner.step``).
Not covered: the PRIME math (``learner.prime``), sharded (per-rank) checkpoint files, loss
scaling for float16 compute, CPU offload of parameters.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import placement, schema
from common.admission import AdmissionRule
from common.config import PrimeRunConfig, save_resolved
from common.lockstep import save_eval_weights
from learner.checkpoint import (bytes_to_tensor, groups_lost_since, list_checkpoints, load_checkpoint,
                                load_model_opt, rng_state, save_checkpoint, save_model_opt, set_rng_state,
                                tensor_to_bytes)
from learner.distributed import broadcast_groups, close_dist, init_dist, is_sharded, shard_groups, world
from learner.metrics_log import actor_metrics, weight_sync_metrics
from learner.models import build_models, cast_weights, full_state_dict, torch_dtype, unwrap
from learner.rollout import build_batch
from learner.step import prime_step

log = logging.getLogger(__name__)


class Learner:
    """Owns the run: models, optimisers, counters and (rank 0) the I/O side."""

    def __init__(self, cfg: PrimeRunConfig, server=None, sender=None, logger=None, sync_handle: str = ""):
        self.cfg = cfg
        self.sync_handle = sync_handle  # where actors fetch weights (shm channel / store address)
        self._tokenizer = None  # loaded at the first final save (_save_hf)
        self.device = init_dist(cfg.run.device)
        self.rank, self.world = world()
        torch.manual_seed(cfg.run.seed)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        self.models = build_models(cfg, self.device)
        self.sharded = is_sharded(self.models.policy)  # FSDP2: weight gathers are collectives
        self.step = 0
        self.policy_version = 0
        self.run_dir = Path(cfg.run.output_dir)
        self.server, self.sender, self.logger = server, sender, logger
        self.ingest = None
        if self.rank == 0:
            from learner.ingest import GroupLimits, Ingest

            save_resolved(cfg, self.run_dir)
            if self.server is not None:
                p, g = cfg.prime, cfg.generation
                limits = GroupLimits(k=g.k, max_prompt_tokens=g.max_prompt_tokens, max_tokens=g.max_tokens,
                                     vocab_size=unwrap(self.models.policy).get_input_embeddings().num_embeddings)
                self.ingest = Ingest(self.server, AdmissionRule.from_config(cfg.async_, cfg.batch.prompts_per_step),
                                     p.filter_low, p.filter_high, p.drop_truncated, cfg.batch.max_buffered_groups,
                                     limits=limits)
                self.ingest.update_admission()

    # ------------------------------------------------------------- checkpoints

    def state(self) -> dict:
        """The checkpoint's contents. FSDP2: a collective; complete on rank 0 only."""
        m = self.models
        policy, policy_opt = save_model_opt(m.policy, m.policy_opt)
        s = {
            "step": self.step, "policy_version": self.policy_version,
            "policy": policy, "policy_opt": policy_opt,
            "rng": rng_state(),
        }
        if m.prm is not None:
            s["prm"], s["prm_opt"] = save_model_opt(m.prm, m.prm_opt)
        if self.ingest is not None:
            s["ingest_counts"] = dict(self.ingest.counts)
            s["ingest_rejected"] = dict(self.ingest.rejected)
            s["buffer"] = [bytes_to_tensor(schema.encode_group(g)) for g in self.ingest.buffer]
            s["arrived"] = [bytes_to_tensor(schema.encode_group(g)) for g in self.ingest.arrived]  # not judged yet
        return s

    def save(self) -> Path | None:
        """Call on every rank; rank 0 writes. FSDP2 gathers the state on all ranks first."""
        if self.rank != 0 and not self.sharded:
            return None
        state = self.state()
        if self.rank != 0:
            return None
        return save_checkpoint(self.run_dir / "checkpoints", self.step, state, self.cfg.checkpoint.keep_last)

    def restore(self, path: str | Path | None = None) -> bool:
        ckpt_dir = Path(path) if path else self.run_dir / "checkpoints"
        if not (ckpt_dir / "state.pt").is_file() and not list_checkpoints(ckpt_dir):
            return False
        s = load_checkpoint(ckpt_dir)
        m = self.models
        load_model_opt(m.policy, m.policy_opt, s["policy"], s["policy_opt"])
        if m.prm is not None:
            load_model_opt(m.prm, m.prm_opt, s["prm"], s["prm_opt"])
        self.step, self.policy_version = int(s["step"]), int(s["policy_version"])
        set_rng_state(s["rng"])
        if self.ingest is not None:
            self.ingest.counts.update(s.get("ingest_counts", {}))
            self.ingest.rejected.update(s.get("ingest_rejected", {}))
            for t in s.get("buffer", []):
                self.ingest.buffer.append(schema.decode_group(tensor_to_bytes(t)))
            for t in s.get("arrived", []):
                self.ingest.arrived.append(schema.decode_group(tensor_to_bytes(t)))
            self.ingest.version = self.policy_version  # the next batch's: the restored buffer holds room
            self.ingest.update_admission()
            c = self.ingest.counts
            lost, before = groups_lost_since(self.run_dir / "metrics.jsonl", self.step, c["received"])
            total = max(c["lost_in_restart"], before) + lost  # (no key at all while nothing was lost)
            if total:
                c["lost_in_restart"] = total
            if lost:
                log.warning("resumed at step %d: the previous learner had received %d group(s) after this "
                            "checkpoint; they are gone (system/groups_lost_in_restart)", self.step, lost)
        return True

    # ------------------------------------------------------------------ weights

    def publish(self) -> dict[str, float]:
        """Rank 0: send the policy weights with the current version, then announce it.
        Call on every rank: with FSDP2 all ranks first gather the whole weights."""
        t0 = time.perf_counter()
        full = full_state_dict(self.models.policy) if self.sharded else None
        if self.rank != 0:
            return {}
        out: dict[str, float] = {}
        e = self.cfg.eval
        snapshot = (self.cfg.run.deterministic and e.every > 0 and e.heldout_path is not None
                    and self.policy_version > 0 and self.policy_version % e.every == 0)
        if self.sender is not None or snapshot:
            if full is None:
                full = unwrap(self.models.policy).state_dict()
            state = cast_weights(full, torch_dtype(self.cfg.model.dtype))  # masters -> the actors' dtype
            if snapshot:  # deterministic mode: the evaluator scores exactly this version (common.lockstep)
                save_eval_weights(self.run_dir, state, self.policy_version)
            if self.sender is not None:
                st = self.sender.send(state, self.policy_version)
                out.update(weight_sync_metrics(self.sender, st))
        if self.server is not None:
            backend = self.cfg.async_.weight_sync
            self.server.publish_policy(self.policy_version, backend, self.sync_handle, step=self.step)
        out["time/weight_sync_s"] = time.perf_counter() - t0
        return out

    # --------------------------------------------------------------------- loop

    def train_step(self, groups: list | None = None) -> dict[str, float]:
        """One step: (rank 0) collect groups unless given, broadcast, PRIME step, publish."""
        cfg = self.cfg
        t0, cpu0 = time.perf_counter(), time.process_time()
        wait = 0.0
        if self.rank == 0 and groups is None:
            groups, wait = self.ingest.next_batch(cfg.batch.prompts_per_step, self.policy_version)
        groups = broadcast_groups(groups)
        batch = build_batch(groups).to(self.device)
        mine = batch.groups(shard_groups(batch.num_groups, self.rank, self.world))
        t1 = time.perf_counter()
        m = prime_step(self.models, mine, cfg, self.policy_version)
        self.step += 1
        self.policy_version += 1
        m.update(self.publish())
        dt = time.perf_counter() - t0
        m["time/wait_data_s"] = wait
        m["time/step_s"] = dt
        m["system/cpu_s"] = time.process_time() - cpu0  # this rank's process, every thread
        m["system/tokens_per_s"] = m["system/tokens"] / max(time.perf_counter() - t1, 1e-9)
        if self.ingest is not None:
            m.update(self.ingest.metrics())
        if self.server is not None:
            m.update(self.server.metrics())
            m.update(actor_metrics(self.server.actor_info()))
        if self.rank == 0 and self.logger is not None and (self.step % cfg.logging.log_every == 0
                                                            or self.step == cfg.run.steps):
            self.logger.log(self.step, m, self.policy_version)
        every = cfg.checkpoint.every
        if every and self.step % every == 0:
            self.save()
        return m

    def save_final(self) -> Path | None:
        """The policy in transformers format, with the tokenizer of ``model.tokenizer_path``
        (or ``policy_path``), under <run_dir>/final, written to final.tmp then renamed; the
        implicit PRM (when there is one) likewise under <run_dir>/final_prm, loadable as
        ``model.prm_path`` of a later run (a PRM trained beforehand, e.g. the frozen cell of
        configs/sweeps/prm.yaml). Call on every rank (FSDP2 gathers the whole weights; rank 0
        writes). The weights and the config's ``dtype`` are ``model.dtype``, the serving dtype
        (the fp32 masters rounded, as the actors get them); the masters themselves live in
        the checkpoints."""
        if not self.cfg.checkpoint.save_hf:
            return None
        out = self._save_hf(self.models.policy, "final")
        if self.models.prm is not None:
            self._save_hf(self.models.prm, "final_prm")
        return out

    def _save_hf(self, wrapped, name: str) -> Path | None:
        full = full_state_dict(wrapped) if self.sharded else None
        if self.rank != 0:
            return None
        out = self.run_dir / name
        tmp = self.run_dir / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = unwrap(wrapped)
        dt = torch_dtype(self.cfg.model.dtype)
        model.save_pretrained(tmp, state_dict=cast_weights(full if full is not None else model.state_dict(), dt))
        conf = copy.deepcopy(model.config)  # save_pretrained records the masters' dtype; serving is dt
        setattr(conf, "dtype" if hasattr(conf, "dtype") else "torch_dtype", self.cfg.model.dtype)
        conf.save_pretrained(tmp)
        tok_dir = self.cfg.model.tokenizer_path or self.cfg.model.policy_path
        try:  # a loadable model directory carries its tokenizer (vLLM and transformers read it)
            if self._tokenizer is None:  # loaded once for final/ and final_prm/
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            self._tokenizer.save_pretrained(tmp)
        except (OSError, ValueError) as e:
            log.warning("%s saved without a tokenizer (%s: %s)", name, tok_dir, e)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # readers (the evaluator) see a complete directory or none
        return out


def run_learner(cfg: PrimeRunConfig, steps: int | None = None) -> dict[str, float]:
    """The learner process's whole life: start the I/O on rank 0, (resume,) publish the
    weights, train ``run.steps`` steps, save, tell the actors to stop."""
    from common.transport import LearnerServer
    from common.weight_sync import sender_from_config
    from learner.metrics_log import MetricsLogger

    had_group = dist.is_initialized()  # a caller's own group is left alone at the end
    init_dist(cfg.run.device)
    rank, _ = world()
    placement.apply(cfg.placement, "learner", int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    server = sender = logger = None
    if rank == 0:
        # capacity admission: nobody starts a group before the learner has set its budget
        server = LearnerServer(cfg.transport, max_staleness=cfg.async_.max_staleness,
                               admission_budget=AdmissionRule.from_config(cfg.async_, cfg.batch.prompts_per_step)
                               .initial_budget()).start()
        handle = f"prime-{os.getpid()}"  # shm: the channel's folder; gloo/nccl: a new one per learner start
        # gloo/nccl: actors and the evaluator join at async.weight_sync_addr whenever they come
        sender = sender_from_config(cfg.async_, num_receivers=0, channel=handle)
        lc = cfg.logging
        logger = MetricsLogger(cfg.run.output_dir, lc.tensorboard, lc.console,
                               wandb_mode=lc.wandb_mode if lc.wandb else None, wandb_project=lc.wandb_project,
                               config=cfg.to_dict())
    learner = Learner(cfg, server, sender, logger, sync_handle=handle if rank == 0 else "")
    last: dict[str, float] = {}
    try:
        if cfg.checkpoint.resume:
            learner.restore()
        learner.publish()  # weights first (re-published after a resume), then data
        for _ in range(learner.step, steps or cfg.run.steps):
            last = learner.train_step()
        learner.save()
        learner.save_final()
    finally:
        if rank == 0:
            server.shutdown("training finished")
            time.sleep(0.2)
            server.close()
            sender.close()
            logger.close()
    del learner  # (only reached on success: a failed rank must not wait in a barrier)
    if not had_group:
        close_dist()  # (a no-op when no group was created: world 1 without torchrun)
    return last
