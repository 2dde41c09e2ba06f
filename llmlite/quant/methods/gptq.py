"""GPTQ (``llmlite.quant.gptq``) with GPTAQ's drift correction (v2) and the scale refit."""

from __future__ import annotations

from torch import Tensor

from llmlite.quant.gptq import gptq
from llmlite.quant.method import GroupStats, Method, Quantized, QuantSettings


def run(w: Tensor, stats: GroupStats, s: QuantSettings) -> Quantized:
    shift = None if stats.drift is None else s.v2_alpha * stats.drift
    grid = (s.bits, s.group_size, s.sym, s.act_order, s.damp)
    result = gptq(w, stats.hessian, *grid, mse=s.mse, shift=shift, refit=s.refit)
    return Quantized(result.weight, result.damp)


METHOD = Method(
    "gptq",
    run,
    needs=frozenset({"hessian", "drift"}),
    options=frozenset({"mse", "refit", "v2"}),
    defaults=frozenset({"mse", "refit", "v2"}),
    help="GPTQ: error-compensated rounding on the calibration Hessian",
)
