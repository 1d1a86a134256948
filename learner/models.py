"""The learner's models: loading, precision, FSDP2 sharding or DDP wrapping, and the whole
weights read back out of them.

Contract
--------
- ``build_models(cfg, device)`` loads the policy and the PRM in ``model.master_dtype`` and
  the frozen reference in ``model.dtype``; with ``model.parallel: fsdp2`` and a process
  group it shards all three (``apply_fsdp2``), else it wraps the trainable ones in DDP when
  world > 1 (the PRM on its own process group, ``prm_group``); the optimisers (AdamW) are built after that. ``compute_dtype`` is the
  autocast dtype of plain/DDP forwards.
- ``full_state_dict`` gives whole weights (FSDP2: a collective, rank 0 gets them);
  ``cast_weights`` casts them to the serving dtype keeping tied tensors tied; ``unwrap``
  strips DDP.
Not covered: the process group (``learner.distributed``), checkpoints of model and
optimiser state (``learner.checkpoint``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.config import PrimeRunConfig
from common.weight_sync.wire import tie_key
from learner.distributed import is_sharded, world

log = logging.getLogger(__name__)

__all__ = ["Models", "apply_fsdp2", "build_models", "cast_weights", "compute_dtype", "full_state_dict", "prm_group", "unwrap"]


@dataclass
class Models:
    policy: torch.nn.Module  # DDP-wrapped (world > 1) or FSDP2-sharded, see learner.trainer
    prm: torch.nn.Module | None  # None when process rewards are off
    ref: torch.nn.Module | None  # frozen; None when model.ref == "policy_old"
    policy_opt: torch.optim.Optimizer
    prm_opt: torch.optim.Optimizer | None


def compute_dtype(cfg: PrimeRunConfig) -> torch.dtype | None:
    """The autocast dtype of the learner's forwards: ``model.dtype`` when the masters
    (``model.master_dtype``) are wider, else None (the parameters are the compute dtype)."""
    mc = cfg.model
    return None if mc.dtype == mc.master_dtype else getattr(torch, mc.dtype)


def torch_dtype(name: str) -> torch.dtype:
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
    dt, master = torch_dtype(mc.dtype), torch_dtype(mc.master_dtype)  # compute (and reference) / trainable

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
        # the PRM's own group: its gradient all-reduce may run on the side thread (learner.side_thread)
        # beside the policy's on the default group
        prm = torch.nn.parallel.DistributedDataParallel(prm, process_group=prm_group()) if prm is not None else None
    return Models(policy, prm, ref, adamw(policy.parameters(), cfg.optim.policy),
                  adamw(prm.parameters(), cfg.optim.prm) if prm is not None else None)


def prm_group():
    """A process group of every rank, for the PRM's DDP (a collective: every rank calls it)."""
    return dist.new_group(list(range(dist.get_world_size())))


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
