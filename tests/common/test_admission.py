"""common/admission.py: the staleness and admission rule, each part by hand, the share rule
against a naive per-group allocation, and the config decoding."""

import math
from types import SimpleNamespace

import pytest

from common.admission import (
    KEEP_WARMUP,
    MIN_KEEP_RATE,
    AdmissionRule,
    admit_total,
    capacity_room,
    group_fate,
    is_stale,
    keep_rate,
    usable_buffered,
    version_admitted,
)

RULE = dict(eta=1, low=0.2, high=0.8, drop_truncated=True)


def test_version_rule_and_staleness_by_hand():
    assert version_admitted(5, 4, 1) and version_admitted(5, 5, 0) and version_admitted(5, 6, 0)
    assert not version_admitted(5, 3, 1) and not version_admitted(5, 4, 0)
    assert not version_admitted(None, 0, 1) and not version_admitted(0, 0, None)  # not heard yet
    assert not is_stale(3, 4, 1) and is_stale(2, 4, 1) and not is_stale(4, 4, 0) and is_stale(3, 4, 0)


def test_capacity_room_by_hand():
    assert capacity_room(eta=1, actor_lag=0, groups_per_step=4, accepted=0) == 8     # (1 + 1)·4
    assert capacity_room(eta=8, actor_lag=7, groups_per_step=4, accepted=0) == 8     # (8 − 7 + 1)·4
    assert capacity_room(eta=8, actor_lag=0, groups_per_step=4, accepted=5) == 31    # 36 − 5
    assert capacity_room(eta=0, actor_lag=0, groups_per_step=4, accepted=9) == 0     # never negative


def test_keep_rate_by_hand():
    assert keep_rate([0] * (KEEP_WARMUP - 1)) == 1.0          # too few seen: no estimate
    assert keep_rate([1, 0] * 8) == 0.5
    assert keep_rate([1] + [0] * 99) == MIN_KEEP_RATE          # 0.01, floored


def test_budget_by_hand():
    rule = AdmissionRule(eta=1, groups_per_step=4, slack=2.0)
    assert rule.budget(0, 0.5) == 24        # room 8: ⌈(8 + 2·√(8·0.5)) / 0.5⌉ = ⌈12 / 0.5⌉
    assert rule.budget(8, 0.5) == 0         # no room, no slack
    assert AdmissionRule(eta=1, groups_per_step=4).budget(3, 0.5) == 10  # ⌈5 / 0.5⌉
    assert AdmissionRule(eta=1, groups_per_step=4).budget(0, 1.0) == 8
    assert AdmissionRule(eta=1).budget(0, 0.5) is None and AdmissionRule(eta=1).initial_budget() is None
    assert rule.initial_budget() == 0
    z, room, p = 1.5, 7, 0.3
    assert AdmissionRule(eta=2, actor_lag=1, groups_per_step=5, slack=z).budget(3, p) == \
        math.ceil((room + z * math.sqrt(room * (1 - p))) / p)   # (2 − 1 + 1)·5 − 3 = 7


def test_usable_buffered_by_hand():
    # η = 1, B = 4, the batch at version 5 complete (taken 4): the next batch trains from 6,
    # where version-4 groups are stale: the surplus of version 4 holds no room
    assert usable_buffered([4, 4, 4, 5, 5], current_version=5, taken=4, eta=1, groups_per_step=4) == 2
    # the batch at 5 still has 2 places: two version-4 groups fill them, the third is stale at 6
    assert usable_buffered([4, 4, 4, 5, 5], current_version=5, taken=2, eta=1, groups_per_step=4) == 4
    # η = 2: version 4 is still usable at 6, the fifth group goes to version 7's batch
    assert usable_buffered([4, 4, 4, 4, 4, 5], current_version=5, taken=4, eta=2, groups_per_step=4) == 5
    # η = 0 (synchronous): only the current version's groups, and only the places left
    assert usable_buffered([5, 5, 5], current_version=5, taken=1, eta=0, groups_per_step=4) == 3
    assert usable_buffered([5, 6], current_version=5, taken=4, eta=0, groups_per_step=4) == 1
    assert usable_buffered([], current_version=0, taken=0, eta=1, groups_per_step=4) == 0


