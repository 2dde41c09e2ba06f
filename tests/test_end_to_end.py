"""The bundled SmolLM2-135M through the whole path: quantize, save, reload, evaluate."""

from __future__ import annotations

import json

import pytest
import torch

import llmlite
from llmlite.quant.linear import QuantLinear

pytestmark = pytest.mark.slow


def test_quantize_save_reload_evaluate(tmp_path):
    out = tmp_path / "w4g128"
    result = llmlite.quantize(samples=8, seqlen=128, output=str(out), progress=False)
    assert result.report.path == "llama-staged" and len(result.report.modules) == 210
    assert all(m.output_error < 0.05 for m in result.report.modules)
    assert sum(isinstance(m, QuantLinear) for m in result.model.modules()) == 210

    reloaded, tokenizer = llmlite.load_model(str(out))
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog. " * 8).input_ids])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, result.model(ids).logits)

    quantized = llmlite.evaluate(
        model=str(out), baseline="smollm2-135m", ctx=512, max_windows=2, progress=False
    )
    base = quantized["baseline"]
    assert quantized["windows"] == base["windows"] == 2 and quantized["tokens"] == 2 * 511
    assert base["perplexity"] < quantized["perplexity"] < 1.6 * base["perplexity"]  # 8×128 calibration
    assert quantized["params"] == base["params"]
    assert quantized["size_bytes"] < 0.4 * base["size_bytes"]
    in_memory = llmlite.evaluate(
        model=result.model, tokenizer=result.tokenizer, ctx=512, max_windows=2, progress=False
    )
    assert in_memory["perplexity"] == quantized["perplexity"]
    record = json.loads((out / "llmlite.json").read_text())
    assert record["config"]["samples"] == 8 and record["stats"]["peak_rss_bytes"] > 0
