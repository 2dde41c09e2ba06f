"""Triton w4a16 kernels: ``y = x Wᵀ`` for a 4-bit GPTQ weight, float16 / float32 activations.

The weight is read as GPTQ stores it: ``qweight [ceil(K/8), N]`` int32, eight 4-bit codes per
word along the input dimension (code ``k`` in bits ``4·(k mod 8)``), with ``W[n, k] = (q[k, n] −
z[g, n]) · s[g, n]`` for the group ``g`` of column ``k``. ``prepare`` brings every GPTQ grid the
kernels can carry to one form, groups contiguous along ``K``:

- act-order (``g_idx`` not ``k // group``): the codes are repacked in an input order that makes
  each group contiguous, and the activations take the same permutation at each call;
- per-channel (``group_size = -1``): one group as wide as the row;
- a short last group (576 = 4.5 × 128): the tile loads are masked at ``K``.

Two kernels, each a loop over ``K`` in tiles of ``BLOCK_K`` columns (a divisor of the group, so a
tile reads one row of scales and zero-points), dequantizing ``(q − z) · s`` in float32 and rounding
it once to the activations' dtype, as the torch reference does:

- ``_gemv`` (decode, few rows): one program per ``BLOCK_N`` outputs, row and slice of ``K``
  (split-K: the slices' partial sums meet by atomic adds in float32); each packed word is loaded
  once and split into its eight codes in registers, then a multiply and a sum per tile;
- ``_gemm`` (prefill): ``BLOCK_M × BLOCK_N`` output tiles, a ``tl.dot`` per tile (tensor cores
  on a GPU), float32 accumulation.

Both run under ``TRITON_INTERPRET=1`` on the CPU (float32 and float16; the interpreter's bfloat16
is wrong), which is how CI tests them (``tests/test_kernels_triton.py``); their speed on a GPU is
measured by ``benchmarks/triton_w4a16.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from llmlite.kernels.int4pack import contiguous_order

GEMV_ROWS = 8  # inputs of at most this many rows take the GEMV kernel
TILES_K = (128, 64, 32, 16)  # tile widths along K, widest first; tl.dot needs at least 16


@dataclass
class W4Grid:
    qweight: Tensor  # int32 [ceil(K/8), N]: the layer's own when its groups are contiguous
    scales: Tensor  # float16 [G, N]
    zeros: Tensor  # uint8 [G, N]
    perm: Tensor | None  # int64 [K]: the input order of the repacked codes, None if the layer's
    in_features: int
    group: int  # columns per group (K for per-channel)
    block_k: int


def tile_k(group: int, in_features: int) -> int | None:
    """The widest tile along K that never spans two groups, or None if none exists."""
    if group >= in_features:  # one group: any tile
        return TILES_K[0]
    return next((t for t in TILES_K if group % t == 0), None)


def _repack(codes: Tensor) -> Tensor:
    """Codes ``[N, K]`` (0..15) as GPTQ words ``[ceil(K/8), N]`` int32."""
    out_features, in_features = codes.shape
    k = torch.nn.functional.pad(codes.T.to(torch.int32), (0, 0, 0, -in_features % 8))
    shifts = 4 * torch.arange(8, dtype=torch.int32, device=codes.device)
    words = (k.view(-1, 8, out_features) << shifts[None, :, None]).sum(1, dtype=torch.int64)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def prepare(layer) -> W4Grid | None:
    """``layer`` (a ``QuantLinear``) in the kernels' form on its own device, or None when they
    cannot carry its grid exactly (not 4-bit, a group not a multiple of 16, act-order groups of
    unequal width)."""
    if layer.bits != 4:
        return None
    weight = layer.quantized_weight()
    in_features = layer.in_features
    group = in_features if layer.group_size == -1 else min(layer.group_size, in_features)
    order = contiguous_order(weight.g_idx, layer.group_size)
    block_k = tile_k(group, in_features)
    if order is False or block_k is None:
        return None
    first = torch.arange(0, in_features, group, device=weight.g_idx.device)
    groups = weight.g_idx.long() if order is None else weight.g_idx.long()[order]
    columns = groups[first]  # the stored group of each contiguous group
    scales = weight.scale[:, columns].T.to(torch.float16).contiguous()
    zeros = weight.zero[:, columns].T.to(torch.uint8).contiguous()
    qweight = layer.qweight if order is None else _repack(weight.codes[:, order])
    return W4Grid(qweight, scales, zeros, order, in_features, group, block_k)


@triton.jit
def _dequant(qw_ptr, s_ptr, z_ptr, rk, rn, K, N, GROUP: tl.constexpr, k0):
    """The float32 weight tile ``[BLOCK_K, BLOCK_N]`` of rows ``rk`` and columns ``rn``."""
    mask = (rk < K)[:, None] & (rn < N)[None, :]
    words = tl.load(qw_ptr + (rk // 8)[:, None] * N + rn[None, :], mask=mask, other=0)
    q = (words >> ((rk % 8) * 4)[:, None]) & 0xF
    g = k0 // GROUP
    s = tl.load(s_ptr + g * N + rn, mask=rn < N, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * N + rn, mask=rn < N, other=0).to(tl.int32)
    return (q - z[None, :]).to(tl.float32) * s[None, :]


@triton.jit
def _gemv(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_x, stride_y, k_per_split,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, BLOCK_K // 8)  # words of a tile, each read once and split in registers
    shifts = 4 * tl.arange(0, 8)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = pid_k * k_per_split
    for k0 in range(start, tl.minimum(start + k_per_split, K), BLOCK_K):
        rk = k0 + 8 * rw[:, None] + tl.arange(0, 8)[None, :]  # [BLOCK_K / 8, 8]
        x = tl.load(x_ptr + row * stride_x + rk, mask=rk < K, other=0.0)
        word_mask = (k0 + 8 * rw < K)[:, None] & (rn < N)[None, :]
        words = tl.load(qw_ptr + (k0 // 8 + rw)[:, None] * N + rn[None, :], mask=word_mask, other=0)
        q = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K / 8, 8, BLOCK_N]
        g = k0 // GROUP
        s = tl.load(s_ptr + g * N + rn, mask=rn < N, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + rn, mask=rn < N, other=0).to(tl.int32)
        w = ((q - z[None, None, :]).to(tl.float32) * s[None, None, :]).to(x.dtype).to(tl.float32)
        acc += tl.sum(tl.sum(x.to(tl.float32)[:, :, None] * w, axis=1), axis=0)
    out = y_ptr + row * stride_y + rn
    if SPLIT:
        tl.atomic_add(out, acc, mask=rn < N)
    else:
        tl.store(out, acc, mask=rn < N)


@triton.jit
def _gemm(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_x, stride_y,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = (rm < M)[:, None] & (rk < K)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_x + rk[None, :], mask=mask, other=0.0)
        w = _dequant(qw_ptr, s_ptr, z_ptr, rk, rn, K, N, GROUP, k0).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision="ieee")  # float32: no TF32 rounding; else ignored
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc, mask=mask)


def _split_k(k_tiles: int, n_programs: int, device: torch.device) -> int:
    """Slices of K for the GEMV: enough programs for about four per streaming multiprocessor."""
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(k_tiles, -(-4 * units // max(n_programs, 1))))


def matmul(grid: W4Grid, x: Tensor, split_k: int | None = None, block_n: int | None = None) -> Tensor:
    """``x Wᵀ`` for ``x [..., K]`` (float16 or float32) in ``x``'s dtype. ``split_k`` and
    ``block_n`` override the launch heuristics (tests and the benchmark's sweep)."""
    out_features = grid.qweight.shape[1]
    rows = x.reshape(-1, x.shape[-1])
    if grid.perm is not None:
        rows = rows.index_select(1, grid.perm)
    rows = rows.contiguous()
    m, k = rows.shape
    y = torch.zeros(m, out_features, dtype=torch.float32, device=x.device)
    if m == 0:
        return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
    if m <= GEMV_ROWS:
        block_n = block_n or 128
        n_tiles, k_tiles = triton.cdiv(out_features, block_n), triton.cdiv(k, grid.block_k)
        split = split_k or _split_k(k_tiles, n_tiles * m, x.device)
        k_per_split = triton.cdiv(k_tiles, split) * grid.block_k
        split = triton.cdiv(k, k_per_split)
        _gemv[(n_tiles, split, m)](
            rows, grid.qweight, grid.scales, grid.zeros, y, out_features, k, rows.stride(0), y.stride(0),
            k_per_split, GROUP=grid.group, BLOCK_N=block_n, BLOCK_K=grid.block_k, SPLIT=split > 1,
        )  # fmt: skip
    else:
        block_m, block_n = (16 if m <= 16 else 64), block_n or 64
        launch = (triton.cdiv(m, block_m), triton.cdiv(out_features, block_n))
        _gemm[launch](
            rows, grid.qweight, grid.scales, grid.zeros, y, m, out_features, k, rows.stride(0), y.stride(0),
            GROUP=grid.group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(grid.block_k, 64),
        )  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)
