"""Sequence packing into micro-batches by a token budget (first-fit decreasing).

Contract: ``pack_ffd(lengths, budget)`` assigns every sequence to a bin (micro-batch) so
that no bin's total length exceeds ``budget``; a sequence longer than the budget is an
error (it could never be trained on). Items are taken longest first (ties by index) and
each goes into the first bin with room. The numba kernel and the plain-Python
``pack_ffd_reference`` give identical assignments (tested). Pure: no I/O, no ``dist``.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def _ffd_kernel(order: np.ndarray, lengths: np.ndarray, budget: int) -> np.ndarray:
    n = lengths.shape[0]
    assign = np.empty(n, dtype=np.int64)
    free = np.empty(n, dtype=np.int64)  # remaining room per open bin (at most n bins)
    nbins = 0
    for k in range(n):
        i = order[k]
        ln = lengths[i]
        b = 0
        while b < nbins and free[b] < ln:
            b += 1
        if b == nbins:
            free[nbins] = budget
            nbins += 1
        free[b] -= ln
        assign[i] = b
    return assign


def _check(lengths: np.ndarray, budget: int) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError("lengths must be 1-D")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if lengths.size and (lengths.min() < 0 or lengths.max() > budget):
        raise ValueError(f"a sequence of {int(lengths.max())} tokens exceeds the micro-batch budget of {budget}")
    return lengths


def _order(lengths: np.ndarray) -> np.ndarray:
    # longest first; ties keep index order (stable sort on the negated lengths)
    return np.argsort(-lengths, kind="stable").astype(np.int64)


def pack_ffd(lengths, budget: int) -> np.ndarray:
    """Args: lengths: [N] ints (tokens per sequence); budget: tokens per micro-batch.
    Returns: [N] int64 bin index per sequence, bins numbered 0..nbins-1 in opening order."""
    lengths = _check(lengths, budget)
    if lengths.size == 0:
        return np.empty(0, dtype=np.int64)
    return _ffd_kernel(_order(lengths), lengths, int(budget))


def pack_ffd_reference(lengths, budget: int) -> np.ndarray:
    """Plain-Python first-fit decreasing, the specification of ``pack_ffd``."""
    lengths = _check(lengths, budget)
    free: list[int] = []
    assign = [0] * len(lengths)
    for i in _order(lengths).tolist():
        for b, room in enumerate(free):
            if room >= lengths[i]:
                free[b] -= int(lengths[i])
                assign[i] = b
                break
        else:
            free.append(int(budget - lengths[i]))
            assign[i] = len(free) - 1
    return np.asarray(assign, dtype=np.int64)


def bins(assign: np.ndarray) -> list[list[int]]:
    """Group indices by bin: [[indices of bin 0], [indices of bin 1], ...]."""
    out: list[list[int]] = [[] for _ in range(int(assign.max()) + 1 if assign.size else 0)]
    for i, b in enumerate(assign.tolist()):
        out[b].append(i)
    return out
