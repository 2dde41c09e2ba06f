"""The integer grid shared by every weight quantizer: scales, zero-points, codes.

A weight ``w`` in a group with scale ``s`` and zero-point ``z`` is stored as the code
``q = clamp(round(w / s) + z, 0, 2**bits - 1)`` and read back as ``(q - z) * s``.

Two conventions make the in-memory result identical to what serving loaders read back:

* scales are rounded to float16 before use, because checkpoints store them in float16;
* asymmetric zero-points are at least 1, because the GPTQ "v1" layout stores ``z - 1``
  (a zero of 0 would be written as -1 and misread). When the natural zero rounds to 0, the
  group is re-gridded with ``z = 1`` and ``s = max / (2**bits - 2)``, which still covers its range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)
_FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)


def max_code(bits: int) -> int:
    return 2**bits - 1


def to_fp16_grid(scale: Tensor) -> Tensor:
    return scale.clamp(min=_FP16_TINY).to(torch.float16).to(scale.dtype)


# Clipping search of the GPTQ reference (``Quantizer(mse=True)``): shrink the range by 1% steps
# down to 20% of it, keep the grid with the least Σ|w - q|^2.4.
MSE_NORM, MSE_STEPS, MSE_MAX_SHRINK = 2.4, 100, 0.8


def grid_params(w: Tensor, bits: int, sym: bool, mse: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and zero-point of each row of ``w`` (reducing over the last dimension).

    Both are returned in ``w``'s dtype; zero-points hold integers. With ``mse``, each row's range
    is shrunk to the candidate that minimises the rounding error (outliers get clipped).
    """
    xmin = w.amin(-1).clamp(max=0)
    xmax = w.amax(-1).clamp(min=0)
    best = range_params(xmin, xmax, bits, sym)
    if not mse:
        return best
    best_err = torch.full_like(xmin, float("inf"))
    for i in range(int(MSE_MAX_SHRINK * MSE_STEPS)):
        shrink = 1 - i / MSE_STEPS
        scale, zero = range_params(shrink * xmin, shrink * xmax, bits, sym)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        err = (dequantize_codes(quantize_codes(w, s, z, bits), s, z) - w).abs_().pow_(MSE_NORM).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]))
    return best


def range_params(xmin: Tensor, xmax: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Grid covering ``[xmin, xmax]`` (``xmin ≤ 0 ≤ xmax``) with llmlite's conventions."""
    maxq = max_code(bits)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmax = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
        scale = to_fp16_grid(2 * xmax / maxq)
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = to_fp16_grid((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale)
    low = zero < 1
    if low.any():
        scale = torch.where(low, to_fp16_grid(xmax / (maxq - 1)), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero.clamp(1, maxq)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer codes (in ``w``'s dtype) of ``w`` on the grid; scale/zero broadcast against ``w``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def dequantize_codes(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (q - zero) * scale


@dataclass
class QuantizedWeight:
    """A weight matrix ``[out, in]`` as integer codes plus per-group scales and zero-points.

    ``g_idx[i]`` is the group of input column ``i``; ``scale`` and ``zero`` are ``[out, groups]``.
    """

    codes: Tensor  # uint8 [out, in]
    scale: Tensor  # float32 [out, groups], float16-representable
    zero: Tensor  # uint8 [out, groups]
    g_idx: Tensor  # int32 [in]
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        g = self.g_idx.long()
        s = self.scale.to(dtype)[:, g]
        z = self.zero.to(dtype)[:, g]
        return (self.codes.to(dtype) - z) * s


def group_index(in_features: int, group_size: int) -> Tensor:
    """``g_idx`` for contiguous groups; ``group_size`` -1 means one group per row."""
    g = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // max(g, 1)


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def group_params(
    w: Tensor, bits: int, group_size: int, sym: bool, mse: bool = False
) -> tuple[Tensor, Tensor]:
    """Scale and zero-point ``[out, groups]`` of contiguous column groups (the last may be short)."""
    cols = w.shape[1]
    g = cols if group_size == -1 else group_size
    pairs = [grid_params(w[:, i : i + g], bits, sym, mse) for i in range(0, cols, g)]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


def on_grid(w: Tensor, scale: Tensor, zero: Tensor, group_size: int, bits: int) -> QuantizedWeight:
    """``w`` ``[out, in]`` rounded onto the grids of contiguous column groups, given each group's
    ``scale`` and ``zero`` ``[out, groups]``."""
    g_idx = group_index(w.shape[1], group_size)
    g = g_idx.long()
    codes = quantize_codes(w, scale[:, g], zero[:, g], bits)
    return QuantizedWeight(codes.to(torch.uint8), scale.float(), zero.to(torch.uint8), g_idx, bits)


def fake_quantize(w: Tensor, bits: int, group_size: int, sym: bool) -> Tensor:
    """``w`` ``[out, in]`` rounded to nearest on its groups' grids and read back: the values of
    ``on_grid(w, *group_params(w, ...), ...).dequantize()`` in one pass over ``[out, groups, g]``.
    The last group is padded with zeros, which leave its range as it is (ranges include 0)."""
    out, cols = w.shape
    g = cols if group_size == -1 else group_size
    groups = math.ceil(cols / g) if cols else 0
    padded = torch.nn.functional.pad(w, (0, groups * g - cols)).view(out, groups, g)
    scale, zero = range_params(padded.amin(-1).clamp(max=0), padded.amax(-1).clamp(min=0), bits, sym)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = (padded / scale).round_().add_(zero).clamp_(0, max_code(bits))  # in place: few fresh pages
    return q.sub_(zero).mul_(scale).view(out, -1)[:, :cols]
