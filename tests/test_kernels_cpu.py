"""CPU kernels of the quantized linear layer against float64 references, over the shape grid of
issue 24: in-features 96, 576, 1536, 4096 and one not a multiple of the group; 1, 7 and 64 rows;
contiguous, per-channel and act-order groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import int4pack_matmul

from llmlite.kernels import cpu, int4pack, native
from llmlite.quant import linear
from llmlite.quant.grid import QuantizedWeight, group_index
from llmlite.quant.linear import QuantLinear

needs_int4pack = pytest.mark.skipif(not int4pack.AVAILABLE, reason="this torch has no CPU int4 kernel")


def random_weight(out: int, cols: int, group: int, act_order: bool, seed: int) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    g_idx = group_index(cols, group)
    if act_order:  # GPTQ's act-order: groups of exact width in a shuffled column order
        g_idx = g_idx[torch.randperm(cols, generator=gen)]
    groups = int(g_idx.max()) + 1
    return QuantizedWeight(
        codes=torch.randint(0, 16, (out, cols), dtype=torch.uint8, generator=gen),
        scale=(torch.rand(out, groups, generator=gen) / 8 + 1e-3).half().float(),
        zero=torch.randint(0, 17, (out, groups), dtype=torch.int16, generator=gen),  # 16: v1's wrap
        g_idx=g_idx,
        bits=4,
    )


def check(weight: QuantizedWeight, group: int, rows: int, seed: int) -> None:
    packed = int4pack.pack(weight, group)
    assert packed is not None
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(seed + 1))
    got = int4pack.matmul(packed, x).double().numpy()
    ref = int4pack_matmul(x.numpy(), weight.codes, weight.scale, weight.zero, weight.g_idx)
    # one bfloat16 step of the output, plus float32 summation order on cancelling sums
    scale = np.abs(x.numpy()) @ np.abs(weight.dequantize().double().numpy()).T
    assert np.all(np.abs(got - ref) <= 2.0**-7 * np.abs(ref) + 1e-5 * scale)


@needs_int4pack
@pytest.mark.parametrize("cols", [96, 576, 1536, 4096, 100])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_int4pack_matches_float64_reference(cols, rows):
    for seed, (group, act_order) in enumerate([(32, False), (128, False), (-1, False), (32, True)]):
        if cols == 100 and group == 32 and act_order:
            continue  # act-order needs groups of exact width; 100 = 3 × 32 + 4
        check(random_weight(48, cols, group, act_order, seed), group, rows, seed)


@needs_int4pack
def test_int4pack_edge_shapes():
    check(random_weight(16, 32, 32, False, 0), 32, 1, 0)  # one group, one row
    check(random_weight(16, 33, 32, False, 1), 32, 3, 1)  # a last group of one column
    check(random_weight(16, 576, 512, False, 2), 512, 2, 2)  # group wider than any kernel group


@needs_int4pack
def test_int4pack_refuses_what_it_cannot_carry():
    assert int4pack.pack(random_weight(40, 64, 32, False, 0), 32) is None  # out-features % 16
    assert int4pack.pack(random_weight(16, 72, 24, False, 0), 24) is None  # no kernel group divides 24
    w = random_weight(16, 64, 32, False, 0)
    assert int4pack.pack(QuantizedWeight(w.codes & 7, w.scale, w.zero & 7, w.g_idx, 3), 32) is None
    ragged = random_weight(16, 64, 32, False, 0)
    ragged.g_idx[:3] = 1  # groups of 29 and 35 columns: no permutation makes them contiguous
    assert int4pack.pack(ragged, 32) is None


@needs_int4pack
def test_int4pack_empty_input():
    packed = int4pack.pack(random_weight(32, 64, 32, False, 0), 32)
    assert int4pack.matmul(packed, torch.zeros(0, 64)).shape == (0, 32)


@pytest.mark.skipif(not native.AVAILABLE, reason="the native dequantisation was not compiled")
@pytest.mark.parametrize(
    "cols,group,act_order", [(96, 32, False), (576, 128, False), (100, 32, False), (64, 32, True)]
)
def test_native_dequantize_is_bit_exact(cols, group, act_order):
    layer = QuantLinear.from_weight(random_weight(40, cols, group, act_order, cols), None, group, "torch")
    grid = native.grid(layer.quantized_weight())
    ref = layer.dequantize_in_out(torch.float32)
    assert torch.equal(native.dequantize_in_out(layer.qweight, grid, torch.float32), ref)
    assert torch.equal(native.dequantize_in_out(layer.qweight, grid, torch.bfloat16), ref.bfloat16())


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_every_auto_path_matches_the_reference(rows):
    """Each CPU path of the ``auto`` backend against the float64 product of the layer's weight,
    within the rounding it states (bfloat16 activations / weights: a few 2⁻⁸ of the scale)."""
    bias = torch.randn(48).half()
    layer = QuantLinear.from_weight(random_weight(48, 576, 128, False, rows), bias, 128, "auto")
    x = torch.randn(2, rows, 576)
    ref = x.double() @ layer.dequantize().double().T + layer.bias.double()
    size = x.abs().double() @ layer.dequantize().abs().double().T
    for name, (run, state) in cpu.paths(layer, linear.BACKENDS["torch"].forward).items():
        got = run(layer, state, x)
        assert got.shape == ref.shape and got.dtype == x.dtype
        tol = 1e-5 if name in ("dequant", "native-f32") else 2.0**-6
        assert torch.all((got.double() - ref).abs() <= tol * size + 2.0**-7 * ref.abs()), name


def test_auto_backend_prepares_chooses_and_falls_back():
    layer = QuantLinear.from_weight(random_weight(32, 96, 32, False, 0), None, 32, "auto")
    found = cpu.paths(layer, linear.BACKENDS["torch"].forward)
    assert set(layer.cpu_choice) <= set(found) and set(layer.cpu_paths) == set(layer.cpu_choice)
    assert "decode:" in repr(layer)
    x = torch.randn(3, 96, requires_grad=True)
    layer(x).sum().backward()  # autograd through the input: the reference path, which has a backward
    assert torch.allclose(x.grad, layer.dequantize().sum(0).expand(3, -1), atol=1e-5)
    w = random_weight(16, 64, 32, False, 0)
    w3 = QuantizedWeight(w.codes & 7, w.scale, w.zero & 7, w.g_idx, 3)
    three_bit = QuantLinear.from_weight(w3, None, 32)
    assert three_bit.cpu_choice == ("dequant", "dequant")  # the only path for 3 bits
