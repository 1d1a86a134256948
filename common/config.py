"""The one typed, validated config tree of a run.

Contract
--------
- Sources, later wins: the model defaults below < a YAML file (``configs/*.yaml``) <
  dotted CLI overrides (``prime.beta=0.1 generation.k=8``). YAML and overrides are merged
  with OmegaConf (so ``${...}`` interpolation works); the result is validated by pydantic.
- A YAML file may start from another: ``base: tiny.yaml`` (a path relative to the file) is
  loaded first and the file's own keys win over it; bases chain, a cycle is an error.
- Every field is typed and documented with its unit; an unknown key or a bad value raises
  ``ConfigError`` whose message names the dotted field (``prime.beta: ...``).
- ``save_resolved`` writes the final config (``config.yaml``) into the run directory, so a
  run can always be reproduced from its own directory.
Not covered: what each component does with its fields (see the component's module).
"""

from __future__ import annotations

import os

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "PrimeRunConfig",
    "load_config",
    "save_resolved",
    "describe_fields",
    "render_markdown",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending dotted field."""


_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class _Section(BaseModel):
    # unknown keys are errors; assignments after loading are validated too
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- sections


class ModelConfig(_Section):
    policy_path: str = Field(
        "runs/tiny/sft",
        description="Path of the policy's starting weights (transformers directory; the SFT model). [path]",
    )
    prm_path: str | None = Field(
        None, description="Path of the implicit PRM's starting weights; null = policy_path (paper: PRM initialised from the SFT model). Every run saves its trained PRM to <run_dir>/final_prm. [path]"
    )
    ref: Literal["sft", "policy_old"] = Field(
        "sft",
        description="Reference model for q_t: 'sft' = a frozen copy of the starting weights (ref_path); 'policy_old' = the behaviour/old-policy log-probs (no extra model). [enum]",
    )
    ref_path: str | None = Field(
        None, description="Path of the frozen reference model; null = policy_path. [path]"
    )
    tokenizer_path: str | None = Field(
        None, description="Path of the tokenizer; null = policy_path. [path]"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Compute dtype of the learner (autocast with DDP/plain models, FSDP2's MixedPrecisionPolicy param_dtype), parameter dtype of the frozen reference, and dtype of the weights published to the actors and of the final/ model (the serving dtype). float16 runs without loss scaling: prefer bfloat16. [dtype]",
    )
    master_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Dtype of the trainable models' (policy, PRM) parameters, gradients, optimiser state and checkpoints: float32 masters with dtype=bfloat16 is mixed precision (updates of lr 5e-7 survive); equal to dtype = train directly in that dtype. Must be float32 or equal to dtype. [dtype]",
    )
    parallel: Literal["ddp", "fsdp2"] = Field(
        "ddp",
        description="How the learner spreads its models over ranks: 'ddp' = policy and PRM replicated with DistributedDataParallel (world > 1), reference replicated; 'fsdp2' = policy, PRM and the frozen reference sharded with FSDP2 (fully_shard per decoder layer, then the root), whenever a process group exists (world >= 1). [enum]",
    )

    @model_validator(mode="after")
    def _precision(self):
        if self.master_dtype not in ("float32", self.dtype):
            raise ValueError(f"model.master_dtype ({self.master_dtype}) must be float32 or model.dtype ({self.dtype})")
        return self


class GenerationConfig(_Section):
    engine: Literal["vllm", "vllm-async", "hf"] = Field(
        "vllm",
        description="Actor generation backend: 'vllm' (offline LLM; weights loaded between batches), 'vllm-async' (AsyncLLM; announced weights are loaded in flight with pause_generation(mode='keep'), tokens carry the version that sampled them) or 'hf' (transformers generate). [enum]",
    )
    k: int = Field(4, ge=1, description="Responses sampled per prompt (K; RLOO/GRPO need K >= 2). [responses]")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature. [dimensionless]")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass. [probability]")
    max_tokens: int = Field(3072, ge=1, description="Maximum response length. [tokens]")
    max_prompt_tokens: int = Field(1024, ge=1, description="Prompts longer than this are skipped. [tokens]")
    seed: int = Field(0, ge=0, description="Base sampling seed, mixed with run.seed and each actor's id (so runs of different run.seed sample differently). [integer]")


class PrimeConfig(_Section):
    beta: float = Field(0.05, gt=0.0, description="β, scale of the implicit reward r_φ = β·q in the PRM loss. [dimensionless]")
    prm_update: Literal["after", "before", "none"] = Field(
        "after",
        description="PRM update order: 'after' = single forward (paper default), 'before' = double forward (verl recipe), 'none' = frozen PRM (needs model.prm_path: a trained PRM, e.g. <run_dir>/final_prm of an earlier run; one equal to the reference is refused, its process rewards would all be 0). [enum]",
    )
    advantage: Literal["rloo", "grpo", "reinforce"] = Field(
        "rloo", description="Advantage estimator combined with process rewards (paper Eq. 5, 7, 8). [enum]"
    )
    process_baseline: Literal["official", "paper"] = Field(
        "official",
        description="RLOO baseline for process rewards: 'official' = PRIME-RL code (extra (r−m_i)/(K−1) term), 'paper' = Eq. 5. [enum]",
    )
    prime_norm: Literal["batch_norm", "none"] = Field(
        "batch_norm", description="Normalisation of process rewards before the leave-one-out (official default batch_norm). [enum]"
    )
    process_credit: Literal["sum", "min"] = Field(
        "sum",
        description="Credit assignment of the process rewards: 'sum' = the return sums the rewards ahead (the paper); 'min' = PURE's min form (arXiv 2504.15275), a token's process value is the smallest reward ahead, with the estimator's baseline over the group's minima (learner/prime.py:min_form_process_returns). [enum]",
    )
    use_process_rewards: bool = Field(
        True, description="False = outcome-only estimator (the paper's RLOO baseline); the PRM is then not used. [bool]"
    )
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount over response tokens. [dimensionless]")
    process_gamma: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Discount γ_p of the process term alone (sum form): return_t = Σ γ^(s−t) outcome_s + Σ γ_p^(s−t) process_s; "
        "null = gamma (the paper); 0 = each token keeps only its own process reward, so a penalty stays on the step the PRM "
        "blames instead of reaching every token before it (docs/results.md §1). [dimensionless]",
    )
    filter_low: float = Field(0.2, ge=0.0, le=1.0, description="Accuracy filter: keep a group iff its mean outcome >= this. [fraction]")
    filter_high: float = Field(0.8, ge=0.0, le=1.0, description="Accuracy filter: keep a group iff its mean outcome <= this. [fraction]")
    drop_truncated: bool = Field(
        False, description="Drop groups in which any response hit max_tokens. [bool]"
    )


class LossConfig(_Section):
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip range ε on π_θ/π_old. [dimensionless]")
    correction: Literal["none", "truncate", "mask", "seq_truncate", "seq_mask", "icepop", "decoupled"] = Field(
        "truncate",
        description=(
            "Off-policy correction between behaviour μ and π_old, ρ = π_old/μ per token (formulas in learner/prime.py:importance_weights): "
            "'none' = no weight, μ acts as π_old; "
            "'truncate' = token TIS, weight min(ρ, is_cap); "
            "'mask' = drop tokens with ρ outside [1/is_cap, is_cap]; "
            "'seq_truncate' = sequence TIS, every token of a response weighted min(Π ρ, is_cap); "
            "'seq_mask' = drop a whole response when its geometric-mean ρ, (Π ρ)^(1/n), is outside [seq_is_low, seq_is_high]; "
            "'icepop' = IcePop, weight ρ on tokens with ρ in [is_low, is_high], 0 outside; "
            "'decoupled' = AReaL's decoupled PPO, weight ρ (π_prox/μ) on tokens with ρ <= is_cap, 0 above (AReaL filters, truncate caps). "
            "Not 'none' => π_old is recomputed by the learner (the proximal policy of decoupled PPO). [enum]"
        ),
    )
    is_cap: float = Field(2.0, ge=1.0, description="Importance-weight cap C of truncate, mask, seq_truncate and decoupled. [dimensionless]")
    is_low: float = Field(0.5, ge=0.0, description="Lower bound of the accepted token-ratio band of icepop (token ρ); must be < 1; 0 = no lower bound. [dimensionless]")
    is_high: float = Field(2.0, gt=0.0, description="Upper bound of the accepted token-ratio band of icepop (token ρ); must be > 1. [dimensionless]")
    seq_is_low: float = Field(0.999, ge=0.0, description="Lower bound of the accepted band of seq_mask on a response's geometric-mean ratio (Π ρ)^(1/n); must be < 1; 0 = no lower bound. Its own band, not icepop's: a geometric mean sits far closer to 1 than a token's ρ (on the embedded task at η = 8 every response's lies inside [0.5, 2], so that band rejects nothing, docs/results.md §5); the default is verl's geometric rejection-sampling preset. [dimensionless]")
    seq_is_high: float = Field(1.001, gt=0.0, description="Upper bound of seq_mask's band on the geometric-mean ratio; must be > 1 (see seq_is_low). [dimensionless]")
    kl_coef: float = Field(0.0, ge=0.0, description="Coefficient of the KL(π_θ‖π_ref) penalty added to the policy loss, a token-level mean like the PPO term (official script: 0). The KL to the reference is logged (loss/kl_k1, loss/kl_k3) whenever a reference model exists. [dimensionless]")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="Estimator of the KL penalty from the sampled tokens: k1 = log π_θ − log π_ref, k3 = exp(−k1) + k1 − 1 (≥ 0, lower variance). [enum]")
    entropy_coef: float = Field(0.0, ge=0.0, description="Coefficient of the entropy bonus subtracted from the policy loss (token-level mean of the next-token entropy at the sampling temperature; official script: 0). loss/entropy is logged always. [dimensionless]")

    @model_validator(mode="after")
    def _ratio_band(self):
        if not (self.is_low < 1.0 < self.is_high):
            raise ValueError(f"need loss.is_low < 1 < loss.is_high, got loss.is_low={self.is_low}, loss.is_high={self.is_high}")
        if not (self.seq_is_low < 1.0 < self.seq_is_high):
            raise ValueError(f"need loss.seq_is_low < 1 < loss.seq_is_high, got loss.seq_is_low={self.seq_is_low}, "
                             f"loss.seq_is_high={self.seq_is_high}")
        return self

    def band(self) -> tuple[float, float]:
        """The (low, high) ratio band of the configured correction: seq_mask's own on the
        geometric-mean ratio, else icepop's on the token ratio (unused by the other modes)."""
        if self.correction == "seq_mask":
            return self.seq_is_low, self.seq_is_high
        return self.is_low, self.is_high


