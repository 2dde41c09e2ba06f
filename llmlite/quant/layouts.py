"""Checkpoint folders in each serving layout: what a layout can hold, how a model's quantized
weights are fitted to it, its ``quantization_config``, and how a folder's config names its codec
(the codecs themselves, pure tensor packing, are in ``formats.py``).

=====================  ====================  ===========================================================
``--format``           ``quant_method``      read by
=====================  ====================  ===========================================================
gptq                   gptq                  transformers + GPTQModel, vLLM, SGLang, TGI, exllama
awq                    awq (version gemm)    transformers + GPTQModel, AutoAWQ, vLLM, SGLang, TGI
compressed-tensors     compressed-tensors    vLLM, SGLang, transformers + compressed-tensors
=====================  ====================  ===========================================================

AWQ and compressed-tensors hold whole groups only (``in % g == 0``). A weight quantized on groups of
``g`` columns whose last group is short (576 columns at 128) is written on groups of
``gcd(g, every in_features)`` instead, each old group's scale and zero-point repeated over the new
groups it covers: the same numbers, a slightly larger file (``common_group_size``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmlite.arch import decoder_layers
from llmlite.errors import LlmliteError
from llmlite.quant.formats import AWQ, GPTQ, PACKED, Codec, is_symmetric, regroup
from llmlite.quant.grid import QuantizedWeight, group_index, num_groups


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout ``--format`` writes (readers: the table above): its ``quant_method``,
    its codec, and whether its readers take a quantized ``lm_head``."""

    name: str
    quant_method: str
    codec: Codec
    quantized_head: bool = True


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("gptq", "gptq", GPTQ),
        Layout("awq", "awq", AWQ, quantized_head=False),  # transformers and vLLM keep lm_head in float
        Layout("compressed-tensors", "compressed-tensors", PACKED),
    )
}
READABLE_METHODS = tuple(layout.quant_method for layout in LAYOUTS.values())
# the group sizes the serving kernels take (vLLM's Marlin and Machete, GPTQModel's AWQ kernels);
# transformers + compressed-tensors and AutoAWQ read any size that divides in_features
KERNEL_GROUP_SIZES = (-1, 32, 64, 128)
log = logging.getLogger("llmlite")


@dataclass
class Fitted:
    """A model's quantized weights as a layout stores them, and its ``quantization_config``."""

    weights: dict[str, tuple[QuantizedWeight, Tensor | None]]
    qconfig: dict
    group_size: int | None  # the one group size written (-1: one group per row); None: each its own
    source_group_sizes: tuple[int, ...]  # the group sizes the modules were quantized with

    def describe(self) -> str:
        """The weights in a few words: ``int4 g64 (regrouped from g128)``."""
        bits = "/".join(f"int{b}" for b in sorted({w.bits for w, _ in self.weights.values()}))
        own = "/".join(_group_name(g) for g in self.source_group_sizes)
        if self.group_size is None or self.source_group_sizes == (self.group_size,):
            return f"{bits} {own}"
        return f"{bits} {_group_name(self.group_size)} (regrouped from {own})"


def _group_name(group_size: int) -> str:
    return "per-channel" if group_size == -1 else f"g{group_size}"


def group_size_of(weight: QuantizedWeight) -> int:
    """The columns of a weight's first group (a row's length when it has one group): its group
    size when its groups are contiguous, ``g_idx = i // g``."""
    if weight.scale.shape[1] == 1:
        return weight.codes.shape[1]
    return int((weight.g_idx == 0).sum())


def common_group_size(weights: list[QuantizedWeight]) -> int:
    """The one group size that holds every weight on whole groups: -1 when each has one group
    per row, else the gcd of their group sizes and in_features (128 over 576 columns: 64)."""
    if all(w.scale.shape[1] == 1 for w in weights):
        return -1
    return math.gcd(*(group_size_of(w) for w in weights), *(w.codes.shape[1] for w in weights))


def fit_weights(
    weights: dict[str, QuantizedWeight], fmt: str
) -> tuple[dict[str, QuantizedWeight], int | None]:
    """``weights`` as layout ``fmt`` stores them, regrouped to their common group size where it
    holds whole groups only, and that group size (-1: one per row; ``None``: the layout keeps each
    weight's own grid); a weight it cannot hold is refused, naming the layouts that can."""
    codec = LAYOUTS[fmt].codec
    group_size = common_group_size(list(weights.values())) if weights and codec is not GPTQ else None
    fitted = {}
    for name, weight in weights.items():
        if group_size is not None and group_size > 0:
            with contextlib.suppress(ValueError):  # act-order groups: the codec says what it holds
                weight = regroup(weight, group_size)
        why = codec.refusal(weight)
        if why is not None:
            others = [n for n, lay in LAYOUTS.items() if n != fmt and lay.codec.refusal(weight) is None]
            hint = f": use --format {' or '.join(others)}" if others else ""
            raise LlmliteError(f"--format {fmt} cannot hold {name}: {why}{hint}")
        fitted[name] = weight
    return fitted, group_size


