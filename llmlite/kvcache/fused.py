"""Decode attention that reads the quantized KV cache where it lies (``llmlite/native/kvattend.c``).

For one new token per sequence, with ``q [b, heads, 1, d]`` (already rotated) and everything a
``QuantizedKVLayer`` stores (the new token included, ``store``d first):

    scores = q · [sinks | quantized keys, dequantized and rotated per token | recent] · scaling
    out    = softmax(scores) · [sinks | quantized values | recent]

Everything runs in C: the quantized keys' scores and values' sums, each token's codes dequantized
into registers and used at once (no float copy of the cache is made), and the float parts (sinks,
recent window), the softmax and the new token (``llmlite_kv_combine``).
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
from llmlite.kvcache.backend import TorchBackend
from llmlite.kvcache.quant import QuantizedTensor, reserve
from llmlite.kvcache.salient import ALPHA, ChannelStats, SalientKeys, reserve_keys, salient_bits

MODULE = "llmlite.native.kvattend"
MAX_CHANNELS = 4096  # the C loops' stack buffers


def _load() -> ctypes.CDLL | None:
    lib = load_library(MODULE)
    if lib is None:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.llmlite_kv_key_scores.argtypes = [p, p, p, i64, i64, p, p, p, *[i64] * 4, i32, i64, p]
    lib.llmlite_kv_value_sums.argtypes = [p] * 4 + [i64] * 5 + [i32, i64, p, p]
    lib.llmlite_kv_salient_scores.argtypes = [p, p, i32, p, p, p, i32, p, i64, *[p] * 5, *[i64] * 4, p]
    lib.llmlite_kv_combine.argtypes = [p, p, p, i64, p, i64, i64, p, i64, p, i64, p, p, i64, i64, i64, p, p]
    lib.llmlite_kv_quantize_rows.argtypes = [p, i64, i64, i32, i64, p, p, p]
    f32 = ctypes.c_float
    lib.llmlite_kv_encode_salient.argtypes = [p, *[i64] * 4, *[p] * 5, i64, i32, i32, f32, *[p] * 5]
    return lib


_LIB = _load()
AVAILABLE = _LIB is not None


class NativeBackend(TorchBackend):
    """``TorchBackend`` whose per-token quantization (values: ``axis=-1``, float16 statistics, on
    the CPU) runs in C (``llmlite_kv_quantize_rows``), bit for bit the same: one call where torch
    takes some thirty small operations for the token each decode step adds."""

    name = "native"

    def quantize(
        self, x: Tensor, bits: int, group_size: int, axis: int, stats_dtype: torch.dtype
    ) -> QuantizedTensor:
        if _LIB is None or axis != -1 or stats_dtype != torch.float16 or x.device.type != "cpu":
            return super().quantize(x, bits, group_size, axis, stats_dtype)
        *lead, channels = x.shape
        rows = x.reshape(-1, channels).float().contiguous()
        groups = -(-channels // group_size)
        codes = torch.empty(*lead, -(-channels * bits // 8), dtype=torch.uint8)
        scale = torch.empty(*lead, groups, dtype=torch.float16)
        minimum = torch.empty_like(scale)
        _LIB.llmlite_kv_quantize_rows(
            rows.data_ptr(), rows.shape[0], channels, bits, group_size,
            codes.data_ptr(), scale.data_ptr(), minimum.data_ptr(),
        )  # fmt: skip
        return QuantizedTensor(codes, scale, minimum, bits, channels, group_size, -1)

    def append_quantized(
        self,
        into: QuantizedTensor | None,
        x: Tensor,
        bits: int,
        group_size: int,
        axis: int,
        stats_dtype: torch.dtype,
    ) -> QuantizedTensor:
        """``TorchBackend.append_quantized`` with the rows quantized in C straight into the room
        ``quant.reserve`` makes at the end of ``into`` (values: ``axis=-1``, float16, CPU)."""
        if into is None or axis != -1 or stats_dtype != torch.float16 or x.device.type != "cpu":
            return super().append_quantized(into, x, bits, group_size, axis, stats_dtype)
        b, _, n, channels = x.shape
        rows, first = x.float().contiguous(), into.tokens
        out = reserve(into, n)
        for i in range(b):
            _LIB.llmlite_kv_quantize_rows(
                rows[i].data_ptr(), n, channels, bits, group_size, *(_row(t, i, first) for t in out.tensors())
            )
        return out

    def store_keys(
        self,
        into: SalientKeys | None,
        keys: Tensor,
        angles: tuple[Tensor, Tensor] | None,
        stats: ChannelStats,
        bits: int,
        stats_dtype: torch.dtype,
    ) -> SalientKeys:
        """``TorchBackend.store_keys`` in one C call per sequence (``llmlite_kv_encode_salient``),
        bit for bit the same, writing straight into the room ``quant.reserve`` makes at the end
        of ``into``; for float16 statistics on the CPU (torch's otherwise)."""
        if _LIB is None or stats_dtype != torch.float16 or keys.device.type != "cpu":
            return super().store_keys(into, keys, angles, stats, bits, stats_dtype)
        b, h, n, d = keys.shape
        keys = keys.float()
        if keys.stride(-1) != 1 or keys.stride(-2) != d:
            keys = keys.contiguous()
        window, chosen = keys.stride(1) // d, stats.salient
        if into is None:
            into = _empty_keys(b, h * d, chosen.numel(), bits, keys.device)
        first, out = into.tokens, reserve_keys(into, n)
        cos, sin = (0, 0) if angles is None else (t.data_ptr() for t in angles)  # rows of the RoPE table
        fields = [t if t is not None else out.step for t in out.fields()]  # absent ones are not written
        for i in range(b):
            rows = (_row(t, i, first) for t in fields)
            _LIB.llmlite_kv_encode_salient(
                _row(keys, i, 0), h, window, n, d, cos, sin, stats.mean.data_ptr(), stats.std.data_ptr(),
                chosen.data_ptr(), chosen.numel(), bits, salient_bits(bits), ALPHA[bits], *rows,
            )  # fmt: skip
        return out


def _row(t: Tensor, i: int, row: int) -> int:
    """The address of ``t[i, ..., row, 0]`` (sequence ``i``; rows along dim -2)."""
    return t.data_ptr() + (i * t.stride(0) + row * t.stride(-2)) * t.element_size()


def _empty_keys(b: int, channels: int, n_salient: int, bits: int, device) -> SalientKeys:
    """``SalientKeys`` of no tokens (``salient.encode_keys``' layout), for ``reserve_keys`` to grow."""
    high_bits = salient_bits(bits) - bits

    def empty(width: int, dtype: torch.dtype = torch.float16) -> Tensor:
        return torch.empty(b, 1, 0, width, dtype=dtype, device=device)

    low = empty(-(-channels * bits // 8), torch.uint8)
    if not n_salient:
        return SalientKeys(low, empty(1), None, None, None, bits, 0)
    high = empty(-(-n_salient * high_bits // 8), torch.uint8) if high_bits else None
    return SalientKeys(low, empty(1), high, empty(1), empty(1), bits, n_salient)


def default_backend() -> TorchBackend:
    """``NativeBackend`` where the extension is built, else ``TorchBackend``."""
    return NativeBackend() if _LIB is not None else TorchBackend()


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
    if spec.storage_dtype != torch.float16:
        return f"{spec.storage_dtype} statistics (the C loops read float16)"
    h, d = layer.recent_values.shape[1], layer.recent_values.shape[-1]
    heads = query.shape[1]
    if d % 2 or h * d > MAX_CHANNELS or heads * d > 8 * MAX_CHANNELS or (d * spec.bits) % 8:
        return f"{h} heads of {d} channels at {spec.bits} bits"
    return None


def _salient_scores(layer, qg: Tensor) -> Tensor:
    """``_key_scores`` for the salient scheme's keys (``salient.SalientKeys``, float16 statistics)."""
    keys, stats = layer.quant_keys, layer.key_stats
    b, h, groups, d = qg.shape
    cos, sin = layer.rope.angles(layer.sink_keys.shape[-2], keys.tokens, qg.device)
    fields = [t if t is not None else keys.step for t in keys.fields()]  # absent ones are not read
    scores = qg.new_empty(b, h, groups, keys.tokens)
    for i in range(b):
        low, step, high, scale, minimum = (_row(t, i, 0) for t in fields)
        _LIB.llmlite_kv_salient_scores(
            low, step, keys.bits, high, scale, minimum, salient_bits(keys.bits), stats.salient.data_ptr(),
            keys.n_salient, stats.mean.data_ptr(), stats.std.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            _row(qg, i, 0), h, keys.tokens, d, groups, _row(scores, i, 0),
        )  # fmt: skip
    return scores


def _key_scores(layer, qg: Tensor) -> Tensor:
    """Scores ``[b, kv_heads, group, tokens]`` of the quantized keys for ``qg [b, kv_heads, group, d]``
    (KIVI: per-channel float16 statistics)."""
    q = layer.quant_keys
    b, h, tokens, _ = q.codes.shape
    d, groups = qg.shape[-1], qg.shape[2]
    cos, sin = layer.rope.angles(layer.sink_keys.shape[-2], tokens, qg.device)
    scores = qg.new_empty(b, h, groups, tokens)
    code_rows, stat_rows = q.codes.stride(1) // q.codes.shape[-1], q.scale.stride(1) // d  # room per head
    for i in range(b):
        _LIB.llmlite_kv_key_scores(
            _row(q.codes, i, 0), _row(q.scale, i, 0), _row(q.minimum, i, 0), code_rows, stat_rows,
            cos.data_ptr(), sin.data_ptr(), _row(qg, i, 0), h, tokens, d, groups, q.bits, q.group_size,
            _row(scores, i, 0),
        )  # fmt: skip
    return scores


def _add_value_sums(layer, probs: Tensor, out: Tensor) -> None:
    """Add to ``out [b, kv_heads, group, d]`` the quantized values weighted by their columns of
    ``probs [b, kv_heads, group, L]`` (after the sinks); the salient scheme's rotated values are
    turned back (``layer.rotation``) in the same call. Statistics float16."""
    q = layer.quant_values
    b, h, groups, length = probs.shape
    d, sinks = out.shape[-1], layer.sink_values.shape[-2]
    rotation = 0 if layer.rotation is None else layer.rotation.data_ptr()
    for i in range(b):
        start = _row(probs, i, 0) + sinks * probs.element_size()
        _LIB.llmlite_kv_value_sums(
            _row(q.codes, i, 0), _row(q.scale, i, 0), _row(q.minimum, i, 0), start, length,
            h, q.tokens, d, groups, q.bits, q.group_size, rotation, _row(out, i, 0),
        )  # fmt: skip


def attend(layer, query: Tensor, new_key: Tensor, new_value: Tensor, scaling: float) -> Tensor:
    """``softmax(q Kᵀ · scaling) V`` over all ``layer`` stores: ``[b, heads, 1, d]`` in ``query``'s
    dtype. ``new_key``/``new_value`` ``[b, kv_heads, 1, d]``: the token just stored, exactly."""
    b, heads, _, d = query.shape
    kv_heads = layer.recent_values.shape[1]
    qg = (query.float() * scaling).reshape(b, kv_heads, heads // kv_heads, d).contiguous()
    if isinstance(layer.quant_keys, SalientKeys):
        qscores = _salient_scores(layer, qg)
    elif layer.quant_keys is not None:
        qscores = _key_scores(layer, qg)
    else:
        qscores = qg.new_empty(b, kv_heads, qg.shape[2], 0)
    tq = qscores.shape[-1]
    tv = 0 if layer.quant_values is None else layer.quant_values.tokens
    sink_k, sink_v, recent_k, recent_v = (  # float16, as stored (``unsupported`` checks)
        t.contiguous() for t in (layer.sink_keys, layer.sink_values, layer.recent_keys, layer.recent_values)
    )
    new_k, new_v = new_key.float().contiguous(), new_value.float().contiguous()
    sinks, rk, rv = sink_k.shape[2], recent_k.shape[2], recent_v.shape[2]
    probs = qg.new_empty(b, kv_heads, qg.shape[2], sinks + tq + rk)
    out = torch.empty_like(qg)
    for i in range(b):
        _LIB.llmlite_kv_combine(
            _row(qg, i, 0), _row(sink_k, i, 0), _row(sink_v, i, 0), sinks, _row(qscores, i, 0), tq, tv,
            _row(recent_k, i, 0), rk, _row(recent_v, i, 0), rv, _row(new_k, i, 0), _row(new_v, i, 0),
            kv_heads, qg.shape[2], d, _row(probs, i, 0), _row(out, i, 0),
        )  # fmt: skip
    if tv:
        _add_value_sums(layer, probs, out)
    return out.reshape(b, heads, 1, d).to(query.dtype)
