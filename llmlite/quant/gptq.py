"""GPTQ (Frantar et al. 2022): quantize a weight column by column, spreading each column's
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
inputs. Pure functions on tensors; see ``llmlite.quant.driver`` for the model plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmlite.errors import LlmliteError
from llmlite.quant.grid import (
    QuantizedWeight,
    grid_params,
    group_index,
    group_params,
    max_code,
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


def accumulate_drift(d: Tensor, x: Tensor, x_float: Tensor) -> None:
    """Add ``2 (x_float − x)ᵀ x`` to ``d`` ``[in, in]``: how the inputs of the float model differ
    from the inputs the quantized model feeds the same layer (divide by the tokens at the end)."""
    x = x.to(d.dtype)
    d.addmm_((x_float.to(d.dtype) - x).T, x, alpha=2.0)


def drift_target(w: Tensor, h: Tensor, drift: Tensor, alpha: float, damp: float = 0.01) -> Tensor:
    """The weight GPTQ should aim at so that the quantized layer, fed the quantized model's inputs
    ``X``, reproduces the float layer fed the float model's inputs ``X̃`` (GPTAQ, Li et al. 2025).

    ``min_Q ‖X̃Wᵀ − XQᵀ‖²`` is ``min_Q ‖X(W* − Q)ᵀ‖²`` with ``W* = W + W D H⁻¹``, ``D = 2 (X̃ − X)ᵀX``
    and ``H = 2 XᵀX`` (both per token), so GPTQ on ``W*`` with ``H`` solves it. ``alpha`` in [0, 1]
    shrinks the correction (0.25 is GPTQModel's v2 default); ``H`` is damped as in GPTQ.
    """
    dtype = torch.promote_types(w.dtype, torch.float32)
    h = h.to(dtype)
    mean_diag = h.diagonal().mean()
    if alpha == 0 or mean_diag == 0:
        return w.to(dtype).clone()
    chol, _ = damped_cholesky(h, damp)
    w = w.to(dtype)
    correction = torch.cholesky_solve((w @ drift.to(dtype)).T, chol).T  # (W D) H⁻¹, H symmetric
    return w + alpha * correction


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


def inverse_cholesky(h: Tensor, damp: float = 0.01, max_damp: float = 10.0) -> tuple[Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` (damping as in ``damped_cholesky``, retried the same
    way when the inverse cannot be factorised)."""
    while True:
        chol, damp = damped_cholesky(h, damp, max_damp)
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
        if info == 0 and bool(torch.isfinite(upper).all()):
            return upper, damp
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
) -> GPTQResult:
    """Quantize ``w`` ``[out, in]`` given the Hessian ``[in, in]`` of its layer's inputs.

    ``act_order`` processes columns by descending Hessian diagonal with *static groups*: each
    group's grid is fixed from the unpermuted weight, so ``g_idx`` stays ``i // group_size`` and
    inference needs no reordering. Without it, a group's grid is set from the error-updated weight
    when its first column is reached (the reference behaviour). Computes in float32, or float64
    when given float64.
    """
    dtype = torch.promote_types(w.dtype, torch.float32)
    W = w.to(dtype).clone()
    H = hessian.to(dtype).clone()
    rows, cols = W.shape
    g = cols if group_size == -1 else group_size

    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    g_idx = group_index(cols, group_size)
    n_groups = int(g_idx[-1]) + 1 if cols else 0
    scale = torch.zeros(n_groups, rows, dtype=dtype)  # per group, contiguous over rows
    zero = torch.zeros(n_groups, rows, dtype=dtype)
    perm = None
    if act_order or group_size == -1:
        scale, zero = (t.T.contiguous() for t in group_params(W, bits, group_size, sym, mse))
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    col_group = (g_idx if perm is None else g_idx[perm]).long()

    hinv, damp = inverse_cholesky(H, damp)
    # Blocks hold whole groups, so a group's grid is set from fully updated columns.
    if not act_order and group_size != -1:
        block_size = g * max(1, block_size // g)

    # Work on Wᵀ so that each column is a contiguous row.
    Wt = W.T.contiguous()
    Qt = torch.zeros_like(Wt)
    groups = col_group.tolist()
    loss = torch.zeros((), dtype=dtype)
    s_group = -1
    maxq = max_code(bits)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        # One view per column, made at once: the loop below is bound by per-call overhead.
        w_cols, err_cols, q_cols = W1.unbind(0), Err1.unbind(0), Qt[i1:i2].unbind(0)
        h_rows, h_diag = Hinv1.unbind(0), Hinv1.diagonal().unbind(0)
        for i in range(i2 - i1):
            col, k = i1 + i, groups[i1 + i]
            if not act_order and group_size != -1 and col % g == 0:
                scale[k], zero[k] = grid_params(W1[i : i + g].T, bits, sym, mse)
            if k != s_group:
                s, z, s_group = scale[k], zero[k], k
            w_col, err, q = w_cols[i], err_cols[i], q_cols[i]
            # q = quantize_codes(w_col, s, z), err = (w_col - dequantize_codes(q, s, z)) / Hinv[i, i]
            torch.div(w_col, s, out=q).round_().add_(z).clamp_(0, maxq)
            torch.sub(q, z, out=err).mul_(s)
            torch.sub(w_col, err, out=err).div_(h_diag[i])
            W1[i + 1 :].addr_(h_rows[i][i + 1 :], err, alpha=-1)
        loss += Err1.square().sum() / 2
        Wt[i2:].addmm_(hinv[i1:i2, i2:].T, Err1, alpha=-1)

    Q = Qt.T
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    weight = QuantizedWeight(
        codes=Q.to(torch.uint8),
        scale=scale.T.float().contiguous(),
        zero=zero.T.to(torch.uint8).contiguous(),
        g_idx=g_idx,
        bits=bits,
    )
    return GPTQResult(weight=weight, damp=damp, loss=float(loss.sum()))
