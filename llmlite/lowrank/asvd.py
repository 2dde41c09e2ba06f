"""ASVD (Yuan et al., 2023, "ASVD: Activation-aware Singular Value Decomposition"): the columns of
``W`` ``[out, in]`` scaled by the magnitude of their inputs before the SVD, the scaling undone after:

    S = diag(s),  s_j = rms_j^α  (α = 0.5),   W·S = U Σ Vᵀ,   W ≈ (U_r Σ_r^½)·(Σ_r^½ V_rᵀ S⁻¹)

so that truncation spares the columns that meet large inputs. The paper's ``s_j`` is the mean
absolute input ``mean|x_j|``; llmlite uses the input root mean square ``rms_j = sqrt(mean x_j²)``,
which the layer walk already measures (``GroupStats.input_rms``, Wanda's and AWQ's norm). At full
rank ``U·V = W`` exactly.
"""

from __future__ import annotations

from torch import Tensor

from llmlite.lowrank.svd import LowRank, factorize, spectrum

ALPHA = 0.5
FLOOR = 1e-6  # of the largest scale: an input that never fires (scale 0) would divide by zero


def asvd_scale(input_rms: Tensor, alpha: float = ALPHA) -> Tensor:
    """``s_j = rms_j^α`` (float64), floored at ``1e-6·max s``."""
    s = input_rms.double().clamp(min=0) ** alpha
    return s.clamp(min=FLOOR * float(s.max().clamp(min=1e-30)))


def asvd(w: Tensor, scale: Tensor, rank: int) -> LowRank:
    """``w`` ``[out, in]`` at ``rank``, the SVD taken of ``W·diag(scale)`` (``scale`` ``[in]``)."""
    s = scale.double()
    return factorize(w.double() * s, rank, undo=lambda v: v / s)


def asvd_spectrum(w: Tensor, scale: Tensor) -> Tensor:
    return spectrum(w.double() * scale.double())
