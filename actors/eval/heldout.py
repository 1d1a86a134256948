"""Periodic held-out evaluation during training, in its own process (never stalls the learner).

Who calls it: ``launch/run.py`` starts ``python launch/actors.py --evaluator --config FILE``
next to the actors; a cluster run may start it on any host that reaches the learner.

Contract
--------
- It joins the transport as the client ``evaluator`` (heartbeats, never sends groups) to
  hear ``PolicyUpdate``s, and fetches weights like an actor (``AnnouncedReceiver``).
- It evaluates the starting policy (``model.policy_path``, version 0) before it connects,
  then the newest version whenever it
  has advanced by ``eval.every`` since the last evaluation (it skips versions while busy:
  it never holds anything up) -- in deterministic mode (``run.deterministic``) exactly
  versions ``eval.every``, 2·``eval.every``, ... from the weights the learner leaves in
  ``<run_dir>/eval_weights/`` (``common.lockstep``), each file deleted once scored -- and
  at the end the final policy saved by the learner in
  ``<run_dir>/final`` (``"final": true``) unless that version was the last one evaluated.
- One evaluation: the held-out prompts (``eval.heldout_path``, first ``eval.limit``), each
  sampled ``eval.samples`` times at ``eval.temperature`` (default: the training temperature),
  ``accuracy`` = the fraction of those samples that are correct; with ``eval.greedy`` also
  one greedy answer each (``greedy_accuracy``). Items, generation and scoring are those of
  benchmark evaluation (``actors.eval``: ``load_items``, ``evaluate``), so the verdict
  policy is the same (``actors.verifiers.verdict.is_error``, ``verifier.math_timeout``): a
  verdict that is not a judgement is counted (``errors``) and left out of the accuracy,
  never scored 0; timeouts are counted (``timeouts``) whatever they count as.
- Output: one JSON line per evaluation in ``<run_dir>/eval.jsonl`` (policy_version, accuracy,
  greedy_accuracy, n, errors, seconds, final) and TensorBoard scalars ``eval/accuracy``,
  ``eval/greedy_accuracy`` under ``<run_dir>/tb/eval`` with the policy version as the step.
- A learner restart (the learner re-publishes an older version from its checkpoint) is
  ridden through: the client rejoins, and evaluations continue after the last one done.
Not covered: benchmark suites (``actors.eval.run_eval`` / ``launch/eval.py``), pass@k.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from actors.eval.items import load_items
from actors.eval.run import evaluate
from actors.process import load_newest
from common import placement
from common.jsonl import read_rows
from common.lockstep import eval_weights_path

log = logging.getLogger(__name__)

EVALUATOR_ID = "evaluator"


HELDOUT_CHUNK = 64  # prompts per generate call of a held-out evaluation


def heldout_seeds(seed: int, n: int, samples: int, chunk: int = HELDOUT_CHUNK) -> list[int]:
    """Per-prompt sampling seeds of a held-out evaluation: prompt i of the chunk starting at
    ``lo`` gets ``seed + lo + (i - lo)·samples``, the streams this evaluator has always used
    (so held-out figures stay comparable with earlier runs; prompts in different chunks may
    share a stream, which correlates their samples but biases nothing)."""
    return [seed + (i // chunk) * chunk + (i % chunk) * samples for i in range(n)]


class Evaluator:
    """See the module docstring."""

    def __init__(self, cfg, engine, pool, tokenizer, items, client=None, receiver=None):
        self.cfg, self.engine, self.pool, self.tokenizer, self.items = cfg, engine, pool, tokenizer, items
        self.client, self.receiver = client, receiver
        self.run_dir = Path(cfg.run.output_dir)
        self.records: list[dict] = []
        self._tb = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb" / "eval"))

    def evaluate(self, version: int, final: bool = False) -> dict:
        e = self.cfg.eval
        temp = e.temperature if e.temperature is not None else self.cfg.generation.temperature
        t0 = time.monotonic()
        seed = self.cfg.run.seed + 7919
        common = dict(max_tokens=self.cfg.generation.max_tokens, pool=self.pool, batch_size=HELDOUT_CHUNK,
                      progress=False, math_timeout=self.cfg.verifier.math_timeout,
                      timeouts_s=dict(getattr(self.pool, "kind_timeouts_s", {}) or {}))
        sampled = self._score(samples=e.samples, temperature=temp,
                              seeds=heldout_seeds(seed, len(self.items), e.samples), **common)
        rec = {"policy_version": int(version), "accuracy": sampled["accuracy"], "n": sampled["n"],
               "errors": sampled["errors"], "timeouts": sampled["timeouts"], "temperature": temp, "samples": e.samples, "final": final}
        if e.greedy:
            greedy = self._score(samples=1, temperature=0.0, seed=seed, **common)
            rec["greedy_accuracy"] = greedy["accuracy"]
            rec["errors"] += greedy["errors"]
            rec["timeouts"] += greedy["timeouts"]
        rec["seconds"] = round(time.monotonic() - t0, 2)
        rec["time"] = time.time()
        self.records.append(rec)
        with open(self.run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            self._tb.add_scalar("eval/accuracy", rec["accuracy"], version)
            if "greedy_accuracy" in rec:
                self._tb.add_scalar("eval/greedy_accuracy", rec["greedy_accuracy"], version)
            self._tb.flush()
        log.info("eval v%d%s: accuracy %.3f (greedy %s) on %d samples, %d errors, %.1f s", version,
                 " (final)" if final else "", rec["accuracy"], rec.get("greedy_accuracy"), rec["n"],
                 rec["errors"], rec["seconds"])
        return rec

    def _score(self, **kw) -> dict:
        """One pass of ``actors.eval.evaluate`` over the held-out items: accuracy (a fraction,
        over the judged responses), n (judged responses), errors, timeouts."""
        res = evaluate(self.engine, self.items, self.tokenizer, ks=(), **kw)
        sc = next(iter(res.scores.values()))
        return {"accuracy": sc.accuracy / 100.0, "n": sum(not r.error for r in res.records), "errors": sc.errors,
                "timeouts": sc.timeouts}

    def run(self, poll_s: float = 0.5, final_wait_s: float = 300.0) -> list[dict]:
        """Evaluate as versions arrive until the learner says stop; then the final policy. A
        resumed run (``checkpoint.resume``) keeps the evaluations in ``eval.jsonl`` and
        continues after the last one instead of scoring the starting policy again."""
        done = read_rows(self.run_dir / "eval.jsonl") if self.cfg.checkpoint.resume else []
        done = [r for r in done if not r.get("final")]
        if done:
            self.records = done
            log.info("resumed: %d evaluations kept, the last at v%d", len(done), done[-1]["policy_version"])
        else:
            self.evaluate(self.engine.policy_version)  # the starting policy, as loaded from model.policy_path
        first = (self.records[-1]["policy_version"] // self.cfg.eval.every + 1) * self.cfg.eval.every
        if self.cfg.run.deterministic:
            self._follow_snapshots(poll_s, first)
        else:
            self._follow_newest(poll_s, first)
        self._evaluate_final(poll_s, final_wait_s)
        return self.records

    def _rejoin_if_restarted(self) -> None:
        """The learner restarted from a checkpoint (an older version): rejoin it as a new
        incarnation (so its Shutdown reaches this process) and let the engine take its versions,
        older ones included. Evaluations go on after the last one done."""
        if self.client.rejoin_needed:
            self.client.rejoin()
            self.engine.allow_rewind()
            log.warning("the learner restarted: rejoined; evaluations continue after v%d",
                        self.records[-1]["policy_version"] if self.records else 0)

    def _follow_newest(self, poll_s: float, next_v: int) -> None:
        """The newest version each time it has advanced by ``eval.every`` (skips while busy)."""
        every = self.cfg.eval.every
        while not self.client.shutdown_requested:
            self._rejoin_if_restarted()
            upd = self.client.latest_update
            if upd is None or upd.policy_version < next_v:
                time.sleep(poll_s)
                continue
            version = load_newest(self.receiver, self.engine, self.cfg.async_.weight_sync_timeout_s)
            if version >= next_v:  # (a restarted learner's older versions are loaded, not scored again)
                self.evaluate(version)
            next_v = max(next_v, (version // every + 1) * every)

    def _follow_snapshots(self, poll_s: float, next_v: int) -> None:
        """Deterministic mode: exactly versions every, 2·every, ... from the files the learner
        writes (``common.lockstep.eval_weights_path``), each deleted once scored."""
        every = self.cfg.eval.every
        while True:
            self._rejoin_if_restarted()
            stopped = self.client.shutdown_requested  # read first: the learner writes every file before it stops
            path = eval_weights_path(self.run_dir, next_v)
            if path.is_file():
                self.engine.load_weights(str(path), next_v)
                self.evaluate(next_v)
                path.unlink(missing_ok=True)
                next_v += every
            elif stopped:
                return
            else:
                time.sleep(poll_s)

    def _evaluate_final(self, poll_s: float, final_wait_s: float) -> None:
        """The final policy from ``<run_dir>/final``, unless its version was just evaluated."""
        final = self.run_dir / "final"
        deadline = time.monotonic() + final_wait_s
        while not (final / "config.json").is_file() and time.monotonic() < deadline:
            time.sleep(poll_s)
        if not (final / "config.json").is_file():
            log.warning("no final policy in %s after %.0f s: no final evaluation", final, final_wait_s)
            return
        upd = self.client.latest_update
        version = max(self.engine.policy_version, upd.policy_version if upd is not None else 0)
        if self.records and self.records[-1]["policy_version"] == version:
            log.info("final policy v%d was just evaluated: not again", version)
        else:
            self.engine.load_weights(str(final), version)
            self.evaluate(version, final=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def run_evaluator_process(cfg) -> list[dict]:
    """Build the evaluator for ``cfg`` and run it to the end of training."""
    from transformers import AutoTokenizer

    from actors.engines import make_engine
    from actors.process import AnnouncedReceiver, engine_options
    from actors.verifiers.pool import VerifierPool
    from common.transport import ActorClient

    if cfg.eval.every == 0:
        log.info("eval.every = 0: no periodic evaluation")
        return []
    if cfg.eval.heldout_path is None:
        raise ValueError("eval.heldout_path is not set (the launcher sets it for task.kind=arithmetic)")
    placement.apply(cfg.placement, "evaluator")
    items = load_items(cfg.eval.heldout_path, cfg.eval.limit, default_kind=cfg.actors.verifier_kind,
                       benchmark="heldout", prompt_suffix=cfg.eval.prompt_suffix)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.policy_path)
    kind = cfg.generation.engine if cfg.generation.engine != "vllm-async" else "vllm"
    engine = make_engine(kind, cfg.model.policy_path, **engine_options(cfg, kind))
    receiver = ev = None
    try:
        with VerifierPool.from_config(cfg.verifier) as pool:
            client = ActorClient(cfg.transport, EVALUATOR_ID, generates=False).start()
            try:
                total = cfg.actors.total_slots or cfg.actors.num
                receiver = AnnouncedReceiver(cfg, client, rank=total + 1, num_receivers=total + 1, label=EVALUATOR_ID)
                ev = Evaluator(cfg, engine, pool, tokenizer, items, client, receiver)
                return ev.run()
            finally:
                client.close(goodbye=True, reason="evaluation done")
    finally:
        if ev is not None:
            ev.close()
        if receiver is not None:
            receiver.close()
        engine.close()
