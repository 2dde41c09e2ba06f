"""Uptraining: a short distillation from the original model (teacher, frozen) into the converted one."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmlite.arch import LLAMA
from llmlite.errors import LlmliteError
from llmlite.gqa.convert import attention_layers
from llmlite.training.distill import DistillationKL, distill

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
    """Distil ``teacher`` into ``student`` over token ``windows`` ``[n, seqlen]`` (``distill``), training
    the q/k/v/o projections (``params`` "attention") or every parameter ("all"). Returns the loss of
    each step."""
    trainable = trainable_parameters(student, params)
    return distill(
        student, teacher, windows, trainable, lr, batch_size, seed, "uptrain" if progress else None
    )


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