class OptimizerConfig(_Section):
    lr: float = Field(5e-7, ge=0.0, description="AdamW learning rate (constant); 0 freezes the model, e.g. optim.policy.lr=0 fits an offline PRM on the starting policy's own samples (configs/sweeps/prm.yaml). [1/step]")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay. [dimensionless]")
    betas: tuple[_Beta, _Beta] = Field((0.9, 0.999), description="AdamW (β1, β2), each in [0, 1). [dimensionless]")
    eps: float = Field(1e-8, gt=0.0, description="AdamW ε. [dimensionless]")
    grad_clip: float = Field(1.0, gt=0.0, description="Global gradient-norm clip. [L2 norm]")
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up: optimiser step n (from 0) uses lr·min(1, (n+1)/warmup_steps); 0 = constant lr (paper). Counted from the optimiser's own step count, so it survives a resume. [optimiser steps]")


class OptimConfig(_Section):
    policy: OptimizerConfig = Field(
        default_factory=OptimizerConfig,
        description="Policy optimiser (paper: lr 5e-7, wd 0.01, clip 1.0). [section]",
    )
    prm: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=1e-6, weight_decay=0.0, grad_clip=10.0),
        description="Implicit-PRM optimiser (paper: lr 1e-6, wd 0, clip 10). [section]",
    )


