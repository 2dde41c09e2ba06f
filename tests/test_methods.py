"""The method protocol of the layer walk (``llmlite.quant.method``), the methods found in
``llmlite/quant/methods``, and the one-file demonstration method ``rtn-clip``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import reference as ref
import torch
from conftest import make_tiny

from llmlite.config import QuantizeConfig
from llmlite.errors import LlmliteError
from llmlite.quant import driver
from llmlite.quant.gptq import accumulate_hessian, finish_hessian
from llmlite.quant.linear import QuantLinear
from llmlite.quant.method import GroupStats, Method, Quantized, QuantSettings
from llmlite.quant.methods import METHODS, get
from llmlite.quant.methods.clip import RATIOS, clip_search
from llmlite.quant.rtn import rtn
from llmlite.recipes import build


def hessian(x: torch.Tensor) -> torch.Tensor:
    h = torch.zeros(x.shape[1], x.shape[1])
    accumulate_hessian(h, x)
    return finish_hessian(h, x.shape[0])


def test_every_method_file_is_found():
    assert {"rtn", "gptq", "rtn-clip", "awq", "awq-gptq"} <= set(METHODS)
    assert not get("rtn").calibrated and get("gptq").needs == {"hessian", "drift"}
    assert get("awq").smooths and get("awq-gptq").smooths and not get("gptq").smooths
    with pytest.raises(LlmliteError, match="unknown method 'sparsegpt'; use one of: awq, awq-gptq, gptq"):
        get("sparsegpt")
    with pytest.raises(ValueError, match="unknown statistics"):
        Method("bad", lambda w, s, q: None, needs=frozenset({"gradients"}))


@pytest.mark.parametrize(
    "rows,cols,group,bits,sym", [(6, 70, 32, 3, False), (5, 64, -1, 4, True), (1, 33, 16, 2, True)]
)
def test_clip_search_matches_the_float64_reference(rows, cols, group, bits, sym):
    """Per row and group, the error of the chosen range is the least over the ratios, computed in
    float64 on the tokens themselves (not the Hessian); edge shapes: a short last group, one row."""
    torch.manual_seed(rows * cols)
    w = torch.randn(rows, cols)
    w[:, 3] *= 6  # an outlier column, which clipping can trade against the rest
    x = torch.randn(200, cols) * torch.rand(cols) * 2
    q = clip_search(w, hessian(x), bits, group, sym)
    _, ref_deq, ref_errors = ref.clip_rtn(w.double().numpy(), x.double().numpy(), bits, group, sym, RATIOS)
    deq, xd = q.dequantize(torch.float64).numpy(), x.double().numpy()
    size = cols if group == -1 else group
    for k, start in enumerate(range(0, cols, size)):
        sl = slice(start, start + size)
        ours = ((xd[:, sl] @ (deq[:, sl] - w.double().numpy()[:, sl]).T) ** 2).sum(0)
        np.testing.assert_allclose(ours, ref_errors[:, k], rtol=1e-4, atol=1e-9)
    assert np.mean(deq == ref_deq) > 0.95  # the same ranges, but for near-ties in float32


def test_clip_search_with_no_clipping_is_rtn():
    w, x = torch.randn(8, 96), torch.randn(50, 96)
    plain, clipped = rtn(w, 4, 32, False), clip_search(w, hessian(x), 4, 32, False, ratios=(1.0,))
    for name in ("codes", "scale", "zero", "g_idx"):
        assert torch.equal(getattr(plain, name), getattr(clipped, name))


@pytest.mark.parametrize("path", [None, "generic"])
def test_rtn_clip_runs_through_both_walks(tokenizer, path):
    """A method registered by its file alone runs through the staged and the hooks walk with the
    same result, and every layer's output error is at most RTN's (c = 1 is among the ratios)."""
    base = make_tiny(tokenizer)
    calib = torch.randint(0, len(tokenizer), (4, 48))
    settings = QuantSettings("rtn-clip", 3, 32, sym=False, compact_mlp=False)
    model = copy.deepcopy(base)
    report = driver.quantize_model(model, settings, calib, progress=False, path=path)
    assert report.path == ("llama-staged" if path is None else "generic-hooks") and len(report.modules) == 14
    other = copy.deepcopy(base)
    driver.quantize_model(other, settings, calib, progress=False, path="generic" if path is None else None)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, module in other.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module.qweight, mods[name].qweight), name


def test_a_method_gets_the_statistics_it_asks_for(tokenizer, monkeypatch):
    """A method asking for the group's inputs gets them, as chunks whose Hessian is the walk's."""
    seen = []

    def run(w, stats: GroupStats, s: QuantSettings) -> Quantized:
        x = torch.cat(stats.inputs)
        seen.append((w.shape, x.shape))
        torch.testing.assert_close(hessian(x), stats.hessian, rtol=1e-5, atol=1e-6)
        assert stats.drift is None
        torch.testing.assert_close(stats.input_rms, x.pow(2).mean(0).sqrt(), rtol=1e-5, atol=1e-6)
        return Quantized(rtn(w, s.bits, s.group_size, s.sym))

    monkeypatch.setitem(METHODS, "probe", Method("probe", run, needs=frozenset({"inputs"})))
    model, calib = make_tiny(tokenizer), torch.randint(0, len(tokenizer), (3, 40))
    driver.quantize_model(model, QuantSettings("probe", 4, 32, v2_alpha=0.5), calib, progress=False)
    attn, width = make_tiny(tokenizer).model.layers[0].self_attn, model.config.hidden_size
    qkv = sum(p.out_features for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert len(seen) == 8 and seen[0] == ((qkv, width), (120, width))  # q, k, v stacked; 3 × 40 tokens


@pytest.mark.parametrize(
    "options,message",
    [
        (
            {"method": "rtn-clip", "mse": True},
            "--mse searches .*; use it with --method awq-gptq or gptq or rtn",
        ),
        ({"method": "rtn-clip", "refit": True}, "--refit fits .*; use it with --method awq-gptq or gptq"),
        ({"method": "rtn", "v2": True}, "--v2 corrects .*; use it with --method awq-gptq or gptq"),
    ],
)
def test_options_a_method_does_not_read_are_refused(options, message):
    with pytest.raises(LlmliteError, match=message):
        build(QuantizeConfig, None, **options)
    assert build(QuantizeConfig, None, method="rtn-clip").refit is False


@pytest.mark.slow
@pytest.mark.parametrize("bits", [3, 4])
def test_rtn_clip_beats_rtn_on_real_smollm2_layers(bundled_dir, bits):
    """Real weights and activations (SmolLM2-135M, layer 5, 8 windows of 256 WikiText tokens):
    clipping for the output lowers the output error of every projection group RTN leaves."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlite.data import calibration_windows, load_text, tokenize

    model = AutoModelForCausalLM.from_pretrained(bundled_dir).eval()
    tok = AutoTokenizer.from_pretrained(bundled_dir)
    windows = calibration_windows(tokenize(tok, load_text("wikitext2-valid")[:200_000]), 8, 256, seed=1)
    layer, inputs = model.model.layers[5], {}
    names = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    hooks = [
        layer.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: inputs.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for n in names
    ]
    with torch.no_grad():
        model.model(windows)
    for hook in hooks:
        hook.remove()
    for name in names:
        w, h = layer.get_submodule(name).weight.detach().float(), hessian(torch.cat(inputs[name]))
        plain = driver.relative_output_error(w, rtn(w, bits, 128).dequantize(), h)
        clipped = driver.relative_output_error(w, clip_search(w, h, bits, 128).dequantize(), h)
        assert clipped < 0.97 * plain, (name, clipped, plain)
