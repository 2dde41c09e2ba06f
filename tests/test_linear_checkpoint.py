"""QuantLinear and GPTQ-layout checkpoints: exact reload, and the file decoded independently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny
from safetensors.torch import load_file

from llmlite.config import QuantizeConfig
from llmlite.models import load_model
from llmlite.quant.checkpoint import gptq_config, round_unquantized, save_gptq_checkpoint
from llmlite.quant.driver import QuantSettings, quantize_model
from llmlite.quant.linear import QuantLinear
from llmlite.quant.rtn import rtn


def decode_gptq_file(tensors: dict, prefix: str, bits: int) -> np.ndarray:
    """Weight [out, in] from a GPTQ-layout file, straight from the layout's definition:
    value i of a column is bits b·i .. b·i+b-1 of its little-endian word stream; zeros are v1."""
    g_idx = tensors[f"{prefix}.g_idx"].numpy().astype(np.int64)
    scales = tensors[f"{prefix}.scales"].numpy().astype(np.float64)
    words = tensors[f"{prefix}.qweight"].numpy().view(np.uint32)
    zwords = tensors[f"{prefix}.qzeros"].numpy().view(np.uint32)

    def stream_value(column_words, i):
        stream = 0
        for k, word in enumerate(column_words):
            stream |= int(word) << (32 * k)
        return (stream >> (bits * i)) & ((1 << bits) - 1)

    in_features, out_features = len(g_idx), scales.shape[1]
    w = np.zeros((out_features, in_features))
    for j in range(out_features):
        for i in range(in_features):
            q = stream_value(words[:, j], i)
            z = stream_value(zwords[g_idx[i]], j) + 1
            w[j, i] = (q - z) * scales[g_idx[i], j]
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_linear_forward_is_dequantized_matmul(bits):
    w, b, x = torch.randn(40, 72), torch.randn(40), torch.randn(3, 5, 72)
    # the torch backend, bit for bit (the default ``auto`` backend's paths: tests/test_kernels_cpu.py)
    layer = QuantLinear.from_weight(rtn(w, bits, 32, sym=False), b, group_size=32, backend="torch")
    expected = F.linear(x, rtn(w, bits, 32, sym=False).dequantize(), b.half().float())
    assert torch.equal(layer(x), expected)
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}


def test_quant_linear_keeps_float16_scales_when_cast():
    layer = QuantLinear.from_weight(rtn(torch.randn(16, 64), 4, 32, True), group_size=32)
    scales = layer.scales.clone()
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def test_quant_linear_one_token_and_empty_input():
    layer = QuantLinear.from_weight(rtn(torch.randn(8, 48), 4, 32, True), group_size=32)
    assert layer(torch.randn(1, 48)).shape == (1, 8)
    assert layer(torch.randn(0, 48)).shape == (0, 8)


@pytest.mark.parametrize(
    "bits,group_size,sym,act_order,dtype",
    [
        (4, 64, True, False, torch.float16),
        (3, 32, False, True, torch.bfloat16),
        (2, -1, False, False, torch.float32),
        (8, 128, True, True, torch.float16),
    ],
)
def test_checkpoint_reloads_exactly(tmp_path, tokenizer, bits, group_size, sym, act_order, dtype):
    model = make_tiny(tokenizer)
    calib = torch.randint(0, len(tokenizer), (4, 64))
    settings = QuantSettings("gptq", bits, group_size, sym, act_order)
    quantize_model(model, settings, calib, progress=False)
    round_unquantized(model, dtype)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    qconfig = gptq_config(QuantizeConfig(bits=bits, group_size=group_size, sym=sym, act_order=act_order))
    save_gptq_checkpoint(model, tokenizer, folder, qconfig, dtype)

    reloaded, _ = load_model(str(folder))
    x = torch.randint(0, len(tokenizer), (2, 33))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)

    tensors = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied to the embeddings
    assert tensors["model.embed_tokens.weight"].dtype == dtype
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        qlinear = reloaded.get_submodule(name)
        assert isinstance(qlinear, QuantLinear)
        assert (
            tensors[f"{name}.qweight"].dtype == torch.int32
            and tensors[f"{name}.scales"].dtype == torch.float16
        )
        assert np.array_equal(
            qlinear.dequantize(torch.float64).numpy(), decode_gptq_file(tensors, name, bits)
        )
        assert torch.equal(qlinear.dequantize(), model.get_submodule(name).dequantize())

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq"
    assert (config["bits"], config["group_size"], config["sym"], config["desc_act"]) == (
        bits,
        group_size,
        sym,
        False,
    )
    assert json.loads((folder / "quantize_config.json").read_text()) == config
    assert (folder / "tokenizer.json").exists()


def test_gptq_config_records_the_drift_correction():
    meta = gptq_config(QuantizeConfig(v2_windows=8).validate())["meta"]
    assert (meta["v2"], meta["v2_alpha"], meta["v2_windows"]) == (True, 0.25, 8)
    meta = gptq_config(QuantizeConfig(v2=False).validate())["meta"]
    assert (meta["v2"], meta["v2_alpha"], meta["v2_windows"]) == (False, None, None)
    assert meta["refit"] is True
    assert gptq_config(QuantizeConfig(refit=False).validate())["meta"]["refit"] is False


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group_size", [((40, 200), 64), ((7, 576), 128), ((9, 33), -1)])
def test_quant_linear_computes_with_the_codes_values(bits, shape, group_size):
    """The packed layer dequantizes to ``QuantizedWeight.dequantize``'s values bit for bit (the
    driver sets the float weights it calibrates with from the latter), also with a shuffled g_idx."""
    qw = rtn(torch.randn(shape), bits, group_size, sym=False)
    qw.g_idx = qw.g_idx[torch.randperm(shape[1])]
    layer = QuantLinear.from_weight(qw, None, group_size)
    for dtype in (torch.float32, torch.float16):
        assert torch.equal(layer.dequantize(dtype), qw.dequantize(dtype))
