"""4-bit GPTQ dequantisation in compiled C (``llmlite/native/dequant4.c``), for prefill: the float
weight ``[K, N]`` written once per call, vectorised, then one float matrix product (AMX / AVX-512
bfloat16 or float32 BLAS). Optional: ``AVAILABLE`` is False when the install had no C compiler."""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor

MODULE = "llmlite.native.dequant4"


def load_library(module: str) -> ctypes.CDLL | None:
    """The optional compiled extension ``module`` opened with ctypes, or None if it was not built."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None
    try:
        return ctypes.CDLL(spec.origin)
    except OSError:
        return None


def _load() -> ctypes.CDLL | None:
    lib = load_library(MODULE)
    if lib is None:
        return None
    fn = lib.llmlite_dequant4
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    fn.restype = None
    return lib


_LIB = _load()
AVAILABLE = _LIB is not None


@dataclass
class Grid:
    """A layer's grid as the C loop reads it: float32 ``scale`` and ``offset = −z·s``, ``[groups, N]``."""

    scale: Tensor
    offset: Tensor
    g_idx: Tensor  # int32 [K]


def grid(weight) -> Grid:
    """From a ``grid.QuantizedWeight`` (scale, zero ``[out, groups]``, ``g_idx``)."""
    scale = weight.scale.float().T
    offset = -weight.zero.float().T * scale
    return Grid(scale.contiguous(), offset.contiguous(), weight.g_idx.to(torch.int32).contiguous())


def dequantize_in_out(qweight: Tensor, g: Grid, dtype: torch.dtype) -> Tensor:
    """The weight ``[K, N]`` in ``dtype`` (float32 or bfloat16) from GPTQ's 4-bit ``qweight [K/8, N]``."""
    if _LIB is None or dtype not in (torch.float32, torch.bfloat16):
        raise RuntimeError("the native 4-bit dequantisation is not built, or dtype is not float32/bfloat16")
    k, n = g.g_idx.numel(), qweight.shape[1]
    out = torch.empty(k, n, dtype=dtype)
    args = (qweight.data_ptr(), g.scale.data_ptr(), g.offset.data_ptr(), g.g_idx.data_ptr())
    _LIB.llmlite_dequant4(*args, k, n, out.data_ptr(), int(dtype == torch.bfloat16))
    return out