def check_bits(fmt: str, bits: int) -> None:
    """Refuse, before quantizing, a width that layout ``fmt`` does not hold."""
    held = LAYOUTS[fmt].codec.bits
    if bits not in held:
        others = " or ".join(n for n, lay in LAYOUTS.items() if bits in lay.codec.bits)
        widths = " or ".join(str(b) for b in held)
        raise LlmliteError(
            f"--format {fmt} holds {widths}-bit weights, not {bits}-bit: use --bits {held[0]}, "
            f"or --format {others}"
        )


def check_head(fmt: str, quantized_head: bool) -> None:
    """Refuse a quantized ``lm_head`` for a layout whose readers keep it in float."""
    if quantized_head and not LAYOUTS[fmt].quantized_head:
        others = " or ".join(n for n, lay in LAYOUTS.items() if lay.quantized_head)
        raise LlmliteError(
            f"--format {fmt}: its readers keep lm_head in float, and this checkpoint quantizes it "
            f"(--quantize-head); use --format {others}"
        )


def check_fits(model: nn.Module, fmt: str, bits: int, group_size: int, quantize_head: bool) -> None:
    """Before quantizing: refuse what layout ``fmt`` could not hold once the decoder layers'
    linears (and the head with ``quantize_head``) are quantized at ``bits`` / ``group_size``."""
    check_head(fmt, quantize_head)
    inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and id(m) in inside}
    head = model.get_output_embeddings()
    if quantize_head and isinstance(head, nn.Linear):
        linears["lm_head"] = head
    placeholders = {}
    for name, m in linears.items():
        groups = num_groups(m.in_features, group_size)
        placeholders[name] = QuantizedWeight(  # expanded zeros: shapes without memory
            codes=torch.zeros((), dtype=torch.uint8).expand(m.out_features, m.in_features),
            scale=torch.ones(()).expand(m.out_features, groups),
            zero=torch.ones((), dtype=torch.uint8).expand(m.out_features, groups),
            g_idx=group_index(m.in_features, group_size),
            bits=bits,
        )
    fit_weights(placeholders, fmt)


def fit(model: nn.Module, fmt: str, base: dict) -> Fitted:
    """The weights of ``model``'s quantized linears (``QuantLinear``) as layout ``fmt`` stores them
    (``fit_weights``), and its ``quantization_config`` (``base``: the model's own, whose ``meta``
    is kept)."""
    from llmlite.quant.linear import QuantLinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    head = model.get_output_embeddings()
    check_head(fmt, any(m is head for m in layers.values()))
    weights, group_size = fit_weights({n: m.quantized_weight() for n, m in layers.items()}, fmt)
    floats = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    meta = base.get("meta") if isinstance(base.get("meta"), dict) else None
    written = -1 if group_size is None else group_size
    if group_size is not None and group_size not in KERNEL_GROUP_SIZES:
        log.warning(
            "--format %s: written at group size %d, the largest that divides every layer's inputs; vLLM's "
            "kernels and GPTQModel (transformers' AWQ reader) take %s only, AutoAWQ and transformers + "
            "compressed-tensors any",
            fmt, group_size, ", ".join(map(str, KERNEL_GROUP_SIZES[1:])),
        )  # fmt: skip
    if fmt == "awq":
        qconfig = awq_config(written, floats, meta)
    elif fmt == "compressed-tensors":
        qconfig = packed_config(weights, written, floats, meta)
    else:
        qconfig = base if base.get("quant_method") == "gptq" else gptq_config_of(layers, head, meta)
    sources = tuple(sorted({m.group_size for m in layers.values()}))
    return Fitted({n: (w, layers[n].bias) for n, w in weights.items()}, qconfig, group_size, sources)


def awq_config(group_size: int, floats: list[str], meta: dict | None) -> dict:
    """``quantization_config`` of an AWQ GEMM checkpoint (AutoAWQ's keys, as transformers reads
    them): zero-points always stored, a symmetric weight's being ``8``."""
    config = {
        "quant_method": "awq",
        "version": "gemm",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "modules_to_not_convert": floats or None,
    }
    return {**config, "meta": meta} if meta else config


def packed_config(
    weights: dict[str, QuantizedWeight], group_size: int, floats: list[str], meta: dict | None
) -> dict:
    """``quantization_config`` of a compressed-tensors ``pack-quantized`` checkpoint: one config
    group per (bits, symmetric) scheme, targeting every ``Linear`` when there is one scheme, else
    each group its modules by name; the float linears (``lm_head``) in ``ignore``."""
    schemes: dict[tuple[int, bool], list[str]] = {}
    for name, weight in weights.items():
        schemes.setdefault((weight.bits, is_symmetric(weight)), []).append(name)
    groups = {}
    for i, ((bits, sym), names) in enumerate(sorted(schemes.items())):
        targets = ["Linear"] if len(schemes) == 1 else [f"re:^{re.escape(n)}$" for n in names]
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": sym,
                "group_size": None if group_size == -1 else group_size,
                "strategy": "channel" if group_size == -1 else "group",
                "dynamic": False,
                "actorder": None,
                "observer": "minmax",
            },
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    config = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": floats,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    return {**config, "meta": meta} if meta else config


