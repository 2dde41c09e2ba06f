"""Quantized checkpoints in the GPTQ layout: what transformers + GPTQModel, vLLM and TGI load.

A checkpoint folder holds ``model.safetensors`` (``qweight``/``qzeros``/``scales``/``g_idx`` for
each quantized Linear, everything else as is), ``config.json`` with ``quantization_config``,
``quantize_config.json`` beside it, the generation config and the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from llmlite import __version__
from llmlite.errors import LlmliteError
from llmlite.quant.grid import SUPPORTED_BITS
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
    model: PreTrainedModel, tokenizer, folder: Path, qconfig: dict, dtype: torch.dtype = torch.float16
) -> None:
    """Write ``model`` (with ``QuantLinear`` layers) and its tokenizer into ``folder``; tensors that
    are not quantized are stored in ``dtype`` (call ``round_unquantized`` first for exactness)."""
    packed = {
        f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QuantLinear) for b in ("scales", "bias")
    }
    state = {
        k: v if k in packed or not v.is_floating_point() else v.to(dtype)
        for k, v in model.state_dict().items()
    }
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head_name = next(n for n, m in model.named_modules() if m is head)
        state.pop(f"{head_name}.weight", None)  # tied: loaders re-tie it to the embeddings
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_gptq_checkpoint(folder: Path, dtype: torch.dtype = torch.float32, backend: str = "torch"):
    """Load a GPTQ-layout checkpoint (v1 zero-points) into a model with ``QuantLinear`` layers."""
    config_dict = json.loads((folder / "config.json").read_text())
    qc = config_dict["quantization_config"]
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if bits not in SUPPORTED_BITS:
        raise LlmliteError(f"{folder}: GPTQ bits {bits} unsupported; llmlite reads {SUPPORTED_BITS}")
    layout = qc.get("checkpoint_format", "gptq")
    if layout != "gptq":
        raise LlmliteError(f"{folder}: checkpoint_format '{layout}' unsupported; llmlite reads 'gptq' (v1)")
    state = _read_weights(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight")):
        out_features, in_features = state[f"{name}.scales"].shape[1], state[f"{name}.g_idx"].numel()
        layer = QuantLinear(in_features, out_features, bits, group_size, f"{name}.bias" in state, backend)
        model.set_submodule(name, layer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise LlmliteError(
            f"{folder} does not match its config ({len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[0]}); re-create the checkpoint"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise LlmliteError(
            f"cannot load the tokenizer in {folder} ({e}); copy the tokenizer files in"
        ) from None
    model.llmlite_quantization = qc
    return model, tokenizer


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / f"{WEIGHTS}.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state.update(load_file(str(folder / name)))
        except (SafetensorError, OSError) as e:
            raise LlmliteError(
                f"cannot read {folder / name} ({e}); the file is missing, truncated or corrupt: re-create it"
            ) from None
    return state


def _is_tied(model: PreTrainedModel, key: str) -> bool:
    head = model.get_output_embeddings()
    return (
        head is not None
        and head.weight is model.get_input_embeddings().weight
        and key.endswith(".weight")
        and (model.get_submodule(key[: -len(".weight")]) is head)
    )
