"""``generate --runtime llama.cpp``: llama.cpp (llama-cpp-python, an optional extra) serving the
bundled model's GGUF file and an llmlite checkpoint exported on the fly. Runs where
llama-cpp-python is installed (``pip install 'llmlite[llama-cpp]'``; CI does not build it); the
benchmark (``benchmarks/speed.py --llama-python``) runs and reports it too."""

from __future__ import annotations

import pytest

import llmlite
from llmlite import llamacpp

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed"),
]

PROMPT = "The capital of France is"


def test_llama_cpp_continues_the_bundled_model_as_llmlite_does():
    """The bundled file is llama.cpp's own Q4_1; llmlite's float model is that file dequantized:
    the greedy continuations agree until a near-tie (llama.cpp multiplies Q4_1 by activations
    rounded to 8 bits; here after the first line)."""
    theirs = llmlite.generate(prompt=PROMPT, runtime="llama.cpp", max_new_tokens=12)
    ours = llmlite.generate(prompt=PROMPT, max_new_tokens=12)
    assert theirs.loop.startswith("llama.cpp") and theirs.new_tokens == 12 and theirs.prompt_tokens >= 5
    assert theirs.text.split("\n")[0] == ours.text.split("\n")[0] == " Paris."


def test_llama_cpp_serves_a_checkpoint_exported_on_the_fly(tmp_path):
    ckpt = tmp_path / "w4g32"
    llmlite.quantize(method="rtn", group_size=32, output=str(ckpt), progress=False)
    out = llmlite.generate(prompt=PROMPT, model=str(ckpt), runtime="llama.cpp", max_new_tokens=8, chat=True)
    assert out.new_tokens >= 1 and out.text.strip() and out.cache_bytes > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4g32"]  # the temporary GGUF file is gone


def test_llama_cpp_latency_of_the_report():
    """The report's efficiency task times llama.cpp on the model's GGUF form; a checkpoint that
    has none (group 128) is named as not run, with the reason."""
    from llmlite.evaluation.efficiency import LatencySettings, llama_cpp_latency

    settings = LatencySettings(prompt_tokens=16, decode_tokens=4, batch_sizes=(1,), repeats=2)
    served = llama_cpp_latency("smollm2-135m", settings)
    assert served["runtime"].startswith("llama.cpp") and served["batch"] == 1
    assert served["decode_tokens_per_s"] > 0 and served["prefill"]["p50_ms"] > 0
    assert served["decode"]["p90_ms"] >= served["decode"]["p50_ms"]
