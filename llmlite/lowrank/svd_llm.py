"""SVD-LLM (Wang et al., 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition"): the SVD
taken of ``W`` whitened by the Cholesky factor of its inputs' Gram matrix, so that each dropped
singular value is exactly output error.

With ``X`` ``[tokens, in]`` and ``H = 2XᵀX/tokens = L Lᵀ`` (``L`` lower triangular, the walk's Hessian):

    W·L = U Σ Vᵀ,   W ≈ (U_r Σ_r^½)·(Σ_r^½ V_rᵀ L⁻¹)

and since ``(W − U·V)·L = W·L − U_r Σ_r V_rᵀ``,

    ‖(W − U·V) Xᵀ‖_F² = tokens/2 · ‖(W − U·V) L‖_F² = tokens/2 · Σ_{i>r} σ_i²

the least output error of any rank-r weight on those inputs. ``H`` may be singular (an input that
never fires, fewer tokens than inputs): it is then damped, ``H + λ·mean(diag H)·I``, λ raised
tenfold from 10⁻⁶ until the Cholesky factorisation succeeds (the identity holds for the damped
``H``). Computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmlite.lowrank.svd import LowRank, factorize, spectrum

FIRST_DAMP = 1e-6


def whitening(h: Tensor, damp: float = 0.0) -> tuple[Tensor, float]:
    """The lower Cholesky factor ``L`` of ``h + λ·mean(diag h)·I`` (float64) and the ``λ`` used:
    ``damp`` first, then (on failure) ``max(damp, 10⁻⁶)`` raised tenfold up to 1."""
    h = h.double()
    mean = float(h.diagonal().mean().clamp(min=1e-30))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = damp
    while True:
        chol, info = torch.linalg.cholesky_ex(h + lam * mean * eye if lam else h)
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            return chol, lam
        if lam >= 1:
            raise ValueError("the Gram matrix is not positive definite even damped by its mean diagonal")
        lam = max(lam * 10, FIRST_DAMP)


def svd_llm(w: Tensor, chol: Tensor, rank: int) -> LowRank:
    """``w`` ``[out, in]`` at ``rank``, the SVD taken of ``W·L`` (``chol`` = ``L`` ``[in, in]``)."""
    lower = chol.double()

    def undo(v: Tensor) -> Tensor:  # v·L⁻¹, by a triangular solve
        return torch.linalg.solve_triangular(lower, v, upper=False, left=False)

    return factorize(w.double() @ lower, rank, undo=undo)


def svd_llm_spectrum(w: Tensor, chol: Tensor) -> Tensor:
    return spectrum(w.double() @ chol.double())
