"""Model plumbing: find the attention layers, measure calibration statistics, rewrite k/v (and, for
the aligned method, q/o) projections in place."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlite.arch import LLAMA, attention_modules
from llmlite.errors import LlmliteError
from llmlite.gqa.heads import align_keys, align_values, key_weights, pool_heads, repeat_heads, value_weights
from llmlite.quant.checkpoint import quantized_error

SUPPORTED = ("llama", "mistral", "qwen2")
METHODS = ("mean", "weighted", "aligned")


def check_target(config, kv_heads: int) -> tuple[int, int]:
    """``(query heads, current key/value heads)`` of a model config, after checking that the
    architecture is supported and that ``kv_heads`` fits it."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise LlmliteError(
            f"GQA conversion does not support the '{model_type}' architecture; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    heads = config.num_attention_heads
    current = getattr(config, "num_key_value_heads", None) or heads
    fits = [g for g in range(1, heads + 1) if current % g == 0 or (g % current == 0 and heads % g == 0)]
    if kv_heads not in fits:
        raise LlmliteError(
            f"--kv-heads {kv_heads} does not fit a model with {heads} query heads and {current} key/value "
            f"heads (it must divide {current}, or be a multiple of {current} dividing {heads}); "
            f"use one of {', '.join(map(str, fits))}"
        )
    return heads, current


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer, checked to hold float ``nn.Linear`` projections."""
    qc = getattr(model, "llmlite_quantization", None)
    if qc:
        raise quantized_error(getattr(model, "llmlite_source", type(model).__name__), qc, "convert")
    try:
        layers = [m for m in attention_modules(model) if hasattr(m, "num_key_value_groups")]
    except LlmliteError:  # no decoder layers at all: the message below says what is needed
        layers = []
    if not layers:
        raise LlmliteError(
            f"found no attention layers with k_proj/v_proj in {type(model).__name__}; convert-gqa "
            "converts Llama, Mistral and Qwen2-style models"
        )
    for i, attn in enumerate(layers):
        for name in LLAMA.attention_projections:
            module = getattr(attn, name)
            if type(module) is not nn.Linear:
                raise LlmliteError(
                    f"layer {i}'s {name} is a {type(module).__name__}, not a float Linear (a quantized "
                    "checkpoint?); convert the float model first and quantize the result"
                )
    return layers


@dataclass
class LayerStats:
    query_energy: Tensor  # E[q²] of the q_proj outputs, [heads, d], float64
    moment: Tensor | None  # E[x xᵀ] of the inputs with a constant 1 appended, [n+1, n+1], float64


@torch.no_grad()
def calibration_stats(
    model: nn.Module, windows: Tensor, moments: bool = True, progress: bool = True
) -> list[LayerStats]:
    """Per attention layer, statistics of one forward pass of the (unchanged) model over token
    ``windows`` ``[n, seqlen]``: the query energy and, with ``moments``, the inputs' second moment."""
    layers = attention_layers(model)
    energy: list[Tensor] = [torch.zeros(()) for _ in layers]
    moment: list[Tensor] = [torch.zeros(()) for _ in layers]

    def hook(i: int):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            energy[i] = energy[i] + output.double().pow(2).reshape(-1, output.shape[-1]).sum(0)
            if moments:
                x = inputs[0].double().reshape(-1, inputs[0].shape[-1])
                x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
                moment[i] = moment[i] + x.mT @ x

        return record

    handles = [attn.q_proj.register_forward_hook(hook(i)) for i, attn in enumerate(layers)]
    device = next(model.parameters()).device
    body = decoder(model)
    try:
        for window in tqdm(windows, desc="calibration", unit="window", disable=not progress):
            body(window[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    heads, tokens = model.config.num_attention_heads, windows.numel()
    return [
        LayerStats((e / tokens).reshape(heads, -1).cpu(), (m / tokens).cpu() if moments else None)
        for e, m in zip(energy, moment, strict=True)
    ]


@torch.no_grad()
def convert_gqa(
    model: nn.Module,
    kv_heads: int,
    method: str = "mean",
    windows: Tensor | None = None,
    progress: bool = True,
) -> None:
    """Rewrite every layer's k_proj/v_proj in place for ``kv_heads`` key/value heads.

    Fewer heads: ``method`` "mean" pools contiguous groups; "weighted" pools with activation-aware
    weights from calibration token ``windows`` ``[n, seqlen]``; "aligned" aligns the heads before
    merging them and folds the alignment into q_proj/o_proj (see ``llmlite.gqa.heads``). More heads:
    each head repeated, an exact change (the same function). Sets ``config.num_key_value_heads`` and
    each layer's ``num_key_value_groups``.
    """
    if method not in METHODS:
        raise LlmliteError(f"unknown GQA method '{method}'; use one of: {', '.join(METHODS)}")
    heads, current = check_target(model.config, kv_heads)
    layers = attention_layers(model)
    if kv_heads == current:
        return
    stats = None
    if kv_heads < current and method != "mean":
        if windows is None:
            raise LlmliteError(f"the {method} method needs calibration windows; pass windows=[n, seqlen] ids")
        stats = calibration_stats(model, windows, moments=method == "aligned", progress=progress)
    for i, attn in enumerate(layers):
        if kv_heads > current:
            repeat = partial(repeat_heads, heads=current, times=kv_heads // current)
            _set_kv(attn, repeat, repeat)
        elif stats is None:
            mean = partial(pool_heads, heads=current, groups=kv_heads)
            _set_kv(attn, mean, mean)
        elif method == "weighted":
            kw = key_weights(stats[i].query_energy, current)
            vw = value_weights(attn.o_proj.weight, heads, current)
            pool = partial(pool_heads, heads=current, groups=kv_heads)
            _set_kv(attn, partial(pool, weights=kw), partial(pool, weights=vw))
        else:
            _align(attn, stats[i], heads, kv_heads)
        attn.num_key_value_groups = heads // kv_heads
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = kv_heads
    model.config.num_key_value_heads = kv_heads


def _set_kv(attn: nn.Module, keys, values) -> None:
    """Replace k_proj/v_proj with new Linears whose weight and bias are ``keys(t)``/``values(t)``."""
    for name, resize in (("k_proj", keys), ("v_proj", values)):
        old = getattr(attn, name)
        bias = None if old.bias is None else resize(old.bias.data)
        setattr(attn, name, _linear(old, resize(old.weight.data), bias))


def _align(attn: nn.Module, stats: LayerStats, heads: int, kv_heads: int) -> None:
    """The aligned method on one layer; biases travel as an extra input column (x gains a 1)."""
    q, k, v = (_with_bias(getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj"))
    new_k, new_q = align_keys(k, q, stats.query_energy, stats.moment, kv_heads)
    new_v, new_o = align_values(v, attn.o_proj.weight, stats.moment, heads, kv_heads)
    for name, full in (("q_proj", new_q), ("k_proj", new_k), ("v_proj", new_v)):
        old = getattr(attn, name)
        bias = None if old.bias is None else full[:, -1].to(old.weight.dtype)
        setattr(attn, name, _linear(old, full[:, :-1].to(old.weight.dtype), bias))
    attn.o_proj.weight.copy_(new_o)


def _with_bias(linear: nn.Linear) -> Tensor:
    """``[out, in + 1]``: the weight with the bias (or zeros) as its last column."""
    bias = torch.zeros_like(linear.weight[:, 0]) if linear.bias is None else linear.bias
    return torch.cat([linear.weight, bias[:, None]], 1)


def _linear(old: nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A Linear like ``old`` (device, dtype, trainability) holding ``weight`` and ``bias``."""
    new = nn.Linear(
        old.in_features, weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new.requires_grad_(old.weight.requires_grad)


def decoder(model: nn.Module) -> nn.Module:
    """The decoder body (embeddings, layers, final norm) of a causal LM, without lm_head."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model
