"""RoPE for the KV cache: the model's rotation undone before keys are quantized and redone when
they are read. Keys are quantized before RoPE (KVQuant): a channel's values then vary with the
content, not with the position, and a per-channel grid fits them far better. The rotation is the
model's frequencies, fixed when the cache is made, so undoing and redoing it is exact whatever
positions the model used."""

from __future__ import annotations

import torch
from torch import Tensor


class RopeTable:
    """Cosine and sine of the model's RoPE angles ``[positions, head_dim / 2]`` (float32),
    computed once for a cache's layers and grown (doubling) as the cache grows."""

    def __init__(self, inv_freq: Tensor | None):
        self.inv_freq = inv_freq
        self.cos = self.sin = torch.empty(0, 0)

    def angles(self, start: int, count: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of positions ``start ... start + count - 1``."""
        end = start + count
        if self.cos.shape[0] < end or self.cos.device != device:
            size = max(end, 2 * self.cos.shape[0], 256)
            positions = torch.arange(size, device=device, dtype=torch.float32)
            angles = torch.outer(positions, self.inv_freq.to(device, torch.float32))
            self.cos, self.sin = angles.cos(), angles.sin()
        return self.cos[start:end], self.sin[start:end]


def rotate(keys: Tensor, cos: Tensor, sin: Tensor, out: Tensor, inverse: bool = False) -> None:
    """RoPE of ``keys [..., tokens, d]`` at angles ``cos``/``sin`` ``[tokens, d/2]`` written into
    ``out`` (not ``keys``), in ``keys``' dtype: ``out = (lo·c ∓ hi·s, hi·c ± lo·s)`` for the halves
    ``lo``, ``hi`` of each head (``rotate_half``'s pairing; the lower signs undo it), each half one
    product then one ``addcmul`` (``llmlite_kv_encode_salient`` repeats this order bit for bit)."""
    cos, sin = cos.to(keys.dtype), sin.to(keys.dtype)
    half, sign = keys.shape[-1] // 2, 1.0 if inverse else -1.0
    lo, hi = keys[..., :half], keys[..., half:]
    torch.mul(lo, cos, out=out[..., :half]).addcmul_(hi, sin, value=sign)
    torch.mul(hi, cos, out=out[..., half:]).addcmul_(lo, sin, value=-sign)
