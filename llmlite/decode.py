"""A lean decode loop for Llama-layout models (gpt-fast's approach, on the model's own modules).

transformers' eager ``generate`` spends most of a small model's decode step outside the matrix
products (cache objects, mask construction, logits processors, hooks). This loop reads the same
modules (so every ``QuantLinear`` backend, LoRA wrapper and norm is the model's own) but keeps the
keys and values in one pre-allocated tensor per layer and runs only the step's arithmetic:

    h = embed(ids);  for each layer:  a = rmsnorm(h);  q, k, v = a W_qᵀ, a W_kᵀ, a W_vᵀ;
    rotate q, k at their positions;  K[:, :, p] = k;  V[:, :, p] = v;
    h += W_o · softmax(q Kᵀ / √d + causal) V;  h += W_down (silu(a' W_gateᵀ) ⊙ a' W_upᵀ)
    logits = lm_head(rmsnorm(h))[last position]

Shapes: ``ids [B, T]``; the cache ``[layers][B, kv_heads, capacity, head_dim]``; grouped-query heads
are read through ``enable_gqa`` (no repeated copies). ``compile=True`` additionally compiles the
one-token step with ``torch.compile`` (static shapes: the whole cache is attended with a mask, so
one graph serves every position); where compilation is unavailable it stays eager.

With a ``QuantizedKVCache`` instead, each one-token step attends the packed cache where it lies
(the layer's ``attend``: ``kvcache.fused``) and other steps read it back first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llmlite.arch import LLAMA, decoder_layers

# the Llama layer with nothing added (no query/key norms, no multipliers)
PLAIN_LLAMA = ("llama", "mistral", "qwen2")


def unsupported(model: nn.Module, capacity: int) -> str | None:
    """Why the lean loop cannot run ``model`` up to ``capacity`` tokens (None: it can)."""
    config = model.config
    if config.model_type not in PLAIN_LLAMA:
        return f"model type {config.model_type!r} (the lean loop runs {', '.join(PLAIN_LLAMA)})"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and capacity > window:
        return f"a sliding window of {window} tokens shorter than {capacity}"
    attn = getattr(decoder_layers(model)[0], LLAMA.attention)
    if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
        return "query/key norms"
    return None


@dataclass
class StaticCache:
    """Keys and values of every layer, pre-allocated: ``[B, kv_heads, capacity, head_dim]`` each."""

    keys: list[Tensor]
    values: list[Tensor]
    length: int = 0  # positions filled

    @classmethod
    def allocate(cls, model: nn.Module, batch: int, capacity: int) -> StaticCache:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, config.num_key_value_heads, capacity, head_dim)
        param = next(model.parameters())
        dtype = param.dtype if param.is_floating_point() else torch.float32
        n = config.num_hidden_layers
        make = lambda: torch.zeros(shape, dtype=dtype, device=param.device)  # noqa: E731
        return cls([make() for _ in range(n)], [make() for _ in range(n)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


AnyCache = StaticCache | Cache


def _cache_attention(cache: Cache, i: int, q: Tensor, k: Tensor, v: Tensor, scaling: float) -> Tensor:
    """Attention through a transformers ``Cache``: a one-token step is handed to the cache layer's
    own ``attend`` where it has one (``QuantizedKVLayer``: the packed cache read in place), else
    the cache is updated and read back."""
    t = q.shape[2]
    if t == 1 and i < len(cache.layers) and hasattr(cache.layers[i], "attend"):
        out = cache.layers[i].attend(q, k, v, scaling)
        if out is not None:
            return out
    keys, values = cache.update(k, v, i)
    length = keys.shape[2]
    positions = torch.arange(length, device=q.device)
    mask = positions.view(1, -1) <= positions[length - t :].view(-1, 1)  # causal for the t new tokens
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)


def _attention(
    layer: nn.Module,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    cache: AnyCache,
    i: int,
    at: Tensor,
):
    """One attention block for ``h [B, T, hidden]`` at positions ``at [T]`` (a tensor, so that a
    compiled step does not specialise on it)."""
    attn = getattr(layer, LLAMA.attention)
    b, t, _ = h.shape
    a = getattr(layer, LLAMA.input_norm)(h)
    q = attn.q_proj(a).view(b, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(a).view(b, t, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(a).view(b, t, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if not isinstance(cache, StaticCache):
        out = _cache_attention(cache, i, q, k, v, attn.scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
    cache.keys[i].index_copy_(2, at, k.to(cache.keys[i].dtype))
    cache.values[i].index_copy_(2, at, v.to(cache.values[i].dtype))
    if t == 1 and torch.compiler.is_compiling():  # static shapes: the whole cache, later slots masked
        # written out (not SDPA's kernel) so that the compiler fuses it: one query row per head
        keys, values = cache.keys[i].to(q.dtype), cache.values[i].to(q.dtype)
        groups = q.shape[1] // keys.shape[1]
        qg = q.view(b, keys.shape[1], groups, attn.head_dim)  # query heads by the key/value head they read
        scores = (qg @ keys.transpose(-1, -2)) * attn.scaling  # [B, kv_heads, groups, capacity]
        later = torch.arange(cache.capacity, device=at.device) > at
        probs = torch.softmax(scores.masked_fill(later, float("-inf")), -1)
        out = (probs @ values).view(b, -1, 1, attn.head_dim)
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
    else:  # eager: only the filled positions
        end = int(at[-1]) + 1
        keys, values = cache.keys[i][:, :, :end], cache.values[i][:, :, :end]
        mask = torch.arange(end, device=at.device).view(1, -1) <= at.view(-1, 1)
    out = F.scaled_dot_product_attention(
        q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=attn.scaling, enable_gqa=True
    )
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def forward(model: nn.Module, ids: Tensor, cache: AnyCache, at: Tensor) -> Tensor:
    """Logits ``[B, vocab]`` of the last of ``ids [B, T]``, placed at positions ``at [T]``; the
    keys and values of ``ids`` are written into ``cache``."""
    body = model.model
    h = body.embed_tokens(ids)
    cos, sin = body.rotary_emb(h, at.view(1, -1))
    for i, layer in enumerate(decoder_layers(model)):
        h = h + _attention(layer, h, cos, sin, cache, i, at)
        h = h + getattr(layer, LLAMA.mlp)(getattr(layer, LLAMA.post_attention_norm)(h))
    return model.lm_head(body.norm(h[:, -1]))


def compiled_step(model: nn.Module) -> Callable[[nn.Module, Tensor, StaticCache, Tensor], Tensor]:
    """``forward`` compiled for one new token (compiled once per model; eager if compilation fails
    at its first call, e.g. without a C compiler)."""
    if getattr(model, "_llmlite_step", None) is None:
        model._llmlite_step = torch.compile(forward, dynamic=False)
    return model._llmlite_step


@torch.no_grad()
def decode(
    model: nn.Module,
    ids: Tensor,
    max_new_tokens: int,
    pick: Callable[[Tensor], Tensor],
    stop: Callable[[Tensor], bool] = lambda _: False,
    compile: bool = False,
    cache: Cache | None = None,
) -> Iterator[Tensor]:
    """Yield ``max_new_tokens`` tokens ``[B, 1]`` after the prompt ``ids [B, T]`` (fewer if ``stop``):
    one forward over the prompt, then one step per token. ``pick`` turns logits ``[B, vocab]``
    into tokens ``[B]`` (greedy, sampling). ``cache``: a fresh transformers cache to decode through
    (e.g. a ``QuantizedKVCache``; eager only) instead of the pre-allocated float one."""
    batch, prompt = ids.shape
    if cache is None:
        cache = StaticCache.allocate(model, batch, prompt + max_new_tokens)
    step = compiled_step(model) if compile and isinstance(cache, StaticCache) else forward
    device = ids.device
    token = pick(forward(model, ids, cache, torch.arange(prompt, device=device))).view(batch, 1)
    for n in range(max_new_tokens):
        yield token
        if n == max_new_tokens - 1 or stop(token):
            return
        token = pick(step(model, token, cache, torch.tensor([prompt + n], device=device))).view(batch, 1)
