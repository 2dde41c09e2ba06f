"""The command line: bad input gets one line, exit code 2, no traceback and no partial output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the llmlite command as processes

LLMLITE = str(Path(sys.executable).parent / "llmlite")


def ctrl_c_able() -> None:
    """``preexec_fn`` for a child the test will interrupt: SIGINT back to its default, as in a
    terminal (a shell's background job inherits it ignored, and Python then never raises
    KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(*args, cwd=None):
    return subprocess.run([LLMLITE, *args], capture_output=True, text=True, cwd=cwd, timeout=900)


def assert_user_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def leftovers(folder: Path, name: str):
    return [p.name for p in folder.iterdir() if p.name.startswith((name, f".{name}"))]


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--model", "no-such-model"], ["unknown model", "bundled name"]),
        (["--model", "./missing-dir"], ["no such model"]),
        (["--bits", "5"], ["5-bit", "--bits 2, 3, 4 or 8"]),
        (["--group-size", "0"], ["group size 0", "-1"]),
        (["--bits", "five"], ["invalid int value"]),
        (["--method", "awqq"], ["invalid choice"]),
        (["--damp", "2"], ["--damp"]),
    ],
)
def test_quantize_bad_options(tmp_path, args, needles):
    result = run("quantize", *args, "--output", str(tmp_path / "out"), "--quiet")
    assert_user_error(result, *needles)
    assert leftovers(tmp_path, "out") == []


def test_quantize_needs_output(tmp_path):
    assert_user_error(run("quantize", "--method", "rtn"), "--output")


def test_short_calibration_text_and_corrupt_model(tmp_path, tiny_dir):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    result = run(
        "quantize",
        "--model",
        str(tiny_dir),
        "--calibration",
        str(short),
        "--output",
        str(tmp_path / "o"),
        "--quiet",
    )
    assert_user_error(result, "fewer than one window", "--seqlen")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:500] if f.suffix == ".safetensors" else f.read_bytes())
    assert_user_error(
        run("quantize", "--model", str(broken), "--output", str(tmp_path / "o"), "--quiet"), "corrupt"
    )
    assert leftovers(tmp_path, "o") == []


def test_existing_output_refused_unless_overwrite(tmp_path, tiny_dir):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["quantize", "--model", str(tiny_dir), "--method", "rtn", "--output", str(out), "--quiet"]
    assert_user_error(run(*args), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = run(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path, "ckpt") == ["ckpt"]


def test_recipe_options_and_cli_override(tmp_path, tiny_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_dir}\nmethod: gptq\nbits: 3\ngroup-size: 32\nasym: true\nsamples: 4\nseqlen: 64\n"
    )
    assert_user_error(
        run("quantize", "--recipe", str(recipe), "--output", str(tmp_path / "o")), "unknown option(s) asym"
    )
    recipe.write_text(
        f"model: {tiny_dir}\nmethod: gptq\nbits: 3\ngroup-size: 32\nsym: false\nsamples: 4\nseqlen: 64\n"
    )
    result = run(
        "quantize", "--recipe", str(recipe), "--bits", "4", "--output", str(tmp_path / "o"), "--quiet"
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "o" / "quantize_config.json").read_text())
    assert (config["bits"], config["group_size"], config["sym"]) == (4, 32, False)
    record = json.loads((tmp_path / "o" / "llmlite.json").read_text())
    assert record["config"]["samples"] == 4 and record["report"]["path"] == "llama-staged"


def test_eval_json_and_bad_input(tmp_path, tiny_dir):
    out = tmp_path / "r.json"
    result = run("eval", str(tiny_dir), "--ctx", "128", "--max-windows", "2", "--json", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert {"perplexity", "windows", "tokens", "model", "size_bytes", "params"} <= set(data)
    assert (data["windows"], data["tokens"], data["ctx"]) == (2, 2 * 127, 128)
    assert data["size_bytes"] > 0 and data["peak_rss_bytes"] > 0
    assert_user_error(run("eval", str(tiny_dir), "--ctx", "4096", "--quiet"), "above the model's maximum")
    assert_user_error(run("eval", str(tiny_dir), "--max-windows", "0", "--quiet"), "--max-windows")
    assert_user_error(
        run("eval", str(tiny_dir), "--ppl", str(tmp_path / "none.txt"), "--quiet"), "no such text file"
    )
    assert_user_error(run("eval", "nonexistent-model", "--quiet"), "unknown model")


def test_ctrl_c_leaves_no_output(tmp_path, bundled_dir):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [LLMLITE, "quantize", "--output", str(out), "--samples", "64", "--calibration", "wikitext2-valid"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_able,
    )
    seen = threading.Event()
    lines: list[str] = []

    def read():
        for line in iter(lambda: proc.stderr.read(64), ""):
            lines.append(line)
            if "gptq:" in "".join(lines[-3:]):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen.wait(300), "".join(lines)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 130
    reader.join(10)
    stderr = "".join(lines)
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert leftovers(tmp_path, "interrupted") == []
