"""The one perplexity routine (``llmlite.nll``): one forward pass or through a cache factory, the
same windows, tokens and sums as the cached path of ``kvcache.evaluate`` and a float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from transformers.cache_utils import DynamicCache

from llmlite import nll
from llmlite.kvcache.cache import KVSpec, kv_cache_for
from llmlite.kvcache.evaluate import cached_perplexity


def reference_nll(model, windows, prefill: int) -> float:
    """Summed NLL of ``windows[:, prefill:]`` from one float64 forward pass."""
    with torch.no_grad():
        logp = model.double()(windows).logits[:, prefill - 1 : -1].log_softmax(-1)
    model.float()
    return float(-logp.gather(-1, windows[:, prefill:, None]).sum())


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return make_tiny(tokenizer, seed=7)


@pytest.mark.parametrize("prefill", [1, 5, 40])
def test_one_pass_in_head_slices_equals_float64(tiny, monkeypatch, prefill):
    windows = torch.randint(0, tiny.config.vocab_size, (3, 70), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(nll, "HEAD_CHUNK", 16)  # several head slices per window
    got = nll.perplexity(tiny, windows, batch_size=2, progress=False, prefill=prefill)
    assert (got.windows, got.tokens, got.ctx) == (3, 3 * (70 - prefill), 70)
    assert got.nll * got.tokens == pytest.approx(reference_nll(tiny, windows, prefill), rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_through_a_float_cache_equals_one_pass(tiny, chunk):
    windows = torch.randint(0, tiny.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    seen = []
    cached = nll.perplexity(
        tiny, windows, progress=False, make_cache=DynamicCache, prefill=9, chunk=chunk, on_cache=seen.append
    )
    plain = nll.perplexity(tiny, windows, progress=False, prefill=9)
    assert cached.tokens == plain.tokens == 2 * (48 - 9)
    assert cached.nll == pytest.approx(plain.nll, abs=2e-6)
    assert [c.get_seq_length() for c in seen] == [48, 48]  # one fresh cache per window, read to the end
    batched = nll.perplexity(tiny, windows, 2, False, make_cache=DynamicCache, prefill=9, chunk=chunk)
    assert batched.nll == pytest.approx(cached.nll, abs=2e-6)


@pytest.mark.parametrize("bits", [16, 4, 2])
def test_cached_perplexity_is_the_routine_with_a_cache_factory(tiny, tokenizer, bits):
    windows = torch.randint(0, tiny.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(3))

    def make():
        return kv_cache_for(tiny, KVSpec(bits), tokenizer)

    wrapped = cached_perplexity(tiny, windows, make, 40, 7, False)
    direct = nll.perplexity(tiny, windows, progress=False, make_cache=make, prefill=40, chunk=7)
    assert (wrapped.perplexity, wrapped.nll, wrapped.tokens) == (direct.perplexity, direct.nll, direct.tokens)
    assert (wrapped.prefill, wrapped.chunk, wrapped.ctx) == (40, 7, 96) and wrapped.cache_bytes > 0
    exact = reference_nll(tiny, windows, 40) / wrapped.tokens  # what a lossless cache would give
    assert abs(wrapped.nll - exact) < (2e-3 if bits == 16 else 0.2)
    assert (abs(wrapped.nll - exact) < 1e-3) == (bits == 16)  # quantized keys and values do cost


def test_prefill_out_of_range(tiny):
    windows = torch.zeros(1, 10, dtype=torch.long)
    for prefill in (0, 10):
        with pytest.raises(ValueError, match=r"prefill must be in \[1, 10\)"):
            nll.perplexity(tiny, windows, progress=False, prefill=prefill)
