"""Independent float64 references of llmlite's quantization math, written for the tests only.

They follow the papers' formulations rather than llmlite's code: GPTQ here is the column-by-column
Optimal Brain Quantization update with an explicit inverse Hessian that is reduced after every
column (GPTQ paper, eq. 2-3), not the blocked Cholesky form that llmlite runs.
"""

from __future__ import annotations

import numpy as np


def fp16(x):
    return np.maximum(x, 2.0**-24).astype(np.float16).astype(np.float64)


def grid(w: np.ndarray, bits: int, sym: bool, mse: bool = False):
    """Per-row (scale, zero) of a 2-D float64 array, with llmlite's documented conventions; with
    ``mse``, the GPTQ reference's search: shrink the range in 1% steps (80 of them), keep the
    smallest Σ|w − q|^2.4 per row (the first best on ties)."""
    lo = np.minimum(w.min(1), 0.0)
    hi = np.maximum(w.max(1), 0.0)
    if not mse:
        return range_grid(lo, hi, bits, sym)
    best = None
    for i in range(80):
        p = 1 - i / 100
        s, z = range_grid(p * lo, p * hi, bits, sym)
        _, dq = quant(w, s[:, None], z[:, None], bits)
        err = (np.abs(dq - w) ** 2.4).sum(1)
        if best is None:
            best = [err, s, z]
        else:
            better = err < best[0]
            best = [
                np.where(better, err, best[0]),
                np.where(better, s, best[1]),
                np.where(better, z, best[2]),
            ]
    return best[1], best[2]


