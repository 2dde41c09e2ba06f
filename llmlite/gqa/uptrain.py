"""Uptraining: a short distillation from the original model (teacher, frozen) into the converted one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlite.arch import LLAMA
from llmlite.errors import LlmliteError
from llmlite.gqa.convert import attention_layers, decoder

UPTRAIN_PARAMS = ("attention", "all")
_KL_ROWS = 1024  # positions per lm_head slice: the full [batch, seq, vocab] logits never exist


def trainable_parameters(model: nn.Module, params: str = "attention") -> list[nn.Parameter]:
    """What uptraining trains: the q/k/v/o projections ("attention") or every parameter ("all")."""
    if params not in UPTRAIN_PARAMS:
        raise LlmliteError(f"unknown --uptrain-params '{params}'; use one of: {', '.join(UPTRAIN_PARAMS)}")
    if params == "all":
        return list(model.parameters())
    layers = attention_layers(model)
    return [
        p for attn in layers for name in LLAMA.attention_projections for p in getattr(attn, name).parameters()
    ]


def uptrain(
    student: nn.Module,
    teacher: nn.Module,
    windows: Tensor,
    lr: float = 1e-4,
    batch_size: int = 4,
    params: str = "attention",
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Distil ``teacher`` into ``student`` over token ``windows`` ``[n, seqlen]``, one pass in order.

    Loss: KL(teacher ‖ student) of the next-token distributions at every position, temperature 1,
    unscaled, averaged over positions. AdamW (no weight decay), cosine decay from ``lr`` to 0, no
    warm-up, gradient norm clipped to 1. ``params``: "attention" trains q/k/v/o only, "all" every
    parameter. Returns the loss of each step; ``student`` ends in eval mode with its flags restored.
    """
    trainable = trainable_parameters(student, params)
    torch.manual_seed(seed)
    teacher.eval().requires_grad_(False)
    flags = [(p, p.requires_grad) for p in student.parameters()]
    student.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    steps = math.ceil(len(windows) / batch_size)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    device = next(student.parameters()).device
    losses: list[float] = []
    student.train()
    bar = tqdm(total=steps, desc="uptrain", unit="step", disable=not progress)
    try:
        for step in range(steps):
            batch = windows[step * batch_size : (step + 1) * batch_size].to(device)
            losses.append(_distil(student, teacher, batch, backward=True))
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            cosine.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            bar.update()
    finally:
        bar.close()
        student.eval()
        for p, flag in flags:
            p.requires_grad_(flag)
    return losses


@torch.no_grad()
def distillation_kl(student: nn.Module, teacher: nn.Module, windows: Tensor, batch_size: int = 4) -> float:
    """Mean KL(teacher ‖ student) of the next-token distributions over every position of ``windows``."""
    device = next(student.parameters()).device
    total = 0.0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        total += _distil(student, teacher, batch, backward=False) * batch.numel()
    return total / windows.numel()


def _distil(student: nn.Module, teacher: nn.Module, batch: Tensor, backward: bool) -> float:
    """KL(teacher ‖ student) averaged over the positions of ``batch``, and with ``backward`` its
    gradient. The logits are made ``_KL_ROWS`` positions at a time; each slice's loss is
    backpropagated to the final hidden states, which carry the summed gradient through the body once."""
    with torch.no_grad():
        target = decoder(teacher)(batch, use_cache=False).last_hidden_state.flatten(0, 1)
    with torch.set_grad_enabled(backward):
        hidden = decoder(student)(batch, use_cache=False).last_hidden_state.flatten(0, 1)
    cut = hidden.detach().requires_grad_(backward)
    s_head, t_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    total = 0.0
    for i in range(0, len(cut), _KL_ROWS):
        with torch.no_grad():
            t_logp = F.log_softmax(t_head(target[i : i + _KL_ROWS]).float(), -1)
        with torch.set_grad_enabled(backward):
            s_logp = F.log_softmax(s_head(cut[i : i + _KL_ROWS]).float(), -1)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum() / len(cut)
        if backward:
            kl.backward()
        total += float(kl.detach())
    if backward:
        hidden.backward(cut.grad)
    return total
