"""The pure core of the ``salient`` KV-cache scheme, which keeps a 2-bit cache close to the float16
one at a smaller size than KIVI's.

Keys (before RoPE) are normalised per channel with a mean and standard deviation fitted once, on
the first tokens the cache sees. The ``fraction`` of channels that matter most (query energy times
key variance, as in mixed-precision KV work such as KVQuant's outlier handling and MiKV) are
quantized at twice the bits, per token with a minimum and scale; the rest per token,
symmetrically, with one step per token set by the root mean square (no minimum stored). Every key
is quantized as it arrives, so no full-precision key group waits to fill up.

Values are rotated by a Hadamard matrix within each head before their per-token quantization
(QuaRot, Ashkboos et al. 2024): the rotation spreads outlier channels across the head, and it is
its own inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llmlite.kvcache.quant import QuantizedTensor, append, dequantize, pack, quantize, select

# step = ALPHA[bits] × the token's root mean square: the mean-square-optimal uniform step for a
# Gaussian (0.996 and 0.335 at 2 and 4 bits, Max 1960; about 0.03 at 8) widened ~10% for heavier
# tails (2 bits, bundled model: 1.1 beat 1.2 on 3 windows; 1.0 and 1.4 lost to 1.2 in probes)
ALPHA = {2: 1.1, 4: 0.37, 8: 0.034}
FIT_TOKENS = 64  # keys a layer sees (after the sinks) before it fits its channel statistics


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal Sylvester Hadamard matrix of order ``n`` (a power of two); symmetric, so it
    is its own inverse."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def quantize_symmetric(x: Tensor, bits: int, stats_dtype: torch.dtype | None = None) -> QuantizedTensor:
    """Per-token symmetric quantization of ``x`` ``[..., tokens, channels]`` (one group per token):
    ``step = ALPHA[bits] * rms``, levels ``(code - 2**(bits-1) + 1/2) * step``, extremes clipped.
    The sum of squares is taken in float64, so that any summation order (the C encoder's in
    ``kvcache.fused``) gives the same step."""
    stats_dtype = stats_dtype or x.dtype
    work = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(work)
    if x.shape[-1]:
        rms = xw.double().pow(2).sum(-1, keepdim=True).div(x.shape[-1]).sqrt().to(work)
    else:
        rms = xw.new_zeros(*x.shape[:-1], 1)
    step = (ALPHA[bits] * rms).to(stats_dtype)
    safe = torch.where(step == 0, torch.ones_like(step), step).to(work)
    half = 1 << (bits - 1)
    codes = (xw / safe).floor_().add_(half).clamp_(0, 2 * half - 1)
    channels = x.shape[-1]
    return QuantizedTensor(pack(codes, bits), step.contiguous(), None, bits, channels, max(1, channels), -1)


@dataclass
class ChannelStats:
    """What a layer fits once for its keys: per-channel mean and standard deviation (``[heads, dim]``,
    storage dtype) and the order of the flat ``heads * dim`` channels, plain ones first (ascending),
    then the salient ones (ascending), with its inverse permutation."""

    mean: Tensor
    std: Tensor
    order: Tensor  # int32 [heads * dim]
    inverse: Tensor  # int32 [heads * dim]: order[inverse] = arange
    n_plain: int

    @property
    def plain(self) -> Tensor:
        return self.order[: self.n_plain]

    @property
    def salient(self) -> Tensor:
        return self.order[self.n_plain :]

    def tensors(self) -> tuple[Tensor, ...]:
        return self.mean, self.std, self.order, self.inverse


def fit_channels(
    keys: Tensor, fraction: float, weight: Tensor | None = None, dtype: torch.dtype = torch.float16
) -> ChannelStats:
    """Channel statistics of ``keys`` ``[batch, heads, tokens, dim]``; the ``round(fraction * heads *
    dim)`` channels with the largest ``weight * variance`` (``weight`` ``[heads, dim]``, e.g. the
    query energy; none: variance alone) are salient."""
    k = keys.double()
    mean = k.mean(dim=(0, 2))
    std = (k - mean[None, :, None]).pow(2).mean(dim=(0, 2)).sqrt()
    mean, std = mean.to(dtype), std.to(dtype)
    std = torch.where(std > 0, std, torch.ones_like(std))
    importance = std.double().pow(2) * (1.0 if weight is None else weight.double().to(std.device))
    count = round(fraction * importance.numel())
    chosen = torch.zeros(importance.numel(), dtype=torch.bool, device=keys.device)
    chosen[importance.flatten().topk(count).indices] = True
    order = torch.cat([(~chosen).nonzero().flatten(), chosen.nonzero().flatten()])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    n_plain = importance.numel() - count
    return ChannelStats(mean, std, order.to(torch.int32), inverse.to(torch.int32), n_plain)


@dataclass
class SalientKeys:
    """Quantized keys of the ``salient`` scheme: the plain channels (symmetric, ``bits``) and the
    salient ones (asymmetric, ``2 * bits`` up to 8), both per token, flat over heads."""

    plain: QuantizedTensor  # [batch, 1, tokens, n_plain]
    salient: QuantizedTensor | None  # [batch, 1, tokens, n_salient]

    @property
    def tokens(self) -> int:
        return self.plain.tokens

    def tensors(self) -> list[Tensor]:
        return [*self.plain.tensors(), *(self.salient.tensors() if self.salient is not None else ())]


def salient_bits(bits: int) -> int:
    return min(8, 2 * bits)


def encode_keys(keys: Tensor, stats: ChannelStats, bits: int, stats_dtype: torch.dtype) -> SalientKeys:
    """Quantize ``keys`` ``[batch, heads, tokens, dim]`` (before RoPE) with fitted ``stats``."""
    b, h, n, d = keys.shape
    work = torch.promote_types(keys.dtype, torch.float32)
    z = (keys.to(work) - stats.mean.to(work)[None, :, None]) / stats.std.to(work)[None, :, None]
    ordered = z.transpose(1, 2).reshape(b, 1, n, h * d).index_select(-1, stats.order)
    plain = quantize_symmetric(ordered[..., : stats.n_plain], bits, stats_dtype)
    salient = None
    if stats.n_plain < h * d:
        chosen = ordered[..., stats.n_plain :]
        salient = quantize(chosen, salient_bits(bits), chosen.shape[-1], -1, stats_dtype)
    return SalientKeys(plain, salient)


def decode_keys(
    q: SalientKeys, stats: ChannelStats, heads: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The inverse of ``encode_keys``: keys ``[batch, heads, tokens, dim]`` in ``dtype``."""
    work = torch.promote_types(dtype, torch.float32)
    parts = [dequantize(q.plain, work)] + ([dequantize(q.salient, work)] if q.salient is not None else [])
    flat = torch.cat(parts, -1).index_select(-1, stats.inverse)  # one gather back to channel order
    b, _, n, hd = flat.shape
    flat = torch.addcmul(stats.mean.to(work).flatten(), flat, stats.std.to(work).flatten())
    return flat.view(b, n, heads, hd // heads).transpose(1, 2).to(dtype)


def append_keys(q: SalientKeys | None, block: SalientKeys) -> SalientKeys:
    """``block`` appended to ``q`` along the token axis (``quant.append``)."""
    if q is None:
        return block
    salient = None if q.salient is None else append(q.salient, block.salient)
    return SalientKeys(append(q.plain, block.plain), salient)


def select_keys(q: SalientKeys, fn) -> SalientKeys:
    return SalientKeys(select(q.plain, fn), None if q.salient is None else select(q.salient, fn))
