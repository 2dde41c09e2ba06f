"""A 4-bit GPTQ weight in the layout of torch's packed CPU int4 kernel.

``torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)`` computes ``x Wᵀ`` with
``W[n, k] = (q[n, k] − 8) · scale[k // group, n] + zero[k // group, n]``, reading 4-bit codes; it is
fast with bfloat16 activations (AVX-512 and AVX2 paths), needs ``group ∈ {32, 64, 128, 256}``,
``K % group == 0`` and ``N % 16 == 0``. GPTQ's ``W = (q − z) · s`` is that with ``zero = (8 − z) · s``.

The layout carries every GPTQ grid whose output width is a multiple of 16:

- a short last group (576 = 4.5 × 128): the codes get zero columns up to a whole group and the
  activations matching zero columns, so the padding adds nothing;
- act-order (``g_idx`` not ``k // group``): the input columns are permuted so that each group is
  contiguous, and the activations get the same permutation;
- groups of other widths (per-channel, 512, ...): a kernel group that divides them, each kernel
  group repeating its GPTQ group's scale and zero.

Rounding: the activations, scales, zeros and the output are bfloat16 (8 significant bits); the
products are summed in float32 (``tests/reference.py: int4pack_matmul`` is the float64 reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KERNEL_GROUPS = (256, 128, 64, 32)
_OPS = ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
AVAILABLE = all(hasattr(torch, op) for op in _OPS)


@dataclass
class Int4Pack:
    weight: Tensor  # uint8, torch's packed form of the codes [N, K'] (K' = K + pad)
    scales_zeros: Tensor  # bfloat16 [K' / group, N, 2]
    group: int
    perm: Tensor | None  # int64 [K]: input order that makes the groups contiguous, None if already
    pad: int  # zero columns appended to the input


def kernel_group(group_size: int, in_features: int) -> int | None:
    """The kernel's group for a GPTQ group size (``-1``: one group per row), or None if none fits."""
    width = in_features if group_size == -1 else group_size
    if group_size == -1:
        return 128  # any kernel group tiles a whole row; 128 is the kernel's sweet spot
    return next((g for g in KERNEL_GROUPS if width % g == 0), None)


def contiguous_order(g_idx: Tensor, group_size: int) -> Tensor | bool | None:
    """The permutation of input columns after which column ``k`` is in group ``k // group_size``:
    None when ``g_idx`` already is, False when no permutation can make it so."""
    k = torch.arange(g_idx.numel(), device=g_idx.device)
    width = g_idx.numel() if group_size == -1 else group_size
    expected = k // width
    if torch.equal(g_idx.long(), expected):
        return None
    perm = torch.argsort(g_idx.long(), stable=True)
    return perm if torch.equal(g_idx.long()[perm], expected) else False


def pack(weight, group_size: int) -> Int4Pack | None:
    """``weight`` (a ``grid.QuantizedWeight``: codes, scale, zero ``[out, groups]``, ``g_idx``, bits)
    in the kernel's layout, or None when the kernel cannot carry it exactly."""
    out_features, in_features = weight.shape
    group = kernel_group(group_size, in_features)
    order = contiguous_order(weight.g_idx, group_size)
    if not AVAILABLE or weight.bits != 4 or out_features % 16 or group is None or order is False:
        return None
    codes, g_idx = weight.codes, weight.g_idx.long()
    if order is not None:
        codes, g_idx = codes[:, order], g_idx[order]
    pad = -in_features % group
    kernel_groups = (in_features + pad) // group
    # the GPTQ group of each kernel group: that of its first column (a kernel group never spans two)
    first = g_idx[torch.arange(kernel_groups) * group]
    scale, zero = weight.scale.float()[:, first], weight.zero.float()[:, first]
    scales_zeros = torch.stack((scale, (8 - zero) * scale), -1).transpose(0, 1).to(torch.bfloat16)
    codes = F.pad(codes.to(torch.int32), (0, pad))
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    return Int4Pack(packed, scales_zeros.contiguous(), group, order, pad)


def matmul(p: Int4Pack, x: Tensor) -> Tensor:
    """``x Wᵀ`` for ``x [..., K]`` (any float dtype), in ``x``'s dtype."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if rows.shape[0] == 0:  # the kernel refuses empty inputs
        return x.new_zeros(*x.shape[:-1], p.weight.shape[0])
    if p.perm is not None:
        rows = rows.index_select(1, p.perm)
    if p.pad:
        rows = F.pad(rows, (0, p.pad))
    y = torch._weight_int4pack_mm_for_cpu(rows.contiguous(), p.weight, p.group, p.scales_zeros)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
