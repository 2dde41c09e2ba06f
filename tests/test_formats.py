"""GPTQ packing: round trips over every bit width and edge shape, hand-computed words, and
AutoGPTQ's own packing loop (reimplemented in ``reference.py``) as the independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch

from llmlite.quant.formats import from_gptq, pack, packed_length, to_gptq, unpack
from llmlite.quant.rtn import rtn

BITS = [2, 3, 4, 8]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n,m", [(1, 1), (5, 3), (31, 2), (32, 1), (33, 4), (96, 7), (200, 5), (576, 3)])
def test_pack_round_trip(bits, n, m):
    values = torch.randint(0, 2**bits, (n, m))
    words = pack(values, bits)
    assert words.dtype == torch.int32
    assert words.shape == (packed_length(n, bits), m)
    assert torch.equal(unpack(words, bits, n).long(), values)


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_autogptq_loop(bits):
    values = torch.randint(0, 2**bits, (96, 6))  # 96 = 3 × 32: whole words for every width
    ours = pack(values, bits).numpy().view(np.uint32)
    theirs = ref.autogptq_pack(values.numpy(), bits)
    assert np.array_equal(ours, theirs)


def test_pack_hand_computed_words():
    # 4-bit: value i at bits 4·i of the word, little end first.
    v4 = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [15]])
    assert pack(v4, 4).item() == np.array(0xF7654321, dtype=np.uint32).view(np.int32)
    # 2-bit: 16 values per word.
    v2 = torch.tensor([[3]] + [[0]] * 14 + [[1]])
    assert pack(v2, 2).item() == 0x40000003
    # 8-bit: 4 values per word.
    v8 = torch.tensor([[0x12], [0x34], [0x56], [0x78]])
    assert pack(v8, 8).item() == 0x78563412
    # 3-bit: 32 values in 3 words; value 10 straddles words 0/1, value 21 words 1/2.
    v3 = torch.zeros(32, 1, dtype=torch.long)
    v3[0], v3[10], v3[21], v3[31] = 5, 7, 6, 1
    words = pack(v3, 3).numpy().view(np.uint32)[:, 0]
    assert words[0] == 5 | (0b11 << 30)  # value 10 = 0b111: low two bits at 30..31
    assert words[1] == 0b1 | (0 << 31)  # its third bit at bit 0; value 21 = 0b110: low bit 0 at 31
    assert words[2] == 0b11 | (1 << 29)  # value 21's high bits at 0..1; value 31 at 3·31-64 = 29


def test_pack_pads_partial_words_with_zero_bits():
    words = pack(torch.tensor([[1], [2], [3]]), 4)
    assert words.shape == (1, 1) and words.item() == 0x321


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(
    "shape,group_size", [((96, 200), 64), ((32, 576), 128), ((8, 40), -1), ((200, 96), 32)]
)
def test_gptq_tensors_round_trip(bits, sym, shape, group_size):
    w = torch.randn(shape)
    qw = rtn(w, bits, group_size, sym)
    tensors = to_gptq(qw, bias=torch.randn(shape[0]))
    out_features, in_features = shape
    assert tensors["qweight"].shape == (packed_length(in_features, bits), out_features)
    assert tensors["qzeros"].shape == (qw.scale.shape[1], packed_length(out_features, bits))
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (
        qw.scale.shape[1],
        out_features,
    )
    assert tensors["g_idx"].dtype == torch.int32 and tensors["bias"].dtype == torch.float16
    back = from_gptq(tensors, bits)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.scale, qw.scale) and torch.equal(back.dequantize(), qw.dequantize())


def test_v1_zero_point_convention():
    qw = rtn(torch.randn(8, 64), 4, 32, sym=True)  # symmetric 4-bit: zero 8, stored as 7
    stored = unpack(to_gptq(qw)["qzeros"].T, 4, 8)
    assert torch.all(stored == 7)
