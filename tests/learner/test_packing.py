"""learner/packing.py: the numba first-fit-decreasing packer against the plain-Python one."""

import numpy as np
import pytest

from learner.packing import bins, pack_ffd, pack_ffd_reference


def test_hand_case():
    # budget 10, lengths (6, 5, 4, 3, 2) already decreasing:
    # 6 -> bin0 (room 4); 5 -> bin1 (room 5); 4 -> bin0 (room 0); 3 -> bin1 (room 2); 2 -> bin1 (room 0)
    assign = pack_ffd([6, 5, 4, 3, 2], 10)
    assert assign.tolist() == [0, 1, 0, 1, 1]
    assert bins(assign) == [[0, 2], [1, 3, 4]]


def test_ties_and_order():
    # lengths (3, 7, 3, 7), budget 10: order by length desc, ties by index -> 1, 3, 0, 2
    # 7(i1) -> bin0 (3 left); 7(i3) -> bin1 (3 left); 3(i0) -> bin0 (0); 3(i2) -> bin1 (0)
    assert pack_ffd([3, 7, 3, 7], 10).tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("seed", range(20))
def test_numba_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    budget = int(rng.integers(50, 4000))
    lengths = rng.integers(1, budget + 1, size=n)
    a = pack_ffd(lengths, budget)
    assert np.array_equal(a, pack_ffd_reference(lengths, budget))
    totals = np.bincount(a, weights=lengths)
    assert totals.max() <= budget
    assert len(totals) >= int(np.ceil(lengths.sum() / budget))  # no packing beats the volume bound


def test_errors_and_empty():
    with pytest.raises(ValueError, match="exceeds"):
        pack_ffd([5, 11], 10)
    assert pack_ffd([], 10).size == 0
