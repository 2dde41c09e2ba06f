"""Uptraining: a short distillation from the original model (teacher, frozen) into the converted one."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from llmlite.arch import LLAMA
from llmlite.errors import LlmliteError
from llmlite.gqa.convert import attention_layers
from llmlite.training.distill import DistillationKL
from llmlite.training.loop import train

UPTRAIN_PARAMS = ("attention", "all")


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
    unscaled, averaged over positions (``DistillationKL``). AdamW (no weight decay), cosine decay
    from ``lr`` to 0, no warm-up, gradient norm clipped to 1, through the shared training loop.
    ``params``: "attention" trains q/k/v/o only, "all" every parameter. Returns the loss of each
    step; ``student`` ends in eval mode with its flags restored.
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

    def batches(step: int) -> list[dict]:
        return [{"input_ids": windows[step * batch_size : (step + 1) * batch_size].to(device)}]

    student.train()
    try:
        return train(
            DistillationKL(student, teacher),
            batches,
            optimizer,
            cosine,
            trainable,
            steps,
            max_grad_norm=1.0,
            desc="uptrain" if progress else None,
            on_step=lambda s: {"kl": f"{s.loss:.4f}"},
        )
    finally:
        student.eval()
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def distillation_kl(student: nn.Module, teacher: nn.Module, windows: Tensor, batch_size: int = 4) -> float:
    """Mean KL(teacher ‖ student) of the next-token distributions over every position of ``windows``."""
    device = next(student.parameters()).device
    loss = DistillationKL(student, teacher)
    total = 0.0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        total += float(loss(batch)) * batch.numel()
    return total / windows.numel()
