"""The layer walk: staged vs generic paths, true-sequential groups, RTN, the head; real layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny
from torch import nn

from llmlite.arch import decoder_layers
from llmlite.quant import driver
from llmlite.quant.driver import (
    QuantSettings,
    _fp16_scale,
    _groups,
    _stats,
    quantize_model,
)
from llmlite.quant.gptq import accumulate_hessian, finish_hessian, gptq
from llmlite.quant.linear import QuantLinear
from llmlite.quant.rtn import rtn


def quantized_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("v2_alpha,v2_windows", [(0.0, 0), (0.5, 0), (0.5, 3)])
def test_staged_path_equals_generic_hooks_path(tokenizer, monkeypatch, v2_alpha, v2_windows):
    """The Llama fast path and the architecture-agnostic path (the layer's own forward, re-run per
    group) must give bit-identical checkpoints: both are true-sequential and layer-sequential, and
    with v2 both run the same float stream (over all windows, or over the first chunks)."""
    monkeypatch.setattr(driver, "CHUNK_TOKENS", 96)  # 2 windows per chunk: 3 chunks
    model = make_tiny(tokenizer)
    other = copy.deepcopy(model)
    calib = torch.randint(0, len(tokenizer), (6, 48))
    settings = QuantSettings(
        "gptq", 4, 32, sym=False, act_order=True, v2_alpha=v2_alpha, v2_windows=v2_windows, compact_mlp=False
    )
    a = quantize_model(model, settings, calib, progress=False)
    b = quantize_model(other, settings, calib, progress=False, path="generic")
    assert (a.path, b.path) == ("llama-staged", "generic-hooks")
    qa, qb = quantized_modules(model), quantized_modules(other)
    assert len(qa) == 14 and qa.keys() == qb.keys()
    for name in qa:
        for buf in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(qa[name], buf), getattr(qb[name], buf)), (name, buf)


def test_compact_mlp_activations_stay_close_to_float32(tokenizer):
    """float16 MLP activations (the default) change only the rounding of what later layers see:
    the first layer's checkpoint is identical, and the quantized model is as close to the float
    model as the float32 walk's (its logits' error at most 10% larger)."""
    model = make_tiny(tokenizer)
    exact, float_model = copy.deepcopy(model), copy.deepcopy(model)
    calib = torch.randint(0, len(tokenizer), (6, 48))
    quantize_model(model, QuantSettings("gptq", 4, 32), calib, progress=False)
    quantize_model(exact, QuantSettings("gptq", 4, 32, compact_mlp=False), calib, progress=False)
    qa, qb = quantized_modules(model), quantized_modules(exact)
    first = [n for n in qa if n.startswith("model.layers.0.")]
    assert len(first) == 7 and all(torch.equal(qa[n].qweight, qb[n].qweight) for n in first)
    ids = calib[:3]
    ref = float_model(ids).logits
    err_compact = (model(ids).logits - ref).square().mean()
    err_exact = (exact(ids).logits - ref).square().mean()
    assert err_compact < 1.1 * err_exact, (float(err_compact), float(err_exact))


@pytest.mark.parametrize("amax", [0.0, 1.0, 2.0**15, 2.0**15 + 1, 3e5, 1e30])
def test_fp16_scale_keeps_values_in_range(amax):
    x = torch.tensor([-amax, amax / 3, 0.0], dtype=torch.float32)
    scale = _fp16_scale(x)
    assert scale >= 1 and math.log2(scale) == int(math.log2(scale))
    stored = (x / scale).half()
    assert torch.isfinite(stored).all()
    assert torch.allclose(stored.double() * scale, x.double(), rtol=2**-11, atol=0)


def test_groups_follow_shared_inputs(tokenizer):
    model = make_tiny(tokenizer)
    layer = decoder_layers(model)[0]
    h = torch.randn(1, 8, 96)
    pos = torch.arange(8)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(h, pos), "attention_mask": None}
    assert _groups(layer, h, kwargs) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_gptq_layer_errors_below_rtn_and_logits_closer(tokenizer):
    calib = torch.randint(0, len(tokenizer), (8, 64))
    base = make_tiny(tokenizer)
    g, r = copy.deepcopy(base), copy.deepcopy(base)
    report = quantize_model(g, QuantSettings("gptq", 3, 32), calib, progress=False)
    quantize_model(r, QuantSettings("rtn", 3, 32), None, progress=False)
    assert all(m.output_error is not None and m.output_error < 1 for m in report.modules)
    with torch.no_grad():
        ref = base(calib).logits
        assert (g(calib).logits - ref).square().mean() < (r(calib).logits - ref).square().mean()


def test_v2_changes_the_result_and_tracks_the_float_model(tokenizer):
    """GPTAQ's float stream is real: v2 gives other weights than plain GPTQ, and at 3 bits its
    logits on the calibration windows are closer to the float model's."""
    calib = torch.randint(0, len(tokenizer), (8, 64))
    base = make_tiny(tokenizer)
    plain, v2 = copy.deepcopy(base), copy.deepcopy(base)
    quantize_model(plain, QuantSettings("gptq", 3, 32, act_order=True), calib, progress=False)
    quantize_model(v2, QuantSettings("gptq", 3, 32, act_order=True, v2_alpha=1.0), calib, progress=False)
    first = "model.layers.0.self_attn.q_proj"  # same inputs in both streams: v2 changes nothing
    assert torch.equal(quantized_modules(plain)[first].qweight, quantized_modules(v2)[first].qweight)
    last = "model.layers.1.mlp.down_proj"
    assert not torch.equal(quantized_modules(plain)[last].qweight, quantized_modules(v2)[last].qweight)
    with torch.no_grad():
        ref = base(calib).logits
        assert (v2(calib).logits - ref).square().mean() < (plain(calib).logits - ref).square().mean()


