"""MKL's AVX2 kernels on AMD CPUs.

PyTorch's x86 wheels do their float matrix products in Intel's oneMKL, which chooses its kernels by
CPU *vendor*: on an AMD CPU it runs a generic code path and leaves AVX2 and FMA unused (on a 2-core
AMD EPYC the bundled model's float32 products run 1.4–1.7× faster on the AVX2 path,
`docs/benchmarks/blas.md`). MKL asks an exported function, ``mkl_serv_intel_cpu``, whether the
CPU is Intel's. llmlite builds a two-line library (``llmlite/native/mkl_intel_cpu.c``) that
answers yes and loads it into the process's global symbol scope *before torch is loaded*, so that
MKL's own lookups find it first; MKL still checks the CPU's features to pick among its kernels
(AVX-512 ones on CPUs that have it).

``import llmlite`` does this by itself (the ``llmlite`` command, and every Python of an environment
where llmlite is installed, since its lm-eval hook imports it at start-up). ``LLMLITE_MKL_AVX2=0``
turns it off. It does nothing on Intel CPUs, without the compiled library (no C compiler at install
time), or when torch was imported first.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys
from pathlib import Path

ENV = "LLMLITE_MKL_AVX2"
SHIM = "llmlite.native.mkl_intel_cpu"
state = "off"  # why the shim is or is not loaded, recorded beside measured figures


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """The CPU's vendor id and feature flags as Linux reports them (``("", set())`` elsewhere)."""
    vendor, flags = "", set()
    try:
        with Path(cpuinfo).open() as lines:  # the first CPU's block is enough: stop at its flags
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


def shim_path() -> str | None:
    """Where the compiled shim lies (``None`` when the install could not compile it)."""
    spec = importlib.util.find_spec(SHIM)
    return None if spec is None or not spec.origin else spec.origin


def enable_mkl_avx2() -> str:
    """Load the shim when it helps and still can; returns (and keeps in ``state``) what happened."""
    global state
    if state == "on":
        return state
    if os.environ.get(ENV, "1") == "0":
        state = f"off ({ENV}=0)"
        return state
    vendor, flags = cpu_flags()
    if sys.platform != "linux" or platform.machine() != "x86_64" or vendor != "AuthenticAMD":
        state = "off (not an AMD x86-64 CPU on Linux)"
    elif not {"avx2", "fma"} <= flags:
        state = "off (the CPU has no AVX2/FMA)"
    elif "torch" in sys.modules:
        state = "off (torch was imported before llmlite)"
    elif (path := shim_path()) is None:
        state = "off (the shim was not compiled at install time)"
    else:
        try:
            ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
            state = "on"
        except OSError as error:
            state = f"off ({error})"
    return state
