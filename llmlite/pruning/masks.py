"""Which weights a pruning method keeps, given a score per weight (higher: more important).

Masks are boolean, ``True`` for a weight that is kept. Three ways to compare scores:

* ``keep_per_row``: each output row keeps its highest scores (Wanda's comparison group);
* ``keep_per_tensor``: one threshold for the whole tensor (magnitude pruning's);
* ``keep_n_of_m``: N:M, each row keeps the N highest of every M consecutive input columns
  (2:4 = 2 non-zeros in every 4, what NVIDIA's sparse tensor cores read).

The number pruned out of ``n`` weights at sparsity ``s`` is ``floor(n·s + 0.5)`` (``pruned_count``);
of equal scores the first (in memory order) goes first, as a stable sort orders them.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
from torch import Tensor

from llmlite.errors import LlmliteError


def parse_pattern(text: str) -> tuple[int, int]:
    """``"N:M"`` as ``(N, M)``: N weights kept in every M consecutive inputs, ``0 < N < M``."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if match is None:
        raise LlmliteError(f"--pattern {text!r} is not N:M; use e.g. 2:4 (2 weights kept in every 4)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise LlmliteError(
            f"--pattern {text} keeps {n} of every {m} weights; use N:M with 0 < N < M, e.g. 2:4"
        )
    return n, m


def pruned_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights sparsity ``sparsity`` removes: the nearest whole number."""
    return math.floor(n * sparsity + 0.5)


def check_divides(cols: int, m: int, what: str = "a linear") -> None:
    if cols % m:
        raise LlmliteError(
            f"N:M pruning with M = {m} needs in-features divisible by {m}; {what} has {cols}: "
            "choose an M that divides it (2:4 fits most models) or use --sparsity"
        )


def keep_per_row(scores: Tensor, sparsity: float) -> Tensor:
    """Each row keeps all but its ``pruned_count(cols, sparsity)`` lowest scores."""
    return drop_lowest(scores, pruned_count(scores.shape[1], sparsity))


def keep_per_tensor(scores: Tensor, sparsity: float) -> Tensor:
    """The tensor keeps all but its ``pruned_count(numel, sparsity)`` lowest scores."""
    return drop_lowest(scores.reshape(1, -1), pruned_count(scores.numel(), sparsity)).view(scores.shape)


def drop_lowest(scores: Tensor, k: int) -> Tensor:
    """A mask of ``scores`` ``[rows, cols]`` without the ``k`` lowest of each row, the first of equal
    scores dropped first (a selection, not a sort: 2.5x faster than ``topk`` on a 1536×576 linear)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0 or not scores.numel():
        return keep
    kth = scores.kthvalue(k, dim=1, keepdim=True).values
    below, tied = scores < kth, scores == kth
    needed = k - below.sum(1, keepdim=True)  # of the scores equal to the k-th, the first `needed`
    return ~(below | (tied & (tied.cumsum(1) <= needed)))


def keep_n_of_m(scores: Tensor, n: int, m: int) -> Tensor:
    """Each row keeps the ``n`` highest of every ``m`` consecutive columns (``m`` divides them)."""
    rows, cols = scores.shape
    check_divides(cols, m)
    grouped = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(2, grouped.topk(n, dim=2).indices, True)
    return keep.view(rows, cols)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block: the cores' operations are small, and on a machine
    busy with other work two threads made them 4x (masks) to 15x (SparseGPT) slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