def range_grid(lo, hi, bits, sym):
    maxq = 2**bits - 1
    lo, hi = lo.copy(), hi.copy()
    if sym:
        m = np.maximum(-lo, hi)
        m[m == 0] = 1.0
        scale = fp16(2 * m / maxq)
        return scale, np.full_like(scale, (maxq + 1) // 2)
    both = (lo == 0) & (hi == 0)
    lo[both], hi[both] = -1.0, 1.0
    scale = fp16((hi - lo) / maxq)
    zero = np.round(-lo / scale)
    low = zero < 1
    scale[low] = fp16(hi[low] / (maxq - 1))
    zero[low] = 1
    return scale, np.clip(zero, 1, maxq)


def quant(w, scale, zero, bits):
    q = np.clip(np.round(w / scale) + zero, 0, 2**bits - 1)
    return q, (q - zero) * scale


def rtn(w: np.ndarray, bits: int, group_size: int, sym: bool, mse: bool = False):
    """Codes, per-column scale and zero (expanded to [out, in]) of round-to-nearest."""
    cols = w.shape[1]
    g = cols if group_size == -1 else group_size
    codes, scales, zeros = (np.zeros_like(w) for _ in range(3))
    for start in range(0, cols, g):
        sl = slice(start, start + g)
        s, z = grid(w[:, sl], bits, sym, mse)
        codes[:, sl], _ = quant(w[:, sl], s[:, None], z[:, None], bits)
        scales[:, sl], zeros[:, sl] = s[:, None], z[:, None]
    return codes, scales, zeros


def gptq(w, h, bits, group_size=-1, sym=True, act_order=False, damp=0.01, mse=False, keep=None):
    """GPTQ as sequential OBQ updates in float64. Returns codes and expanded scales/zeros.

    With ``keep`` (bool ``[out, in]``, False = pruned), SparseGPT's joint prune + quantize: a pruned
    weight is quantized to 0 (its code is the zero-point) and its whole value is the error spread
    over the later columns; every grid is set from the weights with the pruned ones read as 0."""
    keep = np.ones(np.shape(w), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    W = np.array(w, dtype=np.float64)
    H = np.array(h, dtype=np.float64)
    cols = W.shape[1]
    g = cols if group_size == -1 else group_size
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + damp * np.mean(np.diag(H)) * np.eye(cols)
    Hinv = np.linalg.inv(H)
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    codes, scales, zeros = (np.zeros_like(W) for _ in range(3))
    static = act_order or group_size == -1
    if static:  # grid fixed from the weight before any update
        _, scales, zeros = rtn(np.where(keep, W, 0.0), bits, group_size, sym, mse)
    for pos, j in enumerate(order):
        if not static and j % g == 0:
            s, z = grid(np.where(keep[:, j : j + g], W[:, j : j + g], 0.0), bits, sym, mse)
            scales[:, j : j + g], zeros[:, j : j + g] = s[:, None], z[:, None]
        q, dq = quant(W[:, j], scales[:, j], zeros[:, j], bits)
        q = np.where(keep[:, j], q, zeros[:, j])  # a pruned weight: the zero-point's code, 0
        dq = np.where(keep[:, j], dq, 0.0)
        codes[:, j] = q
        err = (W[:, j] - dq) / Hinv[j, j]
        rest = order[pos + 1 :]
        W[:, rest] -= np.outer(err, Hinv[j, rest])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes, scales, zeros


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's reference packing loop (values [in, out] → uint32 words), incl. its 3-bit case."""
    intweight = intweight.astype(np.uint32)
    rows = intweight.shape[0] * bits // 32
    qweight = np.zeros((rows, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    if bits in (2, 4, 8):
        while row < rows:
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
    elif bits == 3:
        while row < rows:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


def gptaq_target(w, x, x_float, alpha, damp=0.01):
    """GPTAQ's target without its closed form: the ridge regression ``min_Q ‖X̃Wᵀ − XQᵀ‖² + λ‖Q − W‖²``
    solved by least squares on the stacked system, then moved ``alpha`` of the way from ``W``.
    λ is GPTQ's damping of ``H = 2XᵀX/n`` in the units of ``XᵀX``."""
    cols = x.shape[1]
    lam = damp * np.mean(np.sum(x * x, axis=0))  # damp · mean diag(H), in XᵀX's units
    a = np.vstack([x, np.sqrt(lam) * np.eye(cols)])
    b = np.vstack([x_float @ w.T, np.sqrt(lam) * w.T])
    ridge = np.linalg.lstsq(a, b, rcond=None)[0].T
    return w + alpha * (ridge - w)


def refit_scales(target, x, codes, scale, zero, group_size):
    """Per row, the group scales ``s`` of least ``‖X(t − B s)ᵀ‖²``, ``B[j, g(j)] = codes[j] − zero[g(j)]``,
    by least squares on ``X B`` itself (no normal equations); a group whose column of ``B`` is zero
    keeps its ``scale``. ``scale`` and ``zero`` are ``[rows, groups]``."""
    rows, cols = codes.shape
    g = cols if group_size == -1 else group_size
    groups = -(-cols // g)
    out = np.zeros((rows, groups))
    for r in range(rows):
        b = np.zeros((cols, groups))
        for j in range(cols):
            b[j, j // g] = codes[r, j] - zero[r, j // g]
        out[r] = np.linalg.lstsq(x @ b, x @ target[r], rcond=None)[0]
        empty = ~b.any(0)
        out[r, empty] = scale[r, empty]
    return out


def clip_rtn(w: np.ndarray, x: np.ndarray, bits: int, group_size: int, sym: bool, ratios):
    """RTN whose range per row and column group is ``c · [min, max]``, ``c`` the ratio of least
    ``‖X_g (ŵ_g − w_g)‖²`` over the group's inputs ``X_g`` (the tokens, not their Hessian).
    Returns the codes and the dequantized weight; ``errors[r, g]`` is the least error found."""
    cols = w.shape[1]
    g = cols if group_size == -1 else group_size
    codes, deq = np.zeros_like(w), np.zeros_like(w)
    errors = np.zeros((w.shape[0], -(-cols // g)))
    for k, start in enumerate(range(0, cols, g)):
        sl = slice(start, start + g)
        lo, hi = np.minimum(w[:, sl].min(1), 0.0), np.maximum(w[:, sl].max(1), 0.0)
        for r in range(w.shape[0]):
            best = None
            for c in ratios:
                s, z = range_grid(np.array([c * lo[r]]), np.array([c * hi[r]]), bits, sym)
                q, dq = quant(w[r, sl], s, z, bits)
                err = float(np.sum((x[:, sl] @ (dq - w[r, sl])) ** 2))
                if best is None or err < best[0]:
                    best = (err, q, dq)
            errors[r, k], codes[r, sl], deq[r, sl] = best
    return codes, deq, errors


def bf16(x: np.ndarray) -> np.ndarray:
    """Round float values to bfloat16 (8 significant bits, nearest even), kept as float64."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def int4pack_matmul(x: np.ndarray, codes, scale, zero, g_idx) -> np.ndarray:
    """What torch's CPU int4 kernel computes for GPTQ's ``W = (q − z)·s``, in float64: bfloat16
    activations, ``W = (q − 8)·bf16(s) + bf16((8 − z)·s)``, the output rounded to bfloat16."""
    g = np.asarray(g_idx, dtype=np.int64)
    s, z = np.asarray(scale, np.float64)[:, g], np.asarray(zero, np.float64)[:, g]
    w = (np.asarray(codes, np.float64) - 8) * bf16(s) + bf16((8 - z) * s)
    return bf16(bf16(x) @ w.T)


def awq_scales(
    w: np.ndarray, x: np.ndarray, bits: int, group_size: int, sym: bool, tie=None, grid=20, gptq_damp=None
):
    """AWQ's duo-scaling search as AutoAWQ writes it, in float64 on the inputs ``x`` [tokens, in]
    themselves: x̄ = mean|x|, w̄ = mean over rows of |W| / max|W| per row and group, candidates
    s = x̄^r / (w̄^(1-r) + 1e-4) (clamped at 1e-4, normalised by sqrt(max · min)) for r = i / grid,
    plus s = 1; the loss is the mean over tokens of ||x Wᵀ - (x / s) Q(W diag s)ᵀ||². ``Q`` is round
    to nearest, or with ``gptq_damp`` the ``gptq`` above (act-order) on the scaled inputs ``x / s``.
    With ``tie`` (column -> shared channel), x̄ and w̄ are averaged over each channel's columns.
    Returns (best s [in], best r or None)."""
    size = w.shape[1] if group_size == -1 else group_size
    a = np.abs(w)
    w_scaled = np.empty_like(a)
    for i in range(0, w.shape[1], size):
        w_scaled[:, i : i + size] = a[:, i : i + size] / (a[:, i : i + size].max(1, keepdims=True) + 1e-6)
    x_mean, w_mean = np.abs(x).mean(0), w_scaled.mean(0)
    if tie is not None:
        n = tie.max() + 1
        x_mean = np.array([x_mean[tie == c].mean() for c in range(n)])
        w_mean = np.array([w_mean[tie == c].mean() for c in range(n)])
    y = x @ w.T

    def loss(s):
        xs = x / s
        if gptq_damp is None:
            codes, scale, zero = rtn(w * s, bits, group_size, sym)
        else:
            codes, scale, zero = gptq(w * s, 2 * xs.T @ xs / len(x), bits, group_size, sym, True, gptq_damp)
        return ((xs @ ((codes - zero) * scale).T - y) ** 2).sum(1).mean()

    best_s, best_r, best = np.ones(w.shape[1]), None, loss(np.ones(w.shape[1]))
    for i in range(grid):
        r = i / grid
        s = np.maximum(x_mean**r / (w_mean ** (1 - r) + 1e-4), 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        s = s if tie is None else s[tie]
        e = loss(s)
        if e < best:
            best_s, best_r, best = s, r, e
    return best_s, best_r


def keep_lowest_pruned(scores: np.ndarray, k: int) -> np.ndarray:
    """A mask (True = kept) of ``scores`` (any shape) without its ``k`` lowest entries (by a
    stable sort: the first of equal scores goes first)."""
    keep = np.ones(scores.size, dtype=bool)
    keep[np.argsort(scores.ravel(), kind="stable")[:k]] = False
    return keep.reshape(scores.shape)


def wanda(w: np.ndarray, x: np.ndarray, sparsity: float | None = None, pattern=None):
    """Wanda in float64 on the inputs ``x`` [tokens, in] themselves: scores ``|W_ij|·‖x_j‖₂``; each
    row drops its floor(in·s + 0.5) lowest, or for N:M each group of M columns its M − N lowest.
    Returns (scores, pruned weight)."""
    scores = np.abs(w) * np.sqrt((x * x).sum(0))[None, :]
    keep = np.zeros_like(w, dtype=bool)
    for r in range(w.shape[0]):
        if pattern is None:
            keep[r] = keep_lowest_pruned(scores[r], int(np.floor(w.shape[1] * sparsity + 0.5)))
        else:
            n, m = pattern
            for j in range(0, w.shape[1], m):
                keep[r, j : j + m] = keep_lowest_pruned(scores[r, j : j + m], m - n)
    return scores, w * keep


def sparsegpt(w, h, sparsity=None, pattern=None, block_size=128, damp=0.01):
    """SparseGPT as sequential Optimal Brain Surgeon steps in float64, with an explicit inverse of
    the damped Hessian reduced after every column (no Cholesky factor). At each block's start the
    mask of the block is chosen on ``w_ij² / [H_F⁻¹]_jj`` (``F``: columns ``j`` onwards, read from
    a copy of the inverse reduced ahead to column ``j``), the block's floor(·+0.5) share
    of the running total over all its rows; for N:M each group of M when it is reached. Each pruned
    weight's error ``w_q / [H_F⁻¹]_qq`` moves the later columns by ``−err·[H_F⁻¹]_{q, later}``.
    Returns the pruned weight and the mask (True = kept)."""
    W = np.array(w, dtype=np.float64)
    H = np.array(h, dtype=np.float64)
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + damp * np.mean(np.diag(H)) * np.eye(cols)
    Hinv = np.linalg.inv(H)
    if pattern is not None:
        block_size = pattern[1] * max(1, block_size // pattern[1])
    keep = np.ones_like(W, dtype=bool)

    def count(n):
        return int(np.floor(n * sparsity + 0.5))

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        if pattern is None:
            d = _diagonal_ahead(Hinv, i1, i2)
            k = count(rows * i2) - count(rows * i1)
            keep[:, i1:i2] = keep_lowest_pruned(W[:, i1:i2] ** 2 / d[None, :], k)
        for j in range(i1, i2):
            if pattern is not None and (j - i1) % pattern[1] == 0:
                n, m = pattern
                d = _diagonal_ahead(Hinv, j, j + m)
                scores = W[:, j : j + m] ** 2 / d[None, :]
                for r in range(rows):
                    keep[r, j : j + m] = keep_lowest_pruned(scores[r], m - n)
            err = np.where(keep[:, j], 0.0, W[:, j]) / Hinv[j, j]
            W[:, j:] -= np.outer(err, Hinv[j, j:])
            W[~keep[:, j], j] = 0.0
            Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return W, keep


def _diagonal_ahead(hinv: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``[H_F⁻¹]_jj`` for ``j`` in ``start:stop``, ``F`` = columns ``j`` onwards, given ``hinv``
    reduced up to ``start``: a copy reduced column by column (the inverse of a trailing block)."""
    t = hinv.copy()
    out = []
    for j in range(start, stop):
        out.append(t[j, j])
        t = t - np.outer(t[:, j], t[j, :]) / t[j, j]
    return np.array(out)