class VerifierConfig(_Section):
    workers: int = Field(2, ge=1, description="Verifier worker processes per actor. [processes]")
    max_queue: int = Field(256, ge=1, description="Responses waiting for a verifier before submit blocks (back-pressure). [responses]")
    math_timeout_s: float = Field(5.0, gt=0.0, description="Time limit of one math verdict. [s]")
    code_timeout_s: float = Field(10.0, gt=0.0, description="Time limit of one code verdict (all its tests). [s]")
    grace_s: float = Field(2.0, ge=0.0, description="Extra time before a stuck worker is killed. [s]")
    math_timeout: Literal["wrong", "error"] = Field(
        "wrong",
        description="What a math verdict that ran out of time (the checker's limit, or a worker the pool killed) counts as, in training, held-out and benchmark evaluation alike (actors/verifiers/verdict.py): 'wrong' = reward 0; 'error' = not judged (the training group is dropped; evaluation counts an error). Counted on their own either way (actor/verify_timeouts, the evaluations' 'timeouts'). [enum]",
    )
    allow_unsandboxed: bool = Field(
        False,
        description="Run model code without bubblewrap (rlimits only) where bubblewrap cannot run; logs a warning at start. Off: such code gets sandbox_error. [bool]",
    )
    sandbox_memory_mb: int = Field(1024, ge=16, description="Address-space limit of a sandboxed program. [MiB]")
    sandbox_cpu_s: int = Field(10, ge=1, description="CPU-time limit of a sandboxed program. [s]")
    sandbox_tmpfs_mb: int = Field(64, ge=1, description="Size of the sandbox's private /tmp, its only writable place. [MiB]")
    sandbox_max_output_bytes: int = Field(1 << 20, ge=1024, description="Captured stdout+stderr per run before it is killed. [bytes]")


class BatchConfig(_Section):
    prompts_per_step: int = Field(256, ge=1, description="Prompt groups (that pass the filter) per RL step. [groups]")
    policy_mini_batch: int = Field(256, ge=1, description="Responses per policy optimiser step. [responses]")
    prm_mini_batch: int = Field(256, ge=1, description="Responses per PRM optimiser step. [responses]")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's data. [epochs]")
    micro_batch_tokens: int = Field(16384, ge=1, description="Token budget of one packed forward/backward micro-batch per rank. [tokens]")
    max_buffered_groups: int = Field(1024, ge=0, description="Surplus filtered groups kept for later steps. [groups]")


