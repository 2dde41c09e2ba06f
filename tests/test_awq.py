"""AWQ: the scale search against a float64 brute-force reference, the folding (the smoothed layer
computes the same function), and the methods through the layer walk on a tiny GQA Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny
from reference import awq_scales

from llmlite.quant.awq import search_scales, tie_mean, weight_magnitude
from llmlite.quant.driver import quantize_model
from llmlite.quant.method import QuantSettings
from llmlite.quant.smooth import plain_gptq, rtn, smooth_layer, value_tie


def block(seed: int, tokens: int = 300, cols: int = 40, rows: int = 24):
    """Inputs with a few loud channels (what AWQ protects) and a weight with outliers."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen, dtype=torch.float64)
    x *= torch.rand(cols, generator=gen, dtype=torch.float64) * 0.5 + 0.1
    x[:, torch.randperm(cols, generator=gen)[:3]] *= 20
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.1
    w[torch.rand(rows, cols, generator=gen) < 0.02] *= 8
    return x, w


@pytest.mark.parametrize(
    "bits,group,sym,tied",
    [(4, 16, True, False), (3, 16, False, False), (4, -1, True, False), (3, 12, True, True)],
)
def test_scale_search_matches_float64_brute_force(bits, group, sym, tied):
    """The winning ratio and scales equal the reference's, which computes every candidate's loss on
    the inputs themselves in float64 (40 columns: groups of 16 leave a short last group of 8)."""
    x, w = block(bits * 10 + group)
    tie = torch.arange(40) % 10 if tied else None  # 4 columns share each of 10 scales
    want_s, want_r = awq_scales(w.numpy(), x.numpy(), bits, group, sym, None if tie is None else tie.numpy())
    h = 2 * x.T @ x / x.shape[0]
    found = search_scales(w.float(), h.float(), x.abs().mean(0).float(), rtn(bits, group, sym), group, tie)
    assert found.ratio == want_r and want_r is not None
    np.testing.assert_allclose(found.scale.numpy(), want_s, rtol=1e-5)
    assert found.error < found.identity_error
    if tie is not None:
        assert torch.equal(found.scale, found.scale[torch.arange(10)][tie])


@pytest.mark.parametrize(
    "bits,group,sym,tied", [(3, 16, False, False), (3, 12, True, True), (4, -1, True, False)]
)
def test_gptq_scored_search_matches_float64_brute_force(bits, group, sym, tied):
    """AWQ→GPTQ's search: each candidate scored by what act-order GPTQ (on the scaled inputs'
    Hessian) makes of it picks the reference's winner; GPTQ's error stays below round to nearest's."""
    x, w = block(bits * 10 + abs(group) + 7)
    tie = torch.arange(40) % 10 if tied else None
    damp = 0.003
    tie_np = None if tie is None else tie.numpy()
    want_s, want_r = awq_scales(w.numpy(), x.numpy(), bits, group, sym, tie_np, gptq_damp=damp)
    h = 2 * x.T @ x / x.shape[0]
    x_mean = x.abs().mean(0).float()
    found = search_scales(w.float(), h.float(), x_mean, plain_gptq(bits, group, sym, True, damp), group, tie)
    assert found.ratio == want_r
    np.testing.assert_allclose(found.scale.numpy(), want_s, rtol=1e-5)
    by_rtn = search_scales(w.float(), h.float(), x_mean, rtn(bits, group, sym), group, tie)
    assert found.error < by_rtn.error


def test_weight_magnitude_and_tie_mean_by_hand():
    w = torch.tensor([[1.0, -2.0, 4.0], [0.5, 0.25, -1.0]])
    # group 2: row 0 peaks 2 then 4, row 1 peaks 0.5 then 1 → |w| / peak, mean over rows
    want = torch.tensor([(0.5 + 1.0) / 2, (1.0 + 0.5) / 2, (1.0 + 1.0) / 2])
    torch.testing.assert_close(weight_magnitude(w, 2), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        tie_mean(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0, 1, 0, 1])), torch.tensor([2.0, 3.5])
    )


