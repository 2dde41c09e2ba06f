"""How many ranks each linear keeps, from one target for the whole model.

A linear ``[m, n]`` at rank ``r`` costs ``r(m + n)`` weights and loses ``Σ_{i>r} e_i``, ``e`` its
spectrum's energies (``σ_i²``, normalised by the caller); it is worth factorising only while
``r(m + n) < mn``: past ``r_max`` (the largest such rank) it stays **dense** (``mn`` weights, no loss).
Every linear keeps at least rank 1.

``global_ranks``: the least total loss within a parameter budget. Each linear's curve of loss
against cost (ranks ``1..r_max``, then dense) is reduced to its convex hull (pool adjacent
violators: a run of steps whose later ones gain more per weight, such as the jump to dense, is
merged into one), and hull segments of all linears are taken by decreasing loss saved per weight
while they fit. While every segment so far fitted, the allocation minimises ``loss + λ·cost`` for
the last segment's ratio ``λ`` and is therefore **optimal among all allocations that cost no
more**; a segment that does not fit is replaced by its single rank steps (same order), so that
the total ends within one rank step ``m + n`` of the budget (between those optimal points the
result is a greedy one, at least as good as the optimal point below it).

``uniform_ranks``: every linear keeps the same fraction of its own weights.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from llmlite.errors import LlmliteError

DENSE = None  # a linear's rank when it stays dense


def max_rank(m: int, n: int) -> int:
    """The largest rank whose factors hold fewer weights than the dense ``m × n`` (0: none does)."""
    return (m * n - 1) // (m + n)


def cost(shape: tuple[int, int], rank: int | None) -> int:
    m, n = shape
    return m * n if rank is DENSE else rank * (m + n)


def minimum_cost(shapes: Sequence[tuple[int, int]]) -> int:
    """Every linear at rank 1 (dense where rank 1 saves nothing)."""
    return sum(cost(s, 1 if max_rank(*s) >= 1 else DENSE) for s in shapes)


def loss(energies: Tensor, rank: int | None) -> float:
    return 0.0 if rank is DENSE else float(energies[rank:].sum())


@dataclass
class _Step:
    linear: int
    cost: int
    gain: float
    to: int | None  # the rank after it (DENSE: dense)

    @property
    def ratio(self) -> float:
        return self.gain / self.cost if self.cost > 0 else math.inf


def _steps(i: int, e: list[float], shape: tuple[int, int], start: int) -> list[_Step]:
    """Linear ``i``'s single steps from rank ``start``: one rank each, the last one to dense."""
    m, n = shape
    top = max_rank(m, n)
    steps = [_Step(i, m + n, e[r], r + 1) for r in range(start, top)]
    steps.append(_Step(i, m * n - top * (m + n), sum(e[top:]), DENSE))
    return steps


def _hull(steps: list[_Step]) -> list[_Step]:
    """Steps merged until their gain per weight never rises (the convex hull of the loss curve)."""
    out: list[_Step] = []
    for step in steps:
        out.append(step)
        while len(out) > 1 and out[-2].gain * out[-1].cost < out[-1].gain * out[-2].cost:
            last = out.pop()
            prev = out.pop()
            out.append(_Step(prev.linear, prev.cost + last.cost, prev.gain + last.gain, last.to))
    return out


def global_ranks(
    energies: Sequence[Tensor], shapes: Sequence[tuple[int, int]], budget: int
) -> list[int | None]:
    """Each linear's rank (``DENSE``: kept dense) for the least ``Σ loss`` with ``Σ cost ≤ budget``
    (see the module's docstring). ``energies[i]`` ``[min(m, n)]``, non-increasing."""
    floor = minimum_cost(shapes)
    if budget < floor:
        raise LlmliteError(f"a budget of {budget} weights is below rank 1 in every linear ({floor})")
    ranks: list[int | None] = [1 if max_rank(*s) >= 1 else DENSE for s in shapes]
    left = budget - floor
    gains = [[float(x) for x in e] for e in energies]
    # the heap holds each open linear's next move: its next hull segment or, once one did not fit,
    # its next single step; by decreasing gain per weight, then by linear (stable ties)
    hulls = [
        _hull(_steps(i, gains[i], s, 1)) if r is not DENSE else []
        for i, (s, r) in enumerate(zip(shapes, ranks, strict=True))
    ]
    heads = [(-h[0].ratio, i, 0, True) for i, h in enumerate(hulls) if h]
    heapq.heapify(heads)
    while heads:
        _, i, k, segment = heapq.heappop(heads)
        step = hulls[i][k] if segment else _steps(i, gains[i], shapes[i], ranks[i])[0]
        if step.gain <= 0:
            continue  # what is left of this linear's spectrum is zero: nothing to gain
        if step.cost > left:
            if segment:  # the segment does not fit: go on one rank at a time
                first = _steps(i, gains[i], shapes[i], ranks[i])[0]
                heapq.heappush(heads, (-first.ratio, i, 0, False))
            continue
        left -= step.cost
        ranks[i] = step.to
        if ranks[i] is DENSE:
            continue
        if segment and k + 1 < len(hulls[i]):
            heapq.heappush(heads, (-hulls[i][k + 1].ratio, i, k + 1, True))
        elif not segment:
            nxt = _steps(i, gains[i], shapes[i], ranks[i])[0]
            heapq.heappush(heads, (-nxt.ratio, i, 0, False))
    return ranks


def uniform_ranks(shapes: Sequence[tuple[int, int]], ratio: float) -> list[int | None]:
    """Each linear at ``⌊ratio·mn/(m + n)⌋`` (dense at ``ratio`` 1, or where the rank saves nothing);
    ``LlmliteError`` where that is rank 0."""
    ranks: list[int | None] = []
    for m, n in shapes:
        r = math.floor(ratio * m * n / (m + n))
        if ratio >= 1 or r > max_rank(m, n):
            ranks.append(DENSE)
        elif r < 1:
            raise LlmliteError(f"keeps less than rank 1 of a {m}x{n} linear")
        else:
            ranks.append(r)
    return ranks
