"""A quantized key/value cache for ``transformers`` (KIVI's scheme), usable with ``model.generate``
and with any forward pass that carries a cache (``cache=``, formerly ``past_key_values=``).

Per layer the cache holds, in token order: up to ``sinks`` first tokens in full precision, the
quantized middle, and the recent tokens in full precision. Keys are quantized per channel in
blocks of ``group_size`` tokens (after RoPE is undone, when the cache knows the model's
frequencies), values per token in groups of ``group_size`` channels, counted across the
key/value heads of the token (so that a group can be larger than one head). A block
leaves the full-precision window once ``residual`` newer tokens follow it: values one token at a
time, keys a whole group of tokens at a time, so that at most ``residual + group_size - 1`` keys
and ``residual`` values are in full precision. ``bits=16`` keeps everything in full precision
(the float16 cache, through the same code).

The ``salient`` scheme (``llmlite.kvcache.salient``) stores keys per token instead: normalised
per channel, the most important channels at twice the bits; values are rotated within each head
before quantization. It is the default at 2 bits.

The tokens of the forward pass that is running always see their own keys and values exactly, as
in real decoding; earlier tokens are read back from what the cache stores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from weakref import WeakKeyDictionary

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from llmlite.arch import LLAMA, attention_modules
from llmlite.errors import LlmliteError
from llmlite.kvcache import fused
from llmlite.kvcache.defaults import KV_DEFAULTS
from llmlite.kvcache.quant import SUPPORTED_BITS, QuantizedTensor, select
from llmlite.kvcache.rope import RopeTable, rotate
from llmlite.kvcache.salient import (
    FIT_TOKENS,
    ChannelStats,
    SalientKeys,
    decode_keys,
    fit_channels,
    hadamard,
    select_keys,
)

CACHE_BITS = (*SUPPORTED_BITS, 16)
SCHEMES = ("auto", "kivi", "salient")


@dataclass(frozen=True)
class KVSpec:
    """How a cache stores keys and values."""

    bits: int = 4
    group_size: int = KV_DEFAULTS["group_size"]
    residual: int = KV_DEFAULTS["residual"]
    sinks: int = KV_DEFAULTS["sinks"]
    storage_dtype: torch.dtype = torch.float16  # full-precision tokens, scales and minima
    scheme: str = "auto"  # kivi, salient, or auto: salient at 2 bits, kivi otherwise
    salient: float = KV_DEFAULTS["salient"]  # salient scheme: fraction of key channels at 2x bits

    def validate(self) -> KVSpec:
        """This spec checked, with ``auto`` resolved."""
        if self.bits not in CACHE_BITS:
            raise LlmliteError(
                f"--kv-bits {self.bits} is not supported; use 2, 4 or 8 (or 16 for the unquantized cache)"
            )
        if self.group_size < 1:
            raise LlmliteError(
                f"--kv-group-size {self.group_size} is invalid; use a positive size such as 64"
            )
        if self.residual < 0:
            raise LlmliteError(f"--kv-residual {self.residual} is invalid; use 0 or more recent tokens")
        if self.sinks < 0:
            raise LlmliteError(f"--kv-sinks {self.sinks} is invalid; use 0 or more initial tokens")
        if self.scheme not in SCHEMES:
            raise LlmliteError(f"--kv-scheme {self.scheme} is unknown; use one of: {', '.join(SCHEMES)}")
        if not 0 <= self.salient < 1:
            raise LlmliteError(
                f"--kv-salient {self.salient} is out of range; use a fraction of key channels in [0, 1)"
            )
        if self.scheme == "auto":
            return replace(self, scheme="salient" if self.bits == 2 else "kivi")
        return self


def _cat(parts: list[Tensor]) -> Tensor:
    """Join along the token axis into a tensor that owns exactly its storage (never a view of a
    larger one, which would keep that alive and make the accounting wrong)."""
    parts = [p for p in parts if p is not None and p.shape[-2] > 0] or parts[:1]
    if len(parts) > 1:
        return torch.cat(parts, dim=-2)
    t = parts[0]
    exact = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if exact else t.clone(memory_format=torch.contiguous_format)


class QuantizedKVLayer(CacheLayerMixin):
    """One decoder layer's share of a ``QuantizedKVCache``."""

    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        spec: KVSpec,
        backend=None,
        inv_freq: Tensor | None = None,
        query_weight: Tensor | None = None,
        rope: RopeTable | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.backend = backend or fused.default_backend()
        self.inv_freq = inv_freq
        self.rope = rope or RopeTable(inv_freq)  # shared by a cache's layers
        self.query_weight = query_weight  # salient scheme: [heads, dim] weight of each key channel
        self.key_stats: ChannelStats | None = None  # salient scheme: fitted on the first keys
        self.rotation: Tensor | None = None  # salient scheme: Hadamard matrix applied to values
        self.length = 0
        self.sink_keys = self.sink_values = None  # [b, h, <=sinks, d], storage dtype
        self.recent_keys = self.recent_values = None  # [b, h, n, d], storage dtype
        self.quant_keys: QuantizedTensor | SalientKeys | None = None
        self.quant_values: QuantizedTensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if self.spec.scheme == "salient" and d & (d - 1) == 0:
            self.rotation = hadamard(d).to(self.device)
        empty = key_states.new_empty((b, h, 0, d), dtype=self.spec.storage_dtype)  # owns no storage
        self.sink_keys = self.sink_values = self.recent_keys = self.recent_values = empty
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Store the new states; return all keys and values so far ``[b, h, tokens, d]``."""
        self.store(key_states, value_states)
        return self._read(key_states, value_states)

    def attend(self, query: Tensor, new_key: Tensor, new_value: Tensor, scaling: float) -> Tensor | None:
        """Store one new token ``[b, kv_heads, 1, d]`` and return the attention of ``query [b, heads,
        1, d]`` over everything stored, read in place (``fused.attend``); None, with nothing stored,
        where ``fused`` does not serve this layer (then ``update`` and any attention apply)."""
        if not self.is_initialized or fused.unsupported(self, query) is not None:
            return None
        self.store(new_key, new_value)
        return fused.attend(self, query, new_key, new_value, scaling)

    def store(self, key_states: Tensor, value_states: Tensor) -> None:
        """Store the new states ``[b, h, tokens, d]`` (``update`` without reading back)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self.length += n
        store = self.spec.storage_dtype
        k, v = key_states.to(store), value_states.to(store)
        room = max(0, self.spec.sinks - self.sink_keys.shape[-2])
        if room:
            self.sink_keys = _cat([self.sink_keys, k[..., :room, :]])
            self.sink_values = _cat([self.sink_values, v[..., :room, :]])
            k, v = k[..., room:, :], v[..., room:, :]
        self.recent_keys = _cat([self.recent_keys, k])
        self.recent_values = _cat([self.recent_values, v])
        if self.spec.bits != 16:
            self._flush()

    def _flush(self) -> None:
        spec = self.spec
        if spec.scheme == "salient":
            self._flush_salient_keys()
        else:
            old_keys = (self.recent_keys.shape[-2] - spec.residual) // spec.group_size * spec.group_size
            if old_keys > 0:
                block = self._old_keys(old_keys)
                self.quant_keys = self.backend.append_quantized(
                    self.quant_keys, block, spec.bits, spec.group_size, -2, spec.storage_dtype
                )
        old_values = self.recent_values.shape[-2] - spec.residual
        if old_values > 0:
            b, h, _, d = self.recent_values.shape
            block = self.recent_values[..., :old_values, :]
            if self.rotation is not None:
                block = block.float() @ self.rotation
            block = block.transpose(1, 2).reshape(b, 1, old_values, h * d)
            self.quant_values = self.backend.append_quantized(
                self.quant_values, block, spec.bits, spec.group_size, -1, spec.storage_dtype
            )
            self.recent_values = self.recent_values[..., old_values:, :].clone()

    def _old_keys(self, count: int) -> Tensor:
        """The first ``count`` recent keys, rotated back to before RoPE, dropped from the window."""
        start = self.sink_keys.shape[-2] + self._quantized_keys()
        block = self._rotate(self.recent_keys[..., :count, :].float(), start, inverse=True)
        self.recent_keys = self.recent_keys[..., count:, :].clone()  # frees the flushed part
        return block

    def _flush_salient_keys(self) -> None:
        """Keys one token at a time, once the channel statistics are fitted on the first
        ``FIT_TOKENS`` keys after the sinks (until then they wait in full precision)."""
        spec, waiting = self.spec, self.recent_keys.shape[-2]
        start = self.sink_keys.shape[-2] + self._quantized_keys()
        if self.key_stats is None:
            if waiting < FIT_TOKENS or waiting <= spec.residual:
                return
            keys = self._rotate(self.recent_keys.float(), start, inverse=True)
            self.key_stats = fit_channels(keys, spec.salient, self.query_weight, spec.storage_dtype)
        old = waiting - spec.residual
        if old > 0:
            angles = None if self.inv_freq is None else self.rope.angles(start, old, self.device)
            self.quant_keys = self.backend.store_keys(
                self.quant_keys, self.recent_keys[..., :old, :], angles, self.key_stats, spec.bits,
                spec.storage_dtype,
            )  # fmt: skip
            self.recent_keys = self.recent_keys[..., old:, :].clone()  # frees the flushed part

    def _quantized_keys(self) -> int:
        return 0 if self.quant_keys is None else self.quant_keys.tokens

    def _rotate(self, keys: Tensor, start: int, inverse: bool = False) -> Tensor:
        """Keys at cache positions ``start...`` rotated back to before RoPE (``inverse``) or forward
        again (``rope.rotate``); unchanged without RoPE frequencies."""
        if self.inv_freq is None:
            return keys
        out = torch.empty_like(keys)
        self._rotate_into(keys, start, out, inverse)
        return out

    def _rotate_into(self, keys: Tensor, start: int, out: Tensor, inverse: bool = False) -> None:
        """``_rotate(keys, start, inverse)`` written into ``out`` (not ``keys``)."""
        if self.inv_freq is None:
            out.copy_(keys)
            return
        if out.dtype != keys.dtype:  # rotate in the keys' precision, round once
            out.copy_(self._rotate(keys, start, inverse))
            return
        rotate(keys, *self.rope.angles(start, keys.shape[-2], keys.device), out, inverse)

    def _read(self, new_keys: Tensor, new_values: Tensor) -> tuple[Tensor, Tensor]:
        """Everything stored, in the compute dtype, with the last tokens replaced by ``new_*``
        (the running tokens see their own states exactly): each part is dequantized, rotated and
        converted straight into its place in one output tensor per side."""
        b, h, _, d = self.recent_values.shape
        sinks, n = self.sink_keys.shape[-2], new_keys.shape[-2]
        keys = new_keys.new_empty(b, h, self.length, d)
        values = new_values.new_empty(b, h, self.length, d)
        keys[..., :sinks, :] = self.sink_keys
        values[..., :sinks, :] = self.sink_values
        at = sinks
        if self.quant_keys is not None:
            if isinstance(self.quant_keys, SalientKeys):
                qk = decode_keys(self.quant_keys, self.key_stats, h)
            else:
                qk = self.backend.dequantize(self.quant_keys, torch.float32)
            self._rotate_into(qk, sinks, keys[..., at : at + qk.shape[-2], :])
            at += qk.shape[-2]
        keys[..., at:, :] = self.recent_keys
        at = sinks
        if self.quant_values is not None:
            work = torch.float32 if self.rotation is not None else self.dtype
            qv = self.backend.dequantize(self.quant_values, work)
            qv = qv.view(b, qv.shape[-2], h, d)
            if self.rotation is not None:
                qv = qv @ self.rotation
            values[..., at : at + qv.shape[1], :] = qv.transpose(1, 2)
            at += qv.shape[1]
        values[..., at:, :] = self.recent_values
        keys[..., self.length - n :, :] = new_keys
        values[..., self.length - n :, :] = new_values
        return keys, values

    def tensors(self) -> list[Tensor]:
        """Every tensor the layer holds."""
        out = [
            t
            for t in (self.sink_keys, self.sink_values, self.recent_keys, self.recent_values)
            if t is not None
        ]
        for q in (self.quant_keys, self.quant_values, self.key_stats):
            if q is not None:
                out.extend(q.tensors())
        return out

    def nbytes(self) -> int:
        """Bytes of storage the layer holds (each storage counted once, slack included)."""
        seen: dict[int, int] = {}
        for t in self.tensors():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _apply(self, fn) -> None:
        for name in ("sink_keys", "sink_values", "recent_keys", "recent_values"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        if isinstance(self.quant_keys, SalientKeys):
            self.quant_keys = select_keys(self.quant_keys, fn)
        elif self.quant_keys is not None:
            self.quant_keys = select(self.quant_keys, fn)
        if self.quant_values is not None:
            self.quant_values = select(self.quant_values, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            self._apply(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._apply(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.__init__(self.spec, self.backend, self.inv_freq, self.query_weight, self.rope)


class QuantizedKVCache(Cache):
    """A quantized KV cache: ``model.generate(ids, cache=QuantizedKVCache(...))``.

    ``bits`` 2, 4 or 8 (16: unquantized, stored in ``storage_dtype``); ``group_size`` tokens per key
    group (KIVI) and channels per value group; ``residual`` recent tokens and ``sinks`` first tokens
    kept in full precision; ``scheme`` ``kivi``, ``salient`` or ``auto`` (salient at 2 bits);
    ``salient`` the fraction of key channels at twice the bits, chosen by ``query_weights`` (one
    ``[kv_heads, head_dim]`` tensor per layer, see ``query_energy``) times the keys' variance.
    Layers are created on first use, one per decoder layer.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = KV_DEFAULTS["group_size"],
        residual: int = KV_DEFAULTS["residual"],
        sinks: int = KV_DEFAULTS["sinks"],
        storage_dtype: torch.dtype = torch.float16,
        backend=None,
        inv_freq: Tensor | None = None,
        scheme: str = KV_DEFAULTS["scheme"],
        salient: float = KV_DEFAULTS["salient"],
        query_weights: list[Tensor] | None = None,
    ):
        spec = KVSpec(bits, group_size, residual, sinks, storage_dtype, scheme, salient).validate()
        self.spec = spec
        self.backend = backend or fused.default_backend()
        self.inv_freq = inv_freq
        self.rope = RopeTable(inv_freq)
        self.query_weights = query_weights
        super().__init__(layer_class_to_replicate=self._new_layer)

    def _new_layer(self) -> QuantizedKVLayer:
        index = len(self.layers)  # transformers appends layers in order of their index
        weight = self.query_weights[index] if self.query_weights and index < len(self.query_weights) else None
        return QuantizedKVLayer(self.spec, self.backend, self.inv_freq, weight, self.rope)

    def memory(self) -> dict:
        """Exact bytes held, per layer and per token, and the ratio to a float16 cache of the
        same tokens (2 bytes per cached key and value element)."""
        per_layer = [layer.nbytes() for layer in self.layers]
        tokens = self.get_seq_length()
        fp16 = 0
        for layer in self.layers:
            if layer.is_initialized:
                b, h, _, d = layer.sink_keys.shape
                fp16 += 2 * b * h * layer.length * d * 2
        total = sum(per_layer)
        return {
            "bytes": total,
            "bytes_per_layer": per_layer,
            "tokens": tokens,
            "bytes_per_token": total / tokens if tokens else 0.0,
            "float16_bytes": fp16,
            "ratio_to_float16": fp16 / total if total else None,
        }


_QUERY_ENERGY: WeakKeyDictionary = WeakKeyDictionary()  # model -> {calibration tokens: energies}


@torch.no_grad()
def query_energy(model, tokenizer, tokens: int = 512) -> list[Tensor] | None:
    """Per layer, the mean square of the queries that read each key channel ``[kv_heads,
    head_dim]`` (averaged over the query heads of a group and over each RoPE pair, which the
    rotation mixes), measured once per model on the bundled calibration text (WikiText-2
    validation). ``None`` for a model whose attention has no ``q_proj``."""
    known = _QUERY_ENERGY.setdefault(model, {})
    if tokens in known:
        return known[tokens]
    layers = _attention_or_none(model)
    if not layers:
        return None
    from llmlite.data import DEFAULT_CALIBRATION, load_text, tokenize

    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    ids = tokenize(tokenizer, load_text(DEFAULT_CALIBRATION))[:tokens]
    sums: dict[int, Tensor] = {}

    def hook(index):
        return lambda module, args, out: sums.__setitem__(index, out.detach().float().pow(2).mean((0, 1)))

    hooks = [getattr(attn, LLAMA.q).register_forward_hook(hook(i)) for i, attn in enumerate(layers)]
    try:
        model(ids[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    rope = getattr(getattr(model, "model", model), "rotary_emb", None) is not None
    energies = []
    for i in range(len(layers)):
        e = sums[i].view(kv_heads, heads // kv_heads, -1).mean(1)
        if rope:  # rotate_half pairs channel c with c + dim/2
            e = (e + e.roll(e.shape[-1] // 2, -1)) / 2
        energies.append(e.cpu())
    known[tokens] = energies
    return energies


def kv_cache_for(model, spec: KVSpec, tokenizer=None) -> Cache:
    """A fresh cache for ``model``: ours with the model's RoPE frequencies (keys are quantized
    before RoPE) and its storage dtype (bfloat16 for a bfloat16 model, float16 otherwise). With
    the ``salient`` scheme and a ``tokenizer``, key channels are weighted by ``query_energy``
    (without one, by the keys' variance alone)."""
    config = model.config.get_text_config(decoder=True)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise LlmliteError(
            "the quantized KV cache needs full attention in every layer; "
            f"this model has {sorted(layer_types)}"
        )
    spec = spec.validate()
    dtype = next(model.parameters()).dtype
    storage = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    weights = None
    if spec.scheme == "salient" and spec.bits != 16 and tokenizer is not None:
        weights = query_energy(model, tokenizer)
    return QuantizedKVCache(
        spec.bits,
        spec.group_size,
        spec.residual,
        spec.sinks,
        storage,
        inv_freq=None if inv_freq is None else inv_freq.detach().float().clone(),
        scheme=spec.scheme,
        salient=spec.salient,
        query_weights=weights,
    )


def kv_spec(config) -> KVSpec:
    """The KV-cache settings of an eval or generate config (its ``kv_*`` fields), checked
    (``auto`` resolved)."""
    residual = KV_DEFAULTS["residual"] if config.kv_residual is None else config.kv_residual
    return KVSpec(
        config.kv_bits,
        config.kv_group_size,
        residual,
        config.kv_sinks,
        scheme=config.kv_scheme,
        salient=config.kv_salient,
    ).validate()


def _attention_or_none(model) -> list:
    """Each decoder layer's attention (Llama layout), or nothing for another layout."""
    try:
        return attention_modules(model)
    except LlmliteError:
        return []
