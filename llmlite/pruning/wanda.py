"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score each weight
by ``|W_ij|·‖X_j‖₂``, the norm of input column ``j`` over the calibration tokens, and remove the
lowest scores of each output row (for N:M, of every M inputs in each row). No weight update.

The walk gives the inputs' root mean square ``‖X_j‖₂ / √tokens`` (``GroupStats.input_rms``): a
constant factor on every score of a row, so the same masks.
"""

from __future__ import annotations

from torch import Tensor

from llmlite.pruning.masks import keep_n_of_m, keep_per_row


def wanda_scores(w: Tensor, input_norm: Tensor) -> Tensor:
    """``|W_ij| · ‖X_j‖`` ``[out, in]`` given each input column's norm ``[in]``."""
    return w.abs() * input_norm.to(w.dtype)[None, :]


def wanda(
    w: Tensor, input_norm: Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None
) -> Tensor:
    """``w`` ``[out, in]`` with the lowest Wanda scores of each row set to zero."""
    return w * wanda_mask(w, input_norm, sparsity, pattern)


def wanda_mask(
    w: Tensor, input_norm: Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None
) -> Tensor:
    """The mask ``[out, in]`` (``True``: kept) of ``wanda``."""
    scores = wanda_scores(w, input_norm)
    return keep_n_of_m(scores, *pattern) if pattern else keep_per_row(scores, sparsity)
