"""``merge``: fold a peft adapter into its base and save a full-precision model that plain
transformers loads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from llmlite.errors import LlmliteError
from llmlite.models import atomic_output, check_output
from llmlite.training.adapters import dequantize_to_float, load_base
from llmlite.training.train import SUMMARY

log = logging.getLogger("llmlite")


def merge(adapter: str, output: str, base: str | None = None, overwrite: bool = False) -> Path:
    """Merge the adapter folder ``adapter`` (written by ``llmlite finetune`` or plain peft) into
    its base model, in float32, and write the merged model to ``output``.

    A quantized base (QLoRA's NF4 or a GPTQ checkpoint) is dequantized first: the merged weights are
    the dequantized base plus the adapter's update, so the merged model computes what base+adapter
    computed in training, not what the original float model plus the adapter would.
    """
    from peft import PeftModel

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise LlmliteError(
            f"{adapter} has no adapter_config.json; pass a folder written by llmlite finetune or peft"
        )
    check_output(output, overwrite)
    settings = _settings(folder)
    source = base or settings.get("base_model") or _peft_base(folder)
    method = settings.get("settings", {}).get("method", "lora")
    model, tokenizer = load_base(
        source, "qlora" if method == "qlora" else "lora", torch.float32, torch.device("cpu")
    )
    if dequantize_to_float(model):
        log.warning(
            "the base of %s is quantized (%s): merging into its dequantized weights; the merged model "
            "equals base+adapter as trained, and is a full-precision model, not the original float one",
            adapter,
            "NF4" if method == "qlora" else "GPTQ",
        )
    try:
        merged = PeftModel.from_pretrained(model, folder).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as e:
        raise LlmliteError(
            f"adapter {adapter} does not fit the base {source} ({str(e).splitlines()[0]})"
        ) from None
    with atomic_output(output, overwrite) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output)


def _settings(folder: Path) -> dict:
    path = folder / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}


def _peft_base(folder: Path) -> str:
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise LlmliteError(f"{folder}/adapter_config.json names no base model; pass --base")
    return base
