"""Distillation: the loss KL(teacher ‖ student) of the next-token distributions, and ``distill``, the
short loop that trains a student on it (GQA uptraining, recovery after structured pruning). The
teacher lives in the loss, so the training loop sees one loss like any other.

The logits are made ``KL_ROWS`` positions at a time: each slice's KL and its gradient (to the
student's final hidden states and to its head's trainable parameters) are computed and the slice's
logits freed before the next, so a ``[positions × vocab]`` tensor never exists; the backward pass
only scales the saved gradients and carries them through the student's body once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlite.training.loop import train

KL_ROWS = 1024  # positions per lm_head slice


def _kl_slices(
    hidden: Tensor,
    target: Tensor,
    s_head: nn.Module,
    t_head: nn.Module,
    params: tuple[Tensor, ...],
    grad: bool,
) -> tuple[float, Tensor | None, list[Tensor | None]]:
    """``Σ_slices Σ_pos Σ_v p_t (log p_t − log p_s) / n`` for student/teacher hidden states ``[n, d]``,
    with (``grad``) its gradient to ``hidden`` ``[n, d]`` and to ``params`` (the student head's)."""
    n = len(hidden)
    grad_h = torch.empty_like(hidden) if grad else None
    grad_p: list[Tensor | None] = [None] * len(params)
    total = 0.0
    for i in range(0, n, KL_ROWS):
        with torch.no_grad():
            t_logp = F.log_softmax(t_head(target[i : i + KL_ROWS]).float(), -1)
        piece = hidden[i : i + KL_ROWS].detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            s_logp = F.log_softmax(s_head(piece).float(), -1)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum() / n
        if grad:
            g_h, *g_p = torch.autograd.grad(kl, [piece, *params])
            grad_h[i : i + KL_ROWS] = g_h
            grad_p = [g if acc is None else acc + g for acc, g in zip(grad_p, g_p, strict=True)]
        total += float(kl.detach())
    return total, grad_h, grad_p


class _SlicedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, target: Tensor, s_head: nn.Module, t_head: nn.Module, *params: Tensor):
        total, grad_h, grad_p = _kl_slices(hidden, target, s_head, t_head, params, grad=True)
        ctx.save_for_backward(grad_h, *grad_p)
        return hidden.new_tensor(total, dtype=torch.float64)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        one = bool(grad_out == 1)  # loss.backward(): the saved gradients as they are
        grads = [g if one else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], None, None, None, *grads[1:]


def sliced_kl(hidden: Tensor, target: Tensor, s_head: nn.Module, t_head: nn.Module) -> Tensor:
    """Mean over the ``n`` positions of KL(p_t ‖ p_s), ``p = softmax(head(h))``, temperature 1, for the
    student's and the teacher's final hidden states ``[n, d]``: a float64 scalar, differentiable to
    ``hidden`` and to the student head's trainable parameters."""
    params = tuple(p for p in s_head.parameters() if p.requires_grad)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or params):
        total = _kl_slices(hidden, target, s_head, t_head, (), grad=False)[0]
        return hidden.new_tensor(total, dtype=torch.float64)
    return _SlicedKL.apply(hidden, target, s_head, t_head, *params)


def _decoder(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


class DistillationKL:
    """``loss(input_ids)`` for token ids ``[b, seq]``: KL(teacher ‖ student) of the next-token
    distributions at every position, temperature 1, unscaled, averaged over the ``b × seq``
    positions (``sliced_kl``). The teacher runs without gradients; set its mode yourself (eval)."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        self.student, self.teacher = student, teacher

    def __call__(self, input_ids: Tensor) -> Tensor:
        with torch.no_grad():
            target = _decoder(self.teacher)(input_ids, use_cache=False).last_hidden_state.flatten(0, 1)
        hidden = _decoder(self.student)(input_ids, use_cache=False).last_hidden_state.flatten(0, 1)
        heads = self.student.get_output_embeddings(), self.teacher.get_output_embeddings()
        return sliced_kl(hidden, target, *heads)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    windows: Tensor,
    trainable: list[nn.Parameter],
    lr: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
    desc: str | None = "distill",
) -> list[float]:
    """Distil ``teacher`` into ``student`` over token ``windows`` ``[n, seqlen]``, one pass in order,
    training only ``trainable`` (parameters of ``student``).

    Loss: KL(teacher ‖ student) of the next-token distributions at every position, temperature 1,
    unscaled, averaged over positions (``DistillationKL``). AdamW (no weight decay), cosine decay
    from ``lr`` to 0, no warm-up, gradient norm clipped to 1, through the shared training loop;
    ``desc``: the progress bar's label (``None``: no bar). Returns the loss of each step;
    ``student`` ends in eval mode with its ``requires_grad`` flags restored.
    """
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
            desc=desc,
            on_step=lambda s: {"kl": f"{s.loss:.4f}"},
        )
    finally:
        student.eval()
        for p, flag in flags:
            p.requires_grad_(flag)


def distill_record(windows: Tensor, losses: list[float], lr: float, batch_size: int, seconds: float) -> dict:
    """What a ``distill`` run did, for a run record: tokens, steps, settings, the loss curve."""
    tenth = max(1, len(losses) // 10)
    return {
        "tokens": windows.numel(),
        "windows": len(windows),
        "seqlen": windows.shape[1],
        "batch_size": batch_size,
        "steps": len(losses),
        "lr": lr,
        "optimizer": "AdamW, no weight decay, cosine to 0, no warm-up, gradient norm 1",
        "loss": "KL(teacher || student) of the next-token distributions, temperature 1",
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first_tenth": sum(losses[:tenth]) / tenth,
        "loss_last_tenth": sum(losses[-tenth:]) / tenth,
        "losses": [round(x, 5) for x in losses],
        "seconds": round(seconds, 2),
    }
