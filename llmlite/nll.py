"""The one perplexity routine: the summed next-token NLL of token windows, each window scored in one
forward pass (the GPTQ/AWQ papers' protocol) or read back through a KV cache made fresh for it.

A single forward pass never reads a cache, so it cannot see the cache's error: through a cache, a
window's first ``prefill`` tokens fill it and the rest is scored ``chunk`` tokens at a time, every
chunk attending to the cache (``chunk=1`` is token-by-token decoding). Below ``evaluation`` and
``kvcache`` (it imports ``ops`` only), so that both may use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlite.ops import token_nll

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

HEAD_CHUNK = 512  # positions per lm_head slice, so the full [ctx, vocab] logits never exist at once


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean next-token negative log-likelihood of the scored tokens, nats
    windows: int
    tokens: int  # tokens scored: windows × (ctx − prefill); prefill is 1 in one forward pass
    ctx: int


def one_pass_logits(model: nn.Module, window: Tensor, prefill: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Float32 logits ``[b, c, vocab]`` (the caller's to overwrite) and their targets ``[b, c]`` for
    ``window[:, prefill:]`` (``[b, ctx]``), from one forward pass; the head runs ``HEAD_CHUNK``
    positions at a time where the model lets the decoder and the head be called apart."""
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", None)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    targets = window[:, prefill:]
    if head is None or body is None or body is model or softcap:
        yield model(window).logits[:, prefill - 1 : -1].float(), targets  # ours to overwrite
        return
    hidden = body(window).last_hidden_state[:, prefill - 1 : -1]
    for i in range(0, hidden.shape[1], HEAD_CHUNK):
        yield head(hidden[:, i : i + HEAD_CHUNK]).float(), targets[:, i : i + HEAD_CHUNK]


def cached_logits(
    model: nn.Module, window: Tensor, cache: Cache, prefill: int, chunk: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """As ``one_pass_logits``, read through ``cache``: ``window[:, :prefill]`` fills it, then each
    ``chunk`` tokens are one forward pass that attends to it; yields one slice per chunk."""
    out = model(window[:, :prefill], cache=cache, use_cache=True, logits_to_keep=1)
    last = out.logits[:, -1:].float()  # predicts the first scored token
    for start in range(prefill, window.shape[1], chunk):
        piece = window[:, start : start + chunk]
        logits = torch.cat([last, model(piece, cache=cache, use_cache=True).logits.float()], 1)
        last = logits[:, -1:]  # left alone by the caller, who overwrites logits[:, :-1] only
        yield logits[:, :-1], piece


@torch.no_grad()
def window_nll(
    model: nn.Module, window: Tensor, prefill: int = 1, cache: Cache | None = None, chunk: int | None = None
) -> Tensor:
    """Summed NLL (float64, on the CPU) of ``window[:, prefill:]`` for each row of ``window``
    ``[b, ctx]``: ``Σ_t logsumexp(z_t) − z_t[x_{t+1}]``, in one forward pass, or through ``cache``
    ``chunk`` tokens at a time (default: the rest of the window at once)."""
    if cache is None:
        slices = one_pass_logits(model, window, prefill)
    else:
        slices = cached_logits(model, window, cache, prefill, chunk or window.shape[1])
    total = torch.zeros(window.shape[0], dtype=torch.float64)
    for logits, targets in slices:
        total += token_nll(logits, targets).double().sum(1).cpu()
    return total


def perplexity(
    model: nn.Module,
    windows: Tensor,
    batch_size: int = 1,
    progress: bool = True,
    *,
    make_cache: Callable[[], Cache] | None = None,
    prefill: int = 1,
    chunk: int | None = None,
    on_cache: Callable[[Cache], None] | None = None,
) -> Perplexity:
    """Perplexity ``exp(Σ NLL / tokens)`` of ``model`` over token ``windows`` ``[n, ctx]``, scoring
    each window's tokens after its first ``prefill``. ``make_cache``: each batch of windows is read
    through a fresh ``make_cache()`` (``prefill``, ``chunk`` as in ``window_nll``), handed to
    ``on_cache`` once scored; ``None``: one forward pass per batch."""
    n, ctx = windows.shape
    if not 1 <= prefill < ctx:
        raise ValueError(f"prefill must be in [1, {ctx}), got {prefill}")
    device = next(model.parameters()).device
    desc = "perplexity" if make_cache is None else "perplexity through the cache"
    total = 0.0
    bar = tqdm(total=n, desc=desc, unit="window", disable=not progress)
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size].to(device)
        cache = None if make_cache is None else make_cache()
        total += float(window_nll(model, batch, prefill, cache, chunk).sum())
        if cache is not None and on_cache is not None:
            on_cache(cache)
        bar.update(batch.shape[0])
    bar.close()
    tokens = n * (ctx - prefill)
    nll = total / tokens
    return Perplexity(perplexity=math.exp(nll), nll=nll, windows=n, tokens=tokens, ctx=ctx)
