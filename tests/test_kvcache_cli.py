"""``llmlite generate`` and ``llmlite eval --kv-bits``: results, and bad input as one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import assert_user_error, run

pytestmark = pytest.mark.slow  # runs the llmlite command as processes

RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    from llmlite.data import load_text

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(load_text("wikitext2")[:20000])
    return path


@pytest.mark.parametrize(
    "args,needles",
    [
        (["generate", "Hi", "--kv-bits", "5"], ["--kv-bits 5", "use 2, 4 or 8"]),
        (["generate", "Hi", "--kv-bits", "4", "--kv-group-size", "0"], ["--kv-group-size 0", "positive"]),
        (["generate", "Hi", "--kv-bits", "4", "--kv-residual", "500"], ["--kv-residual 500", "lower it"]),
        (["generate", "", "--kv-bits", "4"], ["needs a PROMPT"]),
        (["eval", "--kv-bits", "3"], ["--kv-bits 3"]),
        (["eval", "--kv-bits", "4", "--ctx", "256", "--kv-residual", "300"], ["longer than the context"]),
        (["eval", "--kv-bits", "4", "--ctx", "256", "--prefill", "256"], ["--prefill 256"]),
        (["eval", "--kv-bits", "4", "--chunk", "0"], ["--chunk 0"]),
        (["eval", "--kv-residual", "8"], ["add --kv-bits"]),
        (["generate", "Hi", "--kv-bits", "2", "--kv-scheme", "zip"], ["--kv-scheme zip", "kivi, salient"]),
        (["eval", "--kv-bits", "2", "--kv-salient", "1.5"], ["--kv-salient 1.5", "[0, 1)"]),
        (["eval", "--kv-scheme", "kivi"], ["add --kv-bits"]),
        (["eval", "--tasks", "piqa", "--kv-bits", "4"], ["not a report option"]),
    ],
)
def test_bad_kv_input(args, needles):
    assert_user_error(run(*args), *needles)


def test_eval_through_the_cache(tiny_dir, text_file, tmp_path):
    out = tmp_path / "kv.json"
    common = [str(tiny_dir), "--ppl", str(text_file), "--ctx", "128", "--max-windows", "2"]
    result = run(
        "eval",
        *common,
        "--kv-bits",
        "2",
        "--kv-group-size",
        "16",
        "--kv-residual",
        "8",
        "--prefill",
        "32",
        "--chunk",
        "16",
        "--json",
        str(out),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "2-bit KV cache" in result.stdout
    assert "Loading weights" not in result.stderr  # --quiet silences transformers' bars too
    data = json.loads(out.read_text())
    expected = {"bits": 2, "group_size": 16, "residual": 8, "sinks": 4, "scheme": "salient", "salient": 0.2}
    assert data["kv_cache"] == expected  # auto: the salient scheme at 2 bits
    assert data["tokens"] == 2 * (128 - 32) and data["ratio_to_float16"] > 2
    assert data["cache_bytes_per_token"] == data["cache_bytes"] / 128
    full = run("eval", *common, "--kv-bits", "16", "--prefill", "32", "--json", str(out), "--quiet")
    assert full.returncode == 0, full.stderr
    assert json.loads(out.read_text())["ratio_to_float16"] == pytest.approx(1.0)


def test_generate_command(tiny_dir):
    result = run(
        "generate",
        "The capital of France is",
        "--model",
        str(tiny_dir),
        "--kv-bits",
        "4",
        "--kv-residual",
        "2",
        "--kv-group-size",
        "4",
        "--max-new-tokens",
        "12",
    )
    assert result.returncode == 0, result.stderr
    assert "12 tokens after" in result.stderr and "4-bit KV cache" in result.stderr


def test_generate_api_and_recipe(tiny_dir):
    import llmlite

    r = llmlite.generate(
        prompt="Once upon a time",
        model=str(tiny_dir),
        recipe=RECIPES / "kv-2bit.yaml",
        kv_residual=4,
        max_new_tokens=40,
    )
    assert r.kv_bits == 2 and r.new_tokens == 40
    short = llmlite.generate(prompt="Hi", model=str(tiny_dir), kv_bits=4, max_new_tokens=3)
    assert short.new_tokens == 3  # the default window may be longer than a short context
    assert r.float16_cache_bytes / r.cache_bytes > 1.5
