"""Magnitude pruning (the baseline): remove the weights of least ``|W_ij|``, with one threshold
per linear (``keep_per_tensor``) or, for N:M, the N largest of every M inputs in each row. No
calibration, no weight update."""

from __future__ import annotations

from torch import Tensor

from llmlite.pruning.masks import keep_n_of_m, keep_per_tensor


def magnitude(w: Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None) -> Tensor:
    """``w`` ``[out, in]`` with its smallest weights set to zero (``sparsity`` of the linear's
    weights, or N:M ``pattern``)."""
    return w * magnitude_mask(w, sparsity, pattern)


def magnitude_mask(
    w: Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None
) -> Tensor:
    """The mask ``[out, in]`` (``True``: kept) of ``magnitude``."""
    scores = w.abs()
    return keep_n_of_m(scores, *pattern) if pattern else keep_per_tensor(scores, sparsity)
