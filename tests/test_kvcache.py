"""The quantized KV cache: its pure core against a float64 reference written here, the cache inside
real transformers models (decoding, generate, beam search) and its memory accounting."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny
from transformers import DynamicCache

from llmlite.kvcache.cache import KVSpec, QuantizedKVCache, QuantizedKVLayer, kv_cache_for
from llmlite.kvcache.evaluate import cached_perplexity, float16_cache_bytes
from llmlite.kvcache.quant import APPEND_CHUNK, append, dequantize, pack, quantize, unpack


def reference(x: torch.Tensor, bits: int, group: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values in float64, one group at a time, by explicit loops."""
    x = x.double()
    xt = x.transpose(-1, -2) if axis == -2 else x
    flat = xt.reshape(-1, xt.shape[-1])
    codes = torch.empty_like(flat)
    out = torch.empty_like(flat)
    qmax = 2**bits - 1
    for r in range(flat.shape[0]):
        for start in range(0, flat.shape[1], group):
            g = flat[r, start : start + group]
            lo, hi = float(g.min()), float(g.max())
            scale = (hi - lo) / qmax
            c = torch.zeros_like(g) if scale == 0 else torch.clamp(torch.round((g - lo) / scale), 0, qmax)
            codes[r, start : start + group] = c
            out[r, start : start + group] = c * scale + lo
    codes, out = codes.view(xt.shape), out.view(xt.shape)
    if axis == -2:
        codes, out = codes.transpose(-1, -2), out.transpose(-1, -2)
    return codes, out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [1, 5, 16, 64])
