"""The ``salient`` KV-cache scheme: its pure core against float64 references written here (per-token
symmetric quantization, channel selection, key normalisation, the Hadamard rotation), and the
scheme inside the cache: fitting, exact bytes, decoding, beam search and the query energy."""

from __future__ import annotations

import math

import pytest
import torch

from llmlite.errors import LlmliteError
from llmlite.kvcache.cache import KVSpec, QuantizedKVCache, kv_cache_for, query_energy
from llmlite.kvcache.quant import APPEND_CHUNK, dequantize, unpack
from llmlite.kvcache.salient import (
    ALPHA,
    FIT_TOKENS,
    decode_keys,
    encode_keys,
    fit_channels,
    hadamard,
    quantize_symmetric,
)


def symmetric_reference(x: torch.Tensor, bits: int, step_dtype=torch.float64) -> torch.Tensor:
    """Per row of ``x`` by an explicit loop: the step is ALPHA × the row's root mean square (rounded
    to the storage dtype); codes floor(x / step) + 2**(bits-1), clipped; values (code - half + 1/2)
    × step."""
    flat = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(flat)
    half = 2 ** (bits - 1)
    for r in range(flat.shape[0]):
        row = flat[r]
        rms = math.sqrt(sum(float(v) ** 2 for v in row) / len(row))
        step = float(torch.tensor(ALPHA[bits] * rms, dtype=step_dtype))
        for c, v in enumerate(row):
            code = 0 if step == 0 else min(max(math.floor(float(v) / step) + half, 0), 2 * half - 1)
            out[r, c] = (code - half + 0.5) * step
    return out.view(x.shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("channels", [1, 7, 64, 155])
def test_symmetric_quantization_matches_float64_reference(bits, channels):
    g = torch.Generator().manual_seed(bits * 1000 + channels)
    x = torch.randn(2, 1, 5, channels, generator=g, dtype=torch.float64) * 2
    x[0, 0, 1] = 0.0  # an all-zero token: step 0, read back as zeros
    q = quantize_symmetric(x, bits, torch.float64)
    assert q.minimum is None and q.scale.shape == (2, 1, 5, 1)  # one step per token, no minimum
    assert int(unpack(q.codes, bits, channels).max()) < 2**bits
    torch.testing.assert_close(dequantize(q, torch.float64), symmetric_reference(x, bits), rtol=0, atol=1e-12)
    assert torch.equal(dequantize(q, torch.float64)[0, 0, 1], torch.zeros(channels, dtype=torch.float64))


def test_symmetric_quantization_in_float16_steps_and_bytes():
    x = torch.randn(3, 1, 11, 50)
    q = quantize_symmetric(x, 2, torch.float16)
    assert q.scale.dtype == torch.float16 and q.codes.shape[-1] == math.ceil(50 * 2 / 8)
    torch.testing.assert_close(
        dequantize(q, torch.float64), symmetric_reference(x, 2, torch.float16), rtol=0, atol=1e-6
    )
    inside = x.abs() < 2 * q.scale.float()  # not clipped: within half a step
    error = (dequantize(q, torch.float32) - x).abs()
    assert (error[inside] <= q.scale.float().expand_as(x)[inside] / 2 + 1e-6).all()


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_is_orthonormal_and_its_own_inverse(n):
    h = hadamard(n, torch.float64)
    torch.testing.assert_close(h @ h, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h.T)
    assert torch.allclose(h.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        hadamard(48)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5])
def test_fit_channels_picks_the_weighted_largest_variance(fraction):
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(2, 3, 40, 8, generator=g, dtype=torch.float64) * torch.rand(3, 1, 8, generator=g) * 5
    keys += torch.randn(3, 1, 8, generator=g, dtype=torch.float64)  # channel means
    weight = torch.rand(3, 8, generator=g, dtype=torch.float64)
    stats = fit_channels(keys, fraction, weight, torch.float64)
    flat = keys.permute(1, 3, 0, 2).reshape(24, -1)  # one row per (head, channel)
    torch.testing.assert_close(stats.mean.flatten(), flat.mean(1))
    torch.testing.assert_close(stats.std.flatten(), flat.std(1, unbiased=False))
    score = flat.var(1, unbiased=False) * weight.flatten()
    expected = sorted(score.argsort(descending=True)[: round(fraction * 24)].tolist())
    assert stats.salient.tolist() == expected
    assert sorted(stats.salient.tolist() + stats.plain.tolist()) == list(range(24))
    assert stats.order.dtype == torch.int32 and stats.n_plain == 24 - len(expected)


