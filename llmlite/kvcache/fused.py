"""Decode attention that reads the quantized KV cache where it lies (``llmlite/native/kvattend.c``).

For one new token per sequence, with ``q [b, heads, 1, d]`` (already rotated) and everything a
``QuantizedKVLayer`` stores (the new token included, ``store``d first):

    scores = q · [sinks | quantized keys, dequantized and rotated per token | recent] · scaling
    out    = softmax(scores) · [sinks | quantized values | recent]

The float parts (sinks, recent) are small products in torch; the quantized part runs in C, each
token's codes dequantized into registers and used at once, so no float copy of the cache is made.
The new token's own key and value enter exactly (as ``QuantizedKVLayer._read`` gives them), not
as stored. Served: both schemes (KIVI; salient, whose values are summed in the rotated basis and
turned back once), 2/4/8 bits, on the CPU, with RoPE frequencies; other layers (``unsupported``
says why) are read back by ``_read`` and attended by torch.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from llmlite.kernels.native import load_library
from llmlite.kvcache.salient import SalientKeys

MODULE = "llmlite.native.kvattend"
MAX_CHANNELS = 4096  # the C loops' stack buffers


def _load() -> ctypes.CDLL | None:
    lib = load_library(MODULE)
    if lib is None:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    common = [i64] * 4 + [i32, i64, p]
    lib.llmlite_kv_key_scores.argtypes = [p] * 6 + common
    lib.llmlite_kv_value_sums.argtypes = [p] * 4 + common
    lib.llmlite_kv_salient_scores.argtypes = [p, p, i32, i64, p, p, p, i32] + [p] * 6 + [i64] * 4 + [p]
    return lib


_LIB = _load()
AVAILABLE = _LIB is not None


def unsupported(layer, query: Tensor) -> str | None:
    """Why ``attend`` cannot serve ``layer`` for ``query`` (None: it can)."""
    spec = layer.spec
    if _LIB is None:
        return "the native kvattend extension is not built"
    if spec.bits == 16:
        return "the unquantized (16-bit) cache"
    if query.device.type != "cpu" or query.shape[-2] != 1:
        return "not one new token on the CPU"
    if layer.inv_freq is None:
        return "no RoPE frequencies"
    h, d = layer.recent_values.shape[1], layer.recent_values.shape[-1]
    if d % 2 or h * d > MAX_CHANNELS or (d * spec.bits) % 8:
        return f"{h} heads of {d} channels at {spec.bits} bits"
    return None


def _salient_scores(layer, qg: Tensor) -> Tensor:
    """``_key_scores`` for the salient scheme's keys (plain and salient channels, per token)."""
    keys, stats = layer.quant_keys, layer.key_stats
    plain, salient = keys.plain, keys.salient
    b, h, groups, d = qg.shape
    tokens = plain.tokens
    cos, sin = layer.rope.angles(layer.sink_keys.shape[-2], tokens, qg.device)
    mean, std = stats.mean.float().flatten(), stats.std.float().flatten()
    inverse = stats.inverse.to(torch.int32).contiguous()
    scores = qg.new_empty(b, h, groups, tokens)
    for i in range(b):
        codes, step = plain.codes[i, 0].contiguous(), plain.scale[i, 0].float().contiguous()
        if salient is None:
            s_codes = s_scale = s_min = codes  # not read: no salient channels
            s_bits = plain.bits
        else:
            s_codes, s_bits = salient.codes[i, 0].contiguous(), salient.bits
            s_scale = salient.scale[i, 0].float().contiguous()
            s_min = salient.minimum[i, 0].float().contiguous()
        query = qg[i].contiguous()
        _LIB.llmlite_kv_salient_scores(
            codes.data_ptr(), step.data_ptr(), plain.bits, plain.channels, s_codes.data_ptr(),
            s_scale.data_ptr(), s_min.data_ptr(), s_bits, inverse.data_ptr(), mean.data_ptr(), std.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), query.data_ptr(), h, tokens, d, groups, scores[i].data_ptr(),
        )  # fmt: skip
    return scores


def _key_scores(layer, qg: Tensor) -> Tensor:
    """Scores ``[b, kv_heads, group, tokens]`` of the quantized keys for ``qg [b, kv_heads, group, d]``."""
    q = layer.quant_keys
    b, h, tokens, _ = q.codes.shape
    d, groups = qg.shape[-1], qg.shape[2]
    cos, sin = layer.rope.angles(layer.sink_keys.shape[-2], tokens, qg.device)
    scores = qg.new_empty(b, h, groups, tokens)
    for i in range(b):
        codes, scale, minimum = q.codes[i].contiguous(), q.scale[i].float(), q.minimum[i].float()
        query = qg[i].contiguous()
        _LIB.llmlite_kv_key_scores(
            codes.data_ptr(), scale.data_ptr(), minimum.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            query.data_ptr(), h, tokens, d, groups, q.bits, q.group_size, scores[i].data_ptr(),
        )  # fmt: skip
    return scores


def _value_sums(layer, probs: Tensor) -> Tensor:
    """``probs [b, kv_heads, group, tokens]`` times the quantized values: ``[b, kv_heads, group, d]``."""
    q = layer.quant_values
    b, h, groups, tokens = probs.shape
    d = layer.recent_values.shape[-1]
    out = probs.new_zeros(b, h, groups, d)
    for i in range(b):
        codes, scale, minimum = q.codes[i, 0].contiguous(), q.scale[i, 0].float(), q.minimum[i, 0].float()
        p = probs[i].contiguous()
        _LIB.llmlite_kv_value_sums(
            codes.data_ptr(), scale.data_ptr(), minimum.data_ptr(), p.data_ptr(),
            h, tokens, d, groups, q.bits, q.group_size, out[i].data_ptr(),
        )  # fmt: skip
    return out


def attend(layer, query: Tensor, new_key: Tensor, new_value: Tensor, scaling: float) -> Tensor:
    """``softmax(q Kᵀ · scaling) V`` over all ``layer`` stores: ``[b, heads, 1, d]`` in ``query``'s
    dtype. ``new_key``/``new_value`` ``[b, kv_heads, 1, d]``: the token just stored, exactly."""
    b, heads, _, d = query.shape
    kv_heads = layer.recent_values.shape[1]
    qg = (query.float() * scaling).view(b, kv_heads, heads // kv_heads, d)
    parts = [qg @ layer.sink_keys.float().transpose(-1, -2)]
    if isinstance(layer.quant_keys, SalientKeys):
        parts.append(_salient_scores(layer, qg))
    elif layer.quant_keys is not None:
        parts.append(_key_scores(layer, qg))
    parts.append(qg @ layer.recent_keys.float().transpose(-1, -2))
    scores = torch.cat(parts, -1)
    scores[..., -1] = (qg * new_key.float()).sum(-1)  # the new token's own key, exactly
    probs = torch.softmax(scores, -1)
    last = probs[..., -1:].clone()
    probs[..., -1] = 0  # its value enters exactly, below
    sinks = layer.sink_values.shape[-2]
    out = probs[..., :sinks] @ layer.sink_values.float()
    if layer.quant_values is not None:
        quantized = layer.quant_values.tokens
        summed = _value_sums(layer, probs[..., sinks : sinks + quantized])
        out += summed if layer.rotation is None else summed @ layer.rotation  # salient: stored rotated
        sinks += quantized
    out += probs[..., sinks:] @ layer.recent_values.float()
    out += last * new_value.float()
    return out.reshape(b, heads, 1, d).to(query.dtype)
