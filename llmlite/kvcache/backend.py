"""The cache's arithmetic as one object, so that a faster implementation can replace it
(``kvcache.fused.NativeBackend``: the same results from C loops)."""

from __future__ import annotations

import torch
from torch import Tensor

from llmlite.kvcache.quant import QuantizedTensor, append, dequantize, quantize
from llmlite.kvcache.rope import rotate
from llmlite.kvcache.salient import ChannelStats, SalientKeys, append_keys, encode_keys


class TorchBackend:
    """The pure-PyTorch implementation of the cache's operations: quantize, dequantize, and the
    salient scheme's key encoder. A faster backend replaces this object and keeps its signatures."""

    name = "torch"

    def quantize(
        self, x: Tensor, bits: int, group_size: int, axis: int, stats_dtype: torch.dtype
    ) -> QuantizedTensor:
        return quantize(x, bits, group_size, axis, stats_dtype)

    def append_quantized(
        self,
        into: QuantizedTensor | None,
        x: Tensor,
        bits: int,
        group_size: int,
        axis: int,
        stats_dtype: torch.dtype,
    ) -> QuantizedTensor:
        """``x`` quantized (``quantize``) and appended to ``into`` along the token axis."""
        return append(into, self.quantize(x, bits, group_size, axis, stats_dtype))

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype) -> Tensor:
        return dequantize(q, dtype)

    def store_keys(
        self,
        into: SalientKeys | None,
        keys: Tensor,
        angles: tuple[Tensor, Tensor] | None,
        stats: ChannelStats,
        bits: int,
        stats_dtype: torch.dtype,
    ) -> SalientKeys:
        """The salient scheme's store: ``keys [b, h, n, d]`` as the cache holds them (after RoPE at
        ``angles``, cosine and sine ``[n, d/2]``; None: no RoPE) rotated back in float32
        (``rope.rotate``), encoded (``salient.encode_keys``) and appended to ``into``."""
        keys = keys.float()
        if angles is not None:
            out = torch.empty_like(keys)
            rotate(keys, *angles, out, inverse=True)
            keys = out
        return append_keys(into, encode_keys(keys, stats, bits, stats_dtype))
