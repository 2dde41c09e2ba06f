"""llmlite's quantized weights as llama.cpp's block types (the tensors of a GGUF file), exactly.

A GGML block holds 32 consecutive weights of a row: ``Q4_0`` is ``d`` (float16) and 32 4-bit
codes ``q`` with ``w = (q − 8)·d``; ``Q4_1`` is ``d``, ``m`` (float16) and 32 4-bit codes with
``w = q·d + m``; ``Q8_0`` is ``d`` and 32 signed bytes with ``w = q·d``. A 4-bit byte holds
value ``j`` in its low nibble and value ``j + 16`` in its high one.

llmlite's grid at group size 32 is the same grid: symmetric 4-bit (``z = 8``) is ``Q4_0`` with
``d = s``; 8-bit symmetric (``z = 128``) is ``Q8_0`` with ``q − 128``; asymmetric 4-bit is ``Q4_1``
with ``d = s`` and ``m = −z·s`` rounded to float16 (off by at most ``2⁻¹¹·z·s``, under 1% of a
step at ``z ≤ 15``). Scales are float16 already (``grid.to_fp16_grid``), so the
first two are exact. Pure functions on arrays.
"""

from __future__ import annotations

import numpy as np
import torch

from llmlite.errors import LlmliteError
from llmlite.quant.grid import QuantizedWeight, group_index

BLOCK = 32
BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}  # per block of 32 weights
CARRIED = "4-bit weights (q4_0 symmetric, q4_1 asymmetric) or 8-bit symmetric ones (q8_0) in groups of 32"


def block_type(weight: QuantizedWeight) -> str:
    """The GGML type that holds ``weight`` exactly; a one-line error naming what can be carried
    when none does (other bits, groups other than 32 contiguous columns, rows not whole blocks)."""
    cols = weight.shape[1]
    zero = weight.zero.long()
    if cols % BLOCK or not torch.equal(weight.g_idx.long(), group_index(cols, BLOCK).long()):
        raise LlmliteError(
            f"GGUF holds {CARRIED}; this weight is not in groups of 32 columns: "
            "re-quantize with --group-size 32"
        )
    symmetric = bool((zero == 2 ** (weight.bits - 1)).all())
    if weight.bits == 4:
        return "q4_0" if symmetric else "q4_1"
    if weight.bits == 8 and symmetric:
        return "q8_0"
    grid = f"{weight.bits}-bit {'symmetric' if symmetric else 'asymmetric'}"
    raise LlmliteError(
        f"GGUF holds {CARRIED}; this weight is {grid}: re-quantize with --bits 4, or --bits 8 --sym"
    )


def carried_by(weight: QuantizedWeight) -> tuple[str, ...]:
    """Every GGML type that holds ``weight`` exactly, the smallest first (symmetric 4-bit fits
    ``q4_1`` too, with ``m = −8·d``, exact in float16)."""
    kind = block_type(weight)
    return ("q4_0", "q4_1") if kind == "q4_0" else (kind,)


def to_blocks(weight: QuantizedWeight, kind: str | None = None) -> np.ndarray:
    """The rows of ``weight`` ``[out, in]`` as GGML blocks: uint8 ``[out, in / 32 · BYTES[kind]]``."""
    kind = kind or block_type(weight)
    if kind not in carried_by(weight):
        raise LlmliteError(f"this weight is {block_type(weight)} in GGUF terms, not {kind}")
    out, cols = weight.shape
    codes = weight.codes.numpy().astype(np.int16).reshape(out, cols // BLOCK, BLOCK)
    d = weight.scale.numpy().astype(np.float16)[..., None]  # [out, blocks, 1]
    parts = [d.view(np.uint8)]
    if kind == "q4_1":
        m = -weight.zero.numpy().astype(np.float32) * weight.scale.numpy()  # w = q·d + m
        parts.append(m.astype(np.float16)[..., None].view(np.uint8))
    if kind == "q8_0":
        parts.append((codes - 128).astype(np.int8).view(np.uint8))
    else:
        parts.append((codes[..., :16] | codes[..., 16:] << 4).astype(np.uint8))
    return np.concatenate(parts, -1).reshape(out, -1)


def from_blocks(data: np.ndarray, kind: str, shape: tuple[int, int]) -> QuantizedWeight:
    """GGML blocks back to llmlite's form (inverse of ``to_blocks``). A ``q4_1`` block whose ``m``
    is not ``−z·d`` for a whole ``z`` in the grid (llama.cpp's own quantizer writes any ``m``) has no
    zero-point form: a ``ValueError``."""
    out, cols = shape
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(out, cols // BLOCK, BYTES[kind])
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    if kind == "q8_0":
        codes = blocks[..., 2:].view(np.int8).astype(np.int16) + 128
        zero = np.full(d.shape, 128)
    else:
        packed = blocks[..., -16:].astype(np.int16)
        codes = np.concatenate([packed & 15, packed >> 4], -1)
        zero = np.full(d.shape, 8)
    if kind == "q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        zero = np.rint(-m.astype(np.float32) / np.where(d == 0, 1, d).astype(np.float32))
        exact = np.array_equal((-zero * d.astype(np.float32)).astype(np.float16), m)
        if not exact or zero.min() < 0 or zero.max() > 15:
            raise ValueError(
                "q4_1 blocks whose minimum is not a whole number of steps have no zero-point form"
            )
    return QuantizedWeight(
        codes=torch.from_numpy(codes.reshape(out, cols).astype(np.uint8)),
        scale=torch.from_numpy(d.astype(np.float32)),
        zero=torch.from_numpy(zero.astype(np.int16)),
        g_idx=group_index(cols, BLOCK),
        bits=8 if kind == "q8_0" else 4,
    )
