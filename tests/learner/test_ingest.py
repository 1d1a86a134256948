"""learner/ingest.py against a real LearnerServer and ActorClient: the accuracy filter, the
staleness backstop, the surplus buffer, and the capacity-admission budget it hands the server."""

import dataclasses
import time

import pytest
from synthetic import ALL_RIGHT, MIXED, group, live_link

from common.admission import AdmissionRule
from learner.ingest import Ingest


@pytest.fixture
def link():
    with live_link() as pair:
        yield pair


def _receive_all(srv, ing, n, version):
    deadline = time.monotonic() + 10
    while ing.counts["received"] < n and time.monotonic() < deadline:
        env = srv.recv_group(timeout=0.2)
        if env is not None:
            ing._accept(env.body, version)
    assert ing.counts["received"] == n


def test_budget_filter_backstop_and_buffer(link):
    srv, cli = link
    ing = Ingest(srv, AdmissionRule(eta=1, groups_per_step=2), filter_low=0.2, filter_high=0.8)
    ing.update_admission()
    assert srv._admission_budget == 4  # (η + 1)·B = 2·2, nothing accepted yet
    for g in (group("a", MIXED, 0), group("b", ALL_RIGHT, 0), group("c", MIXED, 0)):
        assert cli.send_group(g, timeout=5)
    out, _ = ing.next_batch(2, current_version=0)
    assert [g.prompt_id for g in out] == ["a", "c"]  # b filtered (accuracy 1.0 > 0.8)
    assert (ing.counts["kept"], ing.counts["filtered"]) == (2, 1)
    assert srv._admission_budget == 2  # 4 - the 2 taken for this step; the filtered one used none
    # next step (version 1): d arrives, is kept and taken: 4 - 0 buffered - 1 taken = 3
    assert cli.send_group(group("d", MIXED, 0), timeout=5)
    out, _ = ing.next_batch(1, current_version=1)
    assert [g.prompt_id for g in out] == ["d"] and srv._admission_budget == 3
    # a version-0 group arriving at version 2 is over η = 1: the backstop drops and counts it
    assert cli.send_group(group("e", MIXED, 0), timeout=5)
    assert cli.send_group(group("f", MIXED, 2), timeout=5)
    out, _ = ing.next_batch(1, current_version=2)
    assert [g.prompt_id for g in out] == ["f"] and ing.counts["stale"] == 1
    # surplus waits in the buffer and holds room: 4 - 1 buffered - 1 taken = 2 while it is built
    assert cli.send_group(group("g", MIXED, 3), timeout=5)
    assert cli.send_group(group("h", MIXED, 3), timeout=5)
    _receive_all(srv, ing, 8, 3)
    assert len(ing.buffer) == 2
    out, _ = ing.next_batch(1, current_version=3)
    assert [g.prompt_id for g in out] == ["g"] and len(ing.buffer) == 1
    assert srv._admission_budget == 4 - 1 - 1


def test_surplus_that_will_be_stale_holds_no_room(link):
    """η = 1, B = 2: five version-0 groups buffered. After the batch at version 0 (a, c), x
    and y still fit the batch at version 1, z's turn comes at version 2, where it is stale:
    it holds no room. After the batch at version 1 nothing buffered is usable: the whole
    room (η + 1)·B minus the batch taken is handed out again (it was 4 − 2 − 1 = 1 when every
    buffered group counted, and every other step then waited for data)."""
    srv, cli = link
    ing = Ingest(srv, AdmissionRule(eta=1, groups_per_step=2), filter_low=0.2, filter_high=0.8)
    for name in "acxyz":
        assert cli.send_group(group(name, MIXED, 0), timeout=5)
    _receive_all(srv, ing, 5, 0)
    out, _ = ing.next_batch(2, current_version=0)
    assert [g.prompt_id for g in out] == ["a", "c"] and len(ing.buffer) == 3
    assert srv._admission_budget == 4 - 2 - 2 == ing.admission_budget()  # x and y usable at 1, z not
    out, _ = ing.next_batch(2, current_version=1)
    assert [g.prompt_id for g in out] == ["x", "y"] and len(ing.buffer) == 1
    assert srv._admission_budget == 4 - 2
    out, _ = ing.next_batch(1, current_version=2, poll_s=0.05, should_stop=lambda: True)
    assert out == [] and ing.counts["stale"] == 1  # z, dropped where its turn came


def test_groups_received_during_the_step_are_counted_when_the_batch_is_complete(link):
    """Once a batch is complete, what has already arrived is taken in without being judged,
    so the budget sees it: of a version-0 surplus after the batch at 0, the groups the filter
    will keep fill the batch at 1 (e, all right, will be filtered: it holds no room). They are
    judged at the next call, in order, as if received then."""
    srv, cli = link
    ing = Ingest(srv, AdmissionRule(eta=1, groups_per_step=2), filter_low=0.2, filter_high=0.8)
    for g in (group("a", MIXED, 0), group("b", MIXED, 0), group("c", MIXED, 0), group("e", ALL_RIGHT, 0),
              group("d", MIXED, 0)):
        assert cli.send_group(g, timeout=5)
    time.sleep(0.5)  # all five on the learner's socket (loopback) before the batch is built
    out, _ = ing.next_batch(2, current_version=0)
    assert [g.prompt_id for g in out] == ["a", "b"] and not ing.buffer
    assert [g.prompt_id for g in ing.arrived] == ["c", "e", "d"] and ing.counts["received"] == 2
    assert ing.metrics()["system/groups_arrived"] == 3.0
    assert srv._admission_budget == 0  # (η + 1)·B = 4: 2 taken + c and d for version 1
    out, _ = ing.next_batch(2, current_version=1)
    assert [g.prompt_id for g in out] == ["c", "d"] and not ing.arrived
    assert (ing.counts["received"], ing.counts["filtered"]) == (5, 1)