def naive_intake_used(oldest, version, taken, eta, b):
    """Ingest.next_batch played out literally: pop oldest first; a stale group is dropped;
    a batch of b is trained at each version in turn (the first already holds ``taken``)."""
    queue, used, batch = list(oldest), 0, min(taken, b)
    if taken >= b:
        version, batch = version + 1, 0
    while queue:
        o = queue.pop(0)
        if version - o > eta:
            continue
        used, batch = used + 1, batch + 1
        if batch == b:
            version, batch = version + 1, 0
    return used


@pytest.mark.parametrize("seed", range(40))
def test_usable_buffered_matches_the_intake_played_out(seed):
    import random

    rng = random.Random(seed)
    eta, b, v = rng.randint(0, 3), rng.randint(1, 6), rng.randint(4, 9)
    oldest = [v - rng.randint(0, eta + 2) + (rng.random() < 0.2) for _ in range(rng.randint(0, 20))]
    taken = rng.randint(0, b)
    assert usable_buffered(oldest, v, taken, eta, b) == naive_intake_used(oldest, v, taken, eta, b)


def naive_admit_totals(budget, started, dropped, taken):
    """Deal budget − outstanding out one group at a time, in actor order: the shares."""
    room = max(budget - sum(s - d - t for s, d, t in zip(started, dropped, taken)), 0)
    share = [0] * len(started)
    for g in range(room):
        share[g % len(started)] += 1
    return [s + x for s, x in zip(started, share)]


@pytest.mark.parametrize("budget,started,dropped,taken", [
    (10, [0, 0, 0], [0, 0, 0], [0, 0, 0]),
    (10, [4, 2, 0], [1, 0, 0], [2, 1, 0]),
    (3, [9, 9], [0, 0], [2, 3]),        # outstanding 13 > budget: no room
    (7, [5], [2], [6]),                 # a lagging heartbeat (taken > started) cancels out
    (0, [1, 2, 3, 4], [0, 0, 0, 0], [1, 2, 3, 4]),
])
def test_shares_match_a_naive_allocation(budget, started, dropped, taken):
    want = naive_admit_totals(budget, started, dropped, taken)
    assert [admit_total(budget, started, dropped, taken, i) for i in range(len(started))] == want


def test_one_actor_gets_budget_plus_dropped_plus_taken():
    assert admit_total(7, [5], [2], [6], 0) == 7 + 2 + 6


def test_group_fate_by_hand():
    assert group_fate([1, 0, 0, 1], False, 3, 4, **RULE) == "kept"      # lag 1 = η, accuracy 0.5
    assert group_fate([1, 0, 0, 1], False, 2, 4, **RULE) == "stale"     # lag 2 > η, checked first
    assert group_fate([1, 1, 1, 1], True, 2, 4, **RULE) == "stale"
    assert group_fate([1, 0, 0, 1], True, 4, 4, **RULE) == "truncated"
    assert group_fate([1, 0, 0, 1], True, 4, 4, **{**RULE, "drop_truncated": False}) == "kept"
    assert group_fate([1, 1, 1, 1], False, 4, 4, **RULE) == "filtered"  # 1.0 > 0.8
    assert group_fate([0, 0, 0, 0], False, 4, 4, **RULE) == "filtered"  # 0.0 < 0.2
    assert group_fate([1, 0, 0, 0, 0], False, 4, 4, **RULE) == "kept"   # 0.2: the bounds are inclusive
    assert group_fate([1, 1, 1, 1, 0], False, 4, 4, **RULE) == "kept"   # 0.8


def test_rule_from_config_and_its_checks():
    a = SimpleNamespace(max_staleness=4, actor_lag=3, admission="capacity", admission_slack=1.0)
    assert AdmissionRule.from_config(a, 8) == AdmissionRule(eta=4, actor_lag=3, groups_per_step=8, slack=1.0)
    a.admission = "version"
    assert AdmissionRule.from_config(a, 8).groups_per_step is None
    for bad in (4, 5, -1):
        with pytest.raises(ValueError, match="actor_lag"):
            AdmissionRule(eta=4, actor_lag=bad)
    assert AdmissionRule(eta=0, actor_lag=0).actor_lag == 0
    with pytest.raises(ValueError, match="groups_per_step"):
        AdmissionRule(eta=1, groups_per_step=0)
