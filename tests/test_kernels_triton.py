"""Triton w4a16 kernels under ``TRITON_INTERPRET=1`` (on the CPU) against float64 references, over
the shape grid of issue 24: in-features 96, 576, 1536, 4096 and one not a multiple of the group;
1, 7 and 64 rows; contiguous, per-channel and act-order groups; float32 and float16 activations."""

from __future__ import annotations

import os

import pytest
import torch
from test_kernels_cpu import random_weight

from llmlite.quant.linear import QuantLinear

pytest.importorskip("triton")
from llmlite.kernels import triton_w4a16

# tests/conftest.py sets TRITON_INTERPRET=1 on a machine without a GPU
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

# the output's rounding step in each dtype (float32: the summation order of a 4096-term sum)
STEP = {torch.float32: 2.0**-20, torch.float16: 2.0**-10}


def check(layer: QuantLinear, rows: int, dtype: torch.dtype, seed: int, **launch) -> None:
    grid = triton_w4a16.prepare(layer.to(DEVICE))
    assert grid is not None
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
    got = triton_w4a16.matmul(grid, x.to(DEVICE), **launch).cpu()
    layer.cpu()
    assert got.dtype == dtype and got.shape == (rows, layer.out_features)
    w = layer.dequantize(dtype).double()  # the weight rounded to the activations' dtype, as the reference
    ref = x.double() @ w.T
    scale = x.double().abs() @ w.abs().T
    assert torch.all((got.double() - ref).abs() <= STEP[dtype] * ref.abs() + 2.0**-20 * scale + 1e-6)


def layer_for(out: int, cols: int, group: int, act_order: bool, seed: int) -> QuantLinear:
    return QuantLinear.from_weight(random_weight(out, cols, group, act_order, seed), None, group, "torch")


@pytest.mark.parametrize("cols", [96, 576, 1536, 4096, 100])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_triton_matches_float64_reference(cols, rows):
    for seed, (group, act_order) in enumerate([(32, False), (128, False), (-1, False), (32, True)]):
        dtype = (torch.float32, torch.float16)[seed % 2]
        check(layer_for(40, cols, group, act_order, seed), rows, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_launch_variants(dtype):
    layer = layer_for(200, 576, 128, False, 3)  # 200 outputs: a partial tile of outputs
    check(layer, 1, dtype, 0, split_k=3)  # split-K whose last slice is short
    check(layer, 2, dtype, 1, split_k=1, block_n=32)
    check(layer, 9, dtype, 2, block_n=128)  # the GEMM kernel
    check(layer, 17, dtype, 3)  # more rows than one tile of the GEMM


def test_triton_edge_shapes():
    check(layer_for(16, 32, 32, False, 0), 1, torch.float32, 0)  # one group
    check(layer_for(16, 48, 16, True, 1), 3, torch.float16, 1)  # act-order, the narrowest tile
    check(layer_for(8, 256, 256, False, 2), 20, torch.float32, 2)  # one group wider than a tile
    layer = layer_for(16, 96, 32, False, 3).to(DEVICE)
    empty = triton_w4a16.matmul(triton_w4a16.prepare(layer), torch.zeros(0, 96, device=DEVICE))
    assert empty.shape == (0, 16)
    batched = torch.randn(2, 3, 96, device=DEVICE)
    grid = triton_w4a16.prepare(layer)
    torch.testing.assert_close(triton_w4a16.matmul(grid, batched)[1], triton_w4a16.matmul(grid, batched[1]))


def test_triton_refuses_grids_it_cannot_carry():
    assert triton_w4a16.prepare(layer_for(16, 96, 24, False, 0)) is None  # group not a multiple of 16
    layer = QuantLinear(96, 16, 3, 32)
    assert triton_w4a16.prepare(layer) is None  # 3-bit
    uneven = random_weight(16, 100, 32, False, 0)
    uneven.g_idx[40] = 0  # groups of unequal width (33, 31, 32, 4): no order makes them contiguous
    assert triton_w4a16.prepare(QuantLinear.from_weight(uneven, None, 32, "torch")) is None


def test_triton_backend_of_quant_linear(monkeypatch):
    """The layer's ``triton`` backend runs the kernels, adds the bias, and falls back to the torch
    reference for float64 and for grids the kernels cannot carry."""
    weight = random_weight(24, 100, 32, True, 5)
    bias = torch.randn(24)
    layer = QuantLinear.from_weight(weight, bias, 32, "torch").to(DEVICE)
    x = torch.randn(3, 100, device=DEVICE)
    expected = layer(x)
    layer.set_backend("triton")
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.triton_grid is not False and layer.triton_grid.perm is not None
    assert torch.equal(layer(x.double()), layer.set_backend("torch")(x.double()))
    three_bit = QuantLinear(96, 16, 3, 32, backend="torch").set_backend("triton")
    assert three_bit(torch.randn(2, 96)).shape == (2, 16) and three_bit.triton_grid is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        layer.set_backend("triton")
