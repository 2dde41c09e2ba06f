"""The ``auto`` backend of ``QuantLinear``: on the CPU, per layer shape, the fastest path measured
on this machine, once for decode (one row) and once for prefill (many rows).

The paths, each exact to its stated rounding (``tests/test_kernels_cpu.py``):

- ``dequant``: the torch reference: dequantize in the activations' dtype, one float product;
- ``int4pack``: torch's packed 4-bit kernel, bfloat16 activations (``int4pack.py``); it reads
  4 bits a weight, so it wins decode, where the time is memory traffic;
- ``native-f32`` / ``native-bf16``: the compiled 4-bit dequantisation (``native.py``), then one
  float32 or bfloat16 product; prefill is compute-bound, and AMX / AVX-512 bfloat16 products are
  2–4× float32's where the CPU has them.

``prepare`` builds every path the layer's grid allows, times each (median of a few calls at 1 and
at ``PREFILL_ROWS`` rows, cached per shape and thread count), and keeps only the chosen ones. On
another device, with autograd through the input, or in float64, the layer runs the reference path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from llmlite.kernels import int4pack, native
from llmlite.quant.linear import BACKENDS, QuantLinear, register_backend

DECODE_ROWS, PREFILL_ROWS = 1, 64
SPLIT = 16  # inputs of fewer rows take the decode choice


def _reference(layer: QuantLinear, x: Tensor) -> Tensor:
    return BACKENDS["torch"].forward(layer, x)


def _product(w_in_out: Tensor, x: Tensor, bias: Tensor | None) -> Tensor:
    y = x.to(w_in_out.dtype) @ w_in_out
    y = y.to(x.dtype)
    return y if bias is None else y.add_(bias.to(x.dtype))


def _native(dtype: torch.dtype) -> Callable[[QuantLinear, Any, Tensor], Tensor]:
    def run(layer: QuantLinear, grid: native.Grid, x: Tensor) -> Tensor:
        return _product(native.dequantize_in_out(layer.qweight, grid, dtype), x, layer.bias)

    return run


def _int4pack(layer: QuantLinear, packed: int4pack.Int4Pack, x: Tensor) -> Tensor:
    y = int4pack.matmul(packed, x)
    return y if layer.bias is None else y.add_(layer.bias.to(y.dtype))


def paths(layer: QuantLinear) -> dict[str, tuple[Callable[[QuantLinear, Any, Tensor], Tensor], Any]]:
    """Every CPU path for ``layer``: ``name -> (run(layer, state, x), state)``."""
    found: dict = {"dequant": (lambda layer, _, x: _reference(layer, x), None)}
    if layer.bits == 4 and native.AVAILABLE:
        grid = native.grid(layer.qzeros, layer.scales, layer.g_idx, layer.out_features)
        found["native-f32"] = (_native(torch.float32), grid)
        found["native-bf16"] = (_native(torch.bfloat16), grid)
    if layer.bits == 4 and (packed := int4pack.pack(layer.quantized_weight(), layer.group_size)) is not None:
        found["int4pack"] = (_int4pack, packed)
    return found


_CHOICES: dict[tuple, tuple[str, str]] = {}


def _seconds(run: Callable[[], Tensor], repeats: int = 5) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose(layer: QuantLinear, found: dict) -> tuple[str, str]:
    """The fastest path at decode and at prefill for ``layer``'s shape, measured once per shape."""
    key = (layer.in_features, layer.out_features, layer.bits, layer.group_size, tuple(sorted(found)))
    key += (torch.get_num_threads(),)
    if key not in _CHOICES:
        picks = []
        for rows in (DECODE_ROWS, PREFILL_ROWS):
            x = torch.randn(rows, layer.in_features)
            with torch.no_grad():
                times = {name: _seconds(partial(run, layer, st, x)) for name, (run, st) in found.items()}
            picks.append(min(times, key=times.get))
        _CHOICES[key] = (picks[0], picks[1])
    return _CHOICES[key]


def prepare(layer: QuantLinear) -> None:
    found = paths(layer)
    layer.cpu_paths = {name: found[name] for name in choose(layer, found)}
    layer.cpu_choice = choose(layer, found)


@register_backend("auto", prepare=prepare)
def forward(layer: QuantLinear, x: Tensor) -> Tensor:
    if x.device.type != "cpu" or x.dtype == torch.float64 or (torch.is_grad_enabled() and x.requires_grad):
        return _reference(layer, x)
    rows = x.numel() // max(x.shape[-1], 1)
    name = layer.cpu_choice[0] if rows < SPLIT else layer.cpu_choice[1]
    run, state = layer.cpu_paths[name]
    return run(layer, state, x)
