"""Perplexity with the protocol of the GPTQ/AWQ papers: the whole text tokenized once, cut into
non-overlapping windows, mean next-token NLL over every window, exponentiated. The routine itself
(``perplexity``, plain or through a KV cache) is ``llmlite.nll``'s; here is what calibration adds."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlite.nll import Perplexity, one_pass_logits, perplexity, window_nll
from llmlite.ops import logsumexp_

__all__ = ["Perplexity", "next_token_confidence", "perplexity", "window_nll"]


@torch.no_grad()
def next_token_confidence(model: nn.Module, windows: Tensor, progress: bool = True) -> dict[str, Tensor]:
    """Per scored token of ``windows`` ``[n, ctx]``: the top-1 probability (``confidence``), whether
    the top-1 token is the next token (``correct``), and the next token's NLL (``nll``, nats)."""
    device = next(model.parameters()).device
    confidence, correct, nll = [], [], []
    for window in tqdm(windows, desc="next-token calibration", unit="window", disable=not progress):
        for logits, targets in one_pass_logits(model, window[None].to(device)):
            top, arg = logits.max(-1)
            picked = logits.gather(-1, targets[..., None])[..., 0]
            lse = logsumexp_(logits, top)  # overwrites logits, ours
            confidence.append((top - lse).exp().flatten().cpu())
            correct.append((arg == targets).flatten().cpu())
            nll.append((lse - picked).flatten().cpu())
    cat = torch.cat
    return {"confidence": cat(confidence), "correct": cat(correct), "nll": cat(nll)}
