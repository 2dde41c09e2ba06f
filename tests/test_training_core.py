"""The pure parts of fine-tuning: the chunked loss against a float64 reference, the data
formatting (packing, response-only labels), the quantized layer's backward, target discovery."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from llmlite.errors import LlmliteError
from llmlite.quant.linear import QuantLinear
from llmlite.quant.rtn import rtn
from llmlite.training.adapters import add_adapters, target_modules
from llmlite.training.data import (
    collate,
    epoch_batches,
    epoch_order,
    instruction_example,
    load_examples,
    pack_text,
    split,
)
from llmlite.training.loss import IGNORE, linear_cross_entropy, shift_targets


def _reference(h, w, t, normaliser):
    """float64 cross-entropy written out: logsumexp of the logits minus the target logit."""
    logits = h.double() @ w.double().T
    keep = t != IGNORE
    lse = torch.logsumexp(logits[keep], dim=-1)
    return (lse - logits[keep].gather(1, t[keep, None]).squeeze(1)).sum() / normaliser


@pytest.mark.parametrize("rows,chunk", [(1, 4), (37, 8), (64, 64), (50, 1024)])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("factor", [1.0, 2.5])  # loss.backward() hands the saved gradients over as they are
def test_linear_cross_entropy_matches_float64(rows, chunk, train_head, factor):
    g = torch.Generator().manual_seed(rows * 7 + chunk)
    d, vocab = 24, 97
    h = torch.randn(rows, d, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(vocab, d, generator=g).mul_(0.3).requires_grad_(train_head)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[torch.rand(rows, generator=g) < 0.3] = IGNORE
    t[0] = 5  # at least one target counts
    normaliser = 3.0 + rows
    loss = linear_cross_entropy(h, w, t, normaliser, chunk=chunk)
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_(train_head)
    ref = _reference(h64, w64, t, normaliser)
    (loss * factor).backward()
    (ref * factor).backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1, abs(ref.item()))
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-6, rtol=1e-4)
    if train_head:
        torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-6, rtol=1e-4)
    else:
        assert w.grad is None


def test_linear_cross_entropy_bfloat16_chunks_match_float_logits():
    # lower-precision logits are copied into the float32 buffer that every chunk reuses
    h = torch.randn(37, 24, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(97, 24) * 0.3).bfloat16()
    t = torch.randint(0, 97, (37,))
    loss = linear_cross_entropy(h, w, t, 37.0, chunk=8)
    loss.backward()
    h32 = h.detach().float().requires_grad_()
    expected = F.cross_entropy((h32.bfloat16() @ w.T).float(), t)
    expected.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    assert abs(loss.item() - expected.item()) < 1e-5 * expected.item()
    torch.testing.assert_close(h.grad.float(), h32.grad, atol=2e-3, rtol=2e-2)


def test_linear_cross_entropy_default_normaliser_and_all_ignored():
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(11, 8)
    t = torch.randint(0, 11, (2, 5))
    expected = F.cross_entropy((h @ w.T).flatten(0, 1), t.flatten())
    assert torch.allclose(linear_cross_entropy(h, w, t), expected, atol=1e-5)
    empty = linear_cross_entropy(h, w, torch.full((2, 5), IGNORE))
    empty.backward()
    assert empty.item() == 0 and torch.all(h.grad == 0)


def test_shift_targets():
    labels = torch.tensor([[1, 2, 3], [4, IGNORE, 6]])
    assert shift_targets(labels).tolist() == [[2, 3, IGNORE], [IGNORE, 6, IGNORE]]


def test_pack_text_cuts_fixed_sequences(tokenizer):
    text = " ".join(f"word{i}" for i in range(300))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    examples = pack_text(text, tokenizer, 50)
    assert len(examples) == len(ids) // 50
    assert [t for e in examples for t in e.input_ids] == ids[: 50 * len(examples)]
    assert all(e.labels == e.input_ids for e in examples)
    with pytest.raises(LlmliteError, match="no usable rows"):
        pack_text("too short", tokenizer, 50)


def test_instruction_labels_cover_the_response_only(tokenizer):
    e = instruction_example({"prompt": "Name a colour.", "response": "Blue is one."}, tokenizer, 512, "row 1")
    learned = [t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab != IGNORE]
    assert tokenizer.decode(learned) == "Blue is one.<|im_end|>\n"
    prompt_part = tokenizer.decode([t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab == IGNORE])
    assert "Name a colour." in prompt_part and "Blue" not in prompt_part


def test_multi_turn_messages_learn_every_assistant_turn(tokenizer):
    row = {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"},
    ]}  # fmt: skip
    e = instruction_example(row, tokenizer, 512, "row 1")
    learned = tokenizer.decode([t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab != IGNORE])
    assert learned == "Hello!<|im_end|>\nGoodbye!<|im_end|>\n"
    full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert tokenizer.decode(e.input_ids) == full


def test_no_chat_template_falls_back_to_prompt_newline_response(tokenizer):
    plain = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    e = instruction_example({"prompt": "2+2=", "response": "4"}, plain, 512, "row 1")
    assert plain.decode(e.input_ids) == "2+2=\n4" + plain.eos_token
    assert plain.decode([t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab != IGNORE]) == (
        "4" + plain.eos_token
    )


def test_instruction_file_errors(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(LlmliteError, match=r"line 2 has no response field"):
        load_examples(str(bad), tokenizer, 64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LlmliteError, match="no usable rows"):
        load_examples(str(empty), tokenizer, 64)
    cut = tmp_path / "cut.jsonl"
    cut.write_text(json.dumps({"prompt": "long " * 200, "response": "x"}) + "\n")
    with pytest.raises(LlmliteError, match="no usable rows"):
        load_examples(str(cut), tokenizer, 16)
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "plain " * 100}) + "\n")
    assert load_examples(str(text), tokenizer, 16)[1] == "text"
    with pytest.raises(LlmliteError, match="not instruction data"):
        load_examples(str(text), tokenizer, 16, "instruction")


def test_collate_pads_right_and_split_is_seeded():
    from llmlite.training.data import Example

    batch = collate([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["lengths"].tolist() == [3, 1]
    examples = [Example([i], [i]) for i in range(40)]
    train, held = split(examples, 0.1, seed=3)
    assert len(held) == 4 and len(train) == 36
    assert split(examples, 0.1, seed=3)[1] == held
    assert {e.input_ids[0] for e in train} | {e.input_ids[0] for e in held} == set(range(40))
    assert sorted(epoch_order(10, 1, 2)) == list(range(10))
    assert epoch_order(10, 1, 2) == epoch_order(10, 1, 2) != epoch_order(10, 1, 3)


def test_padding_after_a_row_does_not_change_its_loss(tiny_dir):
    """Right padding without an attention mask: the padded row's loss equals the unpadded one's."""
    from transformers import AutoModelForCausalLM

    from llmlite.training.data import Example
    from llmlite.training.train import CausalLMLoss

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    short = Example([5, 9, 13, 17], [IGNORE, 9, 13, 17])
    longer = Example(list(range(30, 42)), list(range(30, 42)))
    loss = CausalLMLoss(model)
    assert loss.fused
    with torch.no_grad():
        alone = collate([short], 0)
        padded = collate([short, longer], 0)
        a = loss(alone["input_ids"], alone["labels"], 1.0)
        logits = model(padded["input_ids"]).logits[0, :3].double()
        ref = F.cross_entropy(logits, torch.tensor([9, 13, 17]), reduction="sum")
    assert abs(a.item() - ref.item()) < 1e-4
    loss.fused = False  # the path through the model's logits (heads with a bias or soft-capping)
    with torch.no_grad():
        b = loss(alone["input_ids"], alone["labels"], 1.0)
    assert abs(b.item() - ref.item()) < 1e-4


@pytest.mark.parametrize(("lead", "with_bias"), [((3, 5), False), ((1,), True), ((0,), True)])
def test_quant_linear_backward_matches_dequantized_float64(lead, with_bias):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 70, generator=g)
    bias = torch.randn(40, generator=g) if with_bias else None
    layer = QuantLinear.from_weight(rtn(w, 4, 32, sym=False), bias, group_size=32)
    x = torch.randn(*lead, 70, generator=g, requires_grad=True)
    y = layer(x)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    w_hat = layer.dequantize(torch.float64)
    assert torch.equal(layer.dequantize_in_out(torch.float64), w_hat.T)
    x64 = x.detach().double().requires_grad_()
    y64 = x64 @ w_hat.T + (0 if bias is None else layer.bias.double())
    y64.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.detach().double(), y64.detach(), atol=1e-5, rtol=1e-5)


def test_target_modules_llama_gpt2_and_errors(tiny_dir):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert target_modules(llama, None) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert target_modules(llama, ["q_proj"]) == ["q_proj"]
    with pytest.raises(LlmliteError, match=r"no module named qq_proj .*may name: down_proj, gate_proj"):
        target_modules(llama, ["qq_proj"])
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    assert target_modules(gpt2, None) == ["c_attn", "c_proj", "c_fc"]
    peft_gpt2 = add_adapters(gpt2, "lora", ["c_attn", "c_proj", "c_fc"], 4, 8, 0.0, False, False)
    x = torch.randint(0, 100, (2, 10))
    from llmlite.training.train import CausalLMLoss

    loss = CausalLMLoss(peft_gpt2)(x, x, 18.0)
    loss.backward()
    grads = {n for n, p in peft_gpt2.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    ref = peft_gpt2(input_ids=x, labels=x).loss
    assert abs(loss.item() - ref.item()) < 1e-5

    class NoProjections(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weird = torch.nn.Linear(2, 2)

    with pytest.raises(LlmliteError, match=r"cannot find attention/MLP projections.*weird"):
        target_modules(NoProjections(), None)


@pytest.mark.parametrize("group", [False, True])
def test_epoch_batches_cover_every_example_once(group):
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 300, (1003,), generator=g).tolist()
    batches = epoch_batches(lengths, 4, seed=2, epoch=1, group=group)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert all(len(b) == 4 for b in batches[:-1] if not group) and len(batches) == 251
    assert batches == epoch_batches(lengths, 4, seed=2, epoch=1, group=group)
    padding = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    plain = epoch_batches(lengths, 4, seed=2, epoch=1, group=False)
    plain_padding = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in plain)
    assert (padding < plain_padding / 5) if group else padding == plain_padding


def test_gradient_checkpointing_is_switched_on(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = add_adapters(
        AutoModelForCausalLM.from_pretrained(tiny_dir), "lora", ["q_proj"], 4, 8, 0.0, False, True
    )
    base = model.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    assert base.config.use_cache is False
