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
Not covered: the PRIME math (``learner.prime``), the step internals (``learner.step``),
sharded (per-rank) checkpoint files, loss scaling for float16 compute, CPU offload of
parameters.
"""

from __future__ import annotations

import copy
import gc
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
from common.jsonl import read_rows
from common.lockstep import save_eval_weights
from common.weight_sync.wire import tie_key
from learner.checkpoint import (bytes_to_tensor, list_checkpoints, load_checkpoint, rng_state, save_checkpoint,
                                set_rng_state, tensor_to_bytes)
from learner.rollout import build_batch
from learner.step import Models, is_sharded, prime_step, shard_groups, world

log = logging.getLogger(__name__)


def _init_dist(device: str = "auto") -> torch.device:
    """The process group (under torchrun) and this rank's device, per ``run.device``."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = cuda but torch sees no CUDA GPU (use run.device=cpu or auto)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ and not dist.is_initialized():
        # GPUs: NCCL for CUDA tensors, gloo for the CPU-side bookkeeping collectives
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    if use_cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def close_dist() -> None:
    """End this rank's process group cleanly: wait for every rank (a barrier), then destroy
    the group while the interpreter is fully alive. Call it after the last collective and
    after dropping every module that holds the group: DDP's reducer keeps a group alive past
    ``destroy_process_group``, and a gloo group torn down during interpreter finalisation
    can abort the process (SIGABRT, "terminate called without an active exception"; seen
    once in CI on a 2-rank gloo test), which torchrun reports as a failed rank. A no-op
    without a process group."""
    if not dist.is_initialized():
        return
    gc.collect()  # modules dropped by the caller release their references to the group now
    dist.barrier()
    dist.destroy_process_group()


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def apply_fsdp2(model: torch.nn.Module, mesh, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2: each decoder layer (the classes transformers
    lists in ``_no_split_modules``, else ``model.model.layers``) is its own unit, the root
    unit holds the rest (embeddings, final norm, LM head). ``param_dtype`` (e.g. bfloat16
    over float32 masters): every unit gets ``MixedPrecisionPolicy(param_dtype,
    reduce_dtype=float32)``: parameters are all-gathered and computed in ``param_dtype``,
    gradients reduce-scattered in float32 into the float32 shards. Returns the same object."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": mesh}
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)

    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [mod for mod in model.modules() if type(mod).__name__ in names]
    if not layers:
        layers = list(getattr(getattr(model, "model", None), "layers", None) or [])
    if not layers:
        log.warning("FSDP2: no decoder layers found in %s; sharding the root only", type(model).__name__)
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def build_models(cfg: PrimeRunConfig, device: torch.device) -> Models:
    from transformers import AutoModelForCausalLM

    mc = cfg.model
    dt, master = _dtype(mc.dtype), _dtype(mc.master_dtype)  # compute (and reference) / trainable

    def load(path, dtype):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)

    policy = load(mc.policy_path, master)
    use_prm = cfg.prime.use_process_rewards
    prm = load(mc.prm_path, master) if use_prm and mc.prm_path else (copy.deepcopy(policy) if use_prm else None)
    ref = None
    if (use_prm or cfg.loss.kl_coef > 0) and mc.ref == "sft":  # the PRM's q_t and the KL penalty
        ref = (load(mc.ref_path, dt) if mc.ref_path else copy.deepcopy(policy).to(dt)).requires_grad_(False).eval()

    def adamw(params, o):
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    _, W = world()
    if mc.parallel == "fsdp2" and dist.is_available() and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (W,))
        mp = dt if dt != master else None  # the reference's parameters are already in dt
        policy, prm = (apply_fsdp2(m, mesh, mp) if m is not None else None for m in (policy, prm))
        ref = apply_fsdp2(ref, mesh) if ref is not None else None
    elif mc.parallel == "fsdp2":
        log.info("model.parallel=fsdp2 without a process group: plain models (world 1)")
    elif W > 1:
        policy = torch.nn.parallel.DistributedDataParallel(policy)
        prm = torch.nn.parallel.DistributedDataParallel(prm) if prm is not None else None
    return Models(policy, prm, ref, adamw(policy.parameters(), cfg.optim.policy),
                  adamw(prm.parameters(), cfg.optim.prm) if prm is not None else None)