def gptq_config_of(layers: dict[str, nn.Module], head: nn.Module | None, meta: dict | None) -> dict:
    """A GPTQ ``quantization_config`` for quantized linears read from another layout: the most
    common bits and group size (``dynamic`` lists the others when written)."""
    (bits, group_size), _ = Counter((m.bits, m.group_size) for m in layers.values()).most_common(1)[0]
    config = {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": all(is_symmetric(m.quantized_weight()) for m in layers.values()),
        "desc_act": False,
        "lm_head": any(m is head for m in layers.values()),
        "pack_dtype": "int32",
    }
    return {**config, "meta": meta} if meta else config


@dataclass(frozen=True)
class Reading:
    """How to read a folder's quantized linears: the codec, the checkpoint-wide grid
    (``bits``, ``group_size``, ``sym``) and per-module overrides in GPTQModel's ``dynamic`` form."""

    codec: Codec
    grid: dict
    dynamic: dict | None


def reading(qc: dict, where: str) -> Reading:
    """The ``Reading`` of a ``quantization_config`` (``where``: its file, for messages)."""
    method = qc.get("quant_method")
    if method == "gptq":
        name = qc.get("checkpoint_format", "gptq")
        if name != "gptq":
            raise LlmliteError(f"{where}: checkpoint_format '{name}' unsupported; llmlite reads gptq (v1)")
        return Reading(GPTQ, qc, qc.get("dynamic"))
    if method == "awq":
        version, zero_point = qc.get("version", qc.get("format", "gemm")), qc.get("zero_point", True)
        if not isinstance(version, str) or version.lower() != "gemm" or zero_point is not True:
            raise LlmliteError(
                f"{where}: AWQ version {version!r} (zero_point {zero_point!r}) unsupported; "
                "llmlite reads AWQ GEMM with zero-points"
            )
        return Reading(AWQ, {"bits": qc.get("bits"), "group_size": qc.get("group_size", -1)}, None)
    if method == "compressed-tensors":
        return _packed_reading(qc, where)
    raise LlmliteError(
        f"{where}: quant_method {method!r} unsupported; llmlite reads {', '.join(READABLE_METHODS)}"
    )


def _packed_reading(qc: dict, where: str) -> Reading:
    """A compressed-tensors config as a ``Reading``: the group targeting ``Linear`` gives the
    checkpoint's grid; groups targeting modules by ``re:`` patterns become ``dynamic`` entries."""
    groups = qc.get("config_groups")
    if qc.get("format") != "pack-quantized" or not isinstance(groups, dict) or not groups:
        raise LlmliteError(
            f"{where}: compressed-tensors format {qc.get('format')!r} unsupported; llmlite reads "
            "pack-quantized int weights (config_groups with num_bits 4 or 8)"
        )
    grid, dynamic = None, {}
    for key, group in groups.items():
        scheme = _packed_scheme(group, f"{where}: config_groups[{key!r}]")
        targets = group.get("targets")
        if targets == ["Linear"] and grid is None:
            grid = scheme
        elif isinstance(targets, list) and targets and all(_is_regex(t) for t in targets):
            dynamic.update({f"+:{t[3:]}": scheme for t in targets})
        else:
            raise LlmliteError(
                f"{where}: config_groups[{key!r}] targets {targets!r}; llmlite reads one group targeting "
                "Linear and groups targeting modules by re: patterns"
            )
    return Reading(PACKED, grid or next(iter(dynamic.values())), dynamic or None)


def _is_regex(target) -> bool:
    return isinstance(target, str) and target.startswith("re:")


def _packed_scheme(group, where: str) -> dict:
    """``{bits, group_size, sym}`` of one config group, refused unless it is what pack-quantized
    weight-only quantization writes (int weights, no activation quantization, no g_idx)."""
    weights = group.get("weights") if isinstance(group, dict) else None
    if (
        not isinstance(weights, dict)
        or weights.get("type", "int") != "int"
        or group.get("input_activations") is not None
        or group.get("format", "pack-quantized") != "pack-quantized"
        or weights.get("strategy", "group") not in ("group", "channel")
        or weights.get("actorder") not in (None, "weight", "static")
    ):
        raise LlmliteError(
            f"{where} is not a pack-quantized int weight-only scheme (group or channel strategy); "
            "llmlite reads those only"
        )
    group_size = -1 if weights.get("strategy") == "channel" else weights.get("group_size")
    symmetric = weights.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise LlmliteError(f"{where}.weights.symmetric must be true or false, got {symmetric!r}")
    return {"bits": weights.get("num_bits"), "group_size": group_size, "sym": symmetric}
