"""The cache's arithmetic as one object, so that a faster implementation can replace it
(``kvcache.fused.NativeBackend``: the same results from C loops)."""

from __future__ import annotations

import torch
from torch import Tensor

from llmlite.kvcache.quant import QuantizedTensor, dequantize, quantize
from llmlite.kvcache.salient import ChannelStats, SalientKeys, encode_keys


class TorchBackend:
    """The pure-PyTorch implementation of the cache's operations: quantize, dequantize, and the
    salient scheme's key encoder. A faster backend replaces this object and keeps its signatures."""

    name = "torch"

    def quantize(
        self, x: Tensor, bits: int, group_size: int, axis: int, stats_dtype: torch.dtype
    ) -> QuantizedTensor:
        return quantize(x, bits, group_size, axis, stats_dtype)

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype) -> Tensor:
        return dequantize(q, dtype)

    def encode_keys(
        self, keys: Tensor, stats: ChannelStats, bits: int, stats_dtype: torch.dtype
    ) -> SalientKeys:
        """The salient scheme's keys (``salient.encode_keys``)."""
        return encode_keys(keys, stats, bits, stats_dtype)
