"""AWQ's smoothing of one Llama-style decoder layer, before the layer walk quantizes it: the
scales of ``llmlite.quant.awq`` searched on the float layer's calibration inputs and folded into
the weights, so that the layer computes the same function (to float32 rounding) with weights that
quantize better.

The four mappings of ``arch.Family.smoothing``, each ``y = x Wᵀ`` with ``x`` produced by the
module before it (``x → x / s`` there, ``W → W diag s``):

* ``input_layernorm → q, k, v`` and ``post_attention_layernorm → gate, up``: the norm's weight;
* ``v_proj → o_proj``: the value rows; one scale per value channel, shared by the channel of every
  query head that reads it (GQA), since attention mixes tokens, not channels;
* ``up_proj → down_proj``: the up rows (``down`` reads ``act(gate) · up``, linear in ``up``).

A folded norm weight is rounded to the checkpoint's storage dtype and the linears take exactly the
scale that rounding left, so the checkpoint holds the function the walk calibrated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmlite.arch import LLAMA
from llmlite.quant.awq import Quantizer, search_scales
from llmlite.quant.gptq import accumulate_hessian, finish_hessian, gptq
from llmlite.quant.grid import fake_quantize
from llmlite.quant.hooks import input_of


@dataclass
class SmoothRecord:
    mapping: str  # e.g. "layers.3.input_layernorm -> q_proj,k_proj,v_proj"
    ratio: float | None  # the winning r of s = x̄ʳ / w̄¹⁻ʳ; None: no scaling won
    error: float  # the group's output error after quantization, relative to no scaling (≤ 1)


class _InputStats:
    """The Hessian ``2 XᵀX / tokens`` and mean ``|x|`` of one group's inputs, accumulated."""

    def __init__(self) -> None:
        self.h: Tensor | None = None
        self.abs_sum: Tensor | None = None
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.h is None:
            self.h = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.abs_sum = torch.zeros(x.shape[1], device=x.device)
        accumulate_hessian(self.h, x)
        self.abs_sum += x.abs().sum(0)
        self.tokens += x.shape[0]

    def finish(self) -> tuple[Tensor, Tensor]:
        return finish_hessian(self.h, self.tokens), self.abs_sum / max(self.tokens, 1)


def rtn(bits: int, group_size: int, sym: bool) -> Quantizer:
    """Round to nearest on the grid the walk will use (AWQ's own quantizer)."""
    return lambda w, _h: fake_quantize(w, bits, group_size, sym)


def plain_gptq(bits: int, group_size: int, sym: bool, act_order: bool, damp: float) -> Quantizer:
    """GPTQ on the weight's own input Hessian, on the grid the walk will use (AWQ→GPTQ's search);
    without the walk's clipping search, drift correction and scale refit, which come once after."""
    return lambda w, h: gptq(w, h, bits, group_size, sym, act_order, damp).weight.dequantize()


def by_rows(quantizer: Callable[[int], Quantizer], widths: list[int], rows: list[int]) -> Quantizer:
    """The quantizer of a stacked weight whose row blocks (``rows`` each) take their own ``widths``
    (``quantizer(bits)`` each; one call when all are equal: both quantizers treat rows apart)."""
    if len(set(widths)) == 1:
        return quantizer(widths[0])
    parts = [quantizer(b) for b in widths]
    return lambda w, h: torch.cat([q(p, h) for p, q in zip(w.split(rows), parts, strict=True)])


