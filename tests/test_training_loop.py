"""The shared training loop (``training.loop``) and the distillation loss (``training.distill``):
the loop trains, calls back every step, sums micro-batches and clips; the sliced KL and its gradient
equal a float64 reference; ``finetune`` and ``uptrain`` both step through the loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny

from llmlite.training import distill, loop
from llmlite.training.loss import CausalLMLoss


def batch(model, rows: int, seq: int, seed: int) -> dict:
    ids = torch.randint(
        0, model.config.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(seed)
    )
    return {"input_ids": ids, "labels": ids, "normaliser": float(rows * (seq - 1))}


def sgd(params, lr: float = 1.0):
    optimizer = torch.optim.SGD(params, lr=lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def test_the_loop_lowers_the_loss_and_calls_back_every_step(tokenizer):
    model = make_tiny(tokenizer).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    fixed = batch(model, 2, 24, seed=0)
    seen = []
    losses = loop.train(
        CausalLMLoss(model),
        lambda s: [fixed],
        optimizer,
        scheduler,
        params,
        8,
        start=2,
        on_step=lambda step: seen.append((step.step, step.loss, step.batches[0] is fixed)),
    )
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    assert seen == [(s, loss, True) for s, loss in zip(range(3, 9), losses, strict=True)]
    assert all(p.grad is None for p in params)  # dropped after every step


def test_micro_batches_add_up_to_the_whole_batch(tokenizer):
    whole = batch(make_tiny(tokenizer), 4, 20, seed=1)
    halves = [
        {**whole, "input_ids": whole["input_ids"][i : i + 2], "labels": whole["labels"][i : i + 2]}
        for i in (0, 2)
    ]
    one, two = make_tiny(tokenizer), make_tiny(tokenizer)
    loss_one = loop.train_step(
        CausalLMLoss(one), [whole], *sgd(list(one.parameters())), list(one.parameters()), 0
    )
    loss_two = loop.train_step(
        CausalLMLoss(two), halves, *sgd(list(two.parameters())), list(two.parameters()), 0
    )
    assert loss_two == pytest.approx(loss_one, rel=1e-6)
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_gradient_norm_is_clipped(tokenizer):
    model = make_tiny(tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    loop.train_step(CausalLMLoss(model), [batch(model, 2, 16, seed=2)], *sgd(params), params, 0.25)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before, strict=True)])
    assert float(step.norm()) == pytest.approx(0.25, rel=1e-4)  # SGD, lr 1: the step is the gradient


def reference_kl(student, teacher, ids) -> torch.Tensor:
    """KL(teacher ‖ student) per position, averaged, through the whole float64 logits."""
    t = F.log_softmax(teacher(ids).logits.double(), -1)
    s = F.log_softmax(student(ids).logits.double(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


@pytest.mark.parametrize("head_trains", [False, True])
def test_sliced_kl_and_its_gradient_equal_float64(tokenizer, monkeypatch, head_trains):
    monkeypatch.setattr(distill, "KL_ROWS", 7)  # 2 × 24 positions: 7 slices, the last one short
    teacher = make_tiny(tokenizer, seed=1).requires_grad_(False)
    student = make_tiny(tokenizer, seed=2)
    student.lm_head.weight.requires_grad_(head_trains)  # tied: the embeddings train with it
    ids = torch.randint(0, student.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    kl = distill.DistillationKL(student, teacher)(ids)
    kl.backward()
    got = {n: p.grad.double() for n, p in student.named_parameters() if p.requires_grad}
    student.zero_grad()
    ref_student, ref_teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    ref = reference_kl(ref_student, ref_teacher, ids)
    ref.backward()
    assert kl.dtype == torch.float64 and kl.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ("model.embed_tokens.weight" in got) == head_trains
    for name, p in ref_student.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        assert distill.DistillationKL(student, teacher)(ids).item() == kl.item()  # no gradient, same sum


def test_finetune_and_uptrain_step_through_the_loop(tokenizer, tiny_dir, tmp_path, monkeypatch):
    from llmlite.data import load_text
    from llmlite.gqa import convert_gqa, uptrain
    from llmlite.training.train import finetune

    calls = []
    step = loop.train_step

    def spy(loss, batches, *args):
        calls.append(type(loss).__name__)
        return step(loss, batches, *args)

    monkeypatch.setattr(loop, "train_step", spy)
    teacher = make_tiny(tokenizer)
    student = copy.deepcopy(teacher)
    convert_gqa(student, 1)
    windows = torch.randint(0, teacher.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(4))
    losses = uptrain(student, teacher, windows, batch_size=2, progress=False)
    assert calls == ["DistillationKL"] * 3 == ["DistillationKL"] * len(losses)
    calls.clear()
    data = tmp_path / "text.txt"
    data.write_text(load_text("wikitext2-valid")[:8000])
    r = finetune(
        model=str(tiny_dir), data=str(data), output=str(tmp_path / "out"), max_steps=3, seqlen=32,
        batch_size=2, eval_split=0.0, compile=False, progress=False,
    )  # fmt: skip
    assert calls == ["CausalLMLoss"] * 3 and r.steps == 3
    assert all(math.isfinite(h["loss"]) for h in r.log if "loss" in h)
