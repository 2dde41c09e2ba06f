"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in
One-Shot"): GPTQ's column-by-column machinery with a mask instead of a grid.

Columns are processed in order, in blocks of 128. At the start of a block the mask of the block is
chosen by the Optimal Brain Surgeon score ``w_ij² / [H_F⁻¹]_jj`` (``F``: the columns not yet
processed; the square of the upper Cholesky factor's diagonal of ``H⁻¹``, as in GPTQ); for N:M,
the mask of each group of M columns is chosen when the group is reached, on the updated weights.
Each pruned weight's error ``w_q / [H_F⁻¹]_qq`` is spread over the later columns with row ``q`` of
the Cholesky factor: for a single column this is OBS's closed form
``w ← w − w_q / [H_F⁻¹]_qq · [H_F⁻¹]_{q,:}``. ``H = 2XᵀX/tokens``, damped by ``damp·mean(diag H)``.

Unstructured masks compare the whole block of a linear (all its rows, as the reference does);
given ``segments`` (the rows of each linear in a stacked group), each linear's block is compared
alone, and each linear loses exactly ``pruned_count(rows·in, sparsity)`` weights (each block the
share that keeps the running total exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmlite.pruning.masks import check_divides, drop_lowest, keep_n_of_m, one_thread, pruned_count
from llmlite.quant.gptq import damped_inverse


@dataclass
class SparseGPTResult:
    weight: Tensor  # the pruned and updated weight, in the input's dtype
    damp: float  # the relative damping that made the Hessian factorisable
    loss: float  # the OBS proxy loss: Σ (w − q)² / [H_F⁻¹]_qq / 2
    keep: Tensor | None = None  # the mask [out, in], True for a weight kept


@torch.no_grad()
def sparsegpt(
    w: Tensor,
    hessian: Tensor,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    segments: list[int] | None = None,
    keep: Tensor | None = None,
) -> SparseGPTResult:
    """Prune ``w`` ``[out, in]`` given the Hessian ``[in, in]`` of its inputs, to ``sparsity`` or
    to the N:M ``pattern``, updating the weights kept. ``keep`` (``[out, in]`` bool, ``True`` for a
    weight kept) imposes a mask instead of choosing one. Computes on the CPU in float32, or float64
    when given float64, on one thread: at these sizes threads only add waiting (a 960×576 weight with
    a 576² Hessian: 0.09 s on one thread, 1.4 s on two, on a 2-core machine busy with other work)."""
    with one_thread():
        return _sparsegpt(w, hessian, sparsity, pattern, block_size, damp, segments, keep)


def _sparsegpt(w, hessian, sparsity, pattern, block_size, damp, segments, keep) -> SparseGPTResult:
    dtype = torch.promote_types(w.dtype, torch.float32)
    W = w.to("cpu", dtype, copy=True)
    H = hessian.to("cpu", dtype, copy=True)
    rows, cols = W.shape
    if pattern is not None:
        check_divides(cols, pattern[1])
        block_size = pattern[1] * max(1, block_size // pattern[1])  # groups never straddle blocks
    segments = segments or [rows]
    if sum(segments) != rows:
        raise ValueError(f"segments {segments} do not add up to the {rows} rows")

    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    _, hinv, damp = damped_inverse(H, damp)
    del H
    mask = None if keep is None else keep.to("cpu", torch.bool)
    chosen = torch.ones_like(W, dtype=torch.bool)
    loss = torch.zeros((), dtype=dtype)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        if mask is not None:
            keep1 = mask[:, i1:i2].clone()
        elif pattern is None:
            keep1 = _block_mask(W1.square() / d.square(), sparsity, segments, i1, i2)
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        _prune_columns(W1, Err1, Hinv1, keep1, pattern if mask is None else None)
        chosen[:, i1:i2] = keep1
        loss += Err1.square().sum() / 2
        W[:, i1:i2] = W1
        W[:, i2:].addmm_(Err1, hinv[i1:i2, i2:], alpha=-1)
    return SparseGPTResult(W.to(w.dtype), damp, float(loss), chosen)


def _prune_columns(W1: Tensor, Err1: Tensor, Hinv1: Tensor, keep1: Tensor, pattern) -> None:
    """The column loop of one block, in place: choose each N:M group's mask when it is reached (given
    ``pattern``), zero each pruned weight and spread its error over the block's later columns."""
    d = Hinv1.diagonal()
    for i in range(W1.shape[1]):
        if pattern is not None and i % pattern[1] == 0:
            m = pattern[1]
            keep1[:, i : i + m] = keep_n_of_m(W1[:, i : i + m].square() / d[i : i + m].square(), *pattern)
        err = torch.where(keep1[:, i], 0.0, W1[:, i]) / d[i]  # (w − q) / [U]_ii, q = w or 0
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # column i becomes q (up to rounding)
        W1[:, i].masked_fill_(~keep1[:, i], 0.0)
        Err1[:, i] = err


def _block_mask(scores: Tensor, sparsity: float, segments: list[int], i1: int, i2: int) -> Tensor:
    """The block's mask: each segment of rows prunes its lowest scores, as many as keep the
    segment's running total at ``pruned_count`` of the columns seen so far."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    r0 = 0
    for r in segments:
        k = pruned_count(r * i2, sparsity) - pruned_count(r * i1, sparsity)
        part = scores[r0 : r0 + r]
        keep[r0 : r0 + r] = drop_lowest(part.reshape(1, -1), k).view(part.shape)
        r0 += r
    return keep
