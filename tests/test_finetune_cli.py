"""``llmlite finetune`` / ``merge`` on the command line: bad input gets one line and exit code 2
with nothing written; Ctrl-C leaves the last checkpoint, and --resume finishes the run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_cli import LLMLITE, assert_user_error, ctrl_c_able, leftovers, run

pytestmark = pytest.mark.slow  # runs the llmlite command as processes

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--no-compile", "--seqlen", "32", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ftdata")
    text = (ROOT / "llmlite" / "corpora" / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    (folder / "wiki.txt").write_text(text[:20_000])
    (folder / "empty.jsonl").write_text("\n\n")
    (folder / "noresp.jsonl").write_text(
        json.dumps({"prompt": "hi", "response": "ho"}) + "\n" + '{"prompt": "x"}\n'
    )
    (folder / "blank.txt").write_text("   \n")
    return folder


def test_bad_input_one_line_exit_2_nothing_written(tmp_path, tiny_dir, data):
    model = ["--model", str(tiny_dir)]
    out = ["--output", str(tmp_path / "out")]
    cases = [
        (["--data", str(data / "empty.jsonl"), *out], ["no usable rows", "empty"]),
        (["--data", str(data / "blank.txt"), *out], ["no usable rows"]),
        (["--data", str(data / "noresp.jsonl"), *out], ["line 2 has no response field"]),
        (
            [*model, "--data", str(data / "wiki.txt"), *out, "--seqlen", "1000"],
            ["--seqlen 1000", "maximum of 512"],
        ),
        (["--data", str(data / "wiki.txt"), *out, "--rank", "0"], ["--rank 0", "1 or more"]),
        (
            [*model, "--data", str(data / "wiki.txt"), *out, "--target-modules", "q_proj,qkv"],
            ["no module named qkv"],
        ),
        (
            ["--data", str(data / "wiki.txt"), *out, "--resume"],
            ["no checkpoint to resume", "without --resume"],
        ),
        (["--data", str(data / "nope.jsonl"), *out], ["no such text file"]),
        (["--data", str(data / "wiki.txt"), *out, "--dtype", "float16"], ["float16 training needs a GPU"]),
        ([*model, "--data", str(data / "wiki.txt"), *out, "--optimizer", "adamw_8bit"], ["needs a CUDA GPU"]),
        (["--data", str(data / "wiki.txt")], ["needs --output"]),
    ]
    for args, needles in cases:
        result = run("finetune", *args, *FAST[:1])
        assert_user_error(result, *needles)
        assert leftovers(tmp_path, "out") == [], args
    (tmp_path / "exists").mkdir()
    result = run("finetune", "--data", str(data / "wiki.txt"), "--output", str(tmp_path / "exists"))
    assert_user_error(result, "already exists", "--overwrite")
    result = run("merge", str(tmp_path / "exists"), "--output", str(tmp_path / "m"))
    assert_user_error(result, "no adapter_config.json")


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_keeps_the_last_checkpoint_and_resume_finishes(tmp_path, tiny_dir, data, signum, code):
    """Ctrl-C, and SIGTERM the same way (what timeout, docker stop and schedulers send)."""
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_dir), "--data", str(data / "wiki.txt"), "--output", str(out),
            "--max-steps", "400", "--save-steps", "2", "--eval-split", "0", *FAST]  # fmt: skip
    proc = subprocess.Popen(
        [LLMLITE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_able
    )
    checkpoints = tmp_path / ".run.partial" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))  # no stage left
    done = list(checkpoints.glob("step-*"))
    assert done and all((p / "trainable.safetensors").is_file() for p in done)
    result = run(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert (out / "adapter_model.safetensors").is_file() and not (tmp_path / ".run.partial").exists()


def test_the_same_command_runs_as_two_ddp_processes(tmp_path, tiny_dir, data):
    """torchrun on the CPU (gloo): two processes, different batches, one set of weights."""
    torchrun = str(Path(LLMLITE).parent / "torchrun")
    out = tmp_path / "ddp"
    args = [torchrun, "--nproc_per_node", "2", "-m", "llmlite.cli", "finetune", "--model", str(tiny_dir),
            "--data", str(data / "wiki.txt"), "--max-steps", "3", "--output", str(out), *FAST]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 2 of 2" in result.stderr
    summaries = [line for line in result.stdout.splitlines() if line.startswith("lora on")]
    assert len(summaries) == 2 and summaries[0].split("eval loss")[1] == summaries[1].split("eval loss")[1]
    assert (out / "adapter_model.safetensors").is_file()
