"""peft LoRA layers with a hand-written forward and backward for the common case.

peft's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. Autograd then
materialises the adapter's [tokens x out] output and adds it, scales the incoming gradient into a
new [tokens x out] tensor, and adds two [tokens x in] input gradients. Here the BLAS accumulates
instead: the adapter's product goes into the base output (``addmm_``), the scaling onto the thin
[tokens x rank] tensors, and the adapter's input gradient into the base's. Same math, no extra
full-width tensors: a LoRA decoder layer's forward and backward take about a tenth less time on
the CPU (docs/finetune.md).

Only the layers peft builds stay in the model (saving, loading and merging are peft's); just
their ``forward`` is switched. It falls back to peft's own for anything else: DoRA and other
variants, active dropout, several or disabled adapters, merged weights, mixed-adapter batches,
trainable base weights, and bases other than a plain ``nn.Linear`` (QLoRA's NF4, GPTQ).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _LoraLinear(torch.autograd.Function):
    """``x Wᵀ + b + s (x Aᵀ) Bᵀ`` with ``W`` and ``b`` frozen."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scaling, weight, bias):
        flat = x.reshape(-1, x.shape[-1])
        y = flat @ weight.T if bias is None else torch.addmm(bias, flat, weight.T)
        u = flat @ lora_a.T
        y.addmm_(u, lora_b.T, alpha=scaling)
        ctx.save_for_backward(flat, lora_a, lora_b, u, weight)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, lora_a, lora_b, u, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gu = (g @ lora_b).mul_(ctx.scaling)
        grad_a = gu.T @ flat if ctx.needs_input_grad[1] else None
        grad_b = (g.T @ u).mul_(ctx.scaling) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gu, lora_a).view(*grad.shape[:-1], flat.shape[-1])
        return grad_x, grad_a, grad_b, None, None, None


def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    """peft ``lora.Linear.forward``, through ``_LoraLinear`` where it applies."""
    base = _fusable_base(self, x) if not args and not kwargs else None
    if base is None:
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    a, b, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    return _LoraLinear.apply(x, a, b, scaling, base.weight, base.bias)


def _fusable_base(layer: nn.Module, x: Tensor) -> nn.Module | None:
    """The base layer when ``layer``'s call is plain LoRA on a supported base, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant:
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and (dropout.training and dropout.p > 0):
        return None
    base = layer.base_layer
    if x.dtype != layer.lora_A[name].weight.dtype or x.dtype != layer.lora_B[name].weight.dtype:
        return None
    if type(base) is nn.Linear:
        frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        return base if frozen and base.weight.dtype == x.dtype else None
    return None


def fuse_lora_layers(model: nn.Module) -> int:
    """Switch the ``forward`` of every peft ``lora.Linear`` in ``model`` to the fused path (each call
    still falls back to peft's where it does not apply). Returns how many layers were switched."""
    from peft.tuners.lora import Linear

    switched = 0
    for module in model.modules():
        if type(module) is Linear:
            module.forward = _forward.__get__(module)
            switched += 1
    return switched
