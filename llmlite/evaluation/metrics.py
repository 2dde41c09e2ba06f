"""Efficiency metrics every run reports: parameters, size on disk and in memory (time and peak
memory: ``llmlite.memory.measure``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from llmlite.quant.compressed import is_compressed


def param_count(model: nn.Module) -> int:
    """Logical parameters: a quantized weight counts as its ``in × out`` entries; ties count once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for m in model.modules():
        if is_compressed(m):
            total += m.in_features * m.out_features + (0 if m.bias is None else m.out_features)
    return total


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def size_on_disk(path: str | Path | None) -> int | None:
    """Bytes of a model file or of every file in a model folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
