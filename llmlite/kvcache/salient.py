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

from llmlite.kvcache.quant import QuantizedTensor, grown, pack, quantize, unpack

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


def symmetric_step(x: Tensor, bits: int, stats_dtype: torch.dtype | None = None) -> Tensor:
    """Per-token step ``ALPHA[bits] * rms`` of ``x [..., tokens, channels]`` in ``stats_dtype``,
    ``[..., tokens, 1]`` (0 without channels). The sum of squares is taken in float64, so that any
    summation order (the C encoder's in ``kvcache.fused``) gives the same step."""
    work = torch.promote_types(x.dtype, torch.float32)
    if x.shape[-1]:
        rms = x.to(work).double().pow(2).sum(-1, keepdim=True).div(x.shape[-1]).sqrt().to(work)
    else:
        rms = x.new_zeros(*x.shape[:-1], 1, dtype=work)
    return (ALPHA[bits] * rms).to(stats_dtype or x.dtype)


def symmetric_codes(x: Tensor, step: Tensor, bits: int) -> Tensor:
    """Codes ``clamp(floor(x / step) + 2**(bits-1))`` (``step`` 0 taken as 1), in ``x``'s work dtype."""
    work = torch.promote_types(x.dtype, torch.float32)
    safe = torch.where(step == 0, torch.ones_like(step), step).to(work)
    half = 1 << (bits - 1)
    return (x.to(work) / safe).floor_().add_(half).clamp_(0, 2 * half - 1)


def quantize_symmetric(x: Tensor, bits: int, stats_dtype: torch.dtype | None = None) -> QuantizedTensor:
    """Per-token symmetric quantization of ``x`` ``[..., tokens, channels]`` (one group per token):
    ``step = ALPHA[bits] * rms``, levels ``(code - 2**(bits-1) + 1/2) * step``, extremes clipped."""
    step = symmetric_step(x, bits, stats_dtype)
    codes, channels = symmetric_codes(x, step, bits), x.shape[-1]
    return QuantizedTensor(pack(codes, bits), step.contiguous(), None, bits, channels, max(1, channels), -1)


@dataclass
class ChannelStats:
    """What a layer fits once for its keys: per-channel mean and standard deviation (``[heads, dim]``,
    storage dtype) and the order of the flat ``heads * dim`` channels, plain ones first (ascending),
    then the salient ones (ascending)."""

    mean: Tensor
    std: Tensor
    order: Tensor  # int32 [heads * dim]
    n_plain: int

    @property
    def plain(self) -> Tensor:
        return self.order[: self.n_plain]

    @property
    def salient(self) -> Tensor:
        return self.order[self.n_plain :]

    def tensors(self) -> tuple[Tensor, ...]:
        return self.mean, self.std, self.order


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
    return ChannelStats(mean, std, order.to(torch.int32), importance.numel() - count)


@dataclass
class SalientKeys:
    """Quantized keys of the ``salient`` scheme, per token, in channel order (flat over heads), so
    that reading a token needs no gather: ``low`` holds every channel's ``bits``-bit code (a plain
    channel's symmetric code; a salient channel's low bits), ``high`` the salient channels' other
    bits (their ``2 * bits`` up to 8, in ascending channel order; None at 8 bits or without
    salient channels). A plain channel reads ``(low - 2**(bits-1) + 1/2) * step``, a salient one
    ``(low + high * 2**bits) * scale + minimum``."""

    low: Tensor  # uint8 [batch, 1, tokens, ceil(channels * bits / 8)]
    step: Tensor  # [batch, 1, tokens, 1]
    high: Tensor | None  # uint8 [batch, 1, tokens, ceil(n_salient * (salient_bits - bits) / 8)]
    scale: Tensor | None  # [batch, 1, tokens, 1]; None without salient channels
    minimum: Tensor | None
    bits: int
    n_salient: int

    @property
    def tokens(self) -> int:
        return self.low.shape[-2]

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.low, self.step, self.high, self.scale, self.minimum) if t is not None]

    def map(self, fn) -> SalientKeys:
        """The same keys with ``fn`` applied to each tensor (``fn(tensor, field name)``)."""
        low, step, high, scale, minimum = (
            None if t is None else fn(t, name)
            for t, name in zip(self.fields(), ("low", "step", "high", "scale", "minimum"), strict=True)
        )
        return SalientKeys(low, step, high, scale, minimum, self.bits, self.n_salient)

    def fields(self) -> tuple[Tensor | None, ...]:
        return self.low, self.step, self.high, self.scale, self.minimum


