"""Model plumbing for fine-tuning: load the base (float, bf16/fp16, NF4 through bitsandbytes, or a
llmlite GPTQ checkpoint), find the projections to adapt, and wrap them with peft adapters."""

from __future__ import annotations

import gc
import json
import logging
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from llmlite.arch import LORA_TARGETS
from llmlite.errors import LlmliteError
from llmlite.memory import trim_heap
from llmlite.models import is_quantized_checkpoint, load_model, resolve_model
from llmlite.quant.compressed import is_compressed
from llmlite.quant.linear import QuantLinear
from llmlite.training.fused_lora import fuse_lora_layers
from llmlite.training.nf4 import dequantize_nf4, reuse_dequantization_buffer

log = logging.getLogger("llmlite")
# bitsandbytes (imported by peft) logs a warning when the optional `kernels` package is missing;
# its CPU code works without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The base's compute dtype: ``auto`` is bfloat16 on a GPU that has it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "float16" and device.type == "cpu":
        raise LlmliteError("float16 training needs a GPU; on the CPU use --dtype bfloat16 or float32")
    return getattr(torch, name)


def load_base(source: str, method: str, dtype: torch.dtype, device: torch.device):
    """The model to train on and its tokenizer; QLoRA quantizes the base to NF4 on load."""
    if method == "qlora":
        model, tokenizer = _load_nf4(source, dtype, device)  # placed on the device by transformers
    else:
        model, tokenizer = load_model(source, dtype=dtype)
        if method == "full" and any(is_compressed(m) for m in model.modules()):
            raise LlmliteError(
                f"{source} is a quantized checkpoint and cannot be fully fine-tuned; use --method lora "
                "(LoRA on its 4-bit weights) or the unquantized model"
            )
        model.to(device)
    model.name_or_path = model.config._name_or_path = str(resolve_model(source))  # peft's base path
    return model, tokenizer


def _load_nf4(source: str, dtype: torch.dtype, device: torch.device):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmlite.models import check_causal_lm, load_config, load_tokenizer

    where = resolve_model(source)
    if isinstance(where, Path) and (where.suffix == ".gguf" or is_quantized_checkpoint(where)):
        kind = "a GGUF file" if where.suffix == ".gguf" else "already quantized"
        raise LlmliteError(
            f"--method qlora quantizes a float model to NF4, but {source} is {kind}; pass a Hugging Face "
            "folder or hub id (or use --method lora on the quantized checkpoint)"
        )
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    check_causal_lm(load_config(source), source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, quantization_config=config, dtype=dtype, device_map={"": device}
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LlmliteError(
            f"cannot load {source} for QLoRA: {first}; its files may be truncated or corrupt: "
            "re-download or re-export it"
        ) from None
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes switches a layer to a bfloat16 inference
            # kernel at its first forward in eval mode without gradients, repacking the weight for
            # good; later training forwards then run that kernel too, which has no backward. Keep
            # every forward on the float path, the one training and merging assume.
            module.support_avx512bf16_for_cpu = False
    if device.type == "cpu":
        reuse_dequantization_buffer(model)  # no float copy of each weight per call
        _release_checkpoint_pages(model, bnb.nn.Params4bit)
    model.llmlite_source = source
    return model, load_tokenizer(source)


def _release_checkpoint_pages(model: nn.Module, quantized: type) -> None:
    """Give the float tensors that still view the memory-mapped checkpoint (embeddings, norms)
    memory of their own, so that the mapping, which holds every float weight resident once
    quantization has read it, is dropped; then return the heap that quantizing freed."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not isinstance(tensor, quantized):
                tensor.data = tensor.data.clone()
    gc.collect()
    trim_heap()


def linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear-like modules of ``model`` (what ``--target-modules`` may name)."""
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | Conv1D) or is_compressed(m)
    }
    return sorted(names)


def target_modules(model: nn.Module, requested: list[str] | None) -> list[str]:
    """The module names to adapt: ``requested``, or every known attention/MLP projection."""
    available = linear_names(model)
    if requested:
        missing = [n for n in requested if n not in available]
        if missing:
            raise LlmliteError(
                f"no module named {', '.join(missing)} in {type(model).__name__}; "
                f"--target-modules may name: {', '.join(available)}"
            )
        return requested
    found = [n for n in LORA_TARGETS if n in available]
    if not found:
        raise LlmliteError(
            f"cannot find attention/MLP projections in {type(model).__name__}; name them with "
            f"--target-modules (linear modules here: {', '.join(available)})"
        )
    return found


