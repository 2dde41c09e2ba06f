"""``llmlite generate``: text generation with the quantized KV cache (or transformers' default)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor
from transformers import DynamicCache

from llmlite import llamacpp
from llmlite.decode import decode, unsupported
from llmlite.errors import LlmliteError
from llmlite.kvcache.cache import kv_cache_for, kv_spec
from llmlite.kvcache.defaults import KV_DEFAULTS, KV_HELP
from llmlite.kvcache.evaluate import cache_memory, float16_cache_bytes
from llmlite.models import DEFAULT_MODEL, load_model
from llmlite.recipes import build, option
from llmlite.results import Result

RUNTIMES = ("llmlite", "llama.cpp")


@dataclass
class GenerateConfig:
    """Options of ``llmlite generate`` / ``llmlite.generate``."""

    VERB: ClassVar[str] = "generate"
    ABOUT: ClassVar[str] = (
        "Continue PROMPT with the model (greedy unless --temperature). With --kv-bits the keys and "
        "values are stored in llmlite's quantized cache (--kv-scheme kivi or salient)."
    )

    prompt: str = option("", "the text to continue", positional="1")
    model: str = option(DEFAULT_MODEL, "bundled name, folder, .gguf file, hub id or llmlite checkpoint")
    max_new_tokens: int = option(64, "tokens to generate")
    kv_bits: int | None = option(None, KV_HELP["bits"], shown="transformers' unquantized cache")
    kv_group_size: int = option(KV_DEFAULTS["group_size"], KV_HELP["group_size"])
    # None: the default window, never an error on short contexts
    kv_residual: int | None = option(None, KV_HELP["residual"], shown=str(KV_DEFAULTS["residual"]))
    kv_sinks: int = option(KV_DEFAULTS["sinks"], KV_HELP["sinks"])
    kv_scheme: str = option(KV_DEFAULTS["scheme"], KV_HELP["scheme"])
    kv_salient: float = option(KV_DEFAULTS["salient"], KV_HELP["salient"])
    temperature: float = option(0.0, "sampling temperature; 0 = greedy")
    top_p: float = option(1.0, "nucleus sampling mass")
    seed: int = option(0, "sampling seed")
    chat: bool = option(False, "wrap the prompt in the model's chat template")
    compile: bool = option(
        False, "compile the decode step with torch.compile (about a minute, once per run; then faster steps)"
    )
    runtime: str = option(
        "llmlite",
        "llmlite: the model's modules through llmlite's decode loop; llama.cpp: its GGUF file (a group-32 "
        "checkpoint is exported first) through llama-cpp-python, an optional extra",
        choices=RUNTIMES,
    )

    def validate(self) -> GenerateConfig:
        if not self.prompt:
            raise LlmliteError("generate needs a PROMPT (the text to continue)")
        if self.max_new_tokens < 1:
            raise LlmliteError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise LlmliteError("--temperature must be 0 (greedy) or more and --top-p in (0, 1]")
        if self.kv_residual is not None and (
            isinstance(self.kv_residual, bool) or not isinstance(self.kv_residual, int)
        ):
            raise LlmliteError(f"option kv-residual must be a whole number, got {self.kv_residual!r}")
        if self.runtime not in RUNTIMES:
            raise LlmliteError(f"--runtime {self.runtime} is not one of: {', '.join(RUNTIMES)}")
        if self.runtime == "llama.cpp" and self.kv_bits is not None:
            raise LlmliteError("--kv-bits is llmlite's cache; llama.cpp keeps its own: leave one of them out")
        if self.runtime == "llama.cpp" and not llamacpp.available():
            raise LlmliteError(f"--runtime llama.cpp needs llama-cpp-python: {llamacpp.INSTALL}")
        if self.kv_bits is not None:
            kv_spec(self)
        if self.kv_bits is not None and self.compile:
            raise LlmliteError(
                "--compile compiles the step over the unquantized cache; leave out --compile or --kv-bits"
            )
        return self


@dataclass
class Generation(Result):
    text: str  # the new text only
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tokens_per_second: float  # new tokens over the whole call (prefill included)
    cache_bytes: int
    float16_cache_bytes: int
    kv_bits: int | None
    loop: str  # "lean", "lean, compiled", "transformers (why)" or "llama.cpp (version)"


def generate(
    config: GenerateConfig | None = None, *, recipe: str | None = None, model=None, tokenizer=None, **options
) -> Generation:
    """Continue ``prompt`` with ``model`` (a name or path, or a model object with its ``tokenizer``),
    reading keys and values from a quantized cache when ``kv_bits`` is set."""
    if model is not None and not isinstance(model, str):
        options.setdefault("model", getattr(model, "llmlite_source", "in-memory"))
    elif model is not None:
        options["model"], model = model, None
    cfg = config.validate() if config is not None else build(GenerateConfig, recipe, **options)
    if cfg.runtime == "llama.cpp":
        return _llama_cpp_generate(cfg)
    if model is None:
        model, tokenizer = load_model(cfg.model)
    text = cfg.prompt
    if cfg.chat:
        if not tokenizer.chat_template:
            raise LlmliteError(f"{cfg.model} has no chat template; leave out --chat")
        messages = [{"role": "user", "content": cfg.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not cfg.chat).input_ids.to(device)
    context = ids.shape[1] + cfg.max_new_tokens
    if cfg.kv_bits is not None and cfg.kv_residual is not None and cfg.kv_residual > context:
        raise LlmliteError(
            f"--kv-residual {cfg.kv_residual} is longer than the context ({context} tokens: prompt plus "
            "--max-new-tokens), so nothing would be quantized; lower it"
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and context > limit:
        raise LlmliteError(
            f"prompt plus --max-new-tokens is {context} tokens, above the model's {limit}; shorten"
        )
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
    torch.manual_seed(cfg.seed)
    why_not = unsupported(model, context)
    start = time.perf_counter()
    if why_not is None:
        pick = partial(next_token, temperature=cfg.temperature, top_p=cfg.top_p)
        cache = None if cfg.kv_bits is None else kv_cache_for(model, kv_spec(cfg), tokenizer)
        stop = lambda t: bool((t == eos).all())  # noqa: E731
        new = torch.cat(list(decode(model, ids, cfg.max_new_tokens, pick, stop, cfg.compile, cache)), 1)[0]
        length = ids.shape[1] + len(new)
        if cache is None:  # allocated whole, at the model's float width
            cache_bytes = float16_cache_bytes(model.config, context) * _float_width(model) // 2
        else:
            cache_bytes = cache_memory(cache)["bytes"]
        loop = "lean, compiled" if cfg.compile else "lean"  # validate() refuses --compile with --kv-bits
    else:
        new, cache = _transformers_generate(model, tokenizer, ids, cfg)
        cache_bytes, length = cache_memory(cache)["bytes"], cache.get_seq_length()
        loop = f"transformers ({why_not})"
    seconds = time.perf_counter() - start
    return Generation(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=ids.shape[1],
        new_tokens=len(new),
        seconds=seconds,
        tokens_per_second=len(new) / seconds,
        cache_bytes=cache_bytes,
        float16_cache_bytes=float16_cache_bytes(model.config, length),
        kv_bits=cfg.kv_bits,
        loop=loop,
    )


def _llama_cpp_generate(cfg: GenerateConfig) -> Generation:
    with llamacpp.gguf_file(cfg.model) as path:
        done = llamacpp.complete(
            path, cfg.prompt, cfg.chat, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed
        )
    return Generation(
        text=done.text,
        prompt_tokens=done.prompt_tokens,
        new_tokens=done.new_tokens,
        seconds=done.seconds,
        tokens_per_second=done.new_tokens / done.seconds,
        cache_bytes=done.cache_bytes,
        float16_cache_bytes=done.cache_bytes,
        kv_bits=None,
        loop=f"llama.cpp (llama-cpp-python {llamacpp.version()})",
    )


def _float_width(model) -> int:
    return next(p for p in model.parameters() if p.is_floating_point()).element_size()


def next_token(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0) -> Tensor:
    """Tokens ``[B]`` from logits ``[B, vocab]``: the argmax at temperature 0, else a draw from
    ``softmax(logits / temperature)`` restricted to the smallest set of top tokens whose mass
    reaches ``top_p`` (nucleus sampling, torch's global generator)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # tokens after the mass is reached
    sorted_probs[drop] = 0
    return order.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)


def _transformers_generate(model, tokenizer, ids: Tensor, cfg: GenerateConfig):
    cache = (
        DynamicCache(config=model.config)
        if cfg.kv_bits is None
        else kv_cache_for(model, kv_spec(cfg), tokenizer)
    )
    sampling = {"do_sample": False}
    if cfg.temperature > 0:
        sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            **sampling,
        )
    return out[0, ids.shape[1] :], cache
