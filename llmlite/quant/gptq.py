"""GPTQ (Frantar et al. 2022): quantize a weight column by column, spreading each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
inputs. Pure functions on tensors; see ``llmlite.quant.driver`` for the model plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg.blas import get_blas_funcs
from threadpoolctl import threadpool_limits
from torch import Tensor

from llmlite.errors import LlmliteError
from llmlite.quant.grid import (
    QuantizedWeight,
    grid_params,
    group_index,
    group_params,
    max_code,
    to_fp16_grid,
)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    damp: float  # the relative damping that made the Hessian factorisable
    loss: float  # GPTQ's proxy loss: sum over rows of (w - q)^2 / [H^-1]_ii / 2


def accumulate_hessian(h: Tensor, x: Tensor) -> None:
    """Add ``2 xᵀx`` of the rows of ``x`` ``[tokens, in]`` to the upper triangle of ``h``.

    Only the upper triangle is computed, in six column bands: about 58% of the multiply-adds of a
    full product;
    ``finish_hessian`` mirrors it and divides by the number of tokens.
    """
    n = x.shape[1]
    x = x.to(h.dtype)
    step = max(128, -(-n // 6))
    for i in range(0, n, step):
        h[i : i + step, i:].addmm_(x[:, i : i + step].T, x[:, i:], alpha=2.0)


def finish_hessian(h: Tensor, tokens: int) -> Tensor:
    upper = torch.triu(h)
    return (upper + torch.triu(h, 1).T) / max(tokens, 1)


def accumulate_drift(d: Tensor, x: Tensor, x_float: Tensor, w: Tensor | None = None) -> None:
    """Add ``2 (x_float − x)ᵀ x`` to ``d`` ``[in, in]``: how the inputs of the float model differ
    from the inputs the quantized model feeds the same layer (divide by the tokens at the end).

    Given the layer's weight ``w`` ``[out, in]``, add ``2 w (x_float − x)ᵀ x`` to ``d`` ``[out, in]``
    instead (the same product, cheaper when ``2·out < in``, as in an MLP's down projection).
    """
    x = x.to(d.dtype)
    delta = x_float.to(d.dtype) - x
    left = delta.T if w is None else (delta @ w.to(d.dtype).T).T
    d.addmm_(left, x, alpha=2.0)


def drift_target(w: Tensor, h: Tensor, drift: Tensor, alpha: float, damp: float = 0.01) -> Tensor:
    """The weight GPTQ should aim at so that the quantized layer, fed the quantized model's inputs
    ``X``, reproduces the float layer fed the float model's inputs ``X̃`` (GPTAQ, Li et al. 2025).

    ``min_Q ‖X̃Wᵀ − XQᵀ‖²`` is ``min_Q ‖X(W* − Q)ᵀ‖²`` with ``W* = W + W D H⁻¹``, ``D = 2 (X̃ − X)ᵀX``
    and ``H = 2 XᵀX`` (both per token), so GPTQ on ``W*`` with ``H`` solves it. ``alpha`` in [0, 1]
    shrinks the correction (0.25 is GPTQModel's v2 default); ``H`` is damped as in GPTQ.
    ``gptq(..., shift=alpha·W·D)`` aims at the same weight with the inverse it computes anyway.
    """
    dtype = torch.promote_types(w.dtype, torch.float32)
    w, h = w.to(dtype), h.to(dtype)
    if alpha == 0 or h.diagonal().mean() == 0:
        return w.clone()
    inverse, _, _ = damped_inverse(h, damp)
    return w + alpha * (w @ drift.to(dtype)) @ inverse


def refit_scales(
    target: Tensor, h: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, g_idx: Tensor
) -> Tensor:
    """The scales ``[out, groups]`` that, with ``codes`` and integer ``zero`` ``[out, groups]`` held
    fixed, minimise the layer's output error ``(t − q) H (t − q)ᵀ`` of every row ``t`` of ``target``
    (``q = s[g] (codes − zero[g])``): one small linear system per row.

    A group whose codes all equal its zero-point keeps its scale, and so does any row whose solution
    is not positive and finite; the result is rounded to float16, as checkpoints store it.
    """
    dtype = torch.promote_types(target.dtype, torch.float32)
    g = g_idx.long()
    groups = scale.shape[1]
    e = codes.to(dtype) - zero.to(dtype)[:, g]  # q = s[g] · e
    h = h.to(dtype)
    one_hot = torch.nn.functional.one_hot(g, groups).to(dtype)  # sums columns by group
    m = torch.stack([((e[:, g == k] @ h[g == k]) * e) @ one_hot for k in range(groups)], 1)
    b = ((target.to(dtype) @ h) * e) @ one_hot
    m, b, old = m.double(), b.double(), scale.double()
    empty = m.diagonal(dim1=1, dim2=2) == 0
    m.diagonal(dim1=1, dim2=2).add_(empty.double())
    new = torch.linalg.solve(m, torch.where(empty, old, b))
    keep = ~(torch.isfinite(new) & (new > 0)).all(1, keepdim=True)
    return to_fp16_grid(torch.where(keep, old, new)).to(scale.dtype)


def damped_cholesky(h: Tensor, damp: float = 0.01, max_damp: float = 10.0) -> tuple[Tensor, float]:
    """Lower Cholesky factor of ``H + λI`` with ``λ = damp · mean(diag H)``.

    When ``H + λI`` is not positive definite, ``damp`` is multiplied by 10 and the factorisation
    retried, up to ``max_damp``; the damping that worked is returned so that callers can report it.
    """
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal().mean()
    while damp <= max_damp:
        chol, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if info == 0 and bool(torch.isfinite(chol).all()):
            return chol, damp
        damp *= 10
    raise LlmliteError(
        "GPTQ could not factorise a layer's Hessian even with heavy damping; "
        "use more or longer calibration samples (--samples/--seqlen) or --method rtn"
    )


def damped_inverse(h: Tensor, damp: float = 0.01, max_damp: float = 10.0) -> tuple[Tensor, Tensor, float]:
    """``(H + λI)⁻¹`` and its upper Cholesky factor (damping as in ``damped_cholesky``, raised the
    same way when the inverse cannot be factorised), with the damping that worked."""
    while True:
        chol, damp = damped_cholesky(h, damp, max_damp)
        inverse = torch.cholesky_inverse(chol)
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        if info == 0 and bool(torch.isfinite(upper).all()):
            return inverse, upper, damp
        damp *= 10


@torch.no_grad()
def gptq(
    w: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int = -1,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    mse: bool = False,
    shift: Tensor | None = None,
    refit: bool = False,
    keep: Tensor | None = None,
) -> GPTQResult:
    """Quantize ``w`` ``[out, in]`` given the Hessian ``[in, in]`` of its layer's inputs.

    ``act_order`` processes columns by descending Hessian diagonal with *static groups*: each
    group's grid is fixed from the unpermuted weight, so ``g_idx`` stays ``i // group_size`` and
    inference needs no reordering. Without it, a group's grid is set from the error-updated weight
    when its first column is reached (the reference behaviour). ``shift`` ``[out, in]`` (GPTAQ's
    ``alpha·W·D``) makes GPTQ aim at ``drift_target``'s weight, with the inverse it needs anyway.
    ``refit`` re-solves the scales for the final codes (``refit_scales``, with the damped Hessian).
    ``keep`` ``[out, in]`` (bool, ``False`` for a pruned weight) quantizes jointly with a sparsity
    mask (SparseGPT's prune + quantize): a pruned weight gets its group's zero-point as its code, so
    it reads back as exactly 0, and its error ``w − 0`` is spread like any rounding error; grids
    are set from the kept weights (pruned ones counted as 0, which every grid holds exactly).
    Computes on the CPU in float32, or float64 when given float64.
    """
    dtype = torch.promote_types(w.dtype, torch.float32)
    W = w.to("cpu", dtype, copy=True)
    H = hessian.to("cpu", dtype, copy=True)
    rows, cols = W.shape
    g = cols if group_size == -1 else group_size

    dead = H.diagonal() == 0
    H[dead, dead] = 1
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if keep is not None and tuple(keep.shape) != (rows, cols):
        raise ValueError(f"keep has shape {tuple(keep.shape)}; the weight has {(rows, cols)}")
    pruned = None if keep is None else ~keep.to("cpu", torch.bool)
    if perm is not None:
        W, H, dead = W[:, perm], H[perm][:, perm], dead[perm]
        pruned = None if pruned is None else pruned[:, perm]
    inverse, hinv, damp = damped_inverse(H, damp)
    if shift is not None:  # GPTAQ: aim at W + shift·H⁻¹ (see drift_target)
        shift = shift.to("cpu", dtype)
        W.addmm_(shift if perm is None else shift[:, perm], inverse)
    W[:, dead] = 0
    del inverse

    g_idx = group_index(cols, group_size)
    n_groups = int(g_idx[-1]) + 1 if cols else 0
    scale = torch.zeros(n_groups, rows, dtype=dtype)  # per group, contiguous over rows
    zero = torch.zeros(n_groups, rows, dtype=dtype)
    if act_order or group_size == -1:
        unpermuted = W if pruned is None else W.masked_fill(pruned, 0)
        unpermuted = unpermuted if perm is None else unpermuted[:, torch.argsort(perm)]
        scale, zero = (t.T.contiguous() for t in group_params(unpermuted, bits, group_size, sym, mse))
    col_group = (g_idx if perm is None else g_idx[perm]).long()

    # Blocks hold whole groups, so a group's grid is set from fully updated columns.
    if not act_order and group_size != -1:
        block_size = g * max(1, block_size // g)

    # Work on Wᵀ so that each column is a contiguous row.
    Wt = W.T.contiguous()
    Qt = torch.zeros_like(Wt)
    Pt = None if pruned is None else pruned.T.contiguous()  # pruned weights, by column
    hinv = hinv.contiguous()
    groups = col_group.tolist()
    loss = torch.zeros((), dtype=dtype)
    fresh_grids = not act_order and group_size != -1  # set each grid at its group's first column
    with threadpool_limits(1, user_api="blas"):  # BLAS threads only slow the tiny updates down
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            W1 = Wt[i1:i2].clone()
            Err1 = torch.empty_like(W1)
            views = (W1.numpy(), Err1.numpy(), Qt[i1:i2].numpy(), hinv[i1:i2, i1:i2].numpy())
            p1 = None if Pt is None else Pt[i1:i2].numpy()
            step = g if fresh_grids else i2 - i1
            for a in range(0, i2 - i1, step):
                if fresh_grids:
                    k = groups[i1 + a]
                    cols_now = W1[a : a + g]
                    if Pt is not None:  # the grid of the kept weights (and of 0)
                        cols_now = cols_now.masked_fill(Pt[i1 + a : i1 + a + g], 0)
                    scale[k], zero[k] = grid_params(cols_now.T, bits, sym, mse)
                _quantize_columns(*views, groups[i1:i2], scale.numpy(), zero.numpy(), bits, a, a + step, p1)
            loss += Err1.square().sum() / 2
            Wt[i2:].addmm_(hinv[i1:i2, i2:].T, Err1, alpha=-1)

    Q = Qt.T
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if refit and cols:  # the scales that fit the target best, given the codes
        unperm = slice(None) if perm is None else torch.argsort(perm)
        h_damped = (H + damp * H.diagonal().mean() * torch.eye(cols, dtype=dtype))[unperm][:, unperm]
        scale = refit_scales(W[:, unperm], h_damped, Q, scale.T, zero.T, g_idx).T
    weight = QuantizedWeight(
        codes=Q.to(torch.uint8),
        scale=scale.T.float().contiguous(),
        zero=zero.T.to(torch.uint8).contiguous(),
        g_idx=g_idx,
        bits=bits,
    )
    return GPTQResult(weight=weight, damp=damp, loss=float(loss.sum()))


def _quantize_columns(w, err, q, hinv, groups, scale, zero, bits, start, stop, pruned=None) -> None:
    """GPTQ's inner loop over the columns ``start:stop`` of one block, on NumPy views of it (rows
    are columns of the weight): quantize each, and spread its error over the block's later ones.
    ``pruned`` (bool, like ``w``): weights whose code is the zero-point, whatever their value.

    NumPy calls cost a fraction of torch's on vectors this small, and BLAS's ``ger`` updates the
    rest of the block in place (3x faster than ``Tensor.addr_`` here).
    """
    ger = get_blas_funcs("ger", (w,))
    maxq = max_code(bits)
    for i in range(start, min(stop, len(w))):
        s, z = scale[groups[i]], zero[groups[i]]
        w_col, e, c = w[i], err[i], q[i]
        # c = quantize_codes(w_col, s, z); e = (w_col - dequantize_codes(c, s, z)) / hinv[i, i]
        np.divide(w_col, s, out=c)
        np.rint(c, out=c)
        c += z
        np.clip(c, 0, maxq, out=c)
        if pruned is not None:
            np.copyto(c, z, where=pruned[i])  # (z − z)·s: exactly 0
        np.subtract(c, z, out=e)
        e *= s
        np.subtract(w_col, e, out=e)
        e /= hinv[i, i]
        if i + 1 < len(w):  # w[i + 1:] -= outer(hinv[i, i + 1:], e)
            ger(-1.0, e, hinv[i, i + 1 :], a=w[i + 1 :].T, overwrite_a=1)
