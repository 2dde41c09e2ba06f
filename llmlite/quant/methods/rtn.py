"""RTN: every weight to its nearest grid point (``llmlite.quant.rtn``); no calibration."""

from __future__ import annotations

from torch import Tensor

from llmlite.quant.method import GroupStats, Method, Quantized, QuantSettings
from llmlite.quant.rtn import rtn


def run(w: Tensor, stats: GroupStats, s: QuantSettings) -> Quantized:
    return Quantized(rtn(w, s.bits, s.group_size, s.sym, s.mse))


METHOD = Method("rtn", run, options=frozenset({"mse"}), help="round to nearest, no calibration")
