"""File layouts of quantized weights as pure codecs: ``QuantizedWeight`` (the one in-memory form)
to a module's tensors and back. ``CODECS`` lists them by the name a ``quantization_config`` gives
them (GPTQ's ``checkpoint_format``, AWQ's ``version``, compressed-tensors' ``format``).

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

AWQ GEMM layout (AutoAWQ's ``WQLinear_GEMM``; transformers + GPTQModel, vLLM, SGLang, TGI), 4-bit:

* ``qweight`` int32 ``[in, out/8]``: packed along the *output* dimension, nibble ``j`` (bits
  ``4j .. 4j+3``) of word ``w`` holding output column ``8·w + AWQ_ORDER[j]``;
* ``qzeros`` int32 ``[groups, out/8]``: zero-points as they are (no −1), packed the same way;
* ``scales`` float16 ``[groups, out]``; no ``g_idx``: groups are whole and contiguous, ``i // g``.

compressed-tensors ``pack-quantized`` layout (llm-compressor; vLLM, transformers), b ∈ {4, 8}:

* ``weight_packed`` int32 ``[out, in·b/32]``: the signed values ``q − 2**(b−1)`` offset back by
  ``2**(b−1)`` (so llmlite's unsigned codes as they are), value ``i`` of a row at bits ``b·i`` of
  its little-endian word stream;
* ``weight_scale`` float16 ``[out, groups]``; ``weight_shape`` int64 ``[2]`` = ``[out, in]``;
* ``weight_zero_point`` int32 ``[out·b/32, groups]`` (offset likewise, packed along the output
  dimension), only for asymmetric weights: a symmetric weight has every zero-point at
  ``2**(b−1)``, the format's implicit one. Groups are whole and contiguous, as in AWQ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from llmlite.quant.grid import SUPPORTED_BITS, QuantizedWeight, group_index, num_groups

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


def whole_group_size(weight: QuantizedWeight) -> int | None:
    """The group size ``g`` when the groups are whole and contiguous (``g_idx == i // g`` with
    ``in = groups · g``), the only grids AWQ and compressed-tensors hold; else ``None``."""
    in_features, groups = weight.codes.shape[1], weight.scale.shape[1]
    if groups == 0 or in_features % groups:
        return None
    g = in_features // groups
    expected = torch.arange(in_features, device=weight.g_idx.device) // g
    return g if torch.equal(weight.g_idx.long(), expected) else None


def regroup(weight: QuantizedWeight, group_size: int) -> QuantizedWeight:
    """The same weight on contiguous groups of ``group_size`` columns (``group_size`` dividing
    ``in``), each taking the scale and zero-point of the group its columns had: exact when every
    new group lies inside one old group (a group of 128 over 576 columns is nine groups of 64)."""
    in_features = weight.codes.shape[1]
    old = weight.g_idx.long().view(-1, group_size)  # [new groups, group_size]
    if not torch.equal(old, old[:, :1].expand_as(old)):
        raise ValueError(f"groups of {group_size} columns would straddle the weight's own groups")
    first = old[:, 0]
    return QuantizedWeight(
        codes=weight.codes,
        scale=weight.scale[:, first].contiguous(),
        zero=weight.zero[:, first].contiguous(),
        g_idx=group_index(in_features, group_size),
        bits=weight.bits,
    )


def is_symmetric(weight: QuantizedWeight) -> bool:
    """Whether every zero-point is ``2**(bits−1)``, the zero of a symmetric grid."""
    return bool(torch.all(weight.zero.to(torch.int32) == 2 ** (weight.bits - 1)))


def _outside_codes(weight: QuantizedWeight) -> str | None:
    """Why zero-points outside ``0 .. 2**bits − 1`` (the v1 layout's wrap to ``2**bits``) cannot be
    stored in a layout that keeps zero-points as they are; else ``None``."""
    top = int(weight.zero.max()) if weight.zero.numel() else 0
    if top >= 2**weight.bits:
        return f"a zero-point of {top} is outside the {weight.bits}-bit range it stores zero-points in"
    return None


# AWQ GEMM ---------------------------------------------------------------------------------------

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of a word holds output column 8·w + AWQ_ORDER[j]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output column 8·w + k sits in nibble AWQ_REVERSE_ORDER[k]


def pack_awq(values: Tensor) -> Tensor:
    """4-bit ``values`` ``[n, m]`` (``m`` a multiple of 8) → int32 ``[n, m/8]``, packed along dim 1:
    nibble ``j`` of word ``w`` holds column ``8·w + AWQ_ORDER[j]`` (AutoAWQ's ``from_linear``)."""
    n, m = values.shape
    interleaved = values.reshape(n, m // 8, 8)[:, :, list(AWQ_ORDER)].reshape(n, m)
    return pack(interleaved.T, 4).T.contiguous()


def unpack_awq(words: Tensor) -> Tensor:
    """Inverse of ``pack_awq``: int32 ``[n, m/8]`` → uint8 ``[n, m]``."""
    n, m = words.shape[0], words.shape[1] * 8
    interleaved = unpack(words.T, 4, m).T
    return interleaved.reshape(n, m // 8, 8)[:, :, list(AWQ_REVERSE_ORDER)].reshape(n, m).contiguous()


def awq_refusal(weight: QuantizedWeight) -> str | None:
    """Why the AWQ GEMM layout cannot hold ``weight``, else ``None``."""
    out_features = weight.codes.shape[0]
    if weight.bits != 4:
        return f"AWQ GEMM holds 4-bit weights; this one is {weight.bits}-bit"
    if out_features % 8:
        return f"AWQ GEMM packs output channels by 8; this weight has {out_features}"
    if whole_group_size(weight) is None:
        return "AWQ GEMM has no g_idx: it holds whole groups of contiguous columns (g_idx = i // g) only"
    return _outside_codes(weight)


def to_awq(weight: QuantizedWeight, bias: Tensor | None = None) -> dict[str, Tensor]:
    """Tensors of one layer in the AWQ GEMM layout (``weight`` must pass ``awq_refusal``)."""
    tensors = {
        "qweight": pack_awq(weight.codes.T),
        "qzeros": pack_awq(weight.zero.T),
        "scales": weight.scale.T.to(torch.float16).contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.to(torch.float16).contiguous()
    return tensors


def from_awq(tensors: dict[str, Tensor], bits: int) -> QuantizedWeight:
    """Read one layer's AWQ GEMM tensors back (``bits`` is 4)."""
    scales = tensors["scales"]
    codes = unpack_awq(tensors["qweight"]).T
    in_features, groups = codes.shape[1], scales.shape[0]
    return QuantizedWeight(
        codes=codes.contiguous(),
        scale=scales.float().T.contiguous(),
        zero=unpack_awq(tensors["qzeros"]).T.contiguous(),
        g_idx=group_index(in_features, max(in_features // max(groups, 1), 1)),
        bits=bits,
    )


# compressed-tensors pack-quantized --------------------------------------------------------------

# the widths vLLM runs (its WNA16 kernels), which every compressed-tensors release packs alike (its
# 3-bit packing changed from 10 values per word to a dense stream)
PACKED_BITS = (4, 8)


def packed_refusal(weight: QuantizedWeight) -> str | None:
    """Why compressed-tensors' ``pack-quantized`` layout cannot hold ``weight``, else ``None``."""
    if weight.bits not in PACKED_BITS:
        return f"compressed-tensors pack-quantized holds 4- or 8-bit weights; this one is {weight.bits}-bit"
    if whole_group_size(weight) is None:
        return (
            "compressed-tensors has no g_idx for static groups: it holds whole groups of contiguous "
            "columns (g_idx = i // g) only"
        )
    return _outside_codes(weight)


def to_packed(weight: QuantizedWeight, bias: Tensor | None = None) -> dict[str, Tensor]:
    """Tensors of one layer in compressed-tensors' ``pack-quantized`` layout; the zero-points
    only when ``weight`` is not symmetric (``is_symmetric``)."""
    tensors = {
        "weight_packed": pack(weight.codes.T, weight.bits).T.contiguous(),
        "weight_scale": weight.scale.to(torch.float16).contiguous(),
        "weight_shape": torch.tensor(weight.codes.shape, dtype=torch.int64),
    }
    if not is_symmetric(weight):
        tensors["weight_zero_point"] = pack(weight.zero.to(torch.int64), weight.bits)
    if bias is not None:
        tensors["bias"] = bias.to(torch.float16).contiguous()
    return tensors


def from_packed(tensors: dict[str, Tensor], bits: int) -> QuantizedWeight:
    """Read one layer's ``pack-quantized`` tensors back; no ``weight_zero_point``: symmetric."""
    out_features, in_features = (int(n) for n in tensors["weight_shape"])
    scale = tensors["weight_scale"].float()
    groups = scale.shape[1]
    codes = unpack(tensors["weight_packed"].T, bits, in_features).T
    if "weight_zero_point" in tensors:
        zero = unpack(tensors["weight_zero_point"], bits, out_features)
    else:
        zero = torch.full((out_features, groups), 2 ** (bits - 1), dtype=torch.uint8)
    return QuantizedWeight(
        codes=codes.contiguous(),
        scale=scale.contiguous(),
        zero=zero.contiguous(),
        g_idx=group_index(in_features, max(in_features // max(groups, 1), 1)),
        bits=bits,
    )


@dataclass(frozen=True)
class Codec:
    """A file layout of one quantized linear: ``write(weight, bias)`` gives its tensors by name
    (saved under the module's name), ``read(tensors, bits)`` the ``QuantizedWeight`` back;
    ``marker`` is the tensor whose presence marks a module as quantized in this layout;
    ``refusal(weight)`` says why the layout cannot hold a weight (``None``: it can), and ``bits``
    lists the widths it holds."""

    name: str
    write: Callable[[QuantizedWeight, Tensor | None], dict[str, Tensor]]
    read: Callable[[dict[str, Tensor], int], QuantizedWeight]
    marker: str
    bits: tuple[int, ...] = SUPPORTED_BITS
    refusal: Callable[[QuantizedWeight], str | None] = lambda weight: None

    def empty(
        self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool = False
    ) -> QuantizedWeight:
        """A zero weight of these sizes on contiguous groups (zero-points 1, or the symmetric
        ``2**(bits−1)`` with ``sym``)."""
        groups = num_groups(in_features, group_size)
        zero = 2 ** (bits - 1) if sym else 1
        return QuantizedWeight(
            codes=torch.zeros(out_features, in_features, dtype=torch.uint8),
            scale=torch.zeros(out_features, groups),
            zero=torch.full((out_features, groups), zero, dtype=torch.uint8),
            g_idx=group_index(in_features, group_size),
            bits=bits,
        )

    def layout(
        self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool, sym: bool = False
    ):
        """The tensors (shapes and dtypes, zero-filled) one module of these sizes has in a file."""
        empty = self.empty(in_features, out_features, bits, group_size, sym)
        return self.write(empty, torch.zeros(out_features) if bias else None)


GPTQ = Codec("gptq", to_gptq, from_gptq, marker="qweight")
AWQ = Codec("gemm", to_awq, from_awq, marker="qweight", bits=(4,), refusal=awq_refusal)
PACKED = Codec(
    "pack-quantized", to_packed, from_packed, marker="weight_packed", bits=PACKED_BITS, refusal=packed_refusal
)
# by the name a quantization_config gives the layout: GPTQ's checkpoint_format, AWQ's version,
# compressed-tensors' format
CODECS = {codec.name: codec for codec in (GPTQ, AWQ, PACKED)}
