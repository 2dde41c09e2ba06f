"""``convert_gqa_model``: load, convert, optionally uptrain, and save (the API behind
``llmlite convert-gqa``), with its options dataclass ``GQAConfig``."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from torch import Tensor, nn

from llmlite.data import DEFAULT_CALIBRATION, calibration_windows, load_text, tokenize
from llmlite.errors import LlmliteError
from llmlite.gqa.convert import METHODS, attention_layers, check_target, convert_gqa
from llmlite.gqa.uptrain import UPTRAIN_PARAMS, trainable_parameters, uptrain
from llmlite.kvcache.evaluate import float16_cache_bytes
from llmlite.models import DEFAULT_MODEL, check_window, load_model, local_source
from llmlite.recipes import option
from llmlite.results import Result
from llmlite.runinfo import staged_output
from llmlite.training.distill import distill_record

RECORD = "llmlite_gqa.json"


@dataclass
class GQAConfig:
    """Options of ``llmlite convert-gqa`` / ``llmlite.convert_gqa_model``."""

    VERB: ClassVar[str] = "convert-gqa"
    ABOUT: ClassVar[str] = (
        "Merge the key/value heads of a Llama, Mistral or Qwen2 model into --kv-heads groups (or repeat "
        "them, an exact change), optionally uptrain by distillation from the original, and save a "
        "model plain transformers loads."
    )

    model: str = option(DEFAULT_MODEL, "bundled name, local folder, .gguf file or hub id")
    kv_heads: int | None = option(None, "key/value heads to keep (required)", shown="none")
    method: str = option(
        "aligned",
        "mean pooling; weighted by query energy and o_proj; aligned: merge aligned heads, folding the "
        "alignment into q_proj/o_proj",
        choices=METHODS,
    )
    calibration: str = option(DEFAULT_CALIBRATION, "calibration text (weighted/aligned methods, uptraining)")
    samples: int = option(16, "calibration windows of the weighted/aligned methods")
    seqlen: int = option(512, "tokens per calibration and uptraining window")
    seed: int = option(0, "sampling seed")
    uptrain_tokens: int = option(0, "distillation tokens after converting; 0: no uptraining")
    uptrain_lr: float = option(1e-4, "peak uptraining learning rate, cosine to 0")
    uptrain_params: str = option("attention", "what uptraining trains", choices=UPTRAIN_PARAMS)
    batch_size: int = option(4, "uptraining windows per step")
    output: str | None = option(
        None, "folder for the converted model", cli_required="the folder for the converted model"
    )
    overwrite: bool = option(False, "replace an existing output folder")

    def validate(self) -> GQAConfig:
        if self.kv_heads is None:
            raise LlmliteError("convert-gqa needs --kv-heads G, the number of key/value heads to keep")
        if isinstance(self.kv_heads, bool) or not isinstance(self.kv_heads, int) or self.kv_heads < 1:
            raise LlmliteError(f"--kv-heads must be a whole number of at least 1, got {self.kv_heads!r}")
        if self.method not in METHODS:
            raise LlmliteError(f"unknown method '{self.method}'; use one of: {', '.join(METHODS)}")
        if self.uptrain_params not in UPTRAIN_PARAMS:
            raise LlmliteError(
                f"unknown --uptrain-params '{self.uptrain_params}'; use one of: {', '.join(UPTRAIN_PARAMS)}"
            )
        for name in ("samples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise LlmliteError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.uptrain_tokens < 0:
            raise LlmliteError(f"--uptrain-tokens must be 0 (off) or more, got {self.uptrain_tokens}")
        if not 0 < self.uptrain_lr < 1:
            raise LlmliteError(
                f"--uptrain-lr {self.uptrain_lr} is out of range; use a value in (0, 1), e.g. 1e-4"
            )
        return self


@dataclass
class GQAResult(Result):
    model: nn.Module
    tokenizer: object
    config: GQAConfig
    record: dict = field(default_factory=dict)  # what llmlite_gqa.json holds
    output: Path | None = None

    def to_dict(self) -> dict:
        return {**self.record, "output": None if self.output is None else str(self.output)}


def kv_cache_bytes_per_token(config) -> int:
    """Bytes of keys and values cached per token in float16: 2 × layers × kv_heads × head_dim × 2."""
    return float16_cache_bytes(config, tokens=1)


def convert_gqa_model(
    config: GQAConfig | None = None, *, recipe: str | None = None, progress: bool = True, **options
) -> GQAResult:
    """Load a model, convert its attention to ``kv_heads`` key/value heads, optionally uptrain it by
    distillation from the original, and (with ``output``) save it with its tokenizer.

    Options are ``GQAConfig``'s fields (``convert_gqa_model(kv_heads=1, output="out")``) or a ready
    ``config``; ``recipe`` names a YAML file of options that ``options`` override.
    """
    from llmlite.recipes import build
    from llmlite.runinfo import environment

    cfg = config.validate() if config is not None else build(GQAConfig, recipe, **options)
    inputs = [("--model", local_source(cfg.model)), ("--calibration", cfg.calibration), ("--recipe", recipe)]
    # checked, locked and staged before the long work: a bad --output fails in the first second
    with staged_output(cfg.output, overwrite=cfg.overwrite, inputs=inputs) as tmp:
        start = time.perf_counter()
        model, tokenizer = load_model(cfg.model)
        heads, before = check_target(model.config, cfg.kv_heads)
        check_window(model.config, cfg.seqlen, "--seqlen")
        attention_layers(model)  # a quantized model fails here, before calibration
        record = {
            "settings": asdict(cfg),
            "source": cfg.model,
            "architecture": model.config.model_type,
            "layers": model.config.num_hidden_layers,
            "heads": heads,
            "kv_heads_before": before,
            "kv_heads_after": cfg.kv_heads,
            "kv_cache_bytes_per_token_fp16_before": kv_cache_bytes_per_token(model.config),
            "calibration": None,
            "uptraining": None,
        }
        ids, windows = None, None
        if cfg.method != "mean" and cfg.kv_heads < before:
            ids = tokenize(tokenizer, load_text(cfg.calibration))
            windows = calibration_windows(ids, cfg.samples, cfg.seqlen, cfg.seed)
            record["calibration"] = {"text": cfg.calibration, "windows": cfg.samples, "seqlen": cfg.seqlen}
        teacher = copy.deepcopy(model) if cfg.uptrain_tokens else None
        convert_gqa(model, cfg.kv_heads, cfg.method, windows, progress)
        record["convert_seconds"] = round(time.perf_counter() - start, 2)
        record["kv_cache_bytes_per_token_fp16_after"] = kv_cache_bytes_per_token(model.config)
        if teacher is not None:
            ids = tokenize(tokenizer, load_text(cfg.calibration)) if ids is None else ids
            train = calibration_windows(
                ids, math.ceil(cfg.uptrain_tokens / cfg.seqlen), cfg.seqlen, cfg.seed + 1
            )
            begin = time.perf_counter()
            losses = uptrain(
                model, teacher, train, cfg.uptrain_lr, cfg.batch_size, cfg.uptrain_params, cfg.seed, progress
            )
            del teacher
            record["uptraining"] = _uptrain_record(model, cfg, train, losses, time.perf_counter() - begin)
        record["seconds"] = round(time.perf_counter() - start, 2)
        record["environment"] = environment()
        if tmp is not None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    output = Path(cfg.output) if cfg.output else None
    if output is not None:
        model.llmlite_source = str(output)
    return GQAResult(model, tokenizer, cfg, record, output)


def _uptrain_record(
    model: nn.Module, cfg: GQAConfig, train: Tensor, losses: list[float], seconds: float
) -> dict:
    return {
        "text": cfg.calibration,
        **distill_record(train, losses, cfg.uptrain_lr, cfg.batch_size, seconds),
        "params": cfg.uptrain_params,
        "trainable_params": sum(p.numel() for p in trainable_parameters(model, cfg.uptrain_params)),
    }
