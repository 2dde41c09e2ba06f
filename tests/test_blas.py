"""MKL's AVX2 kernels on AMD CPUs (llmlite.blas): the shim loads where it helps, MKL then takes
its AVX2 path (AVX-512 where the CPU has it), products stay exact to float32 rounding, and the
switch and the guards hold."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmlite import blas

AMD_AVX2 = blas.cpu_flags()[0] == "AuthenticAMD" and {"avx2", "fma"} <= blas.cpu_flags()[1]
needs_amd_mkl = pytest.mark.skipif(
    not (AMD_AVX2 and torch.backends.mkl.is_available() and blas.shim_path()),
    reason="needs an AMD CPU with AVX2, torch with MKL and the compiled shim",
)
FAST_PATHS = ("AVX2", "AVX-512")  # how MKL_VERBOSE names its vector code paths
PROBE = (
    "import llmlite.blas as b, torch; print('STATE', b.state); "
    "x = torch.randn(300, 200, dtype=torch.float64); w = torch.randn(100, 200, dtype=torch.float64); "
    "err = (torch.nn.functional.linear(x.float(), w.float()).double() - x @ w.T).abs().max(); "
    "print('ERR', float(err / (x.abs() @ w.abs().T).max()))"
)


def probe(**env: str) -> tuple[str, str, float]:
    """Run a product in a fresh Python: the shim's state, the code path MKL names (``MKL_VERBOSE``)
    and the product's largest error against float64, relative to the terms' magnitude."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, "MKL_VERBOSE": "1", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stdout.splitlines()
    state = next(line for line in lines if line.startswith("STATE")).split(" ", 1)[1]
    error = float(next(line for line in lines if line.startswith("ERR")).split()[1])
    path = next(line for line in lines if line.startswith("MKL_VERBOSE oneMKL"))
    return state, path, error


def test_cpu_flags_reads_vendor_and_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma\n\n"
        "processor\t: 1\nvendor_id\t: GenuineIntel\nflags\t\t: fpu\n"
    )
    assert blas.cpu_flags(str(info)) == ("AuthenticAMD", {"fpu", "avx2", "fma"})
    assert blas.cpu_flags(str(tmp_path / "missing")) == ("", set())


@needs_amd_mkl
def test_shim_puts_mkl_on_its_avx2_path_with_exact_products():
    state, path, error = probe()
    assert state == "on"
    assert any(name in path for name in FAST_PATHS), path
    assert error < 1e-5  # float32 rounding of a 200-term dot product, relative to its magnitude


@needs_amd_mkl
def test_switch_off_keeps_mkl_generic_path():
    state, path, error = probe(LLMLITE_MKL_AVX2="0")
    assert state == "off (LLMLITE_MKL_AVX2=0)"
    assert not any(name in path for name in FAST_PATHS), path
    assert error < 1e-5


def test_guards(monkeypatch):
    monkeypatch.setattr(blas, "state", "off")
    monkeypatch.setattr(blas, "cpu_flags", lambda: ("AuthenticAMD", {"avx2", "fma"}))
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.setattr(blas.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv(blas.ENV, "0")
    with monkeypatch.context() as m:  # switched off: /proc/cpuinfo is not even read
        m.setattr(blas, "cpu_flags", lambda: pytest.fail("cpu_flags read with the switch off"))
        assert blas.enable_mkl_avx2() == "off (LLMLITE_MKL_AVX2=0)"
    monkeypatch.delenv(blas.ENV)
    assert "torch" in sys.modules
    assert blas.enable_mkl_avx2() == "off (torch was imported before llmlite)"
    monkeypatch.setattr(blas, "cpu_flags", lambda: ("GenuineIntel", {"avx2", "fma"}))
    assert blas.enable_mkl_avx2() == "off (not an AMD x86-64 CPU on Linux)"
    monkeypatch.setattr(blas, "cpu_flags", lambda: ("AuthenticAMD", {"sse2"}))
    assert blas.enable_mkl_avx2() == "off (the CPU has no AVX2/FMA)"