@pytest.mark.parametrize("windows,chunks", [(0, 4), (1, 1), (3, 2), (4, 2), (5, 3), (8, 4), (99, 4)])
def test_float_chunks_cover_the_asked_windows(windows, chunks):
    hidden = [torch.zeros(2, 3, 4)] * 3 + [torch.zeros(1, 3, 4)]  # 7 windows, the last chunk short
    assert driver._float_chunks(hidden, windows) == chunks


@pytest.mark.parametrize("out", [3, 5, 13])  # 2·out < in: W(X̃−X)ᵀX directly; else D, then W·D
def test_stats_drift_over_the_float_chunks_only(out):
    """With float inputs for the first chunks only, the Hessian still sees every chunk, and the
    output drift is the float64 mean of 2 W (x̃ − x)ᵀx over the paired tokens alone."""
    x = [torch.randn(2, 5, 12) for _ in range(3)]
    x_float = [c + 0.1 * torch.randn_like(c) for c in x[:2]]
    w = torch.randn(out, 12)
    stats = _stats(x, x_float, w)
    h, wd = stats.hessian, stats.drift
    flat = torch.cat([c.reshape(-1, 12) for c in x]).double()
    paired = flat[:20]
    diff = torch.cat([c.reshape(-1, 12) for c in x_float]).double() - paired
    torch.testing.assert_close(h.double(), 2 * flat.T @ flat / 30, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wd.double(), w.double() @ (2 * diff.T @ paired / 20), rtol=1e-4, atol=1e-6)
    assert _stats(x, None, w).drift is None


def test_v2_windows_limits_the_float_stream(tokenizer, monkeypatch):
    """v2 over every window equals v2 with as many windows as there are; v2 over the first chunk
    only gives other weights than both (the first group is untouched: it sees no drift)."""
    monkeypatch.setattr(driver, "CHUNK_TOKENS", 128)  # 2 windows per chunk: 4 chunks
    calib = torch.randint(0, len(tokenizer), (8, 64))
    base = make_tiny(tokenizer)
    runs = {}
    for windows in (0, 8, 2):
        model = copy.deepcopy(base)
        settings = QuantSettings("gptq", 3, 32, act_order=True, v2_alpha=1.0, v2_windows=windows)
        quantize_model(model, settings, calib, progress=False)
        runs[windows] = quantized_modules(model)
    first, last = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    assert all(torch.equal(runs[0][n].qweight, runs[8][n].qweight) for n in runs[0])
    assert torch.equal(runs[0][first].qweight, runs[2][first].qweight)
    assert not torch.equal(runs[0][last].qweight, runs[2][last].qweight)


def test_rtn_needs_no_data_and_quantizes_every_layer_linear(tokenizer):
    model = make_tiny(tokenizer)
    report = quantize_model(model, QuantSettings("rtn", 4, 64), None, progress=False)
    assert report.path == "weights-only" and len(report.modules) == 14
    assert set(quantized_modules(model)) == {
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_head_unties_it(tokenizer, method):
    model = make_tiny(tokenizer)
    embedding = model.model.embed_tokens.weight.detach().clone()
    calib = torch.randint(0, len(tokenizer), (4, 32))
    quantize_model(model, QuantSettings(method, 8, 64, quantize_head=True), calib, progress=False)
    assert isinstance(model.lm_head, QuantLinear) and not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert (model.lm_head.dequantize() - embedding).abs().max() < 0.01


@pytest.mark.slow
def test_gptq_beats_rtn_on_real_smollm2_layers(bundled_dir):
    """Real weights and real activations of SmolLM2-135M (layer 7), at 4 and 3 bits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlite.data import calibration_windows, load_text, tokenize

    model = AutoModelForCausalLM.from_pretrained(bundled_dir).eval()
    tok = AutoTokenizer.from_pretrained(bundled_dir)
    windows = calibration_windows(tokenize(tok, load_text("wikitext2-valid")[:200_000]), 8, 256, seed=1)
    inputs = {}
    layer = model.model.layers[7]
    hooks = [
        getattr(layer, part)
        .get_submodule(name)
        .register_forward_pre_hook(
            lambda _m, args, key=name: inputs.setdefault(key, []).append(
                args[0].reshape(-1, args[0].shape[-1])
            )
        )
        for part, name in (("self_attn", "q_proj"), ("mlp", "down_proj"))
    ]
    with torch.no_grad():
        model.model(windows)
    for h in hooks:
        h.remove()
    for name, weight in (
        ("q_proj", layer.self_attn.q_proj.weight),
        ("down_proj", layer.mlp.down_proj.weight),
    ):
        x = torch.cat(inputs[name])
        hess = torch.zeros(x.shape[1], x.shape[1])
        accumulate_hessian(hess, x)
        hess = finish_hessian(hess, x.shape[0])
        w = weight.detach()
        for bits in (4, 3):
            err_g = ((x @ (gptq(w, hess, bits, 128).weight.dequantize() - w).T) ** 2).mean()
            err_r = ((x @ (rtn(w, bits, 128).dequantize() - w).T) ** 2).mean()
            assert err_g < err_r, (name, bits, float(err_g), float(err_r))