def add_adapters(
    model: nn.Module,
    method: str,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    rslora: bool,
    gradient_checkpointing: bool,
) -> nn.Module:
    """``model`` with LoRA / DoRA adapters on ``targets`` (a peft ``PeftModel``); ``full``: as is."""
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from peft.tuners.lora.gptq import GPTQLoraLinear
    from transformers.pytorch_utils import Conv1D

    quantized = any(is_compressed(m) for m in model.modules())
    if quantized and method == "dora":
        raise LlmliteError("DoRA on a GPTQ base is not supported by peft; use --method lora on it")
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    conv1d = any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        use_rslora=rslora,
        use_dora=method == "dora",
        fan_in_fan_out=conv1d,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if quantized:
        config._register_custom_module({QuantLinear: GPTQLoraLinear})  # peft's LoRA for GPTQ layers
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        model = get_peft_model(model, config)
    fuse_lora_layers(model)  # adapter products accumulated in place (peft's path where it does not apply)
    return model


def dequantize_to_float(model: nn.Module) -> bool:
    """Replace every quantized linear (bitsandbytes' 4-bit, llmlite's ``QuantLinear``) by an
    ``nn.Linear`` holding its weight dequantized in float32. True when anything was quantized.

    (transformers' ``model.dequantize()`` goes through bfloat16, which would round the weights.)
    """
    changed = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            weight = _float_weight(child)
            if weight is None:
                continue
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=child.bias is not None)
            linear.weight.data = weight
            if child.bias is not None:
                linear.bias.data = child.bias.detach().float()
            setattr(parent, name, linear)
            changed = True
    if changed:
        hf_quantizer = getattr(model, "hf_quantizer", None)
        if hf_quantizer is not None:
            hf_quantizer.remove_quantization_config(model)
        elif getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.to(torch.float32)
    return changed


def _float_weight(module: nn.Module) -> torch.Tensor | None:
    if is_compressed(module):
        return module.dequantize(torch.float32)
    if type(module).__name__ != "Linear4bit":
        return None
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse, dequantize_4bit

    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    weight = dequantize_nf4(data, state)  # the CPU path that reads the right block scales
    return weight if weight is not None else dequantize_4bit(data, state).float()


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_FROM = "pass a folder written by llmlite finetune or peft"
_RESAVE = "re-save the adapter with peft or re-run llmlite finetune"


def read_adapter(adapter: str | Path) -> dict:
    """The ``adapter_config.json`` of a peft adapter folder, after checking that the folder
    exists, that its config is peft's (a LoRA config's fields of the right kinds) and that its
    weights file reads whole (not truncated)."""
    folder = Path(adapter)
    if not folder.exists():
        raise LlmliteError(f"no such adapter folder: {adapter}; {_FROM}")
    if not folder.is_dir():
        raise LlmliteError(f"{adapter} is a file, not an adapter folder; {_FROM}")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise LlmliteError(f"{adapter} has no {ADAPTER_CONFIG}, so it is not an adapter folder; {_FROM}")
    config = _adapter_config(folder / ADAPTER_CONFIG)
    _check_adapter_weights(folder)
    return config


def _adapter_config(path: Path) -> dict:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise LlmliteError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); {_RESAVE}") from None
    if not isinstance(data, dict) or "peft_type" not in data:
        why = "it has no peft_type" if isinstance(data, dict) else f"it holds a {type(data).__name__}"
        raise LlmliteError(f"{path} is not a peft adapter config ({why}); {_FROM}")
    known = {str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING}
    if data["peft_type"] not in known:
        raise LlmliteError(
            f"{path}: peft_type {data['peft_type']!r} is not one peft knows (LORA, ...); {_RESAVE}"
        )
    if data["peft_type"] == "LORA":
        problem = _lora_config_problem(data)
        if problem:
            raise LlmliteError(f"{path}: {problem}; {_RESAVE}")
    return data


def _lora_config_problem(data: dict) -> str | None:
    """What is wrong with the fields of a LoRA ``adapter_config.json`` (peft reads them unchecked)."""
    r, alpha, dropout = data.get("r"), data.get("lora_alpha"), data.get("lora_dropout", 0.0)
    targets = data.get("target_modules")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        return f"r (the rank) must be a whole number of at least 1, got {r!r}"
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        return f"lora_alpha must be a number, got {alpha!r}"
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        return f"lora_dropout must be a fraction in [0, 1), got {dropout!r}"
    if not (targets is None or isinstance(targets, str) or _all_str(targets)):
        return f"target_modules must be a list of module names, got {targets!r}"
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if not isinstance(data.get(flag, False), bool):
            return f"{flag} must be true or false, got {data[flag]!r}"
    if data.get("bias", "none") not in ("none", "all", "lora_only"):
        return f"bias must be 'none', 'all' or 'lora_only', got {data['bias']!r}"
    return None


def _all_str(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, str) for v in values)


def _check_adapter_weights(folder: Path) -> None:
    """Read the adapter's weights once: a truncated or corrupt file is named here, not deep in peft."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    found = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not found:
        raise LlmliteError(f"{folder} has no adapter weights ({ADAPTER_WEIGHTS[0]}); {_FROM}")
    path = found[0]
    try:
        if path.suffix == ".safetensors":
            load_file(path)
        else:
            torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise LlmliteError(
            f"cannot read {path} ({str(e).splitlines()[0]}); the file is truncated or corrupt: "
            "copy the adapter again or re-run llmlite finetune"
        ) from None
