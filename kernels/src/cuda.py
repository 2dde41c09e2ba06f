"""``QuantLinear`` on a CUDA device: the Triton w4a16 kernels (``triton_w4a16.py``) wherever they
carry the layer's grid, the torch reference elsewhere.

Layers are loaded on the CPU and moved afterwards, so the kernels' form of a layer is built at its
first call on a device (and again if it moves), not by the backend's ``prepare`` step.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from llmlite.quant.linear import QuantLinear

HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted() -> bool:
    """Whether Triton runs its interpreter (on CPU tensors: the tests' way without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable() -> str | None:
    """Why the Triton kernels cannot run here, or None if they can."""
    if not HAS_TRITON:
        return "the 'triton' backend needs the triton package (a CUDA build of torch installs it)"
    if not (torch.cuda.is_available() or interpreted()):
        return "the 'triton' backend needs a CUDA GPU; on this machine use the 'auto' backend"
    return None


def _grid(layer: QuantLinear, device: torch.device):
    """The layer's kernel form on ``device``, built once per device; False if the kernels cannot
    carry its grid."""
    grid = getattr(layer, "triton_grid", None)
    if grid is None or (grid is not False and grid.qweight.device != device):
        from llmlite.kernels import triton_w4a16

        grid = triton_w4a16.prepare(layer)
        layer.triton_grid = False if grid is None else grid
    return layer.triton_grid


def forward(layer: QuantLinear, x: Tensor, reference: Callable[[QuantLinear, Tensor], Tensor]) -> Tensor:
    """``x Wᵀ + b`` through the kernels; ``reference(layer, x)`` with autograd through the input, in
    float64, without triton, off the GPU (unless interpreted), or for a grid the kernels cannot carry."""
    on_device = x.device.type == "cuda" or interpreted()
    if not (HAS_TRITON and on_device) or x.dtype not in KERNEL_DTYPES:
        return reference(layer, x)
    if torch.is_grad_enabled() and x.requires_grad:
        return reference(layer, x)
    grid = _grid(layer, x.device)
    if grid is False:
        return reference(layer, x)
    from llmlite.kernels import triton_w4a16

    y = triton_w4a16.matmul(grid, x)
    return y if layer.bias is None else y.add_(layer.bias.to(y.dtype))