@pytest.mark.parametrize("axis", [-2, -1])
@pytest.mark.parametrize("whole", [False, True])
def test_quantize_matches_float64_reference(bits, group, axis, whole):
    g = torch.Generator().manual_seed(bits * 100 + group * 3 - axis)
    tokens, channels = (37, 24) if axis == -2 else (9, 50)  # neither a multiple of the groups
    if whole:  # whole groups, bytes filled: dequantize's direct path (where the group allows it)
        tokens, channels = (64, 32) if axis == -2 else (9, 64)
    x = torch.randn(2, 3, tokens, channels, generator=g, dtype=torch.float64) * 3 + 1
    x[0, 0, :, 0] = 2.5  # a constant group: scale 0
    q = quantize(x, bits, group, axis, torch.float64)
    codes, expected = reference(x, bits, group, axis)
    assert torch.equal(unpack(q.codes, bits, channels).double(), codes)
    torch.testing.assert_close(dequantize(q, torch.float64), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_float32_error_is_within_half_a_step(bits):
    x = torch.randn(1, 2, 70, 64) * torch.linspace(0.1, 10, 64)  # channels of very different ranges
    for axis in (-2, -1):
        q = quantize(x, bits, 32, axis, torch.float32)
        _, expected = reference(x, bits, 32, axis)
        step = (x.abs().max() * 2) / (2**bits - 1)
        assert (dequantize(q) - x).abs().max() <= step / 2 * 1.001
        # float32 arithmetic may round a value sitting on a half step the other way: rare
        off = (dequantize(q).double() - expected).abs() > 1e-4
        assert off.float().mean() < 0.005


def test_pack_hand_computed_words():
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack(torch.tensor([3, 10, 15]), 4).tolist() == [3 | 10 << 4, 15]  # padded with a zero code
    assert pack(torch.tensor([200, 7]), 8).tolist() == [200, 7]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("channels", [1, 3, 64, 67])
def test_pack_round_trip(bits, channels):
    codes = torch.randint(0, 2**bits, (2, 5, channels), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == math.ceil(channels * bits / 8)
    assert torch.equal(unpack(packed, bits, channels), codes)


@pytest.mark.parametrize("axis,group", [(-1, 32), (-2, 8)])
def test_append_equals_concatenation_and_keeps_earlier_views(axis, group):
    """Blocks appended into buffers with room (``quant.append``) read back as ``torch.cat`` of
    them, for values (per token) and keys (whole token groups), batch 2 and 3 heads; the views
    handed out earlier keep their data, and storage is reallocated only when the room runs out."""
    gen = torch.Generator().manual_seed(abs(axis) * 100 + group)
    step = group if axis == -2 else 1
    sizes = [step * n for n in (3, 1, 1, 5, 1, 40, 2, 1)]
    blocks = [quantize(torch.randn(2, 3, n, 48, generator=gen), 4, group, axis) for n in sizes]
    q, seen, moves = None, [], 0
    for block in blocks:
        before = None if q is None else q.codes.untyped_storage().data_ptr()
        q = append(q, block)
        moves += before is not None and q.codes.untyped_storage().data_ptr() != before
        seen.append((q, [t.clone() for t in q.tensors()]))
    for name in ("codes", "scale", "minimum"):
        assert torch.equal(getattr(q, name), torch.cat([getattr(b, name) for b in blocks], -2)), name
    for view, copies in seen:
        assert all(torch.equal(t, c) for t, c in zip(view.tensors(), copies, strict=True))
    tokens = sum(sizes)
    assert q.tokens == tokens and 1 <= moves < len(blocks)
    assert torch.equal(dequantize(q), torch.cat([dequantize(b) for b in blocks], -2))


def test_rope_is_undone_and_redone_exactly():
    layer = QuantizedKVLayer(KVSpec(16), inv_freq=1 / 10000 ** (torch.arange(0, 64, 2).double() / 64))
    keys = torch.randn(1, 2, 40, 64, dtype=torch.float64)
    there = layer._rotate(keys, 7, inverse=True)
    assert not torch.allclose(there, keys)
    # the angles are float32, the same both ways: cos² + sin² is 1 to float32 rounding
    torch.testing.assert_close(layer._rotate(there, 7), keys, rtol=0, atol=1e-6)


def test_rotation_matches_float64_rope():
    """The cache's RoPE (cosine/sine table, four half-width passes) against the formula in float64."""
    inv_freq = 1 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    layer = QuantizedKVLayer(KVSpec(16), inv_freq=inv_freq)
    keys = torch.randn(2, 3, 50, 64)
    positions = torch.arange(300, 350, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq.double()).repeat(1, 2)
    turned = torch.cat([-keys[..., 32:], keys[..., :32]], -1).double()
    expected = keys.double() * angles.cos() + turned * angles.sin()
    layer._rotate(keys, 0)  # a table shorter than the positions asked next: it grows
    got = layer._rotate(keys, 300)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-4)  # float32 angles near 350 rad
    back = layer._rotate(got, 300, inverse=True)
    torch.testing.assert_close(back, keys, rtol=0, atol=1e-5)


def _updates(cache, lengths, heads=2, dim=16, dtype=torch.float32):
    states = torch.randn(1, heads, sum(lengths), dim, dtype=dtype)
    start = 0
    for n in lengths:
        cache.update(states[:, :, start : start + n], states[:, :, start : start + n] * 2, 0)
        start += n
    return states


def test_layout_residual_sinks_and_exact_bytes():
    cache = QuantizedKVCache(bits=4, group_size=8, residual=5, sinks=3)
    _updates(cache, [10, 1, 1, 7, 20, 1])  # 40 tokens
    layer = cache.layers[0]
    assert layer.sink_keys.shape[-2] == 3 and layer.recent_values.shape[-2] == 5
    assert 5 <= layer.recent_keys.shape[-2] < 5 + 8  # keys leave in whole groups
    quantized_keys = 40 - 3 - layer.recent_keys.shape[-2]
    assert layer.quant_keys.tokens == quantized_keys and quantized_keys % 8 == 0
    assert layer.quant_values.tokens == 40 - 3 - 5
    # bytes by hand: float16 full-precision tokens; 4-bit codes; a float16 scale and minimum per
    # group; the quantized parts grew by appends into buffers with room for APPEND_CHUNK tokens
    fp_tokens = 3 + 3 + layer.recent_keys.shape[-2] + 5
    # each growth leaves room for min(chunk, size // 8) more rows: values 2 -> 3 -> 4 -> 11 (+1) -> 31
    # (+3, holds 32); key codes 8 -> 24 (+3) -> 32 (+4); key groups 1 -> 3 -> 4
    rows, key_rows, groups = 34, 36, 4
    assert APPEND_CHUNK == 64
    codes = key_rows * 2 * 16 // 2 + rows * 2 * 16 // 2
    stats = 2 * 2 * (groups * 2 * 16 + rows * math.ceil(2 * 16 / 8))
    expected = fp_tokens * 2 * 16 * 2 + codes + stats
    memory = cache.memory()
    assert memory["bytes"] == expected == layer.nbytes()
    assert memory["float16_bytes"] == 2 * 40 * 2 * 16 * 2
    assert memory["tokens"] == 40


def test_read_back_is_the_stored_data():
    cache = QuantizedKVCache(bits=8, group_size=4, residual=2, sinks=1, storage_dtype=torch.float32)
    states = _updates(cache, [9, 1, 3])
    keys, values = cache.layers[0]._read(states[..., :0, :], states[..., :0, :])
    assert torch.equal(keys[..., :1, :], states[..., :1, :])  # the sink, exact
    assert torch.equal(keys[..., -2:, :], states[..., -2:, :])  # the residual, exact
    step = (states.max() - states.min()) / 255
    assert (keys - states).abs().max() <= step
    assert (values - 2 * states).abs().max() <= 2 * step


@pytest.fixture(scope="module")
def bundled(bundled_dir):
    from llmlite.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def text_ids(bundled):
    from llmlite.data import load_text, tokenize

    return tokenize(bundled[1], load_text("wikitext2"))


@torch.no_grad()
def test_8bit_cache_decoding_matches_full_precision(bundled, text_ids):
    """Token-by-token decoding through an 8-bit cache (residual 0, no sinks) against one full
    forward pass. The tolerance: an 8-bit group's step is 1/255 of its range, so keys and values
    carry ~0.1% errors; measured KL is ~2e-5 nats per token on average, ~4e-4 at worst."""
    model, _ = bundled
    ids = text_ids[:160][None]
    full = model(ids).logits.double().log_softmax(-1)
    cache = kv_cache_for(model, KVSpec(8, 64, 0, 0))
    out = [model(ids[:, :32], cache=cache).logits]
    out += [model(ids[:, i : i + 1], cache=cache).logits for i in range(32, 160)]
    cached = torch.cat(out, 1).double().log_softmax(-1)
    kl = (full.exp() * (full - cached)).sum(-1)
    assert kl.mean() < 2e-4 and kl.max() < 5e-3
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() >= 0.98
    assert cache.layers[0].quant_keys.tokens == 128  # the cache really was quantized


@torch.no_grad()
def test_16bit_cache_perplexity_equals_one_forward_pass(tokenizer):
    model = make_tiny(tokenizer, seed=3)
    windows = torch.randint(0, len(tokenizer), (2, 96))
    prefill = 40
    result = cached_perplexity(model, windows, lambda: kv_cache_for(model, KVSpec(16)), prefill, 7, False)
    logits = model(windows).logits.double()[:, prefill - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, prefill:].flatten())
    assert result.tokens == 2 * (96 - prefill)
    assert abs(result.nll - float(nll)) < 1e-3  # float16 storage of keys and values
    assert result.ratio_to_float16 == pytest.approx(1.0)
    assert result.float16_bytes == float16_cache_bytes(model.config, 96)


