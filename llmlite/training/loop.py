"""The training loop every trainer shares (``finetune``, GQA uptraining, and later distillation).

A *loss* is any callable that takes one micro-batch's tensors as keyword arguments and returns the
scalar to minimise; what is trained, and against what (labels, or a teacher held by the loss), is
the loss's business, never the loop's. The loop backpropagates each micro-batch, clips the gradient
norm, steps the optimizer and the schedule, drops the gradients, shows a progress bar and calls back
after every step. A *backend* does the backward pass, the gradient clipping and the skipping of the
gradient sync between micro-batches: ``LOCAL`` for one process, accelerate's ``Accelerator`` for
DDP/FSDP (it has the same three methods).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

Batch = dict[str, Any]  # one micro-batch: the loss's keyword arguments


class Loss(Protocol):
    def __call__(self, **batch: Any) -> Tensor: ...


class Backend(Protocol):
    def backward(self, loss: Tensor) -> None: ...

    def no_sync(self, module: Any) -> AbstractContextManager: ...

    def clip_grad_norm_(self, params: list[Tensor], max_norm: float) -> Any: ...


class Local:
    """The backend of a single process: ``loss.backward()``, no gradient sync to skip, torch's
    gradient-norm clipping."""

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def no_sync(self, module: Any) -> AbstractContextManager:
        return nullcontext()

    def clip_grad_norm_(self, params: list[Tensor], max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


LOCAL = Local()


@dataclass
class Step:
    """What the loop hands its callback after an optimizer step."""

    step: int  # optimizer steps done, this one included
    loss: float  # summed over the step's micro-batches
    batches: Sequence[Batch]  # the micro-batches it trained on


def train_step(
    loss: Loss,
    batches: Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: list[Tensor],
    max_grad_norm: float = 1.0,
    backend: Backend = LOCAL,
) -> float:
    """One optimizer step: ``g = Σ_j ∇ loss(**batches[j])``, each micro-batch backpropagated as it
    is made (the gradient sync skipped on all but the last); ``g`` scaled to norm ``max_grad_norm``
    where it is larger (0: no clipping); optimizer, then schedule, stepped; gradients dropped.
    Returns ``Σ_j loss(**batches[j])``. Scale each loss as the step should see it (e.g. divide by
    the tokens of the whole step): the loop adds, it never averages."""
    total = 0.0
    for j, batch in enumerate(batches):
        with nullcontext() if j == len(batches) - 1 else backend.no_sync(loss):
            value = loss(**batch)
            backend.backward(value)
        total += value.item()
    if max_grad_norm > 0:
        backend.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def train(
    loss: Loss,
    batches: Callable[[int], Sequence[Batch]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: list[Tensor],
    steps: int,
    *,
    start: int = 0,
    max_grad_norm: float = 1.0,
    backend: Backend = LOCAL,
    desc: str | None = None,
    on_step: Callable[[Step], dict | None] | None = None,
) -> list[float]:
    """Steps ``start`` .. ``steps − 1``, step ``s`` on the micro-batches ``batches(s)`` (see
    ``train_step``). ``on_step`` runs after each step and may return the progress bar's postfix;
    ``desc``: the bar's label (``None``: no bar). Returns each step's loss."""
    bar = None
    if desc is not None:
        bar = tqdm(total=steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)
    losses: list[float] = []
    try:
        for s in range(start, steps):
            micro = batches(s)
            losses.append(train_step(loss, micro, optimizer, scheduler, params, max_grad_norm, backend))
            postfix = on_step(Step(s + 1, losses[-1], micro)) if on_step is not None else None
            if bar is not None:
                if postfix:
                    bar.set_postfix(postfix)
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return losses
