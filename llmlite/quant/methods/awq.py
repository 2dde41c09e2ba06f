"""AWQ: each layer smoothed with activation-aware scales (``llmlite.quant.smooth``), then each
weight rounded to nearest with its groups' clipping ranges searched on the output error
(``rtn-clip``'s search, AutoAWQ's clipping grid); ``--no-clip``: plain round to nearest."""

from __future__ import annotations

from torch import Tensor

from llmlite.quant.grid import group_params, on_grid
from llmlite.quant.method import GroupStats, Method, Quantized, QuantSettings
from llmlite.quant.methods.clip import clip_search
from llmlite.quant.smooth import rtn


def run(w: Tensor, stats: GroupStats, s: QuantSettings) -> Quantized:
    if s.clip:
        return Quantized(clip_search(w, stats.hessian, s.bits, s.group_size, s.sym))
    return Quantized(on_grid(w, *group_params(w, s.bits, s.group_size, s.sym), s.group_size, s.bits))


METHOD = Method(
    "awq",
    run,
    needs=frozenset({"hessian"}),
    options=frozenset({"clip", "awq_vo"}),
    defaults=frozenset({"clip", "awq_vo"}),
    scale_search=lambda s, bits: rtn(bits, s.group_size, s.sym),
    help="AWQ: activation-aware scales folded into the norm or linear before, then round to nearest "
    "with clipping searched",
)
