"""llmlite's weights as llama.cpp's GGML blocks (issue 24, the GGUF export's core): decoded by the
``gguf`` package's own dequantizer (llama.cpp's Python reference), they are llmlite's weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny
from gguf import GGMLQuantizationType, quants

from llmlite.errors import LlmliteError
from llmlite.quant.driver import QuantSettings, quantize_model
from llmlite.quant.ggml_blocks import BYTES, block_type, from_blocks, to_blocks
from llmlite.quant.linear import QuantLinear
from llmlite.quant.rtn import rtn

GGML = {
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q8_0": GGMLQuantizationType.Q8_0,
}


@pytest.mark.parametrize(
    "bits,sym,kind,rows,cols", [(4, True, "q4_0", 7, 96), (4, False, "q4_1", 3, 64), (8, True, "q8_0", 1, 32)]
)
def test_blocks_decode_to_llmlites_weights(bits, sym, kind, rows, cols):
    """Fresh random weights with outliers and an all-zero row; one row; one block."""
    w = torch.randn(rows, cols) * torch.rand(rows, 1) * 3
    w[0, 5] = 40.0
    w[-1] = 0 if rows > 1 else w[-1]
    qw = rtn(w, bits, 32, sym)
    assert block_type(qw) == kind
    data = to_blocks(qw)
    assert data.shape == (rows, cols // 32 * BYTES[kind]) and data.dtype == np.uint8
    theirs = quants.dequantize(data, GGML[kind])  # gguf-py: llama.cpp's block definitions
    ours = qw.dequantize(torch.float32).numpy()
    if kind == "q4_1":  # m = −z·s rounded to float16: off by at most 2⁻¹¹·z·s (< 1% of a step)
        bound = (qw.zero.numpy() * qw.scale.numpy()).repeat(32, 1) * 2**-11
        assert np.all(np.abs(theirs - ours) <= bound * 1.001 + 1e-7) and np.abs(theirs - ours).max() > 0
    else:
        assert np.array_equal(theirs, ours)
    back = from_blocks(data, kind, (rows, cols))
    for name in ("codes", "scale", "zero", "g_idx"):
        assert torch.equal(getattr(back, name).double(), getattr(qw, name).double()), name
    assert np.array_equal(to_blocks(back), data)


def test_llama_cpps_own_q4_0_blocks_read_back_exactly():
    """Blocks written by the gguf package's quantizer (llama.cpp's Q4_0) read into llmlite's form
    and back byte for byte; its Q4_1 (any minimum) has no zero-point form and says so."""
    x = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
    data = quants.quantize(x, GGMLQuantizationType.Q4_0)
    weight = from_blocks(data, "q4_0", x.shape)
    assert np.array_equal(to_blocks(weight), data)
    assert np.array_equal(weight.dequantize().numpy(), quants.dequantize(data, GGMLQuantizationType.Q4_0))
    with pytest.raises(ValueError, match="no zero-point form"):
        from_blocks(quants.quantize(x, GGMLQuantizationType.Q4_1), "q4_1", x.shape)


@pytest.mark.parametrize(
    "bits,group,sym,message",
    [
        (4, 128, True, "not in groups of 32 columns: re-quantize with --group-size 32"),
        (3, 32, True, "this weight is 3-bit symmetric: re-quantize with --bits 4"),
        (8, 32, False, "this weight is 8-bit asymmetric"),
    ],
)
def test_what_gguf_cannot_carry_is_refused(bits, group, sym, message):
    qw = rtn(torch.randn(4, 128), bits, group, sym)
    with pytest.raises(LlmliteError, match=message):
        to_blocks(qw)
    odd = rtn(torch.randn(2, 48), 4, 32, True)  # 48 columns: one and a half blocks
    with pytest.raises(LlmliteError, match="groups of 32"):
        block_type(odd)


def test_a_quantized_model_exports_every_layer(tokenizer):
    """Each QuantLinear of a model quantized at group 32 (act-order: static groups) is carried,
    but the tiny model's down projections, whose 200 columns are not whole blocks of 32."""
    model = make_tiny(tokenizer)
    calib = torch.randint(0, len(tokenizer), (2, 32))
    quantize_model(model, QuantSettings("gptq", 4, 32, sym=True, act_order=True), calib, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    for layer in layers:
        if layer.in_features % 32:
            with pytest.raises(LlmliteError, match="groups of 32 columns"):
                to_blocks(layer.quantized_weight())
            continue
        data = to_blocks(layer.quantized_weight(), "q4_0")
        decoded = quants.dequantize(data, GGMLQuantizationType.Q4_0)
        assert np.array_equal(decoded, layer.dequantize(torch.float32).numpy())