def salient_bits(bits: int) -> int:
    return min(8, 2 * bits)


def encode_keys(keys: Tensor, stats: ChannelStats, bits: int, stats_dtype: torch.dtype) -> SalientKeys:
    """Quantize ``keys`` ``[batch, heads, tokens, dim]`` (before RoPE) with fitted ``stats``."""
    b, h, n, d = keys.shape
    work = torch.promote_types(keys.dtype, torch.float32)
    z = (keys.to(work) - stats.mean.to(work)[None, :, None]) / stats.std.to(work)[None, :, None]
    z = z.transpose(1, 2).reshape(b, 1, n, h * d)
    step = symmetric_step(z[..., stats.plain.long()], bits, stats_dtype)
    codes = symmetric_codes(z, step, bits)
    chosen, high_bits = stats.salient.long(), salient_bits(bits) - bits
    high = scale = minimum = None
    if chosen.numel():
        q = quantize(z[..., chosen], salient_bits(bits), chosen.numel(), -1, stats_dtype)
        salient = unpack(q.codes, q.bits, chosen.numel(), torch.int32)
        codes[..., chosen] = (salient & ((1 << bits) - 1)).to(codes.dtype)
        high = pack(salient >> bits, high_bits) if high_bits else None
        scale, minimum = q.scale, q.minimum
    return SalientKeys(pack(codes, bits), step.contiguous(), high, scale, minimum, bits, chosen.numel())


def decode_keys(
    q: SalientKeys, stats: ChannelStats, heads: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The inverse of ``encode_keys``: keys ``[batch, heads, tokens, dim]`` in ``dtype``."""
    work = torch.promote_types(dtype, torch.float32)
    channels = stats.mean.numel()
    codes = unpack(q.low, q.bits, channels, work)
    flat = (codes + (0.5 - (1 << (q.bits - 1)))) * q.step.to(work)
    if q.n_salient:
        chosen = stats.salient.long()
        salient = codes[..., chosen]
        if q.high is not None:
            salient += unpack(q.high, salient_bits(q.bits) - q.bits, q.n_salient, work) * (1 << q.bits)
        flat[..., chosen] = torch.addcmul(q.minimum.to(work), salient, q.scale.to(work))
    b, _, n, hd = flat.shape
    flat = torch.addcmul(stats.mean.to(work).flatten(), flat, stats.std.to(work).flatten())
    return flat.view(b, n, heads, hd // heads).transpose(1, 2).to(dtype)


def append_keys(q: SalientKeys | None, block: SalientKeys) -> SalientKeys:
    """``block`` appended to ``q`` along the token axis, copying only ``block`` (``quant.grown``)."""
    if q is None:
        return block
    rows = block.tokens

    def grow(t: Tensor, name: str) -> Tensor:
        room = grown(t, rows)
        room[..., t.shape[-2] :, :] = getattr(block, name)
        return room

    return q.map(grow)


def reserve_keys(q: SalientKeys, rows: int) -> SalientKeys:
    """``q`` with ``rows`` more tokens not yet written (``quant.grown``)."""
    return q.map(lambda t, _name: grown(t, rows))


def select_keys(q: SalientKeys, fn) -> SalientKeys:
    return q.map(lambda t, _name: fn(t))
