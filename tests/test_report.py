"""`llmlite eval --report` and `llmlite compare`: the report, its cache, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny
from test_cli import assert_user_error, leftovers, run

import llmlite
from llmlite.errors import LlmliteError

pytestmark = pytest.mark.slow  # runs reports and lm-eval as processes

FAST = ["--tasks", "wikitext,piqa,calibration,efficiency", "--limit", "2", "--ctx", "64", "--quiet"]


@pytest.fixture()
def eval_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tokenizer):
    """Two tiny random models: a 'baseline' and another one standing in for its compressed version."""
    out = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"tiny{seed}")
        make_tiny(tokenizer, seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out.append(folder)
    return out


def test_report_writes_table_plots_and_caches(tmp_path, tiny_pair, eval_cache):
    base, model = tiny_pair
    report = tmp_path / "report"
    first = run("eval", str(model), "--baseline", str(base), *FAST, "--report", str(report))
    assert first.returncode == 0, first.stderr[-3000:]
    files = sorted(p.name for p in report.iterdir())
    for name in (
        "report.json",
        "report.md",
        "reliability_piqa.png",
        "reliability_calibration.png",
        "pareto_size.png",
        "pareto_decode.png",
    ):
        assert name in files
    data = json.loads((report / "report.json").read_text())
    assert [m["model"] for m in data["models"]] == [str(base), str(model)]
    metrics = data["models"][1]["metrics"]
    assert set(metrics) == {"wikitext", "piqa", "calibration", "efficiency"}
    assert metrics["wikitext"]["token_perplexity"] > 1 and 0 <= metrics["piqa"]["acc"] <= 1
    assert metrics["calibration"]["tokens"] == 2 * 63
    assert metrics["efficiency"]["size_bytes"] > 0 and metrics["efficiency"]["decode_ms_p90_b1"] > 0
    # a float folder has no GGUF form for llama.cpp: named, with the reason (or no llama-cpp-python)
    assert data["models"][1]["details"]["efficiency"]["llama_cpp"]["runtime"].startswith("not run: ")
    md = (report / "report.md").read_text()
    assert "| piqa | acc |" in md and "| change |" in md
    assert " running" in first.stderr and " cached" not in first.stderr

    again = run("eval", str(model), "--baseline", str(base), *FAST, "--report", str(report), "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert " running" not in again.stderr and again.stderr.count(" cached") == 8
    assert json.loads((report / "report.json").read_text())["models"][1]["metrics"] == metrics

    fresh = run("eval", str(model), "--tasks", "piqa", "--limit", "2", "--quiet", "--no-cache")
    assert fresh.returncode == 0 and " running" in fresh.stderr

    other = tmp_path / "other"
    alone = run(
        "eval", str(base), "--tasks", "piqa,efficiency", "--limit", "2", "--quiet", "--report", str(other)
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    merged = run("compare", str(report), str(other), "--output", str(tmp_path / "cmp"))
    assert merged.returncode == 0, merged.stderr[-3000:]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert base.name in table and model.name in table and (tmp_path / "cmp" / "pareto_size.png").exists()
    # the same verb through the Python API: the same merged result, the same files
    api = llmlite.compare([str(report), str(other)], output=str(tmp_path / "cmp-api"))
    written = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert json.loads(json.dumps(api.to_dict())) == written
    assert (tmp_path / "cmp-api" / "compare.md").read_text() == table
    with pytest.raises(LlmliteError, match="lies inside REPORT"):
        llmlite.compare([str(report)], output=str(report / "c"))


def test_report_bad_input(tmp_path, tiny_dir, eval_cache):
    out = tmp_path / "r"
    assert_user_error(
        run("eval", str(tiny_dir), "--tasks", "piqa,nosuchtask", "--report", str(out)),
        "unknown task 'nosuchtask'",
    )
    assert_user_error(run("eval", str(tiny_dir), "--limit", "0", "--report", str(out)), "--limit must be")
    assert_user_error(
        run("eval", str(tmp_path / "nothing"), "--tasks", "piqa", "--report", str(out)), "no such model"
    )
    assert_user_error(
        run("eval", str(tiny_dir), "--tasks", "wikitext", "--ctx", "1024", "--report", str(out)),
        "above",
        "maximum of 512",
    )
    assert_user_error(
        run("eval", str(tiny_dir), "--tasks", "passkey", "--report", str(out)), "passkey asks for 8192 tokens"
    )
    assert leftovers(tmp_path, "r") == []
    out.mkdir()
    assert_user_error(run("eval", str(tiny_dir), "--tasks", "piqa", "--report", str(out)), "--overwrite")
    assert_user_error(run("compare", str(tmp_path / "none")), "no report in")


def test_task_whose_data_cannot_be_loaded(tmp_path, tiny_dir, eval_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run(
        "eval", str(tiny_dir), "--tasks", "arc_easy", "--limit", "1", "--report", str(tmp_path / "r")
    )
    assert_user_error(result, "arc_easy", "data")
    assert leftovers(tmp_path, "r") == []


def test_lm_eval_cli_reads_our_tasks_with_metadata(tmp_path, tiny_dir):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "llmlite",
        "--model_args",
        f"pretrained={tiny_dir},rolling=papers,ppl_window=128",
        "--tasks",
        "llmlite_wikitext",
        "--include_path",
        str(Path(__file__).parent.parent / "evals"),
        "--metadata",
        json.dumps({"text": str(text)}),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "token_perplexity" in out.stdout and "bits_per_byte" in out.stdout


def test_report_kv_cache_task(tmp_path, tiny_dir, eval_cache):
    report = tmp_path / "kv"
    result = run(
        "eval",
        str(tiny_dir),
        "--tasks",
        "kv_cache",
        "--limit",
        "1",
        "--ctx",
        "128",
        "--quiet",
        "--report",
        str(report),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((report / "report.json").read_text())["models"][0]["metrics"]["kv_cache"]
    assert metrics["ratio_to_float16_kv16"] == 1.0
    assert metrics["ratio_to_float16_kv2"] > metrics["ratio_to_float16_kv4"] > 1
    assert all(metrics[f"ppl_kv{b}"] > 1 for b in (16, 4, 2))
    assert "| kv_cache | ppl_kv4 |" in (report / "report.md").read_text()
