"""llama.cpp as the runtime that serves llmlite's weights on a CPU (``generate --runtime llama.cpp``).

llama.cpp comes from ``llama-cpp-python``, an optional extra (``pip install 'llmlite[llama-cpp]'``):
it builds llama.cpp from source at install, 10–25 minutes on 2 cores. The model is a GGUF file, an
llmlite checkpoint at group 32 (exported to a temporary GGUF file first, exactly as ``llmlite
export`` writes it) or the bundled model's own GGUF file.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from llmlite.errors import LlmliteError
from llmlite.models import BUNDLED, bundled_gguf, load_model, local_source

INSTALL = "pip install 'llmlite[llama-cpp]' (it builds llama.cpp from source: 10-25 minutes)"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    return importlib.metadata.version("llama-cpp-python")


@contextmanager
def gguf_file(source: str) -> Iterator[Path]:
    """The GGUF file that serves ``source``: itself, the bundled model's file, or a checkpoint
    folder exported to a temporary file (removed on exit)."""
    if source in BUNDLED:
        yield bundled_gguf(source)
        return
    path = local_source(source)
    if path is not None and path.suffix == ".gguf":
        yield path
        return
    from llmlite.quant.compressed import compressed_linears
    from llmlite.quant.gguf_file import write_gguf

    model, _ = load_model(source, backend="torch")
    if path is None or not path.is_dir() or not compressed_linears(model):
        raise LlmliteError(
            f"--runtime llama.cpp runs GGUF files and llmlite checkpoints quantized at group 32; {source} "
            "is neither: quantize it with --group-size 32 (or --format gguf) first"
        )
    with tempfile.TemporaryDirectory(prefix="llmlite-gguf-") as folder:
        file = Path(folder) / "model.gguf"
        write_gguf(model, path, file, path.name)
        del model
        yield file


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    cache_bytes: int  # llama.cpp's float16 KV cache, as allocated for the context


def complete(
    path: Path, prompt: str, chat: bool, max_new_tokens: int, temperature: float, top_p: float, seed: int
) -> Completion:
    """Continue ``prompt`` (or answer it as a chat message) with llama.cpp on this process's threads."""
    if not available():
        raise LlmliteError(f"--runtime llama.cpp needs llama-cpp-python: {INSTALL}")
    from llama_cpp import Llama

    threads = torch.get_num_threads()
    # a context for the prompt (at most a token a byte), the chat template and the new tokens
    context = len(prompt.encode()) + max_new_tokens + 256
    llm = Llama(
        model_path=str(path),
        n_ctx=context,
        n_threads=threads,
        n_threads_batch=threads,
        seed=seed,
        verbose=False,
    )
    sampling = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": 0}
    start = time.perf_counter()
    if chat:
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], **sampling)
        text = out["choices"][0]["message"]["content"] or ""
    else:
        out = llm.create_completion(prompt, **sampling)
        text = out["choices"][0]["text"]
    seconds = time.perf_counter() - start
    meta = llm.metadata
    arch = meta.get("general.architecture", "llama")
    layers = int(meta.get(f"{arch}.block_count", 0))
    heads = int(meta.get(f"{arch}.attention.head_count", 1))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.embedding_length", 0)) // heads
    cache_bytes = 2 * layers * kv_heads * head_dim * llm.n_ctx() * 2
    usage = out["usage"]
    return Completion(text, usage["prompt_tokens"], usage["completion_tokens"], seconds, cache_bytes)


def timed_runs(path: Path, prompt_tokens: int, decode_tokens: int, repeats: int, seed: int = 0):
    """llama.cpp on ``path`` (batch 1, this process's threads): after one untimed warm-up run,
    ``repeats`` runs of a random prompt of ``prompt_tokens`` tokens, then ``decode_tokens``
    one-token steps (the tokens fed are random: a step costs the same whatever the token).
    Returns (seconds of each prefill, seconds of each decode step)."""
    if not available():
        raise LlmliteError(f"llama.cpp timing needs llama-cpp-python: {INSTALL}")
    from llama_cpp import Llama

    threads = torch.get_num_threads()
    llm = Llama(
        model_path=str(path),
        n_ctx=prompt_tokens + decode_tokens + 8,
        n_batch=max(prompt_tokens, 8),
        n_threads=threads,
        n_threads_batch=threads,
        seed=seed,
        verbose=False,
    )
    draw = torch.Generator().manual_seed(seed)
    prefill, steps = [], []
    for run in range(repeats + 1):
        llm.reset()
        ids = torch.randint(0, llm.n_vocab(), (prompt_tokens + decode_tokens,), generator=draw).tolist()
        start = time.perf_counter()
        llm.eval(ids[:prompt_tokens])
        took = time.perf_counter() - start
        run_steps = []
        for token in ids[prompt_tokens:]:
            start = time.perf_counter()
            llm.eval([token])
            run_steps.append(time.perf_counter() - start)
        if run:  # the first run warms up
            prefill.append(took)
            steps += run_steps
    return prefill, steps
