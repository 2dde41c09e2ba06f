"""Quantized checkpoints in the GPTQ layout: what transformers + GPTQModel, vLLM and TGI load.

A checkpoint folder holds ``model.safetensors`` (``qweight``/``qzeros``/``scales``/``g_idx`` for
each quantized Linear, everything else as is), ``config.json`` with ``quantization_config``,
``quantize_config.json`` beside it, the generation config and the tokenizer files.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llmlite import __version__
from llmlite.errors import LlmliteError
from llmlite.quant.formats import GPTQ, Codec
from llmlite.quant.grid import SUPPORTED_BITS, QuantizedWeight
from llmlite.quant.layouts import LAYOUTS, Fitted, fit, reading
from llmlite.quant.linear import QuantLinear

WEIGHTS = "model.safetensors"


def gptq_config(options) -> dict:
    """``quantization_config`` for a GPTQ-layout checkpoint written by llmlite (``options``: a
    ``QuantizeConfig``).

    ``desc_act`` is false even with act-order: llmlite's static groups keep ``g_idx = i // g``,
    so loaders take their fast, non-reordering kernels.
    """
    o = options
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": o.bits,
        "group_size": o.group_size,
        "sym": o.sym,
        "desc_act": False,
        "static_groups": o.act_order,
        "true_sequential": True,
        "damp_percent": o.damp,
        "lm_head": o.quantize_head,
        "pack_dtype": "int32",
        "meta": {
            "quantizer": [f"llmlite:{__version__}"],
            "source_model": _source_name(o.model),
            "method": o.method,
            "act_order": o.act_order,
            "mse": o.mse,
            "v2": o.v2,
            "v2_alpha": o.v2_alpha if o.v2 else None,
            "v2_windows": o.v2_windows if o.v2 else None,
            "refit": o.refit,
            **({"clip": o.clip, "awq_vo": o.awq_vo} if o.method.startswith("awq") else {}),
        },
    }


def _source_name(model: str) -> str:
    """The quantized model's origin as ``llmlite eval`` can find it again: local paths made absolute."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def round_unquantized(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Round the tensors that stay unquantized (embeddings, norms, a float head) to ``dtype``'s
    precision in place, keeping their storage dtype, so that the model in memory computes exactly
    what a checkpoint saved in ``dtype`` reloads to."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype).to(p.dtype)