def test_without_groups_per_step_no_budget(link):
    srv, _ = link
    ing = Ingest(srv, AdmissionRule(eta=1), filter_low=0.2, filter_high=0.8)
    assert ing.admission_budget() is None
    ing.update_admission()
    assert srv._admission_budget == 0  # untouched: the version rule alone is the caller's choice


def test_budget_divided_by_the_recent_keep_rate():
    ing = Ingest(None, AdmissionRule(eta=1, groups_per_step=4), filter_low=0.2, filter_high=0.8)
    for i in range(15):  # before KEEP_WARMUP (16) groups: no inflation
        ing._accept(group(f"k{i}", MIXED if i % 2 else ALL_RIGHT, 0), 0)
    assert ing.keep_rate() == 1.0
    assert ing.admission_budget() == 8 - 7  # (η + 1)·B = 8 minus the 7 kept (odd i) in the buffer
    ing._accept(group("k15", MIXED, 0), 0)  # 16 seen, 8 kept: p = 0.5
    assert ing.keep_rate() == 0.5
    assert ing.admission_budget() == 0      # 8 buffered fill (η + 1)·B
    ing.buffer.clear()                       # (a step took them)
    assert ing.admission_budget() == 16      # ⌈8 / 0.5⌉
    assert ing.admission_budget(taken=3) == 10  # ⌈5 / 0.5⌉
    for i in range(40):
        ing._accept(group(f"f{i}", ALL_RIGHT, 0), 0)
    assert ing.keep_rate() == pytest.approx(8 / 56, abs=1e-12)
    assert ing.admission_budget() == 56  # ⌈8 / (8/56)⌉
    for i in range(60):  # 8 / 116 = 0.069: floored at MIN_KEEP_RATE = 0.1
        ing._accept(group(f"g{i}", ALL_RIGHT, 0), 0)
    assert ing.keep_rate() == 0.1 and ing.admission_budget() == 80


def test_admission_slack_covers_the_filters_binomial_spread():
    """z standard deviations of the kept count: by hand, and against the binomial itself
    (with z = 2 a budget keeps at least the room in ≥ 95% of draws; with z = 0 about half)."""
    import math

    ing = Ingest(None, AdmissionRule(eta=1, groups_per_step=4, slack=2.0), filter_low=0.2, filter_high=0.8)
    for i in range(16):
        ing._accept(group(f"k{i}", MIXED if i % 2 else ALL_RIGHT, 0), 0)
    ing.buffer.clear()
    assert ing.keep_rate() == 0.5
    assert ing.admission_budget() == 24            # room 8: ⌈(8 + 2·√(8·0.5)) / 0.5⌉ = ⌈12 / 0.5⌉
    assert ing.admission_budget(taken=8) == 0      # no room, no slack
    ing.rule = dataclasses.replace(ing.rule, slack=0.0)
    assert ing.admission_budget() == 16

    def p_enough(n, room, p):  # P(Binomial(n, p) >= room)
        return sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(room, n + 1))

    for p in (0.3, 0.5, 0.62, 0.9):
        ing._kept_recent.clear()
        ing._kept_recent.extend([1] * round(p * 100) + [0] * (100 - round(p * 100)))
        for z, lo, hi in ((2.0, 0.95, 1.0), (0.0, 0.4, 0.8)):
            ing.rule = dataclasses.replace(ing.rule, slack=z)
            n = ing.admission_budget()
            assert lo <= p_enough(n, 8, ing.keep_rate()) <= hi, (p, z, n)


def test_controlled_lag_shrinks_the_room_by_the_lag():
    """With async.actor_lag = k a group starts k versions old, so only (η − k + 1)·B groups
    may be outstanding (at η = 8, k = 7 the unshrunk room let actors run 9 batches ahead and
    about half of all groups aged past η in a 60-step run); k is checked against η."""
    plain = Ingest(None, AdmissionRule(eta=8, groups_per_step=4), filter_low=0.2, filter_high=0.8)
    lagged = Ingest(None, AdmissionRule(eta=8, groups_per_step=4, actor_lag=7), filter_low=0.2, filter_high=0.8)
    assert plain.admission_budget() == 36          # (8 + 1)·4
    assert lagged.admission_budget() == 8          # (8 − 7 + 1)·4
    for i in range(3):
        lagged._accept(group(f"k{i}", MIXED, 7), 7)  # 3 kept, buffered (keep rate still 1 before warm-up)
    assert lagged.admission_budget() == 5 and lagged.admission_budget(taken=5) == 0
    assert Ingest(None, AdmissionRule(eta=0, groups_per_step=4), filter_low=0.2, filter_high=0.8).admission_budget() == 4
    for bad in (8, 9, -1):
        with pytest.raises(ValueError, match="actor_lag"):
            Ingest(None, AdmissionRule(eta=8, groups_per_step=4, actor_lag=bad), filter_low=0.2, filter_high=0.8)
