"""Host memory and time of a run: the peak resident set (reset per run where Linux allows),
wall time, and handing freed heap back to the OS. A leaf: imports nothing of llmlite."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim  # noqa: B018  (glibc only)
except (OSError, AttributeError):
    _LIBC = None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and the peak RSS creeps up
    as large buffers are freed and reallocated)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def rss_peak_bytes() -> int:
    """The process's peak resident set since start or the last ``reset_rss_peak`` (bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_rss_peak() -> bool:
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
    stats = RunStats(peak_rss_scope="run" if reset_rss_peak() else "process")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield stats
    finally:
        stats.seconds = time.perf_counter() - start
        stats.peak_rss_bytes = rss_peak_bytes()
        if cuda:
            stats.peak_gpu_bytes = torch.cuda.max_memory_allocated()