def save_gptq_checkpoint(
    model: PreTrainedModel,
    tokenizer,
    folder: Path,
    qconfig: dict,
    dtype: torch.dtype = torch.float16,
    codec: Codec = GPTQ,
) -> None:
    """Write ``model`` (with ``QuantLinear`` layers, each written by ``codec``) and its tokenizer
    into ``folder``; tensors that are not quantized are stored in ``dtype`` (call
    ``round_unquantized`` first for exactness). A module whose bits or group size differ from
    ``qconfig``'s is listed in its ``dynamic`` block (GPTQModel's and vLLM's per-module overrides)."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    weights = {name: (layer.quantized_weight(), layer.bias) for name, layer in quantized.items()}
    qconfig = {**qconfig, "checkpoint_format": codec.name, **_dynamic(quantized, qconfig)}
    write_checkpoint(model, tokenizer, folder, weights, codec, qconfig, dtype)


def save_checkpoint(
    model: PreTrainedModel, tokenizer, folder: Path, fmt: str, qconfig: dict, dtype: torch.dtype
) -> Fitted:
    """Write ``model`` into ``folder`` in the layout ``fmt`` of ``layouts.LAYOUTS`` (gptq, awq,
    compressed-tensors), ``qconfig`` being its own ``quantization_config``; a weight the layout
    cannot hold is refused before anything is written. Returns what was written."""
    fitted = fit(model, fmt, qconfig)
    if fmt == "gptq":
        save_gptq_checkpoint(model, tokenizer, folder, fitted.qconfig, dtype)
    else:
        write_checkpoint(model, tokenizer, folder, fitted.weights, LAYOUTS[fmt].codec, fitted.qconfig, dtype)
    return fitted


def export_checkpoint(model: PreTrainedModel, tokenizer, source: Path, folder: Path, fmt: str) -> str:
    """Write ``model``, loaded from the checkpoint folder ``source``, into ``folder`` in layout
    ``fmt``: its unquantized tensors in the dtype ``source`` stores them in (so exactly), its run
    record ``llmlite.json`` copied over. Returns what its weights are (``Fitted.describe``)."""
    config = json.loads((source / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.float16
    fitted = save_checkpoint(model, tokenizer, folder, fmt, getattr(model, "llmlite_quantization", {}), dtype)
    if (source / "llmlite.json").is_file():
        shutil.copyfile(source / "llmlite.json", folder / "llmlite.json")
    return fitted.describe()


def write_checkpoint(
    model: PreTrainedModel,
    tokenizer,
    folder: Path,
    weights: dict[str, tuple[QuantizedWeight, torch.Tensor | None]],
    codec: Codec,
    qconfig: dict,
    dtype: torch.dtype,
) -> None:
    """Write ``model`` into ``folder`` with the modules named in ``weights`` (weight, bias) in
    ``codec``'s layout, everything else stored in ``dtype``, ``qconfig`` as its
    ``quantization_config``, and its tokenizer."""
    state = {
        k: v if not v.is_floating_point() else v.to(dtype)
        for k, v in model.state_dict().items()
        if k.rpartition(".")[0] not in weights
    }
    for name, (weight, bias) in weights.items():
        for key, tensor in codec.write(weight, bias).items():
            state[f"{name}.{key}"] = tensor
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is model.get_input_embeddings().weight:
        head_name = next(n for n, m in model.named_modules() if m is head)
        state.pop(f"{head_name}.weight", None)  # tied: loaders re-tie it to the embeddings
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if qconfig.get("quant_method") == "gptq":
        (folder / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _dynamic(quantized: dict[str, QuantLinear], qconfig: dict) -> dict:
    """``{"dynamic": {"+:^NAME$": {"bits": b, "group_size": g}, ...}}`` for the modules whose grid
    differs from the checkpoint's, else nothing."""
    overrides = {
        f"+:^{re.escape(name)}$": {"bits": m.bits, "group_size": m.group_size}
        for name, m in quantized.items()
        if (m.bits, m.group_size) != (qconfig["bits"], qconfig["group_size"])
    }
    return {"dynamic": {**qconfig.get("dynamic", {}), **overrides}} if overrides else {}


def quantized_error(source: str, qc: dict, verb: str) -> LlmliteError:
    """The refusal ``SOURCE is already a 4-bit GPTQ checkpoint; VERB the float model it came from``."""
    method = str(qc.get("quant_method", "quantized"))
    bits = qc.get("bits")
    kind = f"{bits}-bit {method.upper()}" if isinstance(bits, int) else method.upper()
    meta = qc.get("meta")
    origin = meta.get("source_model") if isinstance(meta, dict) else None
    hint = f" (--model {origin})" if origin else ""
    return LlmliteError(f"{source} is already a {kind} checkpoint; {verb} the float model it came from{hint}")