def cast_weights(state: dict, dtype: torch.dtype) -> dict:
    """``state``'s tensors detached on the CPU, floating-point ones cast to ``dtype`` (the
    actors' / serving dtype). Entries that share memory (tied weights) stay one tensor, so
    the weight sender and ``save_pretrained`` still see them as tied."""
    out, done = {}, {}
    for k, v in state.items():
        v = v.detach()
        key = tie_key(v)  # the weight sender's own notion of tied
        if key not in done:
            done[key] = v.to("cpu", dtype) if v.is_floating_point() else v.to("cpu")
        out[k] = done[key]
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper; an FSDP2 module is its own (sharded) module."""
    return model.module if hasattr(model, "module") else model


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: torch.nn.Module) -> dict:
    """Whole weights under the plain module's keys. FSDP2: a collective (call on every
    rank); rank 0 gets CPU tensors, the others an empty dict. Otherwise the replica's
    own state dict (tensors where they live)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())
    return unwrap(model).state_dict()


def _opt_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[list[str]]:
    """Per param group, the fully-qualified names of the optimiser's parameters in order
    (the keys torch.distributed.checkpoint uses; tied weights under their first name)."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def _opt_ids_to_names(sd: dict, names: list[list[str]]) -> dict:
    """optimizer.state_dict() (integer ids) -> name-keyed, by position in the groups."""
    state, groups = {}, []
    for g, gnames in zip(sd["param_groups"], names):
        for pid, name in zip(g["params"], gnames):
            if pid in sd["state"]:
                state[name] = sd["state"][pid]
        groups.append({**g, "params": list(gnames)})
    return {"state": state, "param_groups": groups}


def _opt_names_to_ids(sd: dict) -> dict:
    """Name-keyed optimiser state -> the integer ids optimizer.load_state_dict expects
    (ids numbered through the groups in order, as optimizer.state_dict() does)."""
    state, groups, i = {}, [], 0
    for g in sd["param_groups"]:
        ids = []
        for name in g["params"]:
            if name in sd["state"]:
                state[i] = sd["state"][name]
            ids.append(i)
            i += 1
        groups.append({**g, "params": ids})
    return {"state": state, "param_groups": groups}


def _save_model_opt(model, opt) -> tuple[dict, dict]:
    """Whole weights and optimiser state (FSDP2: collective; rank 0 gets them)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return full_state_dict(model), get_optimizer_state_dict(model, opt, options=_full_options())
    return unwrap(model).state_dict(), opt.state_dict()


def _load_model_opt(model, opt, weights: dict, opt_state: dict) -> None:
    """Inverse of ``_save_model_opt`` on every rank, accepting either optimiser format."""
    ids_format = any(isinstance(p, int) for g in opt_state["param_groups"] for p in g["params"])
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=full)
        if ids_format:
            opt_state = _opt_ids_to_names(opt_state, _opt_names(model, opt))
        set_optimizer_state_dict(model, opt, opt_state, options=full)
    else:
        unwrap(model).load_state_dict(weights)
        opt.load_state_dict(opt_state if ids_format else _opt_names_to_ids(opt_state))


def _broadcast_groups(groups: list | None) -> list:
    """Rank 0's groups to every rank, as msgpack bytes in one uint8 tensor."""
    _, W = world()
    if W == 1:
        return groups
    if dist.get_rank() == 0:
        blobs = [schema.encode(schema.make_envelope(g, "learner", "bcast", i), validate=False) for i, g in enumerate(groups)]
        sizes = torch.tensor([len(b) for b in blobs], dtype=torch.long)
        n = torch.tensor([len(blobs)], dtype=torch.long)
        payload = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
    else:
        n = torch.zeros(1, dtype=torch.long)
    dist.broadcast(n, 0)
    if dist.get_rank() != 0:
        sizes = torch.zeros(int(n), dtype=torch.long)
    dist.broadcast(sizes, 0)
    if dist.get_rank() != 0:
        payload = torch.empty(int(sizes.sum()), dtype=torch.uint8)
    dist.broadcast(payload, 0)
    if dist.get_rank() == 0:
        return groups
    raw, out, off = payload.numpy().tobytes(), [], 0
    for s in sizes.tolist():
        out.append(schema.decode(raw[off : off + s]).body)
        off += s
    return out


# actor metrics summed over actors (rates, counters); every other actor/ metric is averaged
_ACTOR_SUMS = ("actor/tokens_per_s", "actor/groups_sent", "actor/groups_dropped_verifier", "actor/groups_dropped_stop",
               "actor/prompts_skipped", "actor/weight_updates", "actor/tokens")


