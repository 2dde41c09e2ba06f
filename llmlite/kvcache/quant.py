"""The pure core of KV-cache quantization: asymmetric group quantization along either axis of a
``[..., tokens, channels]`` tensor, and packing of the integer codes several to a byte.

Keys are quantized per channel (``axis=-2``: each group is ``group_size`` consecutive tokens of
one channel), values per token (``axis=-1``: each group is ``group_size`` consecutive channels of
one token), as in KIVI (Liu et al. 2024). A last group shorter than ``group_size`` is its own
group. Codes are packed along the channel axis whatever the group axis, so that quantized blocks
are appended along the token axis without repacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 4, 8)


@dataclass
class QuantizedTensor:
    """Packed codes of a ``[..., tokens, channels]`` tensor with one scale and minimum per group."""

    codes: Tensor  # uint8 [..., tokens, ceil(channels * bits / 8)]
    scale: Tensor  # [..., ceil(tokens / g), channels] for axis -2; [..., tokens, ceil(channels / g)] for -1
    minimum: Tensor | None  # same shape as scale; None: symmetric, levels (code - 2**(bits-1) + 1/2) * scale
    bits: int
    channels: int
    group_size: int
    axis: int  # -2 (keys) or -1 (values)

    @property
    def tokens(self) -> int:
        return self.codes.shape[-2]

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.codes, self.scale, self.minimum) if t is not None)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis, ``8 // bits`` to a byte, the
    first code in the lowest bits; the axis is zero-padded to a whole number of bytes."""
    per_byte = 8 // bits
    codes = codes.to(torch.uint8)
    pad = -codes.shape[-1] % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    if per_byte == 1:
        return codes.contiguous()
    codes = codes.view(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int, channels: int, dtype: torch.dtype = torch.uint8) -> Tensor:
    """The inverse of ``pack``: codes ``[..., channels]`` in ``dtype``."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed[..., :channels].to(dtype)
    mask = (1 << bits) - 1
    # one shift and mask per position in the byte (on CPU ~3x faster than a broadcast shift)
    parts = [packed & mask] + [(packed >> (bits * i)) & mask for i in range(1, per_byte)]
    return torch.stack(parts, dim=-1).flatten(-2)[..., :channels].to(dtype)


def _grouped(x: Tensor, group_size: int) -> Tensor:
    """The last axis cut into groups ``[..., n_groups, group_size]``; a short last group is padded
    by repeating its last element, which leaves its minimum and maximum unchanged."""
    pad = -x.shape[-1] % group_size
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.view(*x.shape[:-1], -1, group_size)


def _expand(stat: Tensor, group_size: int, length: int) -> Tensor:
    """Per-group statistics ``[..., n_groups]`` repeated to every element ``[..., length]``."""
    return stat.repeat_interleave(group_size, dim=-1)[..., :length]


def quantize(
    x: Tensor, bits: int, group_size: int, axis: int, stats_dtype: torch.dtype | None = None
) -> QuantizedTensor:
    """Asymmetric round-to-nearest quantization of ``x`` ``[..., tokens, channels]`` in groups of
    ``group_size`` along ``axis`` (-2: tokens, -1: channels).

    Per group: ``scale = (max - min) / (2**bits - 1)``, ``code = round((x - min) / scale)``. Scale
    and minimum are stored in ``stats_dtype`` (default ``x.dtype``) and the codes are computed from
    the stored values, so that ``dequantize`` reproduces exactly what was rounded.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size < 1 or axis not in (-1, -2):
        raise ValueError(f"group_size must be >= 1 and axis -1 or -2, got {group_size}, {axis}")
    stats_dtype = stats_dtype or x.dtype
    work = torch.promote_types(x.dtype, torch.float32)
    xt = x.to(work).transpose(-1, -2) if axis == -2 else x.to(work)  # group axis last
    length = xt.shape[-1]
    low, high = _grouped(xt, group_size).aminmax(dim=-1)
    qmax = (1 << bits) - 1
    scale = ((high - low) / qmax).to(stats_dtype)
    minimum = low.to(stats_dtype)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).to(work)
    s, m = _expand(safe, group_size, length), _expand(minimum.to(work), group_size, length)
    codes = ((xt - m) / s).round_().clamp_(0, qmax)
    if axis == -2:
        codes, scale, minimum = codes.transpose(-1, -2), scale.transpose(-1, -2), minimum.transpose(-1, -2)
    return QuantizedTensor(
        codes=pack(codes, bits),
        scale=scale.contiguous(),
        minimum=minimum.contiguous(),
        bits=bits,
        channels=x.shape[-1],
        group_size=group_size,
        axis=axis,
    )


