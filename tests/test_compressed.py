"""Compressed layers apart from file formats: the GPTQ codec's round trips, per-module grids in
one checkpoint (the ``dynamic`` block), compute backends with a ``prepare`` step, and the
``CompressedLinear`` protocol that metrics and adapters use instead of one class."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny
from torch import Tensor, nn

from llmlite.config import QuantizeConfig
from llmlite.errors import LlmliteError
from llmlite.evaluation.efficiency import macs_per_token
from llmlite.evaluation.metrics import param_count
from llmlite.models import load_model
from llmlite.quant import linear
from llmlite.quant.checkpoint import gptq_config, round_unquantized, save_gptq_checkpoint
from llmlite.quant.compressed import compressed_linears, is_compressed
from llmlite.quant.driver import QuantSettings, quantize_model
from llmlite.quant.formats import CODECS, GPTQ
from llmlite.quant.grid import QuantizedWeight, group_index
from llmlite.quant.linear import QuantLinear
from llmlite.quant.rtn import rtn


def random_weight(out: int, cols: int, bits: int, group: int) -> QuantizedWeight:
    g_idx = group_index(cols, group)
    groups = int(g_idx.max()) + 1
    return QuantizedWeight(
        codes=torch.randint(0, 2**bits, (out, cols), dtype=torch.uint8),
        scale=(torch.rand(out, groups) + 0.01).half().float(),
        zero=torch.randint(1, 2**bits + 1, (out, groups), dtype=torch.int16),  # 2**bits: v1's wrap
        g_idx=g_idx,
        bits=bits,
    )


@pytest.mark.parametrize(
    "bits,out,cols,group", [(4, 24, 70, 32), (3, 5, 64, -1), (8, 1, 33, 16), (2, 16, 1, 8)]
)
def test_gptq_codec_round_trips(bits, out, cols, group):
    """read(write(w)) is w, and write(read(file)) is the file, for short last groups, one row,
    one column and the zero-point 2**bits that the v1 layout stores as all ones."""
    weight, bias = random_weight(out, cols, bits, group), torch.randn(out).half()
    tensors = GPTQ.write(weight, bias)
    back = GPTQ.read(tensors, bits)
    for name in ("codes", "scale", "zero", "g_idx"):
        assert torch.equal(getattr(back, name).double(), getattr(weight, name).double()), name
    again = GPTQ.write(back, tensors["bias"])
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    layout = GPTQ.layout(cols, out, bits, group, bias=True)
    assert {k: (v.shape, v.dtype) for k, v in layout.items()} == {
        k: (v.shape, v.dtype) for k, v in tensors.items()
    }
    layer = QuantLinear.from_weight(weight, bias, group)
    assert layer.stored_bytes() == sum(t.numel() * t.element_size() for t in tensors.values())
    assert torch.equal(layer.dequantize(), weight.dequantize())


def tiny_checkpoint(tokenizer, folder, modules_8bit=()):
    """A tiny model quantized with RTN 4-bit g32, with ``modules_8bit`` re-quantized at 8 bits,
    group 64, saved with the checkpoint codec; returns the model in memory."""
    model = make_tiny(tokenizer)
    floats = {n: model.get_submodule(n).weight.detach().clone() for n in modules_8bit}
    quantize_model(model, QuantSettings("rtn", 4, 32), None, progress=False)
    for name, w in floats.items():
        model.set_submodule(name, QuantLinear.from_weight(rtn(w, 8, 64), None, 64))
    round_unquantized(model, torch.float32)
    folder.mkdir()
    config = gptq_config(QuantizeConfig(method="rtn", bits=4, group_size=32, v2=False, refit=False))
    save_gptq_checkpoint(model, tokenizer, folder, config, torch.float32)
    return model


def test_per_module_grids_are_written_and_read_back(tmp_path, tokenizer):
    """A module with other bits and group size is listed in ``dynamic`` (GPTQModel's regex
    overrides) and reloads exactly; the others keep the checkpoint's grid."""
    name = "model.layers.1.mlp.down_proj"
    model = tiny_checkpoint(tokenizer, tmp_path / "mixed", [name])
    qc = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] == {f"+:^{name.replace('.', chr(92) + '.')}$": {"bits": 8, "group_size": 64}}
    reloaded, _ = load_model(str(tmp_path / "mixed"))
    layer = reloaded.get_submodule(name)
    assert (layer.bits, layer.group_size) == (8, 64)
    assert reloaded.get_submodule("model.layers.0.mlp.down_proj").bits == 4
    x = torch.randint(0, len(tokenizer), (2, 17))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_a_dynamic_entry_that_disagrees_with_the_tensors_is_refused(tmp_path, tokenizer):
    tiny_checkpoint(tokenizer, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["dynamic"] = {r"+:.*\.down_proj": {"bits": 8}}
    config_file.write_text(json.dumps(config))
    with pytest.raises(LlmliteError, match=r"down_proj.qweight has shape .* \(8-bit, group size 32"):
        load_model(str(tmp_path / "ckpt"))
    config["quantization_config"]["dynamic"] = {r"+:.*\.down_proj": {"bits": 5}}
    config_file.write_text(json.dumps(config))
    with pytest.raises(LlmliteError, match="GPTQ bits 5 unsupported"):
        load_model(str(tmp_path / "ckpt"))


def test_a_backend_prepares_each_layer_once_at_load(tmp_path, tokenizer, monkeypatch):
    """A backend's ``prepare`` repacks every layer once when it is loaded for that backend, and
    its ``forward`` computes with what it prepared."""
    prepared: list[QuantLinear] = []

    def prepare(layer: QuantLinear) -> None:
        layer.float_weight = layer.dequantize(torch.float64)
        prepared.append(layer)

    def forward(layer: QuantLinear, x: Tensor) -> Tensor:
        return F.linear(x.double(), layer.float_weight).to(x.dtype)

    monkeypatch.setitem(linear.BACKENDS, "float64", linear.Backend(forward, prepare))
    model = tiny_checkpoint(tokenizer, tmp_path / "ckpt")
    for layer in compressed_linears(model).values():
        layer.set_backend("torch")  # the float32 reference
    fast, _ = load_model(str(tmp_path / "ckpt"), backend="float64")
    assert len(prepared) == 14 and all(m.backend == "float64" for m in compressed_linears(fast).values())
    x = torch.randint(0, len(tokenizer), (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(fast(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown QuantLinear backend 'cuda-int4'"):
        prepared[0].set_backend("cuda-int4")


class LowRank(nn.Module):
    """A factorised linear ``W = U V`` (not a QuantLinear): enough members to be compressed."""

    def __init__(self, w: Tensor, rank: int) -> None:
        super().__init__()
        u, s, v = torch.linalg.svd(w, full_matrices=False)
        self.u, self.v = nn.Parameter(u[:, :rank] * s[:rank]), nn.Parameter(v[:rank])
        self.out_features, self.in_features = w.shape
        self.bias = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.u @ self.v).to(dtype)

    def stored_bytes(self) -> int:
        return (self.u.numel() + self.v.numel()) * 4

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.v.T @ self.u.T


def test_metrics_ask_the_protocol_not_the_class(tokenizer):
    """Any layer with the protocol's members counts as its logical ``in × out`` weight."""
    model = make_tiny(tokenizer)
    dense_params, dense_macs = param_count(model), macs_per_token(model, 16)["linear"]
    name = "model.layers.0.mlp.up_proj"
    w = model.get_submodule(name).weight.detach()
    model.set_submodule(name, LowRank(w, 4))
    assert is_compressed(model.get_submodule(name)) and not is_compressed(nn.Linear(2, 2))
    assert list(compressed_linears(model)) == [name]
    assert macs_per_token(model, 16)["linear"] == dense_macs
    low_rank_params = 4 * sum(w.shape)
    assert param_count(model) == dense_params + low_rank_params  # its factors, plus its logical weight
    assert set(CODECS) == {"gptq", "gemm", "pack-quantized"}