def test_keys_round_trip_against_a_float64_reference():
    g = torch.Generator().manual_seed(11)
    b, h, n, d = 2, 3, 9, 8
    keys = torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 6, d)
    stats = fit_channels(keys, 0.25, None, torch.float64)
    q = encode_keys(keys, stats, 2, torch.float64)
    # reference: normalise per channel, flatten heads, quantize the two channel sets per token
    z = ((keys - stats.mean[None, :, None]) / stats.std[None, :, None]).transpose(1, 2).reshape(b, n, h * d)
    plain = symmetric_reference(z[..., stats.plain.long()], 2)
    chosen = z[..., stats.salient.long()]
    low, high = chosen.amin(-1, keepdim=True), chosen.amax(-1, keepdim=True)
    scale = (high - low) / 15  # salient channels: 4 bits, one minimum and scale per token
    salient = ((chosen - low) / scale).round().clamp(0, 15) * scale + low
    expected = torch.empty_like(z)
    expected[..., stats.plain.long()], expected[..., stats.salient.long()] = plain, salient
    expected = (
        expected.view(b, n, h, d).transpose(1, 2) * stats.std[None, :, None] + stats.mean[None, :, None]
    )
    torch.testing.assert_close(decode_keys(q, stats, h, torch.float64), expected, rtol=0, atol=1e-9)
    # every channel's low 2 bits in channel order, the 6 salient channels' high 2 bits apart
    assert q.n_salient == 6 and q.bits == 2 and q.low.shape[-1] == 24 * 2 // 8 and q.high.shape[-1] == 2


def test_8bit_keys_are_close_and_no_salient_channels_is_allowed():
    keys = torch.randn(1, 2, 30, 16) * 3 + 1
    stats = fit_channels(keys, 0.0, None)
    q = encode_keys(keys, stats, 8, torch.float32)
    assert q.n_salient == 0 and q.high is q.scale is q.minimum is None
    assert (decode_keys(q, stats, 2) - keys).abs().max() < 0.05 * keys.std()


