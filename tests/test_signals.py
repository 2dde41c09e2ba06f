"""SIGTERM is handled like Ctrl-C, kill -9 leftovers are removed by the next run, and a second run
on the same output stops at once: real processes, the bundled model."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from bad_inputs import LLMLITE, start_quantize, wait_for_stage

pytestmark = pytest.mark.slow


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_sigterm_cleans_up_and_a_concurrent_run_stops_at_once(tmp_path, bundled_dir):
    out = tmp_path / "out"
    proc = start_quantize(out)
    wait_for_stage(tmp_path, "out", proc)
    second = subprocess.run(
        [LLMLITE, "quantize", "--method", "rtn", "--output", str(out), "--overwrite"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 2, second.stderr
    assert f"another llmlite run (process {proc.pid}) is writing --output" in second.stderr
    assert "Traceback" not in second.stderr
    time.sleep(2)  # into the model loading or GPTQ
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    stderr = proc.stderr.read()
    assert "terminated (SIGTERM); no output was written" in stderr and "Traceback" not in stderr
    assert entries(tmp_path) == []


def test_kill_9_leftovers_are_removed_by_the_next_run(tmp_path, bundled_dir, tiny_dir):
    out = tmp_path / "out"
    proc = start_quantize(out)
    stage = wait_for_stage(tmp_path, "out", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    assert stage.exists()  # nothing can clean up after kill -9
    rerun = subprocess.run(
        [LLMLITE, "quantize", "--model", str(tiny_dir), "--method", "rtn", "--output", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed {stage}, left by an interrupted run (process {proc.pid})" in rerun.stderr
    assert entries(tmp_path) == ["out"]
