"""Decode attention over the packed KV cache (``llmlite.kvcache.fused`` and its C loops) against a
float64 attention over the cache read back, and inside the lean decode loop against transformers'
``generate`` through the same quantized cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny

from llmlite.decode import decode
from llmlite.kvcache import fused
from llmlite.kvcache.backend import TorchBackend
from llmlite.kvcache.cache import QuantizedKVCache

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="the kvattend extension is not built")
INV_FREQ = 1 / 10000 ** (torch.arange(0, 64, 2).float() / 64)


def check_steps(cache: QuantizedKVCache, prompt: int, steps: int, heads: int = 9, seed: int = 0) -> None:
    """Fill ``cache`` with ``prompt`` tokens, then for each new token compare ``attend`` with
    float64 attention over ``_read`` (the stored data, the new token exact)."""
    gen = torch.Generator().manual_seed(seed)
    b, kv_heads, d = 2, 3, 64
    if prompt:
        cache.update(*torch.randn(2, b, kv_heads, prompt, d, generator=gen), 0)
    for _ in range(steps):
        new_k, new_v = torch.randn(2, b, kv_heads, 1, d, generator=gen)
        q = torch.randn(b, heads, 1, d, generator=gen)
        if not cache.layers:
            cache.update(new_k, new_v, 0)
            continue
        layer = cache.layers[0]
        layer.store(new_k, new_v)
        assert fused.unsupported(layer, q) is None
        got = fused.attend(layer, q, new_k, new_v, 0.125)
        keys, values = layer._read(new_k, new_v)
        want = F.scaled_dot_product_attention(
            q.double(), keys.double(), values.double(), scale=0.125, enable_gqa=True
        )
        assert got.dtype == q.dtype and got.shape == q.shape
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "scheme,bits,group,residual,sinks",
    [
        ("kivi", 4, 64, 32, 4),
        ("kivi", 4, 64, 0, 0),
        ("kivi", 2, 64, 32, 4),
        ("kivi", 2, 32, 128, 4),
        ("kivi", 8, 32, 5, 1),
        ("kivi", 4, 192, 3, 0),
        ("salient", 2, 64, 32, 4),
        ("salient", 2, 128, 0, 4),
        ("salient", 4, 64, 0, 0),
        ("salient", 8, 64, 2, 0),
    ],
)
def test_attend_matches_float64_attention(scheme, bits, group, residual, sinks):
    """Defaults and recipes of both schemes; the new token in the recent window or already
    quantized (residual 0); a value group spanning all three heads (192); salient channels at
    twice the bits (up to 8), values stored in the Hadamard basis."""
    cache = QuantizedKVCache(bits, group, residual, sinks, inv_freq=INV_FREQ, scheme=scheme)
    check_steps(cache, 300, 4, seed=bits + group)


def test_attend_at_the_edges():
    """Nothing quantized yet; only sinks; one query head per key/value head; a first token."""
    check_steps(QuantizedKVCache(4, 64, 32, 4, inv_freq=INV_FREQ, scheme="kivi"), 10, 3)
    check_steps(QuantizedKVCache(4, 64, 0, 8, inv_freq=INV_FREQ, scheme="kivi"), 2, 4)
    check_steps(QuantizedKVCache(2, 64, 0, 0, inv_freq=INV_FREQ, scheme="kivi"), 70, 2, heads=3)
    check_steps(QuantizedKVCache(4, 64, 0, 0, inv_freq=INV_FREQ, scheme="kivi"), 0, 3)
    check_steps(QuantizedKVCache(2, 64, 0, 0, inv_freq=INV_FREQ, scheme="salient", salient=0.0), 100, 2)


@pytest.mark.parametrize("kind", ["subnormal", "largest"])
def test_float16_specials_in_the_stored_tokens(kind):
    """The C loops read the cache's float16 sinks, window and statistics as bits: subnormals
    (below 2^-14) and zeros, or the largest normals, must come out exactly."""
    cache = QuantizedKVCache(4, 64, 32, 4, inv_freq=INV_FREQ, scheme="kivi")
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 1, 3, 40, 64, generator=gen)
    if kind == "subnormal":
        values *= 3e-6  # float16 subnormals everywhere, zeros in a few tokens
        values[..., 20:24, :] = 0.0
    else:
        keys[..., 30, :8] = 60000.0 * torch.sign(keys[..., 30, :8])
        values[..., 31, :8] = -65504.0
    cache.update(keys, values, 0)
    layer, q = cache.layers[0], torch.randn(1, 9, 1, 64, generator=gen) * 1e-4
    new_k, new_v = torch.randn(2, 1, 3, 1, 64, generator=gen) * (values.abs().max() / 4)
    layer.store(new_k, new_v)
    got = fused.attend(layer, q, new_k, new_v, 0.125)
    stored_k, stored_v = layer._read(new_k, new_v)
    want = F.scaled_dot_product_attention(
        q.double(), stored_k.double(), stored_v.double(), scale=0.125, enable_gqa=True
    )
    scale = float(stored_v.abs().max())
    torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=2e-7)


def test_layers_it_does_not_serve_say_why():
    q = torch.randn(1, 9, 1, 64)
    for cache, reason in [
        (QuantizedKVCache(16, inv_freq=INV_FREQ), "16-bit"),
        (QuantizedKVCache(4, 64, 0, 0, scheme="kivi"), "RoPE"),
        (QuantizedKVCache(4, 64, 0, 0, torch.float32, inv_freq=INV_FREQ), "float16"),
    ]:
        cache.update(torch.randn(1, 3, 100, 64), torch.randn(1, 3, 100, 64), 0)
        assert reason in fused.unsupported(cache.layers[0], q)
    assert "one new token" in fused.unsupported(cache.layers[0], torch.randn(1, 9, 2, 64))


@pytest.mark.parametrize("bits,scheme", [(4, "kivi"), (2, "kivi"), (2, "salient"), (16, "kivi")])
def test_lean_loop_through_the_quantized_cache(tokenizer, bits, scheme):
    """Greedy tokens of the lean loop (packed reads) equal transformers' ``generate`` through the
    same kind of cache (read back); 24-channel heads: no Hadamard rotation of values; 16 bits:
    not served in place, the loop reads the cache back."""
    model = make_tiny(tokenizer, seed=2)
    model.generation_config.do_sample = False
    rotary = model.model.rotary_emb.inv_freq.clone()

    def fresh():  # groups of 16 tokens / channels: the tiny model has 2 heads of 24 channels
        return QuantizedKVCache(bits, 16, 8, 2, inv_freq=rotary, scheme=scheme)

    ids = torch.randint(0, len(tokenizer), (2, 40), generator=torch.Generator().manual_seed(bits))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), cache=fresh(), max_new_tokens=24)
    got = torch.cat(list(decode(model, ids, 24, lambda logits: logits.argmax(-1), cache=fresh())), 1)
    assert torch.equal(got, want[:, 40:])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [1, 50, 64, 192, 300])
def test_native_quantization_is_torchs_bit_for_bit(bits, group):
    """Values' per-token quantization in C against the torch core: the same codes, float16 scales
    and minima (groups that divide the 192 channels, a short last group, one group wider than the
    row; constant groups; exact ties at half a step)."""
    gen = torch.Generator().manual_seed(bits * 1000 + group)
    x = torch.randn(2, 1, 37, 192, generator=gen).half().float() * 3
    x[0, 0, :, :64] = 1.5  # constant groups: scale 0
    x[1, 0, 0, :8] = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 6.0])  # steps of 1/2 around ties
    got = fused.NativeBackend().quantize(x, bits, group, -1, torch.float16)
    want = TorchBackend().quantize(x, bits, group, -1, torch.float16)
    for name in ("codes", "scale", "minimum"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (got.bits, got.channels, got.group_size, got.axis) == (bits, 192, group, -1)
    empty = fused.NativeBackend().quantize(x[:, :, :0], bits, group, -1, torch.float16)
    assert empty.codes.shape == (2, 1, 0, -(-192 * bits // 8))


@pytest.mark.parametrize(
    "heads,dim,fraction,bits,rope",
    [
        (3, 64, 0.1, 2, True),
        (3, 64, 0.0, 2, True),
        (2, 16, 0.5, 4, False),
        (1, 8, 0.3, 8, True),
        (4, 64, 0.1, 2, False),
    ],
)
def test_native_salient_store_is_torchs_bit_for_bit(heads, dim, fraction, bits, rope):
    """The salient scheme's key store in C against ``TorchBackend.store_keys`` (RoPE undone in
    float32, then ``salient.encode_keys``): the same plain codes and steps, salient codes, scales
    and minima (channel counts that leave a byte partly filled, no salient channels, a zero key
    whose step is 0), for a first block, then blocks appended one token and several at a time,
    read from a window longer than the tokens taken (as the cache's recent keys)."""
    from llmlite.kvcache.rope import RopeTable
    from llmlite.kvcache.salient import fit_channels

    gen = torch.Generator().manual_seed(heads * 100 + dim + bits)
    spread = torch.rand(heads, 1, dim, generator=gen) * 3
    keys = torch.randn(2, heads, 160, dim, generator=gen) * spread + torch.randn(heads, 1, dim, generator=gen)
    keys = keys.half().float()
    stats = fit_channels(keys[:, :, :64], fraction, torch.rand(heads, dim, generator=gen))
    keys[1, :, 70] = stats.mean.float()  # normalises to zero without RoPE: step 0
    table = RopeTable(1 / 10000 ** (torch.arange(0, dim, 2).float() / dim))
    got = want = None
    at = 64
    for n in (9, 1, 1, 70, 3):
        window = keys[:, :, at : at + n + 5]  # the cache's recent keys: the first n are stored
        angles = table.angles(at + 100, n, keys.device) if rope else None
        got = fused.NativeBackend().store_keys(got, window[:, :, :n], angles, stats, bits, torch.float16)
        want = TorchBackend().store_keys(want, window[:, :, :n], angles, stats, bits, torch.float16)
        at += n
        assert got.tokens == want.tokens == at - 64
        assert len(got.tensors()) == len(want.tensors()) == (2 if fraction == 0 else 4 if bits == 8 else 5)
        for a, b in zip(got.tensors(), want.tensors(), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert (got.bits, got.n_salient) == (want.bits, want.n_salient) == (bits, stats.salient.numel())
    assert (want.step == 0).any() or rope