def load_gptq_checkpoint(
    folder: Path, qc: dict, config, dtype: torch.dtype = torch.float32, backend: str = "auto"
):
    """Load a checkpoint of a layout in ``layouts.LAYOUTS`` (GPTQ v1, AWQ GEMM, compressed-tensors
    pack-quantized) into a model with ``QuantLinear`` layers set to ``backend``; every tensor is
    checked against the shapes of ``config`` (the folder's transformers config, ``qc`` its
    ``quantization_config``, whose ``dynamic`` block or config groups may give a module other
    bits or another group size) first."""
    read = reading(qc, str(folder / "config.json"))
    codec = read.codec
    grid = _grid(folder, read.grid, "quantization_config", codec)
    state = _read_weights(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no float weights for the linears the checkpoint replaces
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    marker = f".{codec.marker}"
    names = sorted(k[: -len(marker)] for k in state if k.endswith(marker))
    for name in names:
        module_grid = _module_grid(folder, name, grid, read.dynamic, codec)
        model.set_submodule(name, _quant_layer(model, name, state, module_grid, codec, backend, folder))
    expected = model.state_dict()
    for key, tensor in state.items():
        want = expected.get(key)
        if want is not None and want.shape != tensor.shape:
            raise LlmliteError(
                f"{folder}: {key} has shape {list(tensor.shape)}, expected {list(want.shape)} from its "
                "config; re-create the checkpoint"
            )
        if want is not None and want.is_floating_point() != tensor.is_floating_point():
            raise LlmliteError(
                f"{folder}: {key} is {str(tensor.dtype).removeprefix('torch.')}, expected "
                f"{str(want.dtype).removeprefix('torch.')}; re-create the checkpoint"
            )
        if want is not None and want.is_floating_point():
            state[key] = tensor.to(want.dtype)  # assigned below, so at the model's dtype here
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    done = set(names)
    missing = [k for k in missing if not _is_tied(model, k) and k.rpartition(".")[0] not in done]
    if missing or unexpected:
        raise LlmliteError(
            f"{folder} does not match its config ({len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[0]}); re-create the checkpoint"
        )
    _rebuild_meta_buffers(model, folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise LlmliteError(
            f"cannot load the tokenizer in {folder} ({e}); copy the tokenizer files in"
        ) from None
    model.llmlite_quantization = qc
    return model, tokenizer


def _grid(folder: Path, qc: dict, where: str, codec: Codec = GPTQ) -> tuple[int, int, bool]:
    """``bits``, ``group_size`` and ``sym`` of a ``quantization_config`` (or one of its ``dynamic``
    entries, named by ``where``), checked against what ``codec`` holds."""
    where = f"{folder / 'config.json'}: {where}"
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise LlmliteError(f"{where}.bits must be a whole number, got {bits!r}; re-create the checkpoint")
    if bits not in SUPPORTED_BITS:
        raise LlmliteError(f"{folder}: GPTQ bits {bits} unsupported; llmlite reads {SUPPORTED_BITS}")
    if bits not in codec.bits:
        raise LlmliteError(
            f"{folder}: {codec.name} layout with bits {bits} unsupported; it holds {codec.bits}"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise LlmliteError(
            f"{where}.group_size must be a positive whole number or -1, got {group_size!r}; "
            "re-create the checkpoint"
        )
    return bits, group_size, qc.get("sym") is True


def _module_grid(
    folder: Path, name: str, grid: tuple[int, int, bool], dynamic, codec: Codec
) -> tuple[int, int, bool]:
    """The bits and group size of module ``name``: the first ``dynamic`` pattern (``+:REGEX``
    or a bare regex, GPTQModel's convention) that matches it overrides the checkpoint's."""
    if not isinstance(dynamic, dict):
        return grid
    for pattern, override in dynamic.items():
        if pattern.startswith("-:") or not isinstance(override, dict):
            continue
        try:
            matches = re.match(pattern.removeprefix("+:"), name)
        except re.error as e:
            raise LlmliteError(
                f"{folder / 'config.json'}: quantization_config.dynamic key {pattern!r} is not a regular "
                f"expression ({e}); re-create the checkpoint"
            ) from None
        if matches:
            merged = {"bits": grid[0], "group_size": grid[1], "sym": grid[2], **override}
            return _grid(folder, merged, f"quantization_config.dynamic[{pattern!r}]", codec)
    return grid


def _quant_layer(
    model: PreTrainedModel,
    name: str,
    state: dict[str, torch.Tensor],
    grid: tuple[int, int, bool],
    codec: Codec,
    backend: str,
    folder: Path,
) -> QuantLinear:
    """The ``QuantLinear`` that replaces the Linear ``name``, read by ``codec`` from its tensors
    in ``state`` (taken out of it) once they are checked against the shapes and dtypes the
    Linear's features and the grid imply."""
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise LlmliteError(
            f"{folder}: {name}.{codec.marker} belongs to no linear layer of {type(model).__name__}; "
            "re-create the checkpoint"
        )
    bits, group_size, sym = grid
    bias = f"{name}.bias" in state
    sizes = f"{bits}-bit, group size {group_size}, {linear.in_features} -> {linear.out_features} features"
    why = codec.refusal(codec.empty(linear.in_features, linear.out_features, bits, group_size, sym))
    if why is not None:
        raise LlmliteError(
            f"{folder}: {name} cannot be in this layout ({sizes}): {why}; re-create the checkpoint"
        )
    layout = _layout(codec, linear.in_features, linear.out_features, bits, group_size, bias, sym)
    tensors = {}
    for key, want in layout.items():
        found = state.pop(f"{name}.{key}", None)
        if found is None:
            raise LlmliteError(f"{folder}: {name}.{key} is missing ({sizes}); re-create the checkpoint")
        if found.shape != want.shape:
            raise LlmliteError(
                f"{folder}: {name}.{key} has shape {list(found.shape)}, expected {list(want.shape)} "
                f"({sizes}); re-create the checkpoint"
            )
        if found.is_floating_point() != want.is_floating_point():
            raise LlmliteError(
                f"{folder}: {name}.{key} is {str(found.dtype).removeprefix('torch.')}, expected "
                f"{str(want.dtype).removeprefix('torch.')}; re-create the checkpoint"
            )
        tensors[key] = found
    weight = codec.read(tensors, bits)
    if weight.shape != (linear.out_features, linear.in_features):
        raise LlmliteError(
            f"{folder}: {name} holds a {list(weight.shape)} weight, expected "
            f"[{linear.out_features}, {linear.in_features}]; re-create the checkpoint"
        )
    groups = weight.scale.shape[1]
    if weight.g_idx.numel() and (int(weight.g_idx.min()) < 0 or int(weight.g_idx.max()) >= groups):
        raise LlmliteError(
            f"{folder}: {name}.g_idx holds groups outside 0..{groups - 1} (group size {group_size}); "
            "re-create the checkpoint"
        )
    return QuantLinear.from_weight(weight, tensors.get("bias"), group_size, backend)


@functools.lru_cache(maxsize=32)
def _layout(codec: Codec, *sizes) -> dict[str, torch.Tensor]:
    """``codec.layout(*sizes)``, computed once per shape (a model's layers repeat a few shapes;
    packing an empty weight per module was a third of a checkpoint's load time). Read-only."""
    return codec.layout(*sizes)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / f"{WEIGHTS}.index.json"
    files = _indexed_files(index) if index.exists() else [WEIGHTS]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(folder / name)))
        except (SafetensorError, OSError) as e:
            raise LlmliteError(
                f"cannot read {folder / name} ({e}); the file is missing, truncated or corrupt: re-create it"
            ) from None
    return state


def _indexed_files(index: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LlmliteError(
            f"cannot read {index} ({type(e).__name__}: {e}); it must map tensors to files: re-create it"
        ) from None


def _rebuild_meta_buffers(model: PreTrainedModel, folder: Path) -> None:
    """The tensors no checkpoint holds (rotary frequencies, computed at init) built again on the
    CPU, since the model was created on the meta device."""
    for name, module in list(model.named_modules()):
        if any(t.is_meta for t in module.buffers(recurse=False)) and "Rotary" in type(module).__name__:
            model.set_submodule(name, type(module)(config=model.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LlmliteError(f"{folder}: {left[0]} has no value in the checkpoint; re-create the checkpoint")


def _is_tied(model: PreTrainedModel, key: str) -> bool:
    head = model.get_output_embeddings()
    return (
        head is not None
        and getattr(head, "weight", None) is model.get_input_embeddings().weight
        and key.endswith(".weight")
        and (model.get_submodule(key[: -len(".weight")]) is head)
    )
