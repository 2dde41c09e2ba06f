"""Round-to-nearest (RTN) weight quantization: every weight to its nearest grid point."""

from __future__ import annotations

import torch
from torch import Tensor

from llmlite.quant.grid import QuantizedWeight, group_params, on_grid


@torch.no_grad()
def rtn(w: Tensor, bits: int, group_size: int = -1, sym: bool = True, mse: bool = False) -> QuantizedWeight:
    """Quantize ``w`` ``[out, in]`` per output channel (``group_size`` -1) or per column group;
    ``mse`` searches each group's clipping range (see ``grid_params``)."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    scale, zero = group_params(w, bits, group_size, sym, mse)
    return on_grid(w, scale, zero, group_size, bits)