class AsyncConfig(_Section):
    max_staleness: int = Field(
        1, ge=0,
        description="η: an actor may start a group only while its weights are at most η policy versions behind the learner; older finished groups are dropped and counted. 0 = synchronous. [policy versions]",
    )
    actor_lag: int = Field(
        0, ge=0,
        description="Controlled staleness: when the learner announces version v, actors generate with the weights of version v − actor_lag (0 = the newest: the pipeline's natural lag), so a staleness ablation realises the lag it names whatever the machine's speed; the trained tokens' lag is then actor_lag plus the pipeline's own 0-1 versions (reported as system/version_lag_*). Actors keep up to actor_lag + 1 versions of the weights in memory. Must be < max_staleness. [policy versions]",
    )
    admission: Literal["capacity", "version"] = Field(
        "capacity",
        description="How actors are admitted to start groups: 'capacity' = the version rule plus AReaL's capacity rule (at learner version v at most (η − actor_lag + v + 1)·B groups ever accepted or in flight, B = batch.prompts_per_step; over-stale drops become rare); 'version' = the version rule alone (actors generate freely; the learner drops what ages past η). [enum]",
    )
    admission_slack: float = Field(
        0.0, ge=0.0, le=10.0, description="Capacity admission: standard deviations of the accuracy filter's binomial keep count added to the budget, so that a step's batch is rarely a few groups short and the learner waits for another generation round; surplus kept groups are buffered for the next step (and count against its room while a batch can still train on them; at η = 1 a version's surplus is stale after its batch and is dropped, at η ≥ 2 the next batch takes it). 0 = the expected count. [standard deviations]"
    )
    weight_sync: Literal["nccl", "gloo", "shm"] = Field(
        "shm", description="Weight-broadcast backend to the actors. [enum]"
    )
    weight_sync_timeout_s: float = Field(120.0, gt=0.0, description="Deadline of one weight update. [s]")
    weight_sync_addr: str = Field(
        "127.0.0.1:29555",
        description="host:port where the learner's rank 0 hosts the weight-sync store (nccl/gloo); every actor and the evaluator must reach it, and the sockets of the gloo/NCCL pair groups between them and rank 0. [host:port]",
    )
    weight_sync_connect_timeout_s: float = Field(
        600.0, gt=0.0, description="Deadline for one receiver (actor, evaluator) to join the learner's weight-sync sender, and how long a receiver keeps trying to reach a sender that went away before receive() fails (nccl/gloo). [s]"
    )
    weight_sync_into_engine: bool = Field(
        True,
        description="With gloo/nccl, a vLLM engine ('vllm') joins the learner's sender from inside its workers and reloads from their own buffers (NCCL: straight onto its GPU; no file, no copy through the actor process); false = the actor process receives and hands the weights over through /dev/shm. The transformers engine always receives in the actor process (on its device); 'vllm-async' too. [bool]",
    )
    weight_sync_liveness_s: float = Field(
        10.0, gt=0.0, description="A weight-sync receiver whose heartbeat has not moved for this long is dropped from updates; it rejoins as a new member when it comes back (nccl/gloo). [s]"
    )
    weight_sync_bucket_mb: float = Field(
        512.0, gt=0.0, description="Largest packed bucket of one weight-sync collective or file region; a larger tensor gets its own. [MiB]"
    )


class TransportConfig(_Section):
    trajectory_addr: str = Field(
        "tcp://127.0.0.1:5555", description="ZeroMQ endpoint the learner binds for trajectory groups. [zmq endpoint]"
    )
    control_addr: str = Field(
        "tcp://127.0.0.1:5556", description="ZeroMQ endpoint the learner binds for control (versions, admission, shutdown). [zmq endpoint]"
    )
    run_id: str | None = Field(
        None, max_length=256, description="Name of the run on the wire: the learner refuses (and tells to stop) actors of another run_id, e.g. a second run on the same host and ports, and actors ignore another run's learner. launch/run.py sets a fresh one per run; several hosts: set the same one in every host's config. None = unnamed (only unnamed peers match). [text]"
    )
    curve_secret_key: str | None = Field(
        None, description="CURVE secret-key file; required when an endpoint binds beyond 127.0.0.1. [path]"
    )
    curve_public_keys_dir: str | None = Field(
        None, description="Folder of peers' CURVE public keys. [path]"
    )
    curve_client_secret_key: str | None = Field(
        None, description="An actor's own CURVE secret-key file; its public key must be in the learner's curve_public_keys_dir. [path]"
    )
    curve_server_public_key: str | None = Field(
        None, description="The learner's CURVE public-key file, used by actors; null = the public key stored in curve_secret_key's file. [path]"
    )
    curve_force: bool = Field(
        False, description="Use CURVE even when every endpoint is loopback (tests; both sides must agree). [bool]"
    )
    heartbeat_s: float = Field(2.0, gt=0.0, description="Actor heartbeat period. [s]")
    peer_timeout_s: float = Field(30.0, gt=0.0, description="An actor silent this long is considered dead. [s]")
    credit_window: int = Field(
        8, ge=1, description="Trajectory groups an actor may have sent that the learner has not yet consumed (back-pressure window per actor). [groups]"
    )
    max_message_bytes: int = Field(
        64 << 20, ge=1024, description="Largest accepted wire message; bigger ones are rejected as too_large. [bytes]"
    )


class ActorsConfig(_Section):
    num: int = Field(1, ge=1, description="Actor processes started by launch/actors.py (one per GPU on a GPU node). [processes]")
    prompts_path: str | None = Field(
        None,
        description="Training prompts (JSONL or parquet, read by actors.prompts.PromptSource; sharded over actors). None with task.kind=arithmetic: the generated training set. [path]",
    )
    first_slot: int = Field(0, ge=0, description="Global index of this machine's first actor (several actor machines: 0, num, 2·num, ...); actor ids and prompt shards are global. [slots]")
    total_slots: int | None = Field(None, ge=1, description="Actors over all machines (the prompt file is split into this many shards); None = num. [slots]")
    prompts_per_batch: int = Field(8, ge=1, description="Prompts per generation call of one actor (K samples each). [prompts]")
    verifier_kind: Literal["math", "code"] = Field(
        "math", description="Verifier for rows that do not name their own (ability/data_source). [enum]"
    )
    gpus: str | None = Field(
        None, description="GPU ids for the actors, comma-separated; actor i gets the i-th (mod the count) as CUDA_VISIBLE_DEVICES; None = leave it unset. [GPU ids]"
    )
    learner_gpus: str | None = Field(
        None, description="CUDA_VISIBLE_DEVICES of the learner started by launch/run.py (e.g. '4,5,6,7' beside actors on '0,1,2,3'); None = unset. [GPU ids]"
    )
    stop_grace_s: float = Field(10.0, ge=0.0, description="On a stop, time to finish and send in-flight groups before they are dropped. [s]")
    restart_backoff_s: float = Field(2.0, ge=0.0, description="Delay before restarting a crashed actor; doubles per consecutive crash. [s]")
    restart_backoff_max_s: float = Field(60.0, ge=0.0, description="Upper bound of the restart delay. [s]")
    max_restarts: int = Field(20, ge=0, description="Restarts of one actor slot before the supervisor gives up on it. [restarts]")


