"""Packing plans: examples -> rows of capacity L (first-fit decreasing), per epoch.

An epoch's plan: shuffle the examples with the epoch's RNG, sort them by decreasing length
(stable, so equal lengths stay in shuffled order), place each in the first row with room (FFD,
as OpenChat's multipack), then shuffle the rows. The number of rows does not depend on the
shuffle (FFD only sees the sorted lengths), so every epoch has the same number of rows and
batches, known up front. Row composition changes between epochs only through equal-length
examples trading places; which rows share a batch, and the batch order, change every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def first_fit_decreasing(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Row index for each item of `sizes` (already in placement order, decreasing).

    First fit: each item goes to the lowest-index row with enough room. A max segment tree over
    rows finds it in O(log n); items larger than capacity/2 can never share a row with an earlier
    (larger) item, so they open rows without a search."""
    n = len(sizes)
    rows = np.empty(n, np.int64)
    if n == 0:
        return rows
    if int(sizes.max()) > capacity:
        raise ValueError(f"item of size {int(sizes.max())} exceeds row capacity {capacity}")
    big = int(np.count_nonzero(sizes > capacity // 2))
    rows[:big] = np.arange(big)
    size = 1
    while size < n:
        size *= 2
    # leaves: remaining room per row (unopened rows are empty); inner nodes: max of children
    tree = [0] * size + [capacity] * size
    for r in range(big):
        tree[size + r] = capacity - int(sizes[r])
    tree[size + n:] = [-1] * (size - n)  # rows beyond n never exist
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    small = sizes[big:].tolist()
    for k, s in enumerate(small, start=big):
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= s else 2 * node + 1
        rows[k] = node - size
        tree[node] -= s
        node //= 2
        while node:
            m = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == m:
                break
            tree[node] = m
            node //= 2
    return rows


@dataclass(frozen=True)
class EpochPlan:
    """Rows in epoch order; row r holds examples `items[splits[r]:splits[r + 1]]`."""

    items: np.ndarray  # int64[num_examples], example indices
    splits: np.ndarray  # int64[num_rows + 1]

    @property
    def num_rows(self) -> int:
        return len(self.splits) - 1

    def row(self, r: int) -> np.ndarray:
        return self.items[self.splits[r]:self.splits[r + 1]]


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]))


def plan_epoch(lengths: np.ndarray, capacity: int, seed: int, epoch: int, shuffle: bool = True) -> EpochPlan:
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    rng = epoch_rng(seed, epoch)
    perm = rng.permutation(n) if shuffle else np.arange(n)
    order = perm[np.argsort(-lengths[perm], kind="stable")]
    row_of = first_fit_decreasing(lengths[order], capacity)
    num_rows = int(row_of.max()) + 1 if n else 0
    row_rank = rng.permutation(num_rows) if shuffle else np.arange(num_rows)
    ranked = row_rank[row_of]
    placement = np.lexsort((np.arange(n), ranked))  # by row rank, then placement order
    counts = np.bincount(ranked, minlength=num_rows)
    splits = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return EpochPlan(items=order[placement].astype(np.int64), splits=splits)
