"""Perplexity with the protocol of the GPTQ/AWQ papers: the whole text tokenized once, cut into
non-overlapping windows, mean next-token NLL over every window, exponentiated."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlite.ops import logsumexp_, token_nll

_HEAD_CHUNK = 512  # tokens per lm_head slice, so the full [ctx, vocab] logits never exist at once


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean next-token negative log-likelihood, nats
    windows: int
    tokens: int  # tokens scored: windows × (ctx - 1)
    ctx: int


@torch.no_grad()
def window_nll(model: nn.Module, window: Tensor) -> Tensor:
    """Summed next-token NLL (float64) of each row of ``window`` ``[b, ctx]``."""
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", None)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    targets = window[:, 1:]
    if head is None or body is None or body is model or softcap:
        logits = model(window).logits[:, :-1].float()  # ours to overwrite
        return token_nll(logits, targets).double().sum(1)
    hidden = body(window).last_hidden_state[:, :-1]
    total = torch.zeros(window.shape[0], dtype=torch.float64)
    for i in range(0, hidden.shape[1], _HEAD_CHUNK):
        logits = head(hidden[:, i : i + _HEAD_CHUNK]).float()
        total += token_nll(logits, targets[:, i : i + _HEAD_CHUNK]).double().sum(1)
    return total


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 1, progress: bool = True) -> Perplexity:
    """Perplexity of ``model`` over token ``windows`` ``[n, ctx]``."""
    n, ctx = windows.shape
    device = next(model.parameters()).device
    total = 0.0
    bar = tqdm(total=n, desc="perplexity", unit="window", disable=not progress)
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size].to(device)
        total += float(window_nll(model, batch).sum())
        bar.update(batch.shape[0])
    bar.close()
    tokens = n * (ctx - 1)
    nll = total / tokens
    return Perplexity(perplexity=math.exp(nll), nll=nll, windows=n, tokens=tokens, ctx=ctx)


@torch.no_grad()
def next_token_confidence(model: nn.Module, windows: Tensor, progress: bool = True) -> dict[str, Tensor]:
    """Per scored token of ``windows`` ``[n, ctx]``: the top-1 probability (``confidence``), whether
    the top-1 token is the next token (``correct``), and the next token's NLL (``nll``, nats)."""
    device = next(model.parameters()).device
    confidence, correct, nll = [], [], []
    for window in tqdm(windows, desc="next-token calibration", unit="window", disable=not progress):
        row = window[None].to(device)
        logits = model(row).logits[0, :-1]
        targets = row[0, 1:]
        for i in range(0, len(targets), _HEAD_CHUNK):
            chunk = logits[i : i + _HEAD_CHUNK].float()
            t = targets[i : i + _HEAD_CHUNK]
            top, arg = chunk.max(-1)
            picked = chunk.gather(-1, t[:, None])[:, 0]
            lse = logsumexp_(chunk, top)  # overwrites chunk, a copy or a slice of our logits
            confidence.append((top - lse).exp().cpu())
            correct.append((arg == t).cpu())
            nll.append((lse - picked).cpu())
    cat = torch.cat
    return {"confidence": cat(confidence), "correct": cat(correct), "nll": cat(nll)}
