"""AWQ's scale search (Lin et al. 2024, "activation-aware weight quantization"): pure functions on
tensors; ``llmlite.quant.smooth`` folds the scales into a model.

A linear ``y = x Wᵀ`` computes the same with its input channels scaled, ``y = (x / s)(W diag s)ᵀ``,
and the ``1 / s`` folds exactly into whatever produces ``x`` (a norm's weight, the rows of the
linear before it). Quantizing ``W diag s`` instead of ``W`` protects the columns that large
inputs read. The search ("duo scaling", AutoAWQ and llm-compressor) tries

    s(r) = x̄ʳ / (w̄¹⁻ʳ + 10⁻⁴),  r = 0, 1/20, ..., 19/20,  then s ← s / √(max s · min s),

with ``x̄`` the mean ``|x|`` of each input channel over the calibration tokens and ``w̄`` the mean
over rows of ``|W| / max|W|`` within each row's quantization group, plus ``s = 1`` (no scaling),
and keeps the ``s`` whose quantized weight changes the outputs least on the calibration inputs:

    e(s) = ‖X (Q(W diag s) diag s⁻¹ − W)ᵀ‖²_F / tokens = tr(Δ H Δᵀ) / 2,  H = 2 XᵀX / tokens,

computed from ``H`` (which the layer walk measures anyway), in float32, so no candidate needs a
forward pass and no float16 overflow can occur. ``Q`` is the quantizer the model will get: round to
nearest for AWQ, GPTQ for AWQ→GPTQ (which sees the scaled inputs' Hessian ``diag s⁻¹ H diag s⁻¹``),
so each candidate is scored on what that quantizer makes of it. ``tie`` lets several input columns
share one scale: GQA's ``v_proj → o_proj``, where each value channel feeds the same channel of every query
head in its group (both peers skip this mapping on GQA models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from llmlite.quant.grid import group_index

GRID = 20  # ratios r = i / GRID, i < GRID (AutoAWQ's n_grid)

# ``(W [out, in], H [in, in] of its inputs) -> Q(W)``: a weight's quantized-then-dequantized values
Quantizer = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ScaleSearch:
    scale: Tensor  # [in]: the input-column scales s (all ones when no scaling won)
    ratio: float | None  # the winning r; None: s = 1
    error: float  # e(s) of the winner
    identity_error: float  # e(1): the error of quantizing W as it is


def weight_magnitude(w: Tensor, group_size: int) -> Tensor:
    """``w̄`` ``[in]``: the mean over rows of ``|W| / max|W|``, the maximum taken over each row's
    quantization group (contiguous columns, the last group may be short; -1: the whole row)."""
    a = w.abs().float()
    g = group_index(w.shape[1], group_size).long()
    peak = torch.zeros(w.shape[0], int(g[-1]) + 1 if len(g) else 0, dtype=a.dtype, device=a.device)
    peak.scatter_reduce_(1, g.expand_as(a), a, "amax")
    return (a / (peak[:, g] + 1e-6)).mean(0)


def tie_mean(values: Tensor, tie: Tensor | None) -> Tensor:
    """The mean of ``values`` ``[in]`` over the columns that share a scale (``tie[j]``: the scale
    of column ``j``): ``[scales]``; ``values`` itself without ``tie``."""
    if tie is None:
        return values
    n = int(tie.max()) + 1
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, tie, values)
    return total / torch.bincount(tie, minlength=n).to(values.dtype)


def candidate_scales(x_mean: Tensor, w_mean: Tensor, grid: int = GRID) -> list[tuple[float, Tensor]]:
    """``(r, s(r))`` for ``r = i / grid``: duo scaling, normalised so that ``max s · min s = 1``."""
    out = []
    for i in range(grid):
        r = i / grid
        s = (x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4)
        out.append((r, s / (s.max() * s.min()).sqrt()))
    return out


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """``tr(Δ H Δᵀ) / 2`` with ``Δ = Ŵ − W``: the summed squared output change per token."""
    d = w_hat - w
    return float((d @ h).mul_(d).sum() / 2)


@torch.no_grad()
def search_scales(
    w: Tensor,
    h: Tensor,
    x_mean: Tensor,
    quantize: Quantizer,
    group_size: int,
    tie: Tensor | None = None,
    grid: int = GRID,
) -> ScaleSearch:
    """The AWQ scale of the input columns of ``w`` ``[out, in]`` (float32), given the Hessian ``h``
    ``[in, in]`` and the mean ``|x|`` ``x_mean`` ``[in]`` of its inputs. ``quantize`` maps a
    weight and the Hessian of its inputs to its quantized-then-dequantized values (what the model
    will get).

    With ``tie`` (``[in]``, values ``0..n-1``) the columns ``j`` with equal ``tie[j]`` share one
    scale: ``x̄`` and ``w̄`` are averaged over them and the result is ``s[tie]``.
    """
    w, h = w.float(), h.float()
    base = output_error(w, quantize(w, h), h)
    best = ScaleSearch(torch.ones(w.shape[1], device=w.device), None, base, base)
    x_mean = tie_mean(x_mean.float(), tie)
    w_mean = tie_mean(weight_magnitude(w, group_size), tie)
    for r, s in candidate_scales(x_mean, w_mean, grid):
        s = s if tie is None else s[tie]
        error = output_error(w, quantize(w * s, h / s[:, None] / s) / s, h)
        if error < best.error:
            best = ScaleSearch(s, r, error, base)
    return best
