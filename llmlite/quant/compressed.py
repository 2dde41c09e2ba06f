"""What every compressed linear layer offers the rest of llmlite, whatever its method or layout.

Metrics, FLOP counts, adapters and loaders ask ``is_compressed(module)`` instead of testing for
one class: a quantized, pruned or factorised linear only has to provide these members.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class CompressedLinear(Protocol):
    """``y = x Wᵀ + b`` with ``W`` ``[out_features, in_features]`` held in a compressed form."""

    in_features: int
    out_features: int
    bias: Tensor | None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W`` ``[out, in]`` as the layer computes with it."""
        ...

    def stored_bytes(self) -> int:
        """Bytes the layer holds for ``W`` and ``b`` (what a checkpoint stores)."""
        ...


def is_compressed(module: nn.Module) -> bool:
    return isinstance(module, CompressedLinear)


def compressed_linears(model: nn.Module) -> dict[str, CompressedLinear]:
    """The compressed linear layers of ``model`` by their full names."""
    return {name: m for name, m in model.named_modules() if is_compressed(m)}
