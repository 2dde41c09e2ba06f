"""Truncated SVD, the baseline, and the split every method ends with.

``W`` ``[out, in]`` ≈ ``U·V``, ``U`` ``[out, r]``, ``V`` ``[r, in]``: with ``A = U_A Σ V_Aᵀ`` the SVD of
the (possibly transformed) weight, ``U = U_A,r Σ_r^½`` and ``V = Σ_r^½ V_A,rᵀ`` (the singular values
shared evenly, so that neither factor's range grows: both are stored in float16). At full rank
``U·V = A`` exactly; truncated, ``‖A − U·V‖_F² = Σ_{i>r} σ_i²`` (Eckart–Young: the least of any rank-r
matrix). Computed in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LowRank:
    u: Tensor  # [out, r] float64
    v: Tensor  # [r, in] float64
    sigma: Tensor  # [min(out, in)] the transformed weight's singular values, descending (all of them)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def dropped(self) -> float:
        """``Σ_{i>r} σ_i²``: the truncation error in the transformed space."""
        return float((self.sigma[self.rank :] ** 2).sum())


def factorize(a: Tensor, rank: int, undo: Callable[[Tensor], Tensor] | None = None) -> LowRank:
    """``a`` ``[out, in]`` split at ``rank`` (``1 ≤ rank ≤ min(out, in)``), ``undo`` applied to the right
    factor (``V ← undo(Σ_r^½ V_A,rᵀ)``: the transform of the inputs taken back)."""
    if not 1 <= rank <= min(a.shape):
        raise ValueError(f"rank {rank} is outside [1, {min(a.shape)}] for a {tuple(a.shape)} weight")
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    root = s[:rank].sqrt()
    v = root[:, None] * vh[:rank]
    return LowRank(u[:, :rank] * root, v if undo is None else undo(v), s)


def spectrum(a: Tensor) -> Tensor:
    """The singular values of ``a`` (float64, descending)."""
    return torch.linalg.svdvals(a.double())


def svd(w: Tensor, rank: int) -> LowRank:
    """Plain truncated SVD of ``w``: the least ``‖W − U·V‖_F``, blind to the inputs."""
    return factorize(w, rank)