def _dequantize_whole_groups(q: QuantizedTensor, dtype: torch.dtype) -> Tensor | None:
    """``dequantize`` for blocks of whole groups whose channels fill the bytes: each position in
    the byte is shifted, masked and scaled straight into its strided place in the output (one
    pass over the output, no unpacked copy). None for other blocks."""
    per_byte, mask = 8 // q.bits, (1 << q.bits) - 1
    *lead, n, width = q.codes.shape
    c, g = q.channels, q.group_size
    if c != width * per_byte or q.minimum is None:
        return None
    out = torch.empty(*lead, n, c, dtype=dtype, device=q.codes.device)
    scale, minimum = q.scale.to(dtype), q.minimum.to(dtype)
    if q.axis == -2 and n % g == 0:  # keys: a group is g tokens of one channel
        codes, place = q.codes.view(*lead, n // g, g, width), out.view(*lead, n // g, g, width, per_byte)
        grouped = (*lead, n // g, 1, width, per_byte)
        scale, minimum = scale.view(grouped), minimum.view(grouped)
        stats = [(scale[..., i], minimum[..., i]) for i in range(per_byte)]
    elif q.axis == -1 and c % g == 0 and g % per_byte == 0:  # values: a group is g channels of one token
        codes = q.codes.view(*lead, n, c // g, g // per_byte)
        place = out.view(*lead, n, c // g, g // per_byte, per_byte)
        stats = [(scale[..., None], minimum[..., None])] * per_byte
    else:
        return None
    for i, (s, m) in enumerate(stats):
        part = codes if per_byte == 1 else (codes >> (q.bits * i)) & mask
        torch.addcmul(m, part, s, out=place[..., i])
    return out


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``code * scale + minimum`` in ``dtype``: a ``[..., tokens, channels]`` tensor."""
    fast = _dequantize_whole_groups(q, dtype)
    if fast is not None:
        return fast
    codes = unpack(q.codes, q.bits, q.channels, dtype)
    scale = q.scale.to(dtype)
    minimum = (0.5 - (1 << (q.bits - 1))) * scale if q.minimum is None else q.minimum.to(dtype)
    g, (*lead, n, c) = q.group_size, codes.shape
    if q.axis == -2 and n % g == 0:  # whole groups (the cache's keys): broadcast, no expansion
        grouped = codes.view(*lead, n // g, g, c)
        return torch.addcmul(minimum[..., None, :], grouped, scale[..., None, :]).view(*lead, n, c)
    if q.axis == -1 and c % g == 0:
        grouped = codes.view(*lead, n, c // g, g)
        return torch.addcmul(minimum[..., None], grouped, scale[..., None]).view(*lead, n, c)
    if q.axis == -2:
        scale = scale.repeat_interleave(g, dim=-2)[..., :n, :]
        minimum = minimum.repeat_interleave(g, dim=-2)[..., :n, :]
    else:
        scale, minimum = _expand(scale, g, c), _expand(minimum, g, c)
    return torch.addcmul(minimum, codes, scale)


APPEND_CHUNK = 64  # tokens of room a quantized tensor that grows in the cache reserves at a time


def grown(t: Tensor, rows: int, chunk: int = APPEND_CHUNK) -> Tensor:
    """``t [..., n, w]`` as ``[..., n + rows, w]`` along the token (or token-group) axis, its first
    ``n`` rows unchanged, the new ones not yet written: a view of ``t``'s own buffer where that has
    room, else of a new buffer with room for ``min(chunk, (n + rows) // 8)`` more rows. So appending
    one token copies one row, not the whole cache, and a buffer's slack is at most an eighth of it
    and at most ``chunk`` rows (counted by ``QuantizedKVLayer.nbytes``). ``t`` must be such a view
    or own its storage, and nothing else may write to the buffer (the cache's quantized tensors)."""
    *lead, n, w = t.shape
    need, stride = n + rows, t.stride()
    if n and w and lead and stride[-1] == 1 and stride[-2] == w and not t.storage_offset():
        room = stride[-3] // w >= need  # rows of the buffer t starts (a fresh tensor: n, no room)
        if room and t.untyped_storage().nbytes() >= stride[0] * lead[0] * t.element_size():
            return t.as_strided((*lead, need, w), stride)
    buffer = t.new_empty(*lead, need + min(chunk, need // 8), w)  # room: an eighth, at most chunk rows
    buffer[..., :n, :] = t
    return buffer[..., :need, :]


def reserve(q: QuantizedTensor, rows: int, scale_rows: int | None = None) -> QuantizedTensor:
    """``q`` with ``rows`` more tokens (and ``scale_rows`` more rows of statistics; default
    ``rows``, as per token) whose codes and statistics are not yet written (``grown``: room for
    ``APPEND_CHUNK`` tokens at a time, i.e. ``APPEND_CHUNK // group_size`` rows of per-channel
    key statistics)."""
    scale_rows = rows if scale_rows is None else scale_rows
    chunk = APPEND_CHUNK if q.axis == -1 else max(1, APPEND_CHUNK // q.group_size)
    minimum = None if q.minimum is None else grown(q.minimum, scale_rows, chunk)
    scale = grown(q.scale, scale_rows, chunk)
    return QuantizedTensor(grown(q.codes, rows), scale, minimum, q.bits, q.channels, q.group_size, q.axis)


def append(q: QuantizedTensor | None, block: QuantizedTensor) -> QuantizedTensor:
    """``block`` appended to ``q`` along the token axis (key blocks must hold whole groups),
    copying only ``block`` (``reserve``); ``block`` itself where ``q`` is None."""
    if q is None:
        return block
    out = reserve(q, block.codes.shape[-2], block.scale.shape[-2])
    for old, room, new in zip(q.tensors(), out.tensors(), block.tensors(), strict=True):
        room[..., old.shape[-2] :, :] = new
    return out


def select(q: QuantizedTensor, fn) -> QuantizedTensor:
    """``q`` with ``fn`` applied to each of its tensors (e.g. a batch ``index_select``)."""
    minimum = None if q.minimum is None else fn(q.minimum)
    return QuantizedTensor(fn(q.codes), fn(q.scale), minimum, q.bits, q.channels, q.group_size, q.axis)
