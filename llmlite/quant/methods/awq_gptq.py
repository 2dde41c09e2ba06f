"""AWQ then GPTQ in one pass: each layer smoothed with AWQ's scales (``llmlite.quant.smooth``),
then its groups quantized by GPTQ (with GPTAQ's correction and the scale refit, as ``gptq``)."""

from __future__ import annotations

from llmlite.quant.method import Method
from llmlite.quant.methods.gptq import run

METHOD = Method(
    "awq-gptq",
    run,
    needs=frozenset({"hessian", "drift"}),
    options=frozenset({"mse", "refit", "v2", "awq_vo"}),
    defaults=frozenset({"mse", "refit", "v2", "awq_vo"}),
    smooths=True,
    help="AWQ's scales, then GPTQ on the smoothed weights",
)
