"""AWQ then GPTQ in one pass: each layer smoothed with AWQ's scales (``llmlite.quant.smooth``),
searched for what GPTQ makes of them (not round to nearest, as the peers search them), then its
groups quantized by GPTQ (with GPTAQ's correction, the clipping search and the scale refit, as
``gptq``)."""

from __future__ import annotations

from llmlite.quant.method import Method
from llmlite.quant.methods.gptq import run
from llmlite.quant.smooth import plain_gptq

METHOD = Method(
    "awq-gptq",
    run,
    needs=frozenset({"hessian", "drift"}),
    options=frozenset({"mse", "refit", "v2", "awq_vo"}),
    defaults=frozenset({"mse", "refit", "v2", "awq_vo"}),
    scale_search=lambda s, bits: plain_gptq(bits, s.group_size, s.sym, s.act_order, s.damp),
    help="AWQ's scales, then GPTQ on the smoothed weights",
)
