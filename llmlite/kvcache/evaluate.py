"""Perplexity read back through a KV cache. A single forward pass over a window never reads the
cache, so it cannot see the cache's error: here each window's first ``prefill`` tokens fill the
cache, and the rest is scored ``chunk`` tokens at a time, every chunk attending to the cache
(``chunk=1`` is token-by-token decoding)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from llmlite.ops import token_nll


@dataclass
class CachedPerplexity:
    perplexity: float
    nll: float  # mean NLL of the scored tokens, nats
    windows: int
    tokens: int  # tokens scored: windows × (ctx − prefill)
    ctx: int
    prefill: int
    chunk: int
    cache_bytes: int  # held by the cache after the last window's last token (mean over windows)
    cache_bytes_per_token: float
    float16_bytes: int  # a float16 cache of the same tokens
    ratio_to_float16: float | None


@torch.no_grad()
def cached_window_nll(model: nn.Module, window: Tensor, cache: Cache, prefill: int, chunk: int) -> Tensor:
    """Summed NLL (float64) of ``window[:, prefill:]`` ``[b, ctx]``, each chunk read through ``cache``."""
    out = model(window[:, :prefill], cache=cache, use_cache=True, logits_to_keep=1)
    last = out.logits[:, -1:].float()  # predicts the first scored token
    total = torch.zeros(window.shape[0], dtype=torch.float64)
    ctx = window.shape[1]
    for start in range(prefill, ctx, chunk):
        piece = window[:, start : start + chunk]
        logits = torch.cat([last, model(piece, cache=cache, use_cache=True).logits.float()], 1)
        total += token_nll(logits[:, :-1], piece).double().sum(1).cpu()
        last = logits[:, -1:]
    return total


def cached_perplexity(
    model: nn.Module,
    windows: Tensor,
    make_cache: Callable[[], Cache],
    prefill: int,
    chunk: int,
    progress: bool = True,
) -> CachedPerplexity:
    """Perplexity of ``windows`` ``[n, ctx]`` scored through a fresh ``make_cache()`` per window."""
    n, ctx = windows.shape
    if not 1 <= prefill < ctx:
        raise ValueError(f"prefill must be in [1, {ctx}), got {prefill}")
    device = next(model.parameters()).device
    total, memories = 0.0, []
    bar = tqdm(total=n, desc="perplexity through the cache", unit="window", disable=not progress)
    for window in windows:
        cache = make_cache()
        total += float(cached_window_nll(model, window[None].to(device), cache, prefill, chunk).sum())
        memories.append(cache_memory(cache))
        bar.update(1)
    bar.close()
    tokens = n * (ctx - prefill)
    nll = total / tokens
    held = sum(m["bytes"] for m in memories) // n
    fp16 = float16_cache_bytes(model.config, ctx)
    return CachedPerplexity(
        perplexity=math.exp(nll),
        nll=nll,
        windows=n,
        tokens=tokens,
        ctx=ctx,
        prefill=prefill,
        chunk=chunk,
        cache_bytes=held,
        cache_bytes_per_token=held / ctx,
        float16_bytes=fp16,
        ratio_to_float16=fp16 / held if held else None,
    )


def float16_cache_bytes(config, tokens: int, batch: int = 1) -> int:
    """Bytes of a float16 cache of ``tokens`` tokens: keys and values of every layer, 2 bytes each."""
    config = config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * tokens * batch * 2


def cache_memory(cache: Cache) -> dict:
    """Bytes held by any transformers cache: ours reports its own exact figure; for the others
    every tensor reachable from the layers is counted once (storages deduplicated; tensor
    subclasses such as quanto's packed tensors through their inner tensors)."""
    if hasattr(cache, "memory"):
        return cache.memory()
    seen: dict[int, int] = {}
    for layer in cache.layers:
        for t in _tensors(vars(layer)):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return {"bytes": sum(seen.values()), "tokens": cache.get_seq_length()}


def _tensors(obj, depth: int = 0):
    if depth > 8:
        return
    if isinstance(obj, Tensor):
        if hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            for name in names:
                yield from _tensors(getattr(obj, name), depth + 1)
        else:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        yield from _tensors(vars(obj), depth + 1)