def test_value_tie_maps_query_heads_to_their_value_head():
    # 4 query heads, 2 value heads, 2 channels each: heads 0, 1 read value head 0; 2, 3 read head 1
    assert value_tie(4, 2, 2).tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    assert value_tie(3, 3, 2).tolist() == list(range(6))


@pytest.mark.parametrize("value_mapping", [True, False])
def test_smoothing_keeps_the_layers_function(tokenizer, value_mapping):
    """The folded layer computes what the original did (float32 rounding), every mapping scaled."""
    model = make_tiny(tokenizer, seed=3)
    layer = model.model.layers[0]
    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 24, 96, generator=gen) for _ in range(2)]
    hidden[0][..., 5] *= 30  # a loud channel, so that scaling wins
    ids = torch.arange(24).view(1, -1)
    kw = {"position_embeddings": model.model.rotary_emb(hidden[0], ids), "attention_mask": None}
    before = [layer(h, **kw)[0] if isinstance(layer(h, **kw), tuple) else layer(h, **kw) for h in hidden]
    norm = layer.input_layernorm.weight.clone()
    records = smooth_layer(
        layer, hidden, [kw, kw], 3, 32, lambda b: rtn(b, 32, True), torch.float16, value_mapping
    )
    after = [layer(h, **kw)[0] if isinstance(layer(h, **kw), tuple) else layer(h, **kw) for h in hidden]
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(records) == (4 if value_mapping else 3)
    assert all(r.ratio is not None and r.error < 1 for r in records)
    assert not torch.equal(layer.input_layernorm.weight, norm)
    assert torch.equal(layer.input_layernorm.weight, layer.input_layernorm.weight.half().float())


def test_awq_methods_through_the_walk(tokenizer):
    """Both methods quantize every linear of a tiny GQA model and record each mapping's choice;
    on the calibration windows, AWQ's scales change the logits less than the same quantizer
    without them: AWQ (no clipping) against RTN, AWQ→GPTQ against GPTQ."""
    ids = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(1))
    errors = {}
    for method, options in [("rtn", {}), ("awq", {"clip": False}), ("gptq", {}), ("awq-gptq", {})]:
        model = make_tiny(tokenizer, seed=1)
        with torch.no_grad():
            want = model(ids).logits
        settings = QuantSettings(method=method, bits=4, group_size=32, sym=False, **options)
        report = quantize_model(model, settings, ids, progress=False)
        assert len(report.modules) == 14
        assert len(report.smoothing) == (8 if method.startswith("awq") else 0)
        assert all(r.error <= 1 for r in report.smoothing)
        with torch.no_grad():
            errors[method] = float((model(ids).logits - want).pow(2).mean() / want.pow(2).mean())
    assert errors["awq"] < errors["rtn"] and errors["awq-gptq"] < errors["gptq"]
    assert report.to_dict()["smoothing"][1]["mapping"] == "layers.0.self_attn.v_proj -> o_proj"


@pytest.mark.parametrize("group", [128, 32, 7, -1])
@pytest.mark.parametrize("bits,sym", [(3, True), (4, False), (2, False), (8, True)])
def test_fake_quantize_is_the_walks_rounding(group, bits, sym):
    """The search's one-pass rounding equals ``on_grid(group_params(...)).dequantize()`` bit for
    bit: a short last group (100 = 3 × 32 + 4), an all-zero row, one column."""
    from llmlite.quant.grid import fake_quantize, group_params, on_grid

    gen = torch.Generator().manual_seed(bits * 100 + abs(group))
    for shape in [(6, 100), (3, 1)]:
        w = torch.randn(*shape, generator=gen) * 0.1
        w[0] = 0
        want = on_grid(w, *group_params(w, bits, group, sym), group, bits).dequantize()
        assert torch.equal(fake_quantize(w, bits, group, sym), want)
