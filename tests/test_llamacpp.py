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
