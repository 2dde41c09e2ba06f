"""Pure cores on tensors: merge (or repeat) the key/value heads of one attention layer.

Shapes: H query heads, K key/value heads, G target key/value heads, head size d, n input columns
(the hidden size, plus one when a bias is carried as an extra column). A k/v projection is
``[K*d, n]``; q_proj ``[H*d, n]``; o_proj ``[hidden, H*d]``. The heads merged into one are
contiguous, as transformers' ``repeat_kv`` maps query heads to key/value heads. RoPE rotates each
pair of rows (c, c + d/2) of a head by a position-dependent angle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmlite.errors import LlmliteError

_RIDGE = 1e-6  # relative to the mean diagonal: pulls toward the plain mean / keeps Cholesky defined


def pool_heads(weight: Tensor, heads: int, groups: int, weights: Tensor | None = None) -> Tensor:
    """Merge each contiguous run of ``heads // groups`` heads of a k/v projection into one head.

    ``weight`` is ``[heads*d, n]`` (or a bias ``[heads*d]``); the result has ``groups`` heads.
    Without ``weights``: the plain mean (Ainslie et al. 2023). ``weights`` is one weight per head
    ``[heads]``, per head and row ``[heads, d]``, or a d×d matrix per head ``[heads, d, d]``; merged
    head g is then ``W' = argmin Σ_i ||W_i − W'||²_{M_i} = (Σ_i M_i)⁻¹ Σ_i M_i W_i`` over the heads i
    of group g (with a 1e-6 ridge toward the plain mean, so that all-zero weights give the mean).
    """
    _check_heads(weight, heads, groups)
    rows = weight[:, None] if weight.dim() == 1 else weight
    d = rows.shape[0] // heads
    w = rows.reshape(groups, heads // groups, d, rows.shape[1])
    # float64: the mean of g identical float32 rows is that row exactly (repeat then pool is lossless)
    out = (w.double().mean(1) if weights is None else _weighted_mean(w, weights)).to(weight.dtype)
    out = out.reshape(groups * d, rows.shape[1])
    return out[:, 0] if weight.dim() == 1 else out


def _weighted_mean(w: Tensor, weights: Tensor) -> Tensor:
    groups, g, d, _ = w.shape
    x, plain = w.double(), w.double().mean(1)
    m = weights.double().to(w.device)
    if m.dim() == 1:
        m = m[:, None].expand(groups * g, d)
    if m.shape[0] != groups * g or m.shape[1:] not in ((d,), (d, d)):
        raise ValueError(f"weights of shape {tuple(weights.shape)} do not fit {groups * g} heads of {d} rows")
    if m.dim() == 2:  # diagonal M_i: a weighted mean per row
        m = m.reshape(groups, g, d, 1)
        total = m.sum(1)
        ridge = (_RIDGE * total.mean(1, keepdim=True)).clamp_min(1e-300)
        return ((m * x).sum(1) + ridge * plain) / (total + ridge)
    m = m.reshape(groups, g, d, d)
    total = m.sum(1)
    ridge = (_RIDGE * total.diagonal(dim1=1, dim2=2).mean(1)).clamp_min(1e-300)[:, None, None]
    eye = torch.eye(d, dtype=total.dtype, device=total.device)
    return torch.linalg.solve(total + ridge * eye, (m @ x).sum(1) + ridge * plain)


def repeat_heads(weight: Tensor, heads: int, times: int) -> Tensor:
    """Repeat each of the ``heads`` heads of a k/v projection ``times`` times, contiguously (what
    transformers' ``repeat_kv`` does to keys and values): the exact inverse of ``pool_heads``."""
    if times < 1:
        raise ValueError(f"times must be at least 1, got {times}")
    _check_heads(weight, heads, 1)
    rows = weight[:, None] if weight.dim() == 1 else weight
    d, n = rows.shape[0] // heads, rows.shape[1]
    out = rows.reshape(heads, 1, d, n).expand(heads, times, d, n).reshape(heads * times * d, n)
    return out[:, 0].clone() if weight.dim() == 1 else out.clone()


def _check_heads(weight: Tensor, heads: int, groups: int) -> None:
    if weight.dim() not in (1, 2) or heads < 1 or groups < 1 or weight.shape[0] % heads or heads % groups:
        raise ValueError(f"cannot split {tuple(weight.shape)} into {heads} heads and {groups} groups")


def key_weights(query_energy: Tensor, kv_heads: int) -> Tensor:
    """Weights ``[kv_heads, d]`` for pooling keys: per key/value head and row, the energy of the
    query heads that read it, summed over each rotary pair (c, c + d/2), the only part of it that
    RoPE leaves independent of position.

    ``query_energy`` is ``E[q²]`` of the q_proj outputs, ``[heads, d]`` (pre-RoPE; the rotation
    keeps each pair's energy).
    """
    heads, d = query_energy.shape
    pair = query_energy[:, : d // 2] + query_energy[:, d // 2 :]
    return torch.cat([pair, pair], 1).reshape(kv_heads, heads // kv_heads, d).sum(1)


def value_weights(o_weight: Tensor, heads: int, kv_heads: int) -> Tensor:
    """Matrices ``[kv_heads, d, d]`` for pooling values: ``B_i = Σ_j W_o,jᵀ W_o,j`` over the query
    heads j that read value head i, so that ``||W_o,j (v_i − v')||²`` summed over j is the pooled
    value's error after the output projection (``o_weight`` is o_proj's ``[hidden, heads*d]``)."""
    w = o_weight.double().reshape(o_weight.shape[0], heads, -1)
    per_head = torch.einsum("nhd,nhe->hde", w, w)
    return per_head.reshape(kv_heads, heads // kv_heads, *per_head.shape[1:]).sum(1)


def align_keys(
    k_weight: Tensor, q_weight: Tensor, query_energy: Tensor, moment: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    """Merge key heads after aligning them, and fold the alignment into the queries (float64).

    Per rotary pair c, a key head's two rows are one complex row κ_i = W[c] + i·W[c + d/2], and the
    score is Re(z_q · conj(κ_i x)) rotated by the position angle. Replacing κ_i by α_i κ' (α_i a
    complex number per head and pair) and the queries that read head i by conj(α_i) z_q leaves every
    score unchanged up to ``κ_i − α_i κ'``, and commutes with RoPE. κ' and α are the best rank-1
    approximation (SVD) of the group's rows under Σ_i a_i E|(κ_i − α_i κ') x|², where ``a_i`` is the
    pair's query energy (``key_weights``) and ``moment`` = E[x xᵀ] ``[n, n]`` of the layer's inputs.
    Returns ``(k' [groups*d, n], q' [H*d, n])``.
    """
    heads, d = query_energy.shape
    kv, n, h = k_weight.shape[0] // d, k_weight.shape[1], d // 2
    g = kv // groups
    chol = _cholesky(moment).to(torch.complex128)
    k = k_weight.double().reshape(kv, d, n)
    kl = torch.complex(k[:, :h], k[:, h:]) @ chol  # [kv, h, n]: ||κ x||² = ||κ L||²
    a = key_weights(query_energy.double(), kv)[:, :h]  # [kv, h]
    y = (a.sqrt()[..., None] * kl).reshape(groups, g, h, n).transpose(1, 2)  # [G, h, g, n]
    z = torch.linalg.svd(y, full_matrices=False)[2][..., 0, :]  # [G, h, n], unit: κ' L
    alpha = kl.reshape(groups, g, h, n).transpose(1, 2) @ z.conj()[..., None]  # [G, h, g, 1]
    kappa = torch.linalg.solve_triangular(chol.mT, z.reshape(-1, n).mT, upper=True).mT.reshape(groups, h, n)
    new_k = torch.cat([kappa.real, kappa.imag], 1).reshape(groups * d, n)
    alpha = alpha[..., 0].transpose(1, 2).reshape(kv, h).repeat_interleave(heads // kv, 0)  # [H, h]
    ar, ai = alpha.real[..., None], alpha.imag[..., None]
    q = q_weight.double().reshape(heads, d, n)
    qr, qi = q[:, :h], q[:, h:]
    new_q = torch.cat([ar * qr + ai * qi, ar * qi - ai * qr], 1)  # conj(α) (qr + i qi)
    return new_k, new_q.reshape(heads * d, n)


def align_values(
    v_weight: Tensor, o_weight: Tensor, moment: Tensor, heads: int, groups: int
) -> tuple[Tensor, Tensor]:
    """Merge value heads into a shared d-dimensional basis and fold each head's map from it into
    o_proj (float64).

    Value head i becomes ``T_i v'``, with ``W_o,j ← W_o,j T_i`` for the query heads j that read it;
    ``W_v'`` and ``T_i`` minimise Σ_i E||C_i (W_v,i − T_i W_v') x||² with ``C_iᵀC_i = B_i``
    (``value_weights``) and ``moment`` = E[x xᵀ] ``[n, n]``: the best rank-d approximation (SVD) of
    the stacked ``C_i W_v,i L`` (L Lᵀ = moment); then ``T_i = W_v,i L Zᵀ`` for the basis rows Z.
    Returns ``(v' [groups*d, n], o' [hidden, heads*d])``.
    """
    d = o_weight.shape[1] // heads
    kv, n = v_weight.shape[0] // d, v_weight.shape[1]
    g = kv // groups
    chol = _cholesky(moment)
    b = value_weights(o_weight, heads, kv)  # [kv, d, d]
    evals, evecs = torch.linalg.eigh(b)
    root = evecs @ (evals.clamp_min(0).sqrt()[..., None] * evecs.mT)  # C_i, symmetric
    a = v_weight.double().reshape(kv, d, n) @ chol  # [kv, d, n]
    z = torch.linalg.svd((root @ a).reshape(groups, g * d, n), full_matrices=False)[2][:, :d]  # [G, d, n]
    new_v = torch.linalg.solve_triangular(chol.mT, z.reshape(-1, n).mT, upper=True).mT
    t = (a.reshape(groups, g, d, n) @ z[:, None].mT).reshape(kv, d, d).repeat_interleave(heads // kv, 0)
    o = o_weight.double().reshape(o_weight.shape[0], heads, d)
    return new_v, torch.einsum("nhd,hde->nhe", o, t).reshape(o_weight.shape)


def _cholesky(moment: Tensor) -> Tensor:
    """Lower L with L Lᵀ = moment + ridge (1e-6 of the mean diagonal, raised until it factors)."""
    moment = moment.double()
    if not bool(torch.isfinite(moment).all()):
        raise LlmliteError(
            "a layer's calibration inputs are not finite (NaN/inf); check the model, or use --method mean"
        )
    eye = torch.eye(len(moment), dtype=moment.dtype, device=moment.device)
    scale = float(moment.diagonal().mean().clamp_min(1e-30))
    ridge = 1e-6
    while True:  # a PSD matrix plus a large enough ridge always factors
        chol, info = torch.linalg.cholesky_ex(moment + ridge * scale * eye)
        if int(info) == 0:
            return chol
        ridge *= 100