_CPUS = "Comma-separated CPU ids and ranges (e.g. '0-3,6') on this host"


class PlacementConfig(_Section):
    """Which CPUs, how many torch threads and what priority each process gets (common/placement.py).
    A role's CPU list is split into equal contiguous shares among that role's processes on the host."""

    learner_cpus: str = Field("", description=f"{_CPUS} for the learner ranks, shared out among the local ranks; '' = where the OS puts them. [CPU list]")
    learner_threads: int | None = Field(None, ge=1, description="torch intra-op threads of one learner rank; None = one per CPU of its share, or torch's default (OMP_NUM_THREADS; launch/run.py sets 1) without one. [threads]")
    learner_nice: int = Field(0, ge=0, le=19, description="Niceness of the learner ranks (higher yields the CPU to others). [nice level]")
    prm_thread: bool = Field(True, description="Run the PRM work that the policy update does not wait for on a second thread of each learner rank: the reference forward beside the PRM's forward, and (prime.prm_update=after) the PRM's backward and optimiser step beside the advantages and the policy update (learner/side_thread.py). Same results as in sequence; on CPUs it uses a second core, so turn it off where the learner has no core of its own to spare (configs/tiny.yaml on 2 cores: learner and actor one core each). Off with model.parallel=fsdp2. [bool]")
    actor_cpus: str = Field("", description=f"{_CPUS} for the actor processes, shared out among actors.num; '' = where the OS puts them. [CPU list]")
    actor_threads: int | None = Field(1, ge=1, description="torch threads of one actor process (transformers engine, verification helpers); None = one per CPU of its share. [threads]")
    actor_nice: int = Field(0, ge=0, le=19, description="Niceness of the actor processes. [nice level]")
    evaluator_cpus: str = Field("", description=f"{_CPUS} for the held-out evaluator; '' = where the OS puts it. [CPU list]")
    evaluator_threads: int | None = Field(1, ge=1, description="torch threads of the evaluator; None = one per CPU of its list. [threads]")
    evaluator_nice: int = Field(0, ge=0, le=19, description="Niceness of the evaluator: above 0 it yields the CPU to the learner and the actors, so an evaluation cannot stall training. [nice level]")

    @field_validator("learner_cpus", "actor_cpus", "evaluator_cpus", mode="before")
    @classmethod
    def _cpu_list(cls, v):
        from common.placement import parse_cpus

        v = str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # "placement.actor_cpus=1"
        if isinstance(v, str):
            parse_cpus(v)  # raises PlacementError (a ValueError) on a malformed list
        return v


class EvalConfig(_Section):
    every: int = Field(10, ge=0, description="Evaluate the policy on the held-out prompts every this many policy versions (and at 0 and at the end); 0 = off. [policy versions]")
    heldout_path: str | None = Field(
        None, description="Held-out prompts (JSONL/parquet). None with task.kind=arithmetic: the generated held-out set. [path]"
    )
    limit: int = Field(0, ge=0, description="Evaluate only the first N held-out prompts; 0 = all. [prompts]")
    samples: int = Field(4, ge=1, description="Samples per prompt at the evaluation temperature; accuracy = their mean. [responses]")
    temperature: float | None = Field(
        None, gt=0.0, description="Sampling temperature of the evaluation; None = generation.temperature. [dimensionless]"
    )
    greedy: bool = Field(True, description="Also report greedy (argmax) accuracy. [bool]")
    last_n: int = Field(3, ge=1, description="The run's final accuracy is the mean of the last N evaluations (noise). [evaluations]")
    prompt_suffix: str = Field(
        "", description="Appended to every held-out text prompt (PRIME math: '\\n\\nPresent the answer in LaTex format: \\\\boxed{Your answer}'). [text]"
    )


