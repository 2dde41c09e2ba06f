"""Next-token cross-entropy straight from hidden states, never holding the full logits tensor.

``linear_cross_entropy(h, W, targets)`` equals ``cross_entropy(h @ Wᵀ, targets, ignore_index=-100,
reduction="sum") / normaliser`` but works through the rows in chunks: each chunk's logits are
made, turned into the loss and into the gradient ``(softmax − onehot)`` in place, multiplied back
into ``∂h`` (and ``∂W`` when the head trains), and freed. The backward pass only scales those saved
gradients. A [tokens × vocab] float32 tensor (400 MB for 2,048 tokens of a 49k vocabulary) and the
several passes over it that ``log_softmax`` and its backward make are never needed, and rows whose
target is ignored (prompt tokens, padding) never reach the head at all. ``CausalLMLoss``, the loss
``finetune`` trains with through the shared loop (``training.loop``), is built on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, normaliser: float, chunk: int) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = 1.0 / normaliser
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        # one logits buffer for every chunk: a fresh [chunk x vocab] block is too large for the
        # allocator to keep, so each chunk would fault in ~100 MB of new pages again
        buffer = h.new_empty((min(chunk, h.shape[0]), weight.shape[0]), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk):
            hc, tc = h[start : start + chunk], targets[start : start + chunk]
            # softmax in place in the logits' own memory: half the passes and memory of
            # log_softmax + exp, and closer to float64 (no exp of a rounded log-probability)
            logits = buffer[: len(hc)]
            if h.dtype == torch.float32 and weight.dtype == torch.float32:
                torch.mm(hc, weight.T, out=logits)
            else:
                logits.copy_(hc @ weight.T)
            rows = torch.arange(len(tc), device=h.device)
            picked = logits[rows, tc]
            top = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(top).exp_()
            sums = probs.sum(dim=-1, keepdim=True)
            total -= (picked - top.squeeze(-1) - sums.squeeze(-1).log()).sum(dtype=torch.float64)
            if need_h or need_w:
                probs.div_(sums)
                probs[rows, tc] -= 1
                probs = probs.to(h.dtype)
                if need_h:
                    torch.mm(probs, weight, out=grad_h[start : start + chunk])
                if need_w:
                    step = (probs.T.float(), hc.float())
                    if grad_w is None:  # the first chunk's product makes the buffer (beta=0: no zeros)
                        grad_w = torch.addmm(step[1].new_zeros(()), *step, beta=0, alpha=scale)
                    else:
                        grad_w.addmm_(*step, alpha=scale)
            logits = probs = None  # drop this chunk's views (and a lower-precision copy) first
        if need_h:
            grad_h.mul_(scale)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w)))
        ctx.has, ctx.weight_dtype = (need_h, need_w), weight.dtype
        return (total * scale).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.has
        one = bool(grad_loss == 1)  # loss.backward(): the saved gradients as they are, no copies
        return (
            (grad_h if one else grad_h * grad_loss.to(grad_h.dtype)) if need_h else None,
            (grad_w if one else grad_w * grad_loss).to(ctx.weight_dtype) if need_w else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    normaliser: float | None = None,
    chunk: int = 512,
) -> Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (``-100`` = ignored),
    divided by ``normaliser`` (default: the number of targets that count).

    ``hidden`` is ``[..., d]`` and ``targets`` has its leading shape. Returns a float32 scalar.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE
    if normaliser is None:
        normaliser = max(int(keep.sum()), 1)
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0 + weight.sum() * 0).float()  # keeps the graph for backward
    return _LinearCrossEntropy.apply(hidden, weight, targets, float(normaliser), chunk)


def shift_targets(labels: Tensor) -> Tensor:
    """Position ``t`` predicts token ``t+1``: labels shifted left, the last position ignored."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)


class CausalLMLoss(nn.Module):
    """Summed next-token loss of a causal LM divided by ``normaliser``. It runs the decoder and
    takes the loss straight from the hidden states (``linear_cross_entropy``) when the head is a
    plain bias-free linear layer, else it goes through the model's logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = hf.get_output_embeddings()
        capped = any(getattr(hf.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
        decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else None
        self.fused = type(head) is nn.Linear and head.bias is None and not capped and decoder is not None
        self.decoder, self.head = (decoder, head) if self.fused else (None, None)

    def forward(self, input_ids: Tensor, labels: Tensor, normaliser: float) -> Tensor:
        targets = shift_targets(labels)
        if self.fused:
            hidden = self.decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            return linear_cross_entropy(hidden, self.head.weight, targets, normaliser)
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        return loss / normaliser
