"""File layouts of quantized weights as pure codecs: ``QuantizedWeight`` (the one in-memory form)
to a module's tensors and back. ``CODECS`` lists them by the ``checkpoint_format`` they write.

GPTQ layout (what transformers + GPTQModel, vLLM, TGI and exllama read), b bits per value:

* ``qweight`` int32 ``[in·b/32, out]``: the codes of each output column as a little-endian bit
  stream along the input dimension (value ``i`` at bits ``b·i .. b·i+b-1`` of the stream). For
  b ∈ {2, 4, 8} this is "value i at bits b·(i mod 32/b) of word i // (32/b)"; for b = 3 it is
  AutoGPTQ's packing of 32 values into 3 words across word boundaries.
* ``qzeros`` int32 ``[groups, out·b/32]``: zero-points minus one (the "v1" convention), packed
  the same way along the output dimension.
* ``scales`` float16 ``[groups, out]``, ``g_idx`` int32 ``[in]``, optional ``bias`` float16.

Lengths that do not fill whole words are padded with zero bits; the true lengths come from
``g_idx`` (input) and ``scales`` (output).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from llmlite.quant.grid import QuantizedWeight, group_index, num_groups

_MASK32 = 0xFFFFFFFF


def _chunk(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest run of values that fills whole 32-bit words."""
    values = 32 // math.gcd(bits, 32)
    return values, values * bits // 32


def packed_length(length: int, bits: int) -> int:
    values, words = _chunk(bits)
    return math.ceil(length / values) * words


def pack(values: Tensor, bits: int) -> Tensor:
    """Pack integer ``values`` ``[n, m]`` (each in ``[0, 2**bits)``) along dim 0 into int32 words.

    Works in int32 throughout (shifts wrap into the sign bit, which is the word's bit 31), one
    value position of the run at a time: no temporary larger than ``values`` as int32 / run length.
    """
    n, m = values.shape
    per_chunk, words_per_chunk = _chunk(bits)
    chunks = math.ceil(n / per_chunk)
    out = torch.zeros(chunks, words_per_chunk, m, dtype=torch.int32, device=values.device)
    for j in range(min(per_chunk, n)):
        v = values[j::per_chunk].to(torch.int32)  # values j, j + per_chunk, ...: one per chunk
        word, shift = divmod(bits * j, 32)
        out[: len(v), word] |= v << shift
        if shift + bits > 32:
            out[: len(v), word + 1] |= v >> (32 - shift)
    return out.view(chunks * words_per_chunk, m)


def unpack(words: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of ``pack``: int32 words ``[w, m]`` → uint8 values ``[length, m]``."""
    per_chunk, words_per_chunk = _chunk(bits)
    m = words.shape[1]
    mask = (1 << bits) - 1
    if words_per_chunk == 1:  # 2, 4, 8 bits: one vectorised shift (masking drops the sign bits)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        out = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
        return out.reshape(-1, m)[:length].to(torch.uint8)
    w = (words.to(torch.int64) & _MASK32).view(-1, words_per_chunk, m)
    out = torch.empty(w.shape[0], per_chunk, m, dtype=torch.int64)
    for j in range(per_chunk):
        word, shift = divmod(bits * j, 32)
        val = w[:, word] >> shift
        if shift + bits > 32:
            val = val | (w[:, word + 1] << (32 - shift))
        out[:, j] = val & mask
    return out.view(-1, m)[:length].to(torch.uint8)


def to_gptq(weight: QuantizedWeight, bias: Tensor | None = None) -> dict[str, Tensor]:
    """Tensors of one layer in the GPTQ checkpoint layout (v1 zero-points)."""
    tensors = {
        "qweight": pack(weight.codes.T, weight.bits),
        "qzeros": pack(weight.zero.to(torch.int64) - 1, weight.bits).T.contiguous(),
        "scales": weight.scale.T.to(torch.float16).contiguous(),
        "g_idx": weight.g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.to(torch.float16).contiguous()
    return tensors


def from_gptq(tensors: dict[str, Tensor], bits: int) -> QuantizedWeight:
    """Read one layer's GPTQ tensors back into codes, scales and zero-points."""
    g_idx = tensors["g_idx"].to(torch.int32)
    scales = tensors["scales"]
    out_features = scales.shape[1]
    codes = unpack(tensors["qweight"], bits, len(g_idx)).T
    zeros = unpack(tensors["qzeros"].T, bits, out_features).to(torch.int16) + 1  # 2**8 fits
    return QuantizedWeight(
        codes=codes.contiguous(),
        scale=scales.float().T.contiguous(),
        zero=zeros.contiguous(),
        g_idx=g_idx,
        bits=bits,
    )


@dataclass(frozen=True)
class Codec:
    """A file layout of one quantized linear: ``write(weight, bias)`` gives its tensors by name
    (saved under the module's name), ``read(tensors, bits)`` the ``QuantizedWeight`` back;
    ``marker`` is the tensor whose presence marks a module as quantized in this layout."""

    name: str
    write: Callable[[QuantizedWeight, Tensor | None], dict[str, Tensor]]
    read: Callable[[dict[str, Tensor], int], QuantizedWeight]
    marker: str

    def layout(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool):
        """The tensors (shapes and dtypes, zero-filled) one module of these sizes has in a file."""
        groups = num_groups(in_features, group_size)
        empty = QuantizedWeight(
            codes=torch.zeros(out_features, in_features, dtype=torch.uint8),
            scale=torch.zeros(out_features, groups),
            zero=torch.ones(out_features, groups, dtype=torch.uint8),
            g_idx=group_index(in_features, group_size),
            bits=bits,
        )
        return self.write(empty, torch.zeros(out_features) if bias else None)


GPTQ = Codec("gptq", to_gptq, from_gptq, marker="qweight")
CODECS = {codec.name: codec for codec in (GPTQ,)}