class TaskConfig(_Section):
    kind: Literal["arithmetic", "none"] = Field(
        "arithmetic",
        description="The embedded task (actors/tasks/): 'arithmetic' = seeded multi-step integer arithmetic with worked, boxed solutions (launch/run.py warms up the starting policy and writes the prompt files); 'none' = bring your own model and prompts. [enum]",
    )
    steps: int = Field(3, ge=1, le=8, description="Operations per problem (one written step each). [operations]")
    digits: int = Field(2, ge=1, le=3, description="Every value (intermediates too) lies in 0..10^digits-1; add/sub operands too, mul operands are 2..9. [digits]")
    slip_share: float = Field(
        0.3, ge=0.0, le=1.0,
        description="Share of the warm-up demonstrations whose written result of one step is off by 1..max_slip; later steps continue from the wrong value, so the answer is wrong. [fraction]",
    )
    max_slip: int = Field(3, ge=1, description="Largest error of a slipped step. [integer]")
    fixed_width: bool = Field(
        True, description="Zero-pad every number in the prompt and the steps to `digits` digits (the boxed answer is not padded): fixed token positions make the steps far quicker to learn. [bool]"
    )
    sft_size: int = Field(20000, ge=1, description="Problems with a demonstration for the supervised warm-up. [problems]")
    train_size: int = Field(4096, ge=1, description="RL training prompts (the actors' prompt file). [problems]")
    dev_size: int = Field(256, ge=1, description="Prompts the warm-up's plateau rule evaluates on. [problems]")
    heldout_size: int = Field(256, ge=1, description="Held-out evaluation prompts; disjoint from every other split. [problems]")
    seed: int = Field(0, ge=0, description="Seed of the problems and of where slips fall. [integer]")


class WarmupConfig(_Section):
    hidden_size: int = Field(128, ge=32, description="Width of the warm-up's Qwen2 model. [units]")
    intermediate_size: int = Field(512, ge=1, description="MLP width of the model. [units]")
    layers: int = Field(4, ge=1, description="Decoder layers of the model. [layers]")
    heads: int = Field(4, ge=1, description="Attention heads (= KV heads); head_dim = hidden_size/heads must be >= 32 for vLLM on CPU. [heads]")
    max_position_embeddings: int = Field(256, ge=64, description="Context length of the model (prompt + response). [tokens]")
    batch_size: int = Field(64, ge=1, description="Demonstrations per optimiser step. [sequences]")
    lr: float = Field(3e-3, gt=0.0, description="Peak AdamW learning rate (linear warm-up, constant, linear cool-down). [1/step]")
    lr_warmup_steps: int = Field(50, ge=0, description="Linear learning-rate warm-up. [optimiser steps]")
    cooldown_steps: int = Field(
        200, ge=0, description="When the constant-LR phase ends (plateau, max_steps or max_seconds), the LR decays linearly to 0 over this many more steps (warmup-stable-decay), then training stops. [optimiser steps]"
    )
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay. [dimensionless]")
    grad_clip: float = Field(1.0, gt=0.0, description="Global gradient-norm clip. [L2 norm]")
    max_steps: int = Field(3000, ge=1, description="Hard cap on training steps, cool-down included (the plateau rule normally ends training first). [optimiser steps]")
    max_seconds: float = Field(900.0, gt=0.0, description="Hard cap on training time, checked at evaluations (makes the result wall-clock dependent when it triggers). [s]")
    eval_every: int = Field(100, ge=1, description="Evaluation period on the dev split. [optimiser steps]")
    eval_samples: int = Field(4, ge=1, description="Samples per dev/held-out prompt for the sampled accuracy. [responses]")
    eval_temperature: float = Field(1.0, gt=0.0, description="Temperature of the sampled accuracy (the RL run's training temperature). [dimensionless]")
    patience: int = Field(3, ge=1, description="The constant-LR phase ends after this many consecutive evaluations without an improvement. [evaluations]")
    min_steps: int = Field(600, ge=0, description="No plateau is declared before this step (the first hundreds of steps learn the format at near-zero accuracy). [optimiser steps]")
    min_delta: float = Field(
        0.01, ge=0.0, description="An evaluation improves if its sampled or greedy dev accuracy beats the best so far by more than this. [fraction]"
    )
    max_new_tokens: int = Field(48, ge=1, description="Response length limit of the warm-up's evaluations. [tokens]")
    threads: int = Field(2, ge=1, description="torch threads while training (restored afterwards). [threads]")
    seed: int = Field(0, ge=0, description="Seed of the initial weights, batch order and evaluation sampling. [integer]")
    cache_dir: str = Field(
        "~/.cache/prime-async/warmup", description="Cache of finished warm-ups, one folder per recipe hash (task + warmup sections). [path]"
    )


