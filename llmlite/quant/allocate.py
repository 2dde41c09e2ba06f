"""Mixed precision: the bit width of each linear that minimises the predicted loss under a size
budget, solved exactly (a multiple-choice knapsack).

Item ``i`` (a linear) takes one choice ``c`` of cost ``costs[i][c]`` (its predicted loss increase
at that width) and integer size ``sizes[i][c]``; the allocation minimises ``Σ costs[i][c_i]``
subject to ``Σ sizes[i][c_i] ≤ budget``. A dynamic programme over sizes in units of
``u = gcd`` of every size increment ``sizes[i][c] − min_c sizes[i][c]`` is exact. Items whose
increments are the same (a model's layers repeat a few shapes) are solved together first, on their
own, coarser, unit; the classes are then merged over the common grid of ``u``: ``O(Σ_class K_class ·
budget / u)`` time with ``K`` a class's reachable totals, and ``budget / u`` cells of memory per class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class BudgetTooSmall(ValueError):
    """The budget is below the smallest allocation (``smallest``: every item at its least size)."""

    def __init__(self, smallest: int, budget: int) -> None:
        super().__init__(f"the smallest allocation takes {smallest}, over the budget {budget}")
        self.smallest, self.budget = smallest, budget


def _class_table(costs: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact DP for items of one class: ``costs`` ``[n, choices]``, the shared increments
    ``steps`` ``[choices]`` in the class's own unit. Returns the least cost of each total
    ``[K]`` (``inf`` where unreachable) and each item's choice at each total, ``[n, K]``."""
    n, k = costs.shape[0], int(steps.max()) * costs.shape[0] + 1
    best = np.full(k, np.inf)
    best[0] = 0.0
    choice = np.zeros((n, k), dtype=np.int16)
    for i in range(n):
        new = np.full(k, np.inf)
        for c, step in enumerate(steps):
            cand = np.full(k, np.inf)
            cand[step:] = best[: k - step] + costs[i, c]
            better = cand < new
            new[better], choice[i, better] = cand[better], c
        best = new
    return best, choice


def allocate(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], budget: int) -> list[int]:
    """The choice of each item (an index into its row) with the least ``Σ cost`` and ``Σ size ≤
    budget``; among equal least costs, the smallest total size. ``costs`` and ``sizes``: ``[items][choices]``
    (rows may differ in length); sizes are non-negative integers. Raises ``BudgetTooSmall``."""
    if len(costs) != len(sizes) or any(len(c) != len(s) or not c for c, s in zip(costs, sizes, strict=True)):
        raise ValueError("costs and sizes must have the same, non-empty, rows")
    floor = [min(s) for s in sizes]
    smallest = sum(floor)
    if smallest > budget:
        raise BudgetTooSmall(smallest, budget)
    increments = [tuple(int(x) - f for x in s) for s, f in zip(sizes, floor, strict=True)]
    unit = math.gcd(*(x for inc in increments for x in inc)) or 1
    cells = min(budget - smallest, sum(max(inc) for inc in increments)) // unit + 1
    classes: dict[tuple[int, ...], list[int]] = {}
    for i, inc in enumerate(increments):
        classes.setdefault(inc, []).append(i)
    total = np.full(cells, np.inf)  # least cost of the classes merged so far, per total size
    total[0] = 0.0
    merged = []  # per class: its table, its choices, its unit in cells, the totals it took
    for inc, items in classes.items():
        own = math.gcd(*inc) or unit
        steps = np.array(inc) // own
        table, choice = _class_table(np.array([costs[i] for i in items], dtype=np.float64), steps)
        stride = own // unit
        took = np.zeros(cells, dtype=np.int32)
        new = np.full(cells, np.inf)
        for k in np.flatnonzero(np.isfinite(table)):
            shift = int(k) * stride
            if shift >= cells:
                break
            cand = total[: cells - shift] + table[k]
            better = cand < new[shift:]
            new[shift:][better] = cand[better]
            took[shift:][better] = k
        total = new
        merged.append((items, choice, steps, stride, took))
    cell = int(np.argmin(total))  # the first least: the smallest total among equal costs
    picks = [0] * len(costs)
    for items, choice, steps, stride, took in reversed(merged):
        k = int(took[cell])
        cell -= k * stride
        for j in reversed(range(len(items))):
            c = int(choice[j, k])
            picks[items[j]] = c
            k -= int(steps[c])
    return picks