def value_tie(heads: int, kv_heads: int, head_dim: int) -> Tensor:
    """``[heads · head_dim]``: the value channel each input column of ``o_proj`` reads (GQA)."""
    j = torch.arange(heads * head_dim)
    return (j // head_dim) // (heads // kv_heads) * head_dim + j % head_dim


@torch.no_grad()
def _layer_inputs(layer: nn.Module, hidden: list[Tensor], kwargs: list[dict]) -> list[_InputStats]:
    """Statistics of the inputs of q/k/v, o, gate/up and down: one float forward of ``layer``
    (``hidden`` is left as it is)."""
    attn, mlp = layer.self_attn, layer.mlp
    stats = [_InputStats() for _ in range(4)]
    for h, kw in zip(hidden, kwargs, strict=True):
        x = layer.input_layernorm(h)
        stats[0].add(x)
        a = input_of(attn.o_proj, attn, x, kw)
        stats[1].add(a)
        x = layer.post_attention_layernorm(h + attn.o_proj(a))
        stats[2].add(x)
        stats[3].add(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    return stats


def _fold_norm(norm: nn.Module, linears: list[nn.Linear], s: Tensor, dtype: torch.dtype) -> None:
    """``norm.weight / s``, rounded to ``dtype``; each linear's columns times the scale that the
    rounded weight really applies."""
    old = norm.weight.detach().float()
    new = (old / s).to(dtype).float()
    applied = torch.where(new != 0, old / new, s)
    norm.weight.data = new.to(norm.weight.dtype)
    for linear in linears:
        linear.weight.data = (linear.weight.detach().float() * applied).to(linear.weight.dtype)


def _fold_linear(before: nn.Linear, linears: list[nn.Linear], s_out: Tensor, s_in: Tensor) -> None:
    """``before``'s output rows (and bias) divided by ``s_out``; the columns of each linear that
    reads them multiplied by ``s_in`` (``s_out`` itself, or repeated per query head for v → o)."""
    before.weight.data = (before.weight.detach().float() / s_out[:, None]).to(before.weight.dtype)
    if before.bias is not None:
        before.bias.data = (before.bias.detach().float() / s_out).to(before.bias.dtype)
    for linear in linears:
        linear.weight.data = (linear.weight.detach().float() * s_in).to(linear.weight.dtype)


@torch.no_grad()
def smooth_layer(
    layer: nn.Module,
    hidden: list[Tensor],
    kwargs: list[dict],
    bits: int | Callable[[str], int],
    group_size: int,
    quantizer: Callable[[int], Quantizer],
    dtype: torch.dtype = torch.float16,
    value_mapping: bool = True,
    prefix: str = "",
) -> list[SmoothRecord]:
    """Search and fold AWQ's scales into ``layer`` (Llama layout, float weights) on its inputs
    ``hidden`` (chunks ``[b, seqlen, d]``, with the model's per-chunk ``kwargs``); the search scores
    each candidate with ``quantizer(width)`` (``rtn`` or ``plain_gptq``) at ``bits`` (or
    ``bits(name)`` per linear: mixed precision) and ``group_size``. ``value_mapping=False`` skips
    ``v_proj → o_proj``. Returns what each mapping chose."""
    stats = _layer_inputs(layer, hidden, kwargs)
    width = bits if callable(bits) else lambda _name: bits
    config = layer.self_attn.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = layer.self_attn.head_dim
    records = []
    for (before_name, names), stat in zip(LLAMA.smoothing(), stats, strict=True):
        is_value = before_name.endswith(LLAMA.v)
        if is_value and not value_mapping:
            continue
        before = layer.get_submodule(before_name)
        linears = [layer.get_submodule(n) for n in names]
        h, x_mean = stat.finish()
        w = torch.cat([m.weight.detach().float() for m in linears])
        quantize = by_rows(quantizer, [width(n) for n in names], [m.out_features for m in linears])
        tie = value_tie(heads, kv_heads, head_dim) if is_value else None
        found = search_scales(w, h, x_mean, quantize, group_size, tie)
        short = ",".join(n.rsplit(".", 1)[-1] for n in names)
        rel = found.error / found.identity_error if found.identity_error > 0 else 1.0
        records.append(SmoothRecord(f"{prefix}{before_name} -> {short}", found.ratio, rel))
        if found.ratio is None:
            continue
        if isinstance(before, nn.Linear):
            s_out = found.scale  # up → down: one scale per up row
            if is_value:  # one per value channel: the scale its query heads' columns share
                s_out = torch.ones(before.out_features).index_copy_(0, tie, found.scale)
            _fold_linear(before, linears, s_out, found.scale)
        else:
            _fold_norm(before, linears, found.scale, dtype)
    return records
