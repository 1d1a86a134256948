"""The actor loop: admitted generation, overlapped verification, groups sent under credit.

Contract
--------
``Actor(cfg, actor_id, engine, pool, client, prompts, tokenizer=None, weight_receiver=None)``;
``run(max_groups=None)`` returns a summary dict. One iteration of the loop:

1. Between generation batches, if the client has heard of a ``PolicyUpdate`` newer than the
   engine's version, the weights are received (``weight_receiver.receive``) and loaded with
   ``engine.load_weights(state, version)``; the heartbeat state is updated. With
   ``async.actor_lag`` = k > 0 (controlled staleness) every announced version is received
   into a delay line and the engine loads the newest one at most k behind the announcement.
2. Admission (the rule: ``common.admission``): no batch is started while the client does not
   admit the engine's version (``client.admitted``), and, under a capacity bound, a batch
   takes at most ``client.admit_room(groups started)`` prompts. While not admitted (or with no room) the actor first finishes the batch whose
   verification is pending (sending it is what frees room), then waits, loading new
   weights as soon as they are announced. Groups started and dropped are reported in the
   heartbeat for the learner's accounting.
3. Up to ``prompts_per_batch`` prompts are generated with ``k`` samples each in ONE ``generate``
   call, so every sample (and every token's ``policy_version``) of the batch comes from one
   engine version. Every response is submitted to the verifier pool at once. With an engine
   that takes in-flight updates (``generation.engine: vllm-async``), ``generate`` runs in a
   worker thread while this loop keeps loading announced weights into it (step 1 during the
   batch); tokens then carry the version that sampled them (non-decreasing, never older
   than the group's ``policy_version``, the version at the start of the batch).
4. Only then are the previous batch's verdicts collected (verification of batch n overlaps
   generation of batch n+1), its ``TrajectoryGroup``s built (int32 tokens, float32 engine
   log-probs, per-token versions, finish reasons, rewards, statuses) and sent under credit.
   A group with any verdict that is not a judgement (``verdict.is_error``: ``error``,
   ``sandbox_error``, and a math ``timeout`` when ``verifier.math_timeout: error``) carries
   no reward: it is dropped and counted (``actor/groups_dropped_verifier``), never sent.
5. Deterministic mode (``run.deterministic``): no batch is started while another is in
   flight, and each is generated with exactly the version at which the learner will consume
   its first group (``common.lockstep.LockstepSchedule`` replays the learner's intake from
   the verdicts of the groups sent); the capacity room is not consulted (a batch is always
   ``prompts_per_batch`` prompts). Every prompt is sampled from its own stream, seeded by
   (generation seed, run seed, actor, policy version, prompt position), in every mode.
6. After each handled group the prompt cursor is committed; it is saved after each batch
   and at exit, so a restarted actor (new client = new incarnation) resumes after the last
   handled prompt.
7. Learner restarts: when the client hears a new learner instance (``client.rejoin_needed``:
   the learner died and was restarted from its newest checkpoint, at an older version) the
   actor keeps its engine and verifiers and rides through. The groups in flight were
   generated for the replaced learner: they are dropped (``actor/groups_dropped_restart``)
   and their prompts handed out again. The client rejoins as a new incarnation, and
   nothing is generated until the engine has loaded a version the new learner published
   (older than its own allowed: ``engine.allow_rewind``). Counted: ``actor/learner_rejoins``.

Stop: ``request_stop()`` (thread-safe), SIGTERM (a handler is installed by ``run`` when it runs
in the main thread; the previous one is restored at exit), the learner's ``Shutdown``,
``max_groups`` reached, or the prompts running out. In-flight groups (generated, not yet
sent) are finished within ``stop_grace_s`` (verdicts collected, sent if credit arrives) or
dropped; the log says which. Then the client is closed with a goodbye and the cursor saved;
prompts of dropped groups are not committed, so a restart generates them again.

Metrics (``client.send_metrics`` after each batch, also in the heartbeat): ``actor/tokens_per_s``,
``actor/gen_s``, ``actor/verify_wait_s``, ``actor/weights_wait_s``, ``actor/admission_wait_s``,
``actor/version_lag``, ``actor/policy_version``, ``actor/groups_sent``,
``actor/groups_dropped_verifier``, ``actor/prompts_skipped``, ``actor/weight_updates``,
``actor/verify_timeouts`` (verdicts that ran out of time, whatever they count as),
``actor/cpu_s`` (CPU seconds so far of the actor process and its verifier workers),
``actor/lockstep_resyncs`` (deterministic mode: times the schedule was lost, e.g. by a restart),
``actor/learner_rejoins``, ``actor/groups_dropped_restart``.

Not covered: multiple engines per actor; in-flight updates on the ``vllm``/``hf`` engines
(they take weights between batches only).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from actors.engines.base import mix_seed
from actors.process import load_newest
from actors.prompts import PromptSource, split_reference, to_token_ids
from actors.verifiers.verdict import is_error
from common.lockstep import LockstepSchedule
from common.placement import cpu_seconds
from common.schema import Int32Vector, Response, TrajectoryGroup
from common.transport import LearnerRestarted, ShutdownRequested

__all__ = ["Actor"]

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    """One generated batch whose verdicts are pending."""

    version: int
    gen_s: float
    t_submit: float
    # per prompt: (cursor_after, prompt_id, prompt_ids, samples, futures, verifier kind)
    prompts: list[tuple[int, str, list[int], list, list[Future], str]] = field(default_factory=list)
    next_index: int = 0  # prompts[:next_index] are handled


def check_sample_versions(sample, version: int) -> None:
    """A sample of a batch started at ``version``: one version per token, never older than
    ``version`` and non-decreasing (in-flight updates only move forward)."""
    v = sample.versions()
    if len(v) != len(sample.token_ids):
        raise RuntimeError(f"engine gave {len(v)} token versions for {len(sample.token_ids)} tokens")
    if v and (v[0] < version or any(b < a for a, b in zip(v, v[1:]))):
        raise RuntimeError(f"engine token versions {v[0]}..{v[-1]} not non-decreasing from {version}")
    if sample.token_versions is None and sample.policy_version != version:
        raise RuntimeError(f"engine sampled version {sample.policy_version}, expected {version}")


class Actor:
    """See the module docstring."""

    def __init__(self, cfg, actor_id: str, engine, pool, client, prompts: PromptSource, tokenizer=None,
                 weight_receiver=None, *, prompts_per_batch: int = 8, verifier_kind: str = "math",
                 stop_grace_s: float = 10.0, detokenize: Callable[[list[int]], str] | None = None,
                 poll_s: float = 0.25):
        self.cfg = cfg
        self.actor_id = actor_id
        self.engine = engine
        self.pool = pool
        self.client = client
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.weight_receiver = weight_receiver
        self.prompts_per_batch = int(prompts_per_batch)
        self.verifier_kind = verifier_kind
        self.stop_grace_s = float(stop_grace_s)
        self.poll_s = float(poll_s)
        if detokenize is None:
            if tokenizer is not None:
                detokenize = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
            else:  # tokenizer-free mode: the verifier sees the ids, space-separated
                detokenize = lambda ids: " ".join(str(int(t)) for t in ids)  # noqa: E731
        self.detokenize = detokenize
        self._stop = threading.Event()
        self._stop_reason = ""
        # run.seed reaches the sampling too: runs of different seeds sample different tokens
        self._seed = mix_seed(int(cfg.generation.seed), int(cfg.run.seed), zlib.crc32(actor_id.encode()))
        self._warned_no_receiver = False
        self._fetched_for = -1  # newest announced version a receive was done for
        self._lag = int(cfg.async_.actor_lag)  # controlled staleness (0: load the newest)
        self._delay: deque = deque()  # (version, weights) received, not loaded yet (actor_lag > 0)
        self._gen_thread: ThreadPoolExecutor | None = None  # in-flight mode only
        self._lockstep: LockstepSchedule | None = None  # deterministic mode (run.deterministic)
        if cfg.run.deterministic:
            p = cfg.prime
            self._lockstep = LockstepSchedule(cfg.batch.prompts_per_step, cfg.async_.max_staleness, p.filter_low,
                                              p.filter_high, p.drop_truncated)
        self.stats: dict[str, float] = {
            "groups_sent": 0, "groups_dropped_verifier": 0, "groups_dropped_stop": 0, "prompts_skipped": 0,
            "weight_updates": 0, "tokens": 0, "gen_s": 0.0, "verify_wait_s": 0.0, "weights_wait_s": 0.0,
            "admission_wait_s": 0.0, "send_wait_s": 0.0, "groups_started": 0, "lockstep_resyncs": 0,
            "verify_timeouts": 0, "learner_rejoins": 0, "groups_dropped_restart": 0,
        }
        self._counts_base = (0, 0)  # groups (started, dropped) before the current incarnation

    # ------------------------------------------------------------------ control
    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask the loop to stop after the current step (thread- and signal-safe)."""
        if not self._stop.is_set():
            self._stop_reason = reason
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() or self.client.shutdown_requested

    def _in_flight(self, pending: _Batch | None) -> int:
        return 0 if pending is None else len(pending.prompts) - pending.next_index

    # ------------------------------------------------------------------ main loop
    def run(self, max_groups: int | None = None) -> dict:
        old_handler = None
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            old_handler = signal.signal(signal.SIGTERM, lambda s, f: self.request_stop("SIGTERM"))
        pending: _Batch | None = None
        started = 0  # prompts started (bounded by max_groups)
        try:
            self.client.set_state(policy_version=self.engine.policy_version, in_flight=0)
            while not self.client.wait_ready(timeout=self.poll_s):
                if self._stop.is_set():
                    break
            while not self.stopping:
                if max_groups is not None and started >= max_groups:
                    break
                if self.client.rejoin_needed:  # the learner restarted from a checkpoint
                    started -= self._rejoin(pending)
                    pending = None
                    continue
                if self._lockstep is not None:  # deterministic mode: nothing in flight, the schedule's version
                    if pending is not None:
                        self._finish(pending, deadline=None)
                        pending = None
                    if not self._lockstep_weights():
                        if self.client.rejoin_needed:
                            continue
                        break
                else:
                    self._maybe_update_weights()
                if not self._admitted():
                    if pending is not None:  # don't sit on finished work while waiting
                        self._finish(pending, deadline=None)
                        pending = None
                    if not self._wait_admission():
                        if self.client.rejoin_needed:
                            continue
                        break
                # deterministic mode: the schedule is the admission (a batch is always whole)
                room = None if self._lockstep is not None else self.client.admit_room(self._started_here())
                if room is not None and room <= 0:  # the learner's capacity rule: no room now
                    if pending is not None:  # sending it is what frees room
                        self._finish(pending, deadline=None)
                        pending = None
                    if not self._wait_room() and not self.client.rejoin_needed:
                        break
                    continue  # weights and the version rule again
                n = self.prompts_per_batch if max_groups is None else min(self.prompts_per_batch, max_groups - started)
                if room is not None:
                    n = min(n, room)
                batch = self._generate(n)
                if batch is None:  # prompts exhausted
                    break
                started += len(batch.prompts)
                self.client.set_state(in_flight=len(batch.prompts) + self._in_flight(pending))
                if pending is not None:
                    self._finish(pending, deadline=None)
                pending = batch
                self._report(pending)
            if pending is not None:  # the last batch (or the in-flight one at a stop)
                deadline = time.monotonic() + self.stop_grace_s if self.stopping else None
                self._finish(pending, deadline=deadline)
                pending = None
        except ShutdownRequested:
            self.request_stop(f"learner shutdown: {self.client.shutdown_reason}")
        except BaseException as e:
            self.request_stop(f"error: {type(e).__name__}: {e}")
            log.exception("actor %s: loop failed", self.actor_id)
            raise
        finally:
            if pending is not None:
                try:
                    self._finish(pending, deadline=time.monotonic() + self.stop_grace_s)
                except Exception:  # still close the client and save the cursor
                    log.exception("actor %s: finishing the in-flight groups failed", self.actor_id)
            reason = self._stop_reason or (f"learner shutdown: {self.client.shutdown_reason}"
                                           if self.client.shutdown_requested else "done")
            self.prompts.save()
            try:
                self._report(None)
            except Exception:  # pragma: no cover - metrics are best effort at exit
                pass
            self.client.close(goodbye=True, reason=reason[:200])
            if self._gen_thread is not None:
                self._gen_thread.shutdown(wait=False)
            if in_main and old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
            log.info("actor %s stopped (%s): %d groups sent, %d dropped (verifier), %d dropped (stop), cursor %d",
                     self.actor_id, reason, self.stats["groups_sent"], self.stats["groups_dropped_verifier"],
                     self.stats["groups_dropped_stop"], self.prompts.committed)
        return {**self.stats, "cursor": self.prompts.committed, "reason": reason,
                "policy_version": self.engine.policy_version}

    # ------------------------------------------------------------------ steps
    def _admitted(self) -> bool:
        """May a batch start now? Never while the engine waits for a restarted learner's weights."""
        return not self.engine.rewinding and self.client.admitted(self.engine.policy_version)

    def _rejoin(self, pending: _Batch | None) -> int:
        """The learner was replaced by a new instance (restarted from its newest checkpoint,
        at an older policy version). The groups in flight were generated for the old one: they
        are dropped (``actor/groups_dropped_restart``) and their prompts handed out again (not
        committed). The client becomes a new incarnation and the engine takes whatever version
        the new learner publishes next, older ones included; nothing is generated until then.
        Returns the number of prompts given back."""
        if pending is not None:
            for _, _, _, _, futs, _ in pending.prompts[pending.next_index:]:
                for f in futs:
                    f.cancel()
        given_back = self.prompts.position - self.prompts.committed  # handed out, not handled
        self.stats["groups_dropped_restart"] += given_back
        self.prompts.rewind()
        self.prompts.save()
        self._counts_base = (self.stats["groups_started"],
                             self.stats["groups_dropped_verifier"] + self.stats["groups_dropped_stop"])
        self._fetched_for = -1
        self._delay.clear()
        self.engine.allow_rewind()
        if self._lockstep is not None:  # resynchronised (and counted) on the new learner's first version
            self._lockstep.step, self._lockstep.taken = 0, 0
        self.stats["learner_rejoins"] += 1
        inc = self.client.rejoin()
        self.client.set_state(policy_version=self.engine.policy_version, in_flight=0, groups_started=0,
                              groups_dropped=0)
        log.warning("actor %s: the learner restarted: %d in-flight group(s) dropped, cursor back to %d, "
                    "rejoined as incarnation %s; waiting for its weights", self.actor_id,
                    given_back, self.prompts.committed, inc[:8])
        return given_back

    def _wait_admission(self) -> bool:
        """Wait until admitted, loading new weights as they are announced. False on stop or
        when the learner restarted (``client.rejoin_needed``)."""
        t0 = time.monotonic()
        try:
            while not self.stopping and not self.client.rejoin_needed:
                if self._admitted():
                    return True
                self._maybe_update_weights()
                if self.engine.rewinding:  # no version of the new learner loaded yet
                    self.client.wait_policy_update(self._fetched_for, timeout=self.poll_s)
                elif self.client.wait_admitted(self.engine.policy_version, timeout=self.poll_s):
                    return True
            return False
        finally:
            self.stats["admission_wait_s"] += time.monotonic() - t0

    def _wait_room(self) -> bool:
        """Wait until the learner's capacity rule leaves room for a group, loading new
        weights as they are announced. False on stop."""
        t0 = time.monotonic()
        try:
            while not self.stopping and not self.client.rejoin_needed:
                if self.client.wait_admit_room(self._started_here(), timeout=self.poll_s):
                    return True
                self._maybe_update_weights()
            return False
        finally:
            self.stats["admission_wait_s"] += time.monotonic() - t0

    def _started_here(self) -> int:
        """Groups started by the current incarnation (the learner's capacity rule counts per incarnation)."""
        return int(self.stats["groups_started"] - self._counts_base[0])

    def _report_counts(self) -> None:
        """Groups started and dropped by this incarnation, for the learner's admission accounting (heartbeat)."""
        dropped = self.stats["groups_dropped_verifier"] + self.stats["groups_dropped_stop"] - self._counts_base[1]
        self.client.set_state(groups_started=self._started_here(), groups_dropped=int(dropped))

    def _maybe_update_weights(self) -> None:
        upd = self.client.latest_update
        if upd is not None and self._lag:
            self._update_lagged(upd.policy_version)
            return
        floor = self._fetched_for if self.engine.rewinding else max(self.engine.policy_version, self._fetched_for)
        if upd is None or upd.policy_version <= floor:
            return
        self._fetched_for = upd.policy_version  # one receive per announcement
        if self.weight_receiver is None:
            if not self._warned_no_receiver:
                log.warning("actor %s: policy %d announced but no weight receiver", self.actor_id, upd.policy_version)
                self._warned_no_receiver = True
            self._fetched_for = -1
            return
        t0 = time.monotonic()
        before = self.engine.policy_version
        version = load_newest(self.weight_receiver, self.engine, self.cfg.async_.weight_sync_timeout_s)
        if self.engine.policy_version != before:  # (older after a learner restart)
            self.stats["weight_updates"] += 1
        self.stats["weights_wait_s"] += time.monotonic() - t0
        self.client.set_state(policy_version=self.engine.policy_version)
        log.info("actor %s: loaded policy version %d (%.2f s)", self.actor_id, version, time.monotonic() - t0)

    def _lockstep_weights(self) -> bool:
        """Deterministic mode: wait until the learner has announced the version the schedule
        names for the next batch (the step that will consume its first group) and load
        exactly it. False on stop. If the learner is already past it (this actor restarted,
        or the learner resumed with buffered groups), the schedule cannot be replayed: it is
        resynchronised to the learner, counted (``actor/lockstep_resyncs``) and warned about,
        and the run goes on without the guarantee."""
        target = self._lockstep.step
        t0 = time.monotonic()
        try:
            while not self.stopping and not self.client.rejoin_needed:
                upd = self.client.latest_update
                if upd is not None and upd.policy_version >= target:
                    break
                self.client.wait_policy_update(target - 1, timeout=self.poll_s)
            else:
                return False
        finally:
            self.stats["admission_wait_s"] += time.monotonic() - t0
        if self.engine.policy_version != target:
            self._maybe_update_weights()
        if self.engine.policy_version != target:
            self.stats["lockstep_resyncs"] += 1
            log.warning("actor %s: deterministic schedule lost (wanted version %d, the learner is at %d): "
                        "resynchronised, this run is no longer deterministic", self.actor_id, target,
                        self.engine.policy_version)
            self._lockstep.step, self._lockstep.taken = self.engine.policy_version, 0
        return True

    def _update_lagged(self, announced: int) -> None:
        """Controlled staleness (``async.actor_lag`` = k): take every announced version into a
        delay line, and generate with the newest one that is at most ``announced - k``."""
        t0 = time.monotonic()
        if announced > self._fetched_for and self.weight_receiver is not None:
            self._fetched_for = announced  # one receive per announcement
            version, state = self.weight_receiver.receive(timeout_s=self.cfg.async_.weight_sync_timeout_s, copy=True)
            if not self._delay or version > self._delay[-1][0]:
                self._delay.append((version, state))
        target = announced - self._lag
        floor = -1 if self.engine.rewinding else self.engine.policy_version  # a restarted learner: any
        ready = [(v, w) for v, w in self._delay if floor < v <= target]
        if ready:
            version, state = ready[-1]
            self.engine.load_weights(state, version)
            self.stats["weight_updates"] += 1
            self.client.set_state(policy_version=version)
            log.info("actor %s: loaded policy version %d, %d behind the announced %d (actor_lag)", self.actor_id,
                     version, announced - version, announced)
        while self._delay and (self._delay[0][0] <= floor or len(self._delay) > self._lag + 1):
            self._delay.popleft()
        self.stats["weights_wait_s"] += time.monotonic() - t0

    def _generate(self, n: int) -> _Batch | None:
        gcfg = self.cfg.generation
        items, ids_list = [], []
        while len(items) < n:
            got = self.prompts.next_batch(n - len(items))
            if not got:
                break
            for after, (pid, prompt, ref) in got:
                ids = to_token_ids(prompt, self.tokenizer)
                if not ids or len(ids) > gcfg.max_prompt_tokens:
                    self.stats["prompts_skipped"] += 1
                    items.append((after, pid, ids, ref, False))
                else:
                    items.append((after, pid, ids, ref, True))
                    ids_list.append(ids)
        if not items:
            return None
        version = self.engine.policy_version
        t0 = time.monotonic()
        samples = []
        if ids_list:
            # one stream per (actor, version, prompt position): a prompt's samples do not depend on
            # its batch, on timing or on restarts
            seeds = [mix_seed(self._seed, version, after - 1) for after, _, _, _, ok in items if ok]
            kwargs = dict(k=gcfg.k, temperature=gcfg.temperature, top_p=gcfg.top_p, max_tokens=gcfg.max_tokens,
                          seed=seeds)
            if getattr(self.engine, "inflight_updates", False):
                samples = self._generate_inflight(ids_list, kwargs)
            else:
                samples = self.engine.generate(ids_list, **kwargs)
        gen_s = time.monotonic() - t0
        self.stats["groups_started"] += len(ids_list)
        self._report_counts()
        self.stats["gen_s"] += gen_s
        ntok = sum(len(s.token_ids) for per in samples for s in per)
        self.stats["tokens"] += ntok
        self._last_tps = ntok / gen_s if gen_s > 0 else 0.0
        batch = _Batch(version=version, gen_s=gen_s, t_submit=time.monotonic())
        it = iter(samples)
        for after, pid, ids, ref, ok in items:
            if not ok:  # skipped prompt: nothing to send, but it is handled
                batch.prompts.append((after, pid, ids, [], [], ""))
                continue
            per = next(it)
            for s in per:
                check_sample_versions(s, version)
            kind, value = split_reference(ref, self.verifier_kind)  # a row may name its verifier
            futs = [self.pool.submit(kind, self.detokenize(s.token_ids), value) for s in per]
            batch.prompts.append((after, pid, ids, per, futs, kind))
        return batch

    def _generate_inflight(self, ids_list: list[list[int]], kwargs: dict) -> list:
        """Generate in a worker thread; meanwhile new weights announced by the learner are
        loaded into the running engine (its samples then carry per-token versions)."""
        if self._gen_thread is None:
            self._gen_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gen-{self.actor_id}")
        fut = self._gen_thread.submit(self.engine.generate, ids_list, **kwargs)
        while True:
            try:
                return fut.result(timeout=self.poll_s)
            except FutureTimeout:
                self._maybe_update_weights()

    def _finish(self, batch: _Batch, deadline: float | None) -> None:
        """Collect the batch's verdicts, send its groups (drop on verifier failure); with a
        ``deadline`` whatever is not done by then is dropped and logged."""
        while batch.next_index < len(batch.prompts):
            after, pid, ids, samples, futs, kind = batch.prompts[batch.next_index]
            if not samples:
                self._handled(batch, after)
                continue
            t0 = time.monotonic()
            try:
                verdicts = [f.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
                            for f in futs]
            except FutureTimeout:
                break
            finally:
                self.stats["verify_wait_s"] += time.monotonic() - t0
            verify_s = time.monotonic() - batch.t_submit
            self.stats["verify_timeouts"] += sum(v.status == "timeout" for v in verdicts)
            bad = [v.status for v in verdicts if is_error(v.status, kind, self.cfg.verifier.math_timeout)]
            if bad:
                self.stats["groups_dropped_verifier"] += 1
                log.warning("actor %s: group %s dropped: verifier %s", self.actor_id, pid, bad[0])
                self._handled(batch, after)
                continue
            group = self._group(pid, ids, samples, verdicts, batch, verify_s)
            if not self._send(group, deadline):
                break
            self.stats["groups_sent"] += 1
            if self._lockstep is not None:
                self._lockstep.observe([v.reward for v in verdicts], any(s.finish_reason == "length" for s in samples),
                                       min(min(s.versions()) for s in samples if s.token_ids))
            self._handled(batch, after)
        left = len(batch.prompts) - batch.next_index
        if left and self.client.rejoin_needed:  # the learner restarted: _rejoin drops them
            self.prompts.save()
            return
        if left:
            self.stats["groups_dropped_stop"] += left
            log.warning("actor %s: stopping: %d in-flight group(s) dropped (prompts not committed: "
                        "a restart generates them again)", self.actor_id, left)
        elif deadline is not None:
            log.info("actor %s: stopping: in-flight groups finished and sent", self.actor_id)
        batch.next_index = len(batch.prompts)
        self.prompts.save()
        self.client.set_state(in_flight=0)
        self._report_counts()

    def _handled(self, batch: _Batch, after: int) -> None:
        self.prompts.commit(after)
        batch.next_index += 1

    def _send(self, group: TrajectoryGroup, deadline: float | None) -> bool:
        t0 = time.monotonic()
        try:
            while True:
                timeout = self.poll_s if deadline is None else min(self.poll_s, max(0.0, deadline - time.monotonic()))
                try:
                    if self.client.send_group(group, timeout=timeout):
                        return True
                except (ShutdownRequested, LearnerRestarted):
                    return False
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                if deadline is None and self._stop.is_set():
                    # a stop arrived while waiting for credit: give it the grace period
                    deadline = time.monotonic() + self.stop_grace_s
        finally:
            self.stats["send_wait_s"] += time.monotonic() - t0

    def _group(self, pid: str, prompt_ids: list[int], samples, verdicts, batch: _Batch,
               verify_s: float) -> TrajectoryGroup:
        responses = []
        for s, v in zip(samples, verdicts):
            responses.append(Response.from_numpy(
                np.asarray(s.token_ids, dtype=np.int32),
                np.minimum(np.asarray(s.logprobs, dtype=np.float32), 0.0),
                np.asarray(s.versions(), dtype=np.int32),
                finish_reason=s.finish_reason, outcome_reward=float(v.reward), verifier_status=v.status,
            ))
        return TrajectoryGroup(prompt_id=pid[:256], prompt_tokens=Int32Vector.from_numpy(np.asarray(prompt_ids, np.int32)),
                               responses=responses, policy_version=batch.version, gen_s=batch.gen_s,
                               verify_s=max(0.0, verify_s))

    def _report(self, batch: _Batch | None) -> None:
        lv = self.client.learner_version
        m = {f"actor/{k}": float(v) for k, v in self.stats.items()}
        m["actor/tokens_per_s"] = float(getattr(self, "_last_tps", 0.0))
        m["actor/policy_version"] = float(self.engine.policy_version)
        m["actor/cpu_s"] = cpu_seconds(getattr(self.pool, "worker_pids", list)())
        m["actor/version_lag"] = float(max(0, lv - self.engine.policy_version)) if lv is not None else 0.0
        if batch is not None:
            m["actor/batch_gen_s"] = batch.gen_s
        self.client.set_state(policy_version=self.engine.policy_version, metrics=m)
        self.client.send_metrics(m)
