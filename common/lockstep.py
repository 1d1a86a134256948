"""The lockstep schedule (the learner's intake rule replayed on the actor side) and the
evaluation weights of deterministic mode.

Contract
--------
- The rule itself is ``common.admission.group_fate`` (``learner.ingest.Ingest`` applies it to
  every received group): ``"stale"``, ``"truncated"``, ``"filtered"`` or ``"kept"``.
- ``LockstepSchedule`` replays that rule on the actor's side in deterministic mode
  (``run.deterministic``): fed the groups an actor sends, in order, it knows exactly which
  learner step will consume the next group (``step``), because the learner takes kept groups
  first-in first-out, ``groups_per_step`` per step, and drops at consumption those stale for
  that step. An actor that generates its next batch with exactly version ``step`` (and
  nothing else in flight) therefore produces the same batches whatever the machine's speed:
  the learner's batch at step s is a function of the seeds and the weights, never of timing.
- ``save_eval_weights`` / ``eval_weights_path``: in deterministic mode the learner writes the
  weights of every ``eval.every``-th version to ``<run_dir>/eval_weights/v<version>.safetensors``
  (written under a temporary name, then renamed: a reader sees a whole file or none) before
  it announces the version, and the evaluator scores exactly those versions, deleting each
  file once scored, instead of whatever version is newest when it is free.
Invariants: with one actor, ordered delivery and no overflow of the learner's surplus buffer,
``LockstepSchedule.step`` equals the learner's step at which the next group is consumed.
Not covered: several actors (their groups interleave by timing), groups lost in transit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.admission import group_fate

__all__ = ["LockstepSchedule", "eval_weights_path", "save_eval_weights"]


class LockstepSchedule:
    """The learner's consumption, replayed from the groups sent (see the module docstring).

    ``step``: the learner step (= the policy version it trains from) at which the next kept
    group will be consumed; ``taken``: groups already taken for that step.
    """

    def __init__(self, groups_per_step: int, eta: int, low: float, high: float, drop_truncated: bool = False):
        if groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1 (got {groups_per_step})")
        self.groups_per_step = int(groups_per_step)
        self.eta, self.low, self.high, self.drop_truncated = int(eta), float(low), float(high), bool(drop_truncated)
        self.step = 0
        self.taken = 0
        self.fates: dict[str, int] = {"kept": 0, "stale": 0, "truncated": 0, "filtered": 0}

    def observe(self, outcomes: Sequence[float], any_truncated: bool, oldest_version: int) -> str:
        """Record one group as sent; returns its fate at the step that reaches it.

        A group that passes the filters waits in the learner's buffer until ``step``; there
        it is stale if it is more than η behind ``step``, else it is taken."""
        fate = group_fate(outcomes, any_truncated, oldest_version, self.step, eta=self.eta, low=self.low,
                          high=self.high, drop_truncated=self.drop_truncated)
        self.fates[fate] += 1
        if fate == "kept":
            self.taken += 1
            if self.taken == self.groups_per_step:
                self.step += 1
                self.taken = 0
        return fate


def eval_weights_path(run_dir: str | os.PathLike, version: int) -> Path:
    """Where the learner leaves version ``version``'s weights for the evaluator."""
    return Path(run_dir) / "eval_weights" / f"v{int(version):08d}.safetensors"


def save_eval_weights(run_dir: str | os.PathLike, state: Mapping, version: int) -> Path:
    """Write ``state`` (name -> tensor; tied tensors once) atomically to
    ``eval_weights_path(run_dir, version)``."""
    from safetensors.torch import save_file

    from common.weight_sync.wire import tie_key

    seen, out = set(), {}
    for name, t in state.items():
        key = tie_key(t)
        if key in seen:
            continue  # a tied alias: the engines re-tie on load
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    path = eval_weights_path(run_dir, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp))
    os.replace(tmp, path)
    return path
