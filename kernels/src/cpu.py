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
at ``PREFILL_ROWS`` rows, cached per shape and thread count), and keeps only the chosen ones: the
fastest, unless it rounds to bfloat16 and is less than ``MARGIN`` faster than the best float32
path (near-ties would otherwise flip between runs and move results in the last digits). On
another device, with autograd through the input, or in float64, the layer runs the reference path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from llmlite.kernels import int4pack, native

if TYPE_CHECKING:
    from llmlite.quant.linear import QuantLinear

DECODE_ROWS, PREFILL_ROWS = 1, 64
SPLIT = 16  # inputs of fewer rows take the decode choice
EXACT = ("dequant", "native-f32")  # float32 throughout: the reference's values
MARGIN = 1.25  # a bfloat16 path is taken only if it is this much faster than the best exact one


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


def paths(layer: QuantLinear, reference: Callable) -> dict[str, tuple[Callable, Any]]:
    """Every CPU path for ``layer``: ``name -> (run(layer, state, x), state)``; ``reference(layer,
    x)`` is the torch backend's forward."""
    found: dict = {"dequant": (lambda layer, reference, x: reference(layer, x), reference)}
    weight = layer.quantized_weight() if layer.bits == 4 else None
    if weight is not None and native.AVAILABLE:
        grid = native.grid(weight)
        found["native-f32"] = (_native(torch.float32), grid)
        found["native-bf16"] = (_native(torch.bfloat16), grid)
    if weight is not None and (packed := int4pack.pack(weight, layer.group_size)) is not None:
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
            exact = min((n for n in times if n in EXACT), key=times.get)
            fastest = min(times, key=times.get)
            picks.append(fastest if times[fastest] * MARGIN <= times[exact] else exact)
        _CHOICES[key] = (picks[0], picks[1])
    return _CHOICES[key]


def prepare(layer: QuantLinear, reference: Callable) -> None:
    found = paths(layer, reference)
    layer.cpu_choice = choose(layer, found)
    layer.cpu_paths = {name: found[name] for name in layer.cpu_choice}


def forward(layer: QuantLinear, x: Tensor, reference: Callable) -> Tensor:
    """``reference(layer, x)`` (the torch backend) on another device, with autograd through the
    input, or in float64; else the path chosen for the number of rows."""
    if x.device.type != "cpu" or x.dtype == torch.float64 or (torch.is_grad_enabled() and x.requires_grad):
        return reference(layer, x)
    rows = x.numel() // max(x.shape[-1], 1)
    name = layer.cpu_choice[0] if rows < SPLIT else layer.cpu_choice[1]
    run, state = layer.cpu_paths[name]
    return run(layer, state, x)