@torch.no_grad()
def test_quantized_cache_perplexity_orders_by_bits(tokenizer):
    model = make_tiny(tokenizer, seed=4)
    windows = torch.randint(0, len(tokenizer), (1, 128))

    def ppl(bits):
        spec = KVSpec(bits, 16, 4, 0)
        return cached_perplexity(model, windows, lambda: kv_cache_for(model, spec), 64, 16, False)

    full, eight, two = ppl(16), ppl(8), ppl(2)
    assert abs(eight.nll - full.nll) < abs(two.nll - full.nll)
    assert two.ratio_to_float16 > eight.ratio_to_float16 > 1


@torch.no_grad()
def test_generate_with_the_cache(bundled):
    model, tok = bundled
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    plain = model.generate(ids, **kw)
    same = model.generate(ids, cache=kv_cache_for(model, KVSpec(16)), **kw)
    assert torch.equal(plain, same)
    cache = kv_cache_for(model, KVSpec(4, 8, 4, 2))
    quantized = model.generate(ids, cache=cache, **kw)
    assert quantized.shape == plain.shape and cache.get_seq_length() == plain.shape[1] - 1
    assert cache.layers[0].quant_keys is not None


@torch.no_grad()
def test_beam_search_and_batches(tokenizer):
    model = make_tiny(tokenizer, seed=5)
    ids = torch.randint(0, len(tokenizer), (2, 80))  # long enough for the salient scheme's fit
    kw = dict(
        max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids)
    )
    plain = model.generate(ids, cache=DynamicCache(), **kw)
    ours = model.generate(ids, cache=kv_cache_for(model, KVSpec(16)), **kw)
    assert torch.equal(plain, ours)
    for spec in (KVSpec(2, 4, 2, 1, scheme="kivi"), KVSpec(8, 32, 0, 1, scheme="salient")):
        cache = kv_cache_for(model, spec)
        out = model.generate(ids, cache=cache, **kw)  # reorders packed data (both salient channel sets)
        assert out.shape == plain.shape and cache.layers[0].quant_keys is not None