def actor_metrics(info: dict[str, dict]) -> dict[str, float]:
    """``actor/*`` metrics of the live actors (``LearnerServer.actor_info()``): totals for
    rates and counters, means otherwise, plus ``actor/version_lag_max``. The evaluator
    client (no groups, no actor metrics) contributes nothing."""
    rows = [r["metrics"] for r in info.values() if r.get("alive") and r.get("metrics")]
    rows = [r for r in rows if any(k.startswith("actor/") for k in r)]
    out: dict[str, float] = {}
    if not rows:
        return out
    keys = sorted({k for r in rows for k in r if k.startswith("actor/")})
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r]
        out[k] = sum(vals) if k in _ACTOR_SUMS else sum(vals) / len(vals)
    lags = [float(r["actor/version_lag"]) for r in rows if "actor/version_lag" in r]
    if lags:
        out["actor/version_lag_max"] = max(lags)
    out["actor/count"] = float(len(rows))
    return out


def weight_sync_metrics(sender, st) -> dict[str, float]:
    """``system/weight_sync/*`` of one send: bytes, receivers served and failed; for gloo/nccl
    also the members now and the sender's running counts (joined, dropped, catch-ups)."""
    out = {"system/weight_sync/bytes": float(st.bytes), "system/weight_sync/receivers": float(st.receivers),
           "system/weight_sync/failed": float(st.failed)}
    counts = getattr(sender, "counts", None)
    if counts is not None:
        out["system/weight_sync/members"] = float(len(sender.members()))
        for k in ("joined", "dropped", "catch_ups"):
            out[f"system/weight_sync/{k}_total"] = float(counts[k])
    return out


def groups_lost_since(metrics_path: Path, step: int, received_at_step: int) -> tuple[int, int]:
    """(Groups a learner that died had received after checkpoint ``step`` (``received_at_step``
    then), the loss it had itself counted in earlier restarts): from its last ``metrics.jsonl``
    row past that step. Groups received after that row was written cannot be known (at most
    one step's worth)."""
    rows = [r for r in read_rows(metrics_path) if r.get("step", 0) > step and "system/groups_received" in r]
    if not rows:
        return 0, 0
    last = rows[-1]
    return (max(0, int(last["system/groups_received"] or 0) - int(received_at_step)),
            int(last.get("system/groups_lost_in_restart") or 0))


class Learner:
    """Owns the run: models, optimisers, counters and (rank 0) the I/O side."""

    def __init__(self, cfg: PrimeRunConfig, server=None, sender=None, logger=None, sync_handle: str = ""):
        self.cfg = cfg
        self.sync_handle = sync_handle  # where actors fetch weights (shm channel / store address)
        self._tokenizer = None  # loaded at the first final save (_save_hf)
        self.device = _init_dist(cfg.run.device)
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
        policy, policy_opt = _save_model_opt(m.policy, m.policy_opt)
        s = {
            "step": self.step, "policy_version": self.policy_version,
            "policy": policy, "policy_opt": policy_opt,
            "rng": rng_state(),
        }
        if m.prm is not None:
            s["prm"], s["prm_opt"] = _save_model_opt(m.prm, m.prm_opt)
        if self.ingest is not None:
            s["ingest_counts"] = dict(self.ingest.counts)
            s["ingest_rejected"] = dict(self.ingest.rejected)
            s["buffer"] = [bytes_to_tensor(schema.encode(schema.make_envelope(g, "learner", "buffer", i), validate=False))
                           for i, g in enumerate(self.ingest.buffer)]
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
        _load_model_opt(m.policy, m.policy_opt, s["policy"], s["policy_opt"])
        if m.prm is not None:
            _load_model_opt(m.prm, m.prm_opt, s["prm"], s["prm_opt"])
        self.step, self.policy_version = int(s["step"]), int(s["policy_version"])
        set_rng_state(s["rng"])
        if self.ingest is not None:
            self.ingest.counts.update(s.get("ingest_counts", {}))
            self.ingest.rejected.update(s.get("ingest_rejected", {}))
            for t in s.get("buffer", []):
                self.ingest.buffer.append(schema.decode(tensor_to_bytes(t)).body)
            self.ingest.update_admission()  # the restored buffer holds room
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
            state = cast_weights(full, _dtype(self.cfg.model.dtype))  # masters -> the actors' dtype
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
        t0 = time.perf_counter()
        wait = 0.0
        if self.rank == 0 and groups is None:
            groups, wait = self.ingest.next_batch(cfg.batch.prompts_per_step, self.policy_version)
        groups = _broadcast_groups(groups)
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
        dt = _dtype(self.cfg.model.dtype)
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
    _init_dist(cfg.run.device)
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
