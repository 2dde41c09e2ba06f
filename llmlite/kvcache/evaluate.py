"""Perplexity read back through a KV cache, with the memory the cache held. The scoring is
``llmlite.nll.perplexity`` with a cache factory: each window's first ``prefill`` tokens fill a fresh
cache and the rest is scored ``chunk`` tokens at a time, every chunk attending to the cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import Tensor, nn
from transformers.cache_utils import Cache

from llmlite.nll import perplexity


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


def cached_perplexity(
    model: nn.Module,
    windows: Tensor,
    make_cache: Callable[[], Cache],
    prefill: int,
    chunk: int,
    progress: bool = True,
) -> CachedPerplexity:
    """Perplexity of ``windows`` ``[n, ctx]`` scored through a fresh ``make_cache()`` per window."""
    held: list[int] = []
    result = perplexity(
        model,
        windows,
        1,
        progress,
        make_cache=make_cache,
        prefill=prefill,
        chunk=chunk,
        on_cache=lambda cache: held.append(cache_memory(cache)["bytes"]),
    )
    mean = sum(held) // len(held)
    fp16 = float16_cache_bytes(model.config, result.ctx)
    return CachedPerplexity(
        **asdict(result),
        prefill=prefill,
        chunk=chunk,
        cache_bytes=mean,
        cache_bytes_per_token=mean / result.ctx,
        float16_bytes=fp16,
        ratio_to_float16=fp16 / mean if mean else None,
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
