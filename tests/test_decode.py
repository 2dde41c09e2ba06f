"""The lean decode loop (``llmlite.decode``) against transformers' own ``generate`` and forward pass
on the same model: identical greedy tokens and logits, for float and 4-bit layers, batch 1 and 2,
one-token prompts; the sampling rule; and the models it hands back to transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from llmlite.decode import StaticCache, decode, forward, unsupported
from llmlite.kvcache.generate import next_token
from llmlite.quant.driver import QuantSettings, quantize_model

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def greedy(model, ids, n, compile=False):
    return torch.cat(list(decode(model, ids, n, lambda logits: logits.argmax(-1), compile=compile)), 1)


def reference(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("batch,prompt", [(1, 1), (1, 9), (2, 5)])
def test_lean_loop_reproduces_transformers_greedy(tokenizer, batch, prompt):
    model = make_tiny(tokenizer)
    model.generation_config.do_sample = False
    ids = torch.randint(0, len(tokenizer), (batch, prompt), generator=torch.Generator().manual_seed(prompt))
    assert torch.equal(greedy(model, ids, 12), reference(model, ids, 12))


def test_lean_forward_matches_the_models_logits(tokenizer):
    model = make_tiny(tokenizer, seed=3)
    ids = torch.randint(0, len(tokenizer), (2, 7))
    cache = StaticCache.allocate(model, 2, 10)
    with torch.no_grad():
        want = model(ids).logits
        got = forward(model, ids[:, :4], cache, torch.arange(4))  # a prefill, then one token at a time
        torch.testing.assert_close(got, want[:, 3], rtol=1e-5, atol=1e-5)
        for t in range(4, 7):
            got = forward(model, ids[:, t : t + 1], cache, torch.tensor([t]))
            torch.testing.assert_close(got, want[:, t], rtol=1e-5, atol=1e-5)


def test_lean_loop_on_quantized_layers(tokenizer):
    """4-bit layers on the ``auto`` backend: the same layers under transformers and the lean loop."""
    model = make_tiny(tokenizer, seed=1)
    model.generation_config.do_sample = False
    quantize_model(model, QuantSettings("rtn", 4, 32), None, progress=False)
    ids = torch.randint(0, len(tokenizer), (1, 6))
    assert torch.equal(greedy(model, ids, 10), reference(model, ids, 10))


def test_stop_ends_the_loop_early(tokenizer):
    model = make_tiny(tokenizer)
    ids = torch.randint(0, len(tokenizer), (1, 3))
    first = greedy(model, ids, 1)
    out = list(
        decode(model, ids, 20, lambda logits: logits.argmax(-1), stop=lambda t: bool((t == first).all()))
    )
    assert len(out) == 1 and torch.equal(out[0], first)


def test_unsupported_layouts_are_named():
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, head_dim=16, **TINY))
    assert "qwen3" in unsupported(qwen3, 8)
    windowed = LlamaForCausalLM(LlamaConfig(vocab_size=64, **TINY))
    windowed.config.model_type, windowed.config.sliding_window = "mistral", 16
    assert "sliding window" in unsupported(windowed, 32) and unsupported(windowed, 16) is None


def test_next_token_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0], [1.0, 0.0, 0.0, 0.0]])
    assert next_token(logits).tolist() == [1, 0]
    torch.manual_seed(0)
    draws = torch.stack([next_token(logits, temperature=1.0, top_p=0.9) for _ in range(200)])  # 0.51 + 0.46
    assert set(draws[:, 0].tolist()) == {1, 2} and set(draws[:, 1].tolist()) <= {0, 1, 2, 3}
    assert set(torch.stack([next_token(logits, 1.0, 1e-6) for _ in range(20)])[:, 0].tolist()) == {1}


@pytest.mark.slow
def test_compiled_step_gives_the_eager_tokens(tokenizer):
    model = make_tiny(tokenizer, seed=2)
    ids = torch.randint(0, len(tokenizer), (1, 4))
    assert torch.equal(greedy(model, ids, 8, compile=True), greedy(model, ids, 8))
