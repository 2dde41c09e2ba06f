"""RTN with each group's clipping range searched on the layer's output error, not the weights'.

For every row and column group ``g`` the grid covers ``c · [min, max]`` of the group's weights,
with the ratio ``c`` of ``RATIOS`` whose rounding least changes the group's share of the layer
output on the calibration inputs ``X``: ``e(c) = Δ H_gg Δᵀ``, ``Δ = Ŵ_c − W`` (the row's part in
``g``), ``H = 2XᵀX / tokens``. ``c = 1`` is plain RTN, so no group's share of the error grows;
outlier weights that few tokens use are clipped, those the inputs rely on are kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmlite.quant.grid import QuantizedWeight, dequantize_codes, on_grid, quantize_codes, range_params
from llmlite.quant.method import GroupStats, Method, Quantized, QuantSettings

RATIOS = tuple(1 - i / 20 for i in range(10))  # 1.0 down to 0.55, AutoAWQ's clipping grid


@torch.no_grad()
def clip_search(
    w: Tensor, h: Tensor, bits: int, group_size: int = -1, sym: bool = True, ratios=RATIOS
) -> QuantizedWeight:
    """Quantize ``w`` ``[out, in]`` given the Hessian ``h`` ``[in, in]`` of its inputs (the first
    ratio of least error wins a tie)."""
    w, h = w.float(), h.float()
    size = w.shape[1] if group_size == -1 else group_size
    scales, zeros = [], []
    for i in range(0, w.shape[1], size):
        wg, hg = w[:, i : i + size], h[i : i + size, i : i + size]
        low, high = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
        best_error = torch.full((w.shape[0], 1), float("inf"))
        best_s, best_z = torch.zeros_like(best_error), torch.zeros_like(best_error)
        for c in ratios:
            s, z = (t[:, None] for t in range_params(c * low, c * high, bits, sym))
            d = dequantize_codes(quantize_codes(wg, s, z, bits), s, z) - wg
            error = ((d @ hg) * d).sum(1, keepdim=True)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        scales.append(best_s[:, 0])
        zeros.append(best_z[:, 0])
    return on_grid(w, torch.stack(scales, 1), torch.stack(zeros, 1), group_size, bits)


def run(w: Tensor, stats: GroupStats, s: QuantSettings) -> Quantized:
    return Quantized(clip_search(w, stats.hessian, s.bits, s.group_size, s.sym))


METHOD = Method(
    "rtn-clip",
    run,
    needs=frozenset({"hessian"}),
    help="round to nearest, each group's range clipped for the least output error",
)
