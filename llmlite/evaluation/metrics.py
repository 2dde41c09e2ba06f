"""Efficiency metrics every run reports: parameters, size on disk and in memory, time, peak memory."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmlite.quant.linear import QuantLinear


def param_count(model: nn.Module) -> int:
    """Logical parameters: a quantized weight counts as its ``in × out`` entries; ties count once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for m in model.modules():
        if isinstance(m, QuantLinear):
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


def _rss_peak_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux); False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class RunStats:
    seconds: float = 0.0
    peak_rss_bytes: int = 0  # host memory high-water mark during the run (whole process)
    peak_rss_scope: str = "run"  # "run", or "process" where the counter could not be reset
    peak_gpu_bytes: int | None = None


@contextmanager
def measure() -> Iterator[RunStats]:
    """Time a block and record the peak memory (host RSS, and the CUDA allocator's when present)."""
    stats = RunStats(peak_rss_scope="run" if _reset_rss_peak() else "process")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield stats
    finally:
        stats.seconds = time.perf_counter() - start
        stats.peak_rss_bytes = _rss_peak_bytes()
        if cuda:
            stats.peak_gpu_bytes = torch.cuda.max_memory_allocated()