def _updates(cache, sizes, heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(1, heads, sum(sizes), dim, generator=g)
    start = 0
    for n in sizes:
        cache.update(states[..., start : start + n, :], 2 * states[..., start : start + n, :], 0)
        start += n
    return states


def test_keys_wait_in_full_precision_until_the_fit():
    cache = QuantizedKVCache(bits=2, group_size=16, residual=0, sinks=2, scheme="salient")
    _updates(cache, [10] + [1] * 20)  # 30 tokens: 28 after the sinks, fewer than FIT_TOKENS
    layer = cache.layers[0]
    assert layer.key_stats is None and layer.quant_keys is None and layer.recent_keys.shape[-2] == 28
    assert layer.quant_values.tokens == 28  # values need no fit: quantized as they arrive
    _updates(cache, [FIT_TOKENS], seed=1)
    assert layer.key_stats is not None and layer.recent_keys.shape[-2] == 0
    assert layer.quant_keys.tokens == 28 + FIT_TOKENS


def test_salient_layout_and_exact_bytes():
    heads, dim, sinks, residual = 2, 16, 3, 5
    cache = QuantizedKVCache(2, 32, residual, sinks, scheme="salient", salient=0.25)
    total = 3 + FIT_TOKENS + 20
    _updates(cache, [3 + FIT_TOKENS, 1, 1, 18])
    layer = cache.layers[0]
    quantized = total - sinks - residual
    assert layer.quant_keys.tokens == layer.quant_values.tokens == quantized
    channels = heads * dim
    salient = round(0.25 * channels)
    fp_tokens = 2 * (sinks + residual)  # keys and values, float16
    rows = 79 + 79 // 8  # appended into buffers with room: 59 -> 60 (+7, holds 61) -> 79 (+9)
    assert quantized == 79 and APPEND_CHUNK >= 9
    keys = rows * (math.ceil((channels - salient) * 2 / 8) + 2)  # 2-bit codes, a float16 step
    keys += rows * (math.ceil(salient * 4 / 8) + 2 * 2)  # 4-bit codes, float16 minimum and scale
    values = rows * (channels * 2 // 8 + 2 * 2 * math.ceil(channels / 32))
    stats = 2 * channels * 2 + 4 * channels  # float16 means and deviations, int32 channel order
    expected = fp_tokens * channels * 2 + keys + values + stats
    assert cache.memory()["bytes"] == expected == layer.nbytes()


def test_values_are_rotated_and_read_back():
    cache = QuantizedKVCache(8, 32, 0, 0, storage_dtype=torch.float32, scheme="salient")
    states = _updates(cache, [FIT_TOKENS + 6])
    layer = cache.layers[0]
    assert layer.rotation is not None
    keys, values = layer._read(states[..., :0, :], states[..., :0, :])
    assert (values - 2 * states).abs().max() < 0.05 * (2 * states).abs().max()
    assert (keys - states).abs().max() < 0.1 * states.abs().max()
    stored = dequantize(layer.quant_values).view(1, -1, 2, 16)  # what is stored is the rotated values
    rotated = (2 * states).transpose(1, 2) @ hadamard(16)
    assert (stored - rotated).abs().max() < 0.05 * rotated.abs().max()


@pytest.fixture(scope="module")
def bundled(bundled_dir):
    from llmlite.models import load_model

    return load_model("smollm2-135m")


@torch.no_grad()
def test_query_energy_against_the_queries_themselves(bundled):
    """Recomputed from the hidden states through the layer's own norm and projection."""
    from llmlite.data import DEFAULT_CALIBRATION, load_text, tokenize

    model, tok = bundled
    energy = query_energy(model, tok, tokens=64)
    assert query_energy(model, tok, tokens=64) is energy  # measured once per model and length
    assert query_energy(model, tok, tokens=32) is not energy
    config = model.config
    assert len(energy) == config.num_hidden_layers
    ids = tokenize(tok, load_text(DEFAULT_CALIBRATION))[:64][None]
    hidden = model(ids, output_hidden_states=True).hidden_states
    for i in (0, 17, 29):
        layer = model.model.layers[i]
        q = layer.self_attn.q_proj(layer.input_layernorm(hidden[i])).double()[0]
        d = config.head_dim
        e = q.pow(2).mean(0).view(config.num_key_value_heads, -1, d).mean(1)
        e = (e + e.roll(d // 2, -1)) / 2
        torch.testing.assert_close(energy[i].double(), e, rtol=1e-4, atol=1e-6)
    assert query_energy(torch.nn.Linear(2, 2), tok) is None  # no attention to read


@torch.no_grad()
def test_8bit_salient_decoding_matches_full_precision(bundled):
    """Token-by-token decoding through an 8-bit salient cache (residual 0, no sinks) against one full
    forward pass; the same tolerance as KIVI's 8-bit test (keys and values carry ~0.5% errors)."""
    from llmlite.data import load_text, tokenize

    model, tok = bundled
    ids = tokenize(tok, load_text("wikitext2"))[:160][None]
    full = model(ids).logits.double().log_softmax(-1)
    cache = kv_cache_for(model, KVSpec(8, 64, 0, 0, scheme="salient"), tok)
    out = [model(ids[:, :80], cache=cache).logits]
    out += [model(ids[:, i : i + 1], cache=cache).logits for i in range(80, 160)]
    cached = torch.cat(out, 1).double().log_softmax(-1)
    kl = (full.exp() * (full - cached)).sum(-1)
    assert kl.mean() < 2e-4 and kl.max() < 5e-3
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean() >= 0.98
    assert cache.layers[0].quant_keys.tokens == 160 and cache.layers[0].key_stats is not None


@torch.no_grad()
def test_2bit_salient_beats_kivi_at_a_smaller_size(bundled):
    from llmlite.data import eval_windows, load_text, tokenize
    from llmlite.kvcache.evaluate import cached_perplexity

    model, tok = bundled
    windows = eval_windows(tokenize(tok, load_text("wikitext2")), 512, 1)

    def run(spec):
        return cached_perplexity(model, windows, lambda: kv_cache_for(model, spec, tok), 128, 32, False)

    full = run(KVSpec(16))
    kivi, salient = run(KVSpec(2, 64, 0, 4, scheme="kivi")), run(KVSpec(2, 128, 0, 4))
    assert salient.cache_bytes < kivi.cache_bytes
    assert salient.nll - full.nll < 0.7 * (kivi.nll - full.nll)  # measured: 0.51


def test_auto_scheme_and_bad_settings():
    assert KVSpec(2).validate().scheme == "salient" and KVSpec(4).validate().scheme == "kivi"
    assert KVSpec(16).validate().scheme == "kivi"
    with pytest.raises(LlmliteError, match="--kv-scheme zip is unknown"):
        KVSpec(2, scheme="zip").validate()
    with pytest.raises(LlmliteError, match=r"--kv-salient 1\.0 is out of range"):
        KVSpec(2, salient=1.0).validate()
