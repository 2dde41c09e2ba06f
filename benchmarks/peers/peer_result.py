"""What every peer script writes: the float weights the benchmark loads into llmlite's model, and
the run's wall time and peak RSS (the peers run in their own venvs, without llmlite)."""

import json
from pathlib import Path

from safetensors.torch import save_file


def reset_peak_rss() -> None:
    """Start the process's peak RSS (VmHWM) from now (Linux only)."""
    Path("/proc/self/clear_refs").write_text("5")


def write_result(output: str, weights: dict, seconds: float) -> None:
    """``OUTPUT/weights.safetensors`` (``weights``: name -> float tensor, none sharing memory) and
    ``OUTPUT/result.json`` with ``seconds``, the peak RSS in MB and the tensor count."""
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "weights.safetensors"))
    status = Path("/proc/self/status").read_text().splitlines()
    peak_mb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    result = {"seconds": seconds, "peak_rss_mb": peak_mb, "tensors": len(weights)}
    (out_dir / "result.json").write_text(json.dumps(result))
    print(json.dumps(result))