class LoggingConfig(_Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files under <run_dir>/tb. [bool]")
    log_every: int = Field(1, ge=1, description="Metrics logging period (TensorBoard, JSONL, W&B, console): every log_every-th learner step and the last one. [learner steps]")
    console: bool = Field(True, description="Show a live progress line. [bool]")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Python logging level. [enum]")
    wandb: bool = Field(
        False,
        description="Also log every learner metric (and the resolved config) to Weights & Biases; needs the wandb package (pip install -e '.[wandb]'). TensorBoard and metrics.jsonl stay. [bool]",
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="'offline' writes the W&B run under <run_dir>/wandb with no network or account (upload later with `wandb sync <run_dir>/wandb/offline-run-*`); 'online' streams it (needs WANDB_API_KEY). [enum]",
    )
    wandb_project: str = Field("prime-async", description="W&B project name. [name]")


class CheckpointConfig(_Section):
    every: int = Field(50, ge=0, description="Checkpoint period; 0 = only at the end. [learner steps]")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk. [checkpoints]")
    resume: bool = Field(False, description="Resume from the newest checkpoint in <run_dir>/checkpoints. [bool]")
    save_hf: bool = Field(True, description="Save the final policy with save_pretrained. [bool]")


class RunConfig(_Section):
    output_dir: str = Field("runs/default", description="Run directory: resolved config, events, checkpoints. [path]")
    steps: int = Field(100, ge=1, description="RL steps to train. [learner steps]")
    seed: int = Field(0, ge=0, description="Global seed. [integer]")
    deterministic: bool = Field(
        False,
        description="Deterministic mode: the same config and seed give the same run (batches, metrics, evaluations, summary line) whatever the machine's speed. The actor generates each batch with exactly the version at which the learner will consume it, one batch at a time (synchronous: slower, lag 0-1), the learner uses torch's deterministic algorithms, and the evaluator scores exactly every eval.every-th version from weights the learner writes to <run_dir>/eval_weights/ (deleted once scored). Needs one actor, async.actor_lag = 0 and an engine without in-flight updates; a restarted actor breaks the guarantee (counted as actor/lockstep_resyncs). [bool]",
    )
    max_learner_restarts: int = Field(2, ge=0, description="launch/run.py: times a dead learner (non-zero exit) is restarted from its newest checkpoint (the actors and the evaluator keep running and rejoin it); 0 = the run ends with it. [restarts]")
    actors_gone_grace_s: float = Field(60.0, ge=0.0, description="launch/run.py: when every local actor has exited (its prompts ran out, or given up after actors.max_restarts) while the learner is short of run.steps and trains no new step for this long, the run is stopped with an error instead of waiting for data forever. [s]")
    learner_restart_backoff_s: float = Field(5.0, ge=0.0, description="launch/run.py: wait before restarting a dead learner. [s]")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Learner device: cpu (gloo, even where a GPU exists), cuda (NCCL; an error without a GPU) or auto = cuda if available. [enum]")


class PrimeRunConfig(_Section):
    """The whole config tree of one run."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run-level settings. [section]")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model paths. [section]")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Sampling. [section]")
    prime: PrimeConfig = Field(default_factory=PrimeConfig, description="PRIME rewards and advantages. [section]")
    loss: LossConfig = Field(default_factory=LossConfig, description="Policy loss. [section]")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimisers. [section]")
    verifier: VerifierConfig = Field(default_factory=VerifierConfig, description="Verifiers and the code sandbox. [section]")
    batch: BatchConfig = Field(default_factory=BatchConfig, description="Batch sizes. [section]")
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async", description="Asynchrony. [section]")
    transport: TransportConfig = Field(default_factory=TransportConfig, description="ZeroMQ transport. [section]")
    actors: ActorsConfig = Field(default_factory=ActorsConfig, description="Actor processes. [section]")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Periodic held-out evaluation during training. [section]")
    placement: PlacementConfig = Field(default_factory=PlacementConfig, description="CPU affinity, threads and priority of each process. [section]")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging. [section]")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints. [section]")
    task: TaskConfig = Field(default_factory=TaskConfig, description="The embedded task (prompts, demonstrations). [section]")
    warmup: WarmupConfig = Field(default_factory=WarmupConfig, description="Supervised warm-up of the starting policy (actors/tasks/warmup.py). [section]")

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data):
        """Keys that moved, read from older files (resolved configs of earlier runs):
        ``actors.threads`` is ``placement.actor_threads`` since 2026-12-02."""
        if isinstance(data, dict) and isinstance(data.get("actors"), dict) and "threads" in data["actors"]:
            actors = dict(data["actors"])
            threads = actors.pop("threads")
            placement = dict(data.get("placement") or {})
            if "actor_threads" in placement and placement["actor_threads"] != threads:
                raise ValueError(f"actors.threads ({threads}) is the old name of placement.actor_threads "
                                 f"({placement['actor_threads']}); give only placement.actor_threads")
            placement["actor_threads"] = threads
            data = {**data, "actors": actors, "placement": placement}
        return data

    def _refuse_silent_combinations(self) -> None:
        """Settings that would run but silently train something else than they say."""
        g, lc, mc = self.generation, self.loss, self.model
        if g.top_p < 1.0:
            raise ValueError(
                f"generation.top_p = {g.top_p}: the learner's log-probs (π_old, π_θ) are of the full distribution, "
                "not the nucleus the actors sample from, so the PPO ratio and every loss.correction would be "
                "biased; train with generation.top_p = 1 (launch/eval.py --top-p evaluates with a nucleus)")
        if g.engine == "vllm-async" and lc.correction == "none":
            raise ValueError(
                "generation.engine = vllm-async with loss.correction = none: in-flight updates mix policy versions "
                "inside a response, and 'none' takes the sampler's log-probs as π_old; pick a correction "
                "(e.g. loss.correction=truncate), which recomputes π_old")
        if lc.kl_coef > 0 and mc.ref == "policy_old":
            raise ValueError("loss.kl_coef > 0 needs a reference model: model.ref = policy_old has none (use model.ref=sft)")
        p = self.prime
        same = os.path.normpath(mc.prm_path or mc.policy_path) == os.path.normpath(mc.ref_path or mc.policy_path)
        if p.prm_update == "none" and p.use_process_rewards and mc.ref == "sft" and same:
            raise ValueError(
                "prime.prm_update = none with model.prm_path " + ("unset" if mc.prm_path is None else "= model.ref_path")
                + ": the frozen PRM is the reference model, so every process reward β·log(π_φ/π_ref) is 0 and the "
                "run is silently outcome-only; set model.prm_path to a trained PRM (e.g. <run_dir>/final_prm of an "
                "earlier run), or train outcome-only on purpose with prime.use_process_rewards=false")

    @model_validator(mode="after")
    def _cross(self):
        # cross-field rules; each message names its dotted fields
        p = self.prime
        if p.filter_low > p.filter_high:
            raise ValueError(f"prime.filter_low ({p.filter_low}) must be <= prime.filter_high ({p.filter_high})")
        if p.process_gamma is not None and p.process_credit == "min":
            raise ValueError("prime.process_gamma discounts the sum form's process returns; "
                             "prime.process_credit = min has no discount (leave process_gamma null)")
        a = self.async_
        if a.actor_lag and a.actor_lag >= a.max_staleness:
            raise ValueError(f"async.actor_lag ({a.actor_lag}) must be < async.max_staleness ({a.max_staleness}): "
                             "groups sampled that far behind would age past η before they are trained")
        if self.run.deterministic:
            n = self.actors.total_slots or self.actors.num
            bad = [f"actors.num/total_slots = {n} (must be 1: several actors' groups interleave by timing)"
                   if n != 1 else "",
                   f"async.actor_lag = {a.actor_lag} (must be 0)" if a.actor_lag else "",
                   "generation.engine = vllm-async (in-flight updates land by timing)"
                   if self.generation.engine == "vllm-async" else ""]
            bad = [b for b in bad if b]
            if bad:
                raise ValueError("run.deterministic=true needs: " + "; ".join(bad))
        self._refuse_silent_combinations()
        if self.prime.advantage in ("rloo", "grpo") and self.generation.k < 2:
            raise ValueError(f"generation.k must be >= 2 for prime.advantage={self.prime.advantage!r}")
        responses = self.batch.prompts_per_step * self.generation.k
        for name in ("policy_mini_batch", "prm_mini_batch"):
            mb = getattr(self.batch, name)
            if responses % mb != 0:
                raise ValueError(
                    f"batch.{name} ({mb}) must divide the responses per step "
                    f"(batch.prompts_per_step × generation.k = {responses})"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the YAML spelling of keys (``async``, not ``async_``)."""
        return self.model_dump(mode="json", by_alias=True)


# ------------------------------------------------------------------------------ loading


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{loc}: {msg}{got_s}" if loc else msg)
    return "invalid config:\n  " + "\n  ".join(lines)


def _load_yaml(p: Path, seen: tuple[Path, ...]) -> DictConfig:
    """The YAML file at ``p`` merged over its ``base:`` chain (the file's keys win)."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in seen:
        raise ConfigError(f"{p}: 'base' chain loops back to itself")
    node = OmegaConf.load(p)
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{p}: a config must be a mapping at the top level")
    if "base" not in node:
        return node
    parent = node.pop("base")
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{p}: 'base' must be the path of another config file (got {parent!r})")
    return OmegaConf.merge(_load_yaml(p.parent / parent, seen + (p.resolve(),)), node)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PrimeRunConfig:
    """Build the run config: defaults < YAML file at ``path`` (over its ``base:`` chain) <
    dotted ``overrides``.

    Args: path: a YAML file or None; overrides: ``["prime.beta=0.1", "generation.k=8"]``.
    Raises: ConfigError naming the field for an unknown key, a bad value, or a malformed override.
    """
    try:
        base = OmegaConf.create({}) if path is None else _load_yaml(Path(path), ())
        for o in overrides:
            if "=" not in o or o.startswith("="):
                raise ConfigError(f"override {o!r} is not of the form dotted.key=value")
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
    try:
        return PrimeRunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def save_resolved(cfg: PrimeRunConfig, run_dir: str | Path) -> Path:
    """Write the resolved config to ``<run_dir>/config.yaml`` and return its path.
    Loading that file with ``load_config`` gives an equal config."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(out)
    return out


def describe_fields(cfg: BaseModel | None = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every leaf field of ``cfg`` (default: the default config) as
    (dotted name, type, value, description), sections expanded."""
    cfg = PrimeRunConfig() if cfg is None else cfg
    rows = []
    for name, f in type(cfg).model_fields.items():
        dotted = f"{prefix}{f.alias or name}"
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            rows.extend(describe_fields(value, dotted + "."))
        else:
            rows.append((dotted, _type_name(f.annotation), value, f.description or ""))
    return rows


def render_markdown() -> str:
    """docs/config.md: every field with its type, default and documentation (units in [])."""
    out = [
        "# Config reference",
        "",
        "Generated by `python launch/config_docs.py` from `common/config.py`; do not edit by hand.",
        "Set fields in a YAML file (`configs/`; `base: other.yaml` starts from another file) or on the command line as `section.field=value`.",
        "Units are in square brackets.",
        "",
        "| field | type | default | meaning [unit] |",
        "|---|---|---|---|",
    ]
    for name, typ, default, desc in describe_fields():
        typ = typ.replace("|", "\\|")
        out.append(f"| `{name}` | `{typ}` | `{default!r}` | {desc} |")
    return "\n".join(out) + "\n"


def _type_name(ann: Any) -> str:
    s = getattr(ann, "__name__", None) if isinstance(ann, type) else None
    return s or str(ann).replace("typing.", "")
