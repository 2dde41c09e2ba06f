"""The fused LoRA layers: the same outputs and gradients as peft's own layers and as a float64
reference of the LoRA formula (dense and NF4 bases, edge shapes, eager and compiled), and peft's
path wherever the fused one does not apply."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from llmlite.training.fused_lora import _fusable_base, fuse_lora_layers
from llmlite.training.nf4 import reuse_dequantization_buffer


class _Net(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _lora(proj: nn.Module, rank: int = 4, dropout: float = 0.0, **kwargs) -> nn.Module:
    """``proj`` wrapped by peft with adapters whose B is non-zero (peft starts B at zero)."""
    config = LoraConfig(r=rank, lora_alpha=3 * rank, lora_dropout=dropout, target_modules=["proj"], **kwargs)
    model = get_peft_model(_Net(proj), config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model


def _layer(model: nn.Module) -> nn.Module:
    return model.get_base_model().proj


def _run(model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(grad)
    layer = _layer(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    grads = (x.grad, a.grad, b.grad)
    a.grad = b.grad = None
    return y.detach(), grads


def _same_as(ours: nn.Module, reference: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """``ours``' output and gradients, checked against ``reference``'s."""
    expected, expected_grads = _run(reference, x, grad)
    got, got_grads = _run(ours, x, grad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5)
    return got, got_grads


def _float64_lora(x, w, bias, a, b, scaling, grad):
    """Output and the gradients of x, A and B of ``x Wᵀ + b + s (x Aᵀ) Bᵀ`` in float64."""
    x, w, a, b, g = (t.detach().double().reshape(-1, t.shape[-1]) for t in (x, w, a, b, grad))
    y = x @ w.T + (0 if bias is None else bias.detach().double()) + scaling * (x @ a.T) @ b.T
    gx = g @ w + scaling * (g @ b) @ a
    ga = scaling * (g @ b).T @ x
    gb = scaling * g.T @ (x @ a.T)
    return y, (gx, ga, gb)


@pytest.mark.parametrize(
    "in_features,out_features,bias,rslora",
    [(576, 192, False, False), (130, 100, True, True), (2, 3, True, False)],
)
def test_fused_layer_matches_peft_and_float64(in_features, out_features, bias, rslora):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    reference = _lora(nn.Linear(in_features, out_features, bias=bias), use_rslora=rslora)
    ours = copy.deepcopy(reference)
    assert fuse_lora_layers(ours) == 1
    layer = _layer(ours)
    for shape in ((2, 7), (1, 1), (3, 0), (5,)):  # tokens in a batch, one token, empty, 2-D input
        x = torch.randn(*shape, in_features)
        assert _fusable_base(layer, x) is layer.base_layer
        grad = torch.randn(*shape, out_features)
        got, got_grads = _same_as(ours, reference, x, grad)

        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        y64, grads64 = _float64_lora(x, layer.base_layer.weight, layer.base_layer.bias, a, b,
                                     layer.scaling["default"], grad)  # fmt: skip
        torch.testing.assert_close(got.double().reshape(y64.shape), y64, atol=1e-5, rtol=1e-5)
        for g, g64 in zip(got_grads, grads64, strict=True):
            torch.testing.assert_close(g.double().reshape(g64.shape), g64, atol=1e-4, rtol=1e-5)
        assert layer.base_layer.weight.grad is None  # the base stays frozen


def _nf4(in_features: int, out_features: int) -> bnb.nn.Linear4bit:
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=True)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features) * 0.05, quant_type="nf4",
                                     compress_statistics=True, requires_grad=False)  # fmt: skip
    return layer.to("cpu")  # quantizes


def test_nf4_base_keeps_peft_path():
    # fused, QLoRA's compiled peak rose by ~0.35 GiB (docs/benchmarks/finetune.md)
    model = _lora(_nf4(130, 96))
    reuse_dequantization_buffer(model)
    x = torch.randn(2, 5, 130)
    expected = model(x)
    fuse_lora_layers(model)
    assert _fusable_base(_layer(model), x) is None
    torch.testing.assert_close(model(x), expected)


def test_compiled_fused_layer_matches_eager():
    model = _lora(nn.Linear(64, 48, bias=True))
    fuse_lora_layers(model)
    compiled = copy.deepcopy(model)
    compiled.compile(dynamic=True)
    for tokens in (5, 9):
        x, grad = torch.randn(2, tokens, 64), torch.randn(2, tokens, 48)
        _same_as(compiled, model, x, grad)


def test_other_cases_keep_peft_path():
    x = torch.randn(3, 16)
    dropout = _lora(nn.Linear(16, 8), dropout=0.5)
    fuse_lora_layers(dropout)
    assert _fusable_base(_layer(dropout), x) is None  # dropout active in training
    dropout.eval()
    assert _fusable_base(_layer(dropout), x) is not None  # inactive when evaluating

    dora = _lora(nn.Linear(16, 8), use_dora=True)
    expected = dora(x)
    fuse_lora_layers(dora)
    assert _fusable_base(_layer(dora), x) is None
    torch.testing.assert_close(dora(x), expected)

    merged = _lora(nn.Linear(16, 8))
    fuse_lora_layers(merged)
    fused = merged(x)
    with merged.disable_adapter():
        assert _fusable_base(_layer(merged), x) is None
        plain = merged(x)
    torch.testing.assert_close(plain, _layer(merged).base_layer(x))
    merged.merge_adapter()
    assert _fusable_base(_layer(merged), x) is None
    torch.testing.assert_close(merged(x), fused, atol=1e-5, rtol=1e-5)

    wrong_dtype = x.double()
    assert _fusable_base(_layer(_lora(nn.Linear(16, 8))), wrong_dtype) is None
