"""GPTQ's defaults before commit 80ed87e (2026-12-07), for the benchmark rows that ran with them.

Until then ``llmlite quantize`` measured GPTAQ's drift on the first 16 calibration windows, rounded
each group over its full range and damped the Hessian by 0.01; since then the defaults are
``--v2-windows 0 --mse --damp 0.003`` (``docs/benchmarks/unseen.md``). A row that recorded a
figure under the earlier defaults keeps them explicitly, so that rerunning it reproduces it.
"""

from __future__ import annotations

EARLIER = {"v2_windows": 16, "mse": False, "damp": 0.01}


def earlier_flags(options: list[str]) -> list[str]:
    """``options`` (``llmlite quantize`` flags) on top of the earlier defaults: the flags for each
    earlier default that ``options`` does not set itself, then ``options``."""
    named = {o[2:].removeprefix("no-").replace("-", "_") for o in options if o.startswith("--")}
    flags = []
    for name, value in EARLIER.items():
        flag = "--" + name.replace("_", "-")
        if name in named:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags + options
