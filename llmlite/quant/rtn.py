"""Round-to-nearest (RTN) weight quantization: every weight to its nearest grid point."""

from __future__ import annotations

import torch
from torch import Tensor

from llmlite.quant.grid import QuantizedWeight, group_index, group_params, quantize_codes


@torch.no_grad()
def rtn(w: Tensor, bits: int, group_size: int = -1, sym: bool = True, mse: bool = False) -> QuantizedWeight:
    """Quantize ``w`` ``[out, in]`` per output channel (``group_size`` -1) or per column group;
    ``mse`` searches each group's clipping range (see ``grid_params``)."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    scale, zero = group_params(w, bits, group_size, sym, mse)
    g_idx = group_index(w.shape[1], group_size)
    g = g_idx.long()
    codes = quantize_codes(w, scale[:, g], zero[:, g], bits)
    return QuantizedWeight(
        codes=codes.to(torch.uint8),
        scale=scale.float(),
        zero=zero.to(torch.uint8),
        g_idx=g_idx,
        bits=bits,
    )
