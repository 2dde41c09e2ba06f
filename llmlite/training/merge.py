"""``merge``: fold a peft adapter into its base and save a full-precision model that plain
transformers loads."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from llmlite.errors import LlmliteError
from llmlite.models import local_source
from llmlite.recipes import build, option
from llmlite.results import Result
from llmlite.runinfo import staged_output
from llmlite.training.adapters import dequantize_to_float, load_base, read_adapter
from llmlite.training.train import SUMMARY

log = logging.getLogger("llmlite")


@dataclass
class MergeConfig:
    """Options of ``llmlite merge`` / ``llmlite.merge``."""

    VERB: ClassVar[str] = "merge"
    ABOUT: ClassVar[str] = (
        "Fold the adapter into its base (dequantized first when the base is NF4 or GPTQ) and write a "
        "float32 model that plain transformers loads."
    )

    adapter: str = option("", "adapter folder written by llmlite finetune (or peft)", positional="1")
    base: str | None = option(None, "base model", shown="the one the adapter was trained on")
    output: str | None = option(None, "folder for the merged model (required)")
    overwrite: bool = option(False, "replace an existing output folder")

    def validate(self) -> MergeConfig:
        if not self.adapter:
            raise LlmliteError("merge needs an ADAPTER folder (written by llmlite finetune or peft)")
        if not self.output:
            raise LlmliteError("merge needs --output DIR (the folder for the merged model)")
        return self


@dataclass
class MergeResult(Result):
    """``merge``'s result; a path-like of the merged model's folder."""

    output: Path
    adapter: str
    base: str

    def __fspath__(self) -> str:
        return str(self.output)

    def to_dict(self) -> dict:
        return {"output": str(self.output), "adapter": self.adapter, "base": self.base}


def merge(
    config: MergeConfig | str | None = None,
    *,
    recipe: str | None = None,
    **options,
) -> MergeResult:
    """Merge the adapter folder ``adapter`` (written by ``llmlite finetune`` or plain peft) into
    its base model, in float32, and write the merged model to ``output``. ``config`` may be the
    adapter folder itself (``merge("runs/lora", output="runs/merged")``).

    A quantized base (QLoRA's NF4 or a GPTQ checkpoint) is dequantized first: the merged weights are
    the dequantized base plus the adapter's update, so the merged model computes what base+adapter
    computed in training, not what the original float model plus the adapter would.
    """
    from peft import PeftModel

    if isinstance(config, str | Path):
        config, options["adapter"] = None, str(config)
    cfg = config.validate() if config is not None else build(MergeConfig, recipe, **options)
    adapter, output = cfg.adapter, cfg.output
    folder = Path(adapter)
    config = read_adapter(folder)  # the folder, its config and weights, checked before any loading
    if config["peft_type"] != "LORA":
        raise LlmliteError(
            f"{adapter} is a {config['peft_type']} adapter; merge folds LoRA/DoRA adapters into their base"
        )
    settings = _settings(folder)
    source = cfg.base or settings.get("base_model") or _peft_base(folder, config)
    inputs = [("ADAPTER", folder), ("--base", local_source(source)), ("--recipe", recipe)]
    # checked, locked and staged before the model is loaded: a bad --output fails at once
    with staged_output(output, overwrite=cfg.overwrite, inputs=inputs) as tmp:
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
                f"adapter {adapter} does not fit the base {source} ({str(e).splitlines()[0]}); "
                "pass the model it was trained on with --base"
            ) from None
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return MergeResult(Path(output), adapter, source)


def _settings(folder: Path) -> dict:
    """llmlite's record of the run that trained the adapter (empty for a plain peft adapter)."""
    path = folder / SUMMARY
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LlmliteError(
            f"{path} is not valid JSON ({str(e).splitlines()[0]}); delete it and pass --base"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("settings", {}), dict):
        raise LlmliteError(f"{path} is not llmlite's record of a run; delete it and pass --base")
    return data


def _peft_base(folder: Path, config: dict) -> str:
    base = config.get("base_model_name_or_path")
    if not base:
        raise LlmliteError(f"{folder}/adapter_config.json names no base model; pass --base")
    return base
