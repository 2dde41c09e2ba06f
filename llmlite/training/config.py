"""Options of ``llmlite finetune`` / ``llmlite.finetune`` (the CLI, the API and recipes share them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llmlite.errors import LlmliteError
from llmlite.models import DEFAULT_MODEL
from llmlite.recipes import option
from llmlite.training.data import FORMATS

METHODS = ("lora", "qlora", "dora", "full")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class FinetuneConfig:
    """Options of ``llmlite finetune``. ``method``: ``lora``, ``dora``, ``qlora`` (a 4-bit NF4 base
    with double quantization through bitsandbytes) or ``full`` (every weight trains). A llmlite
    GPTQ checkpoint as ``model`` gives LoRA on its 4-bit weights."""

    VERB: ClassVar[str] = "finetune"
    ABOUT: ClassVar[str] = (
        "Train adapters (peft format) on text (packed) or instruction JSONL (loss on the responses). "
        "Defaults: the bundled smollm2-135m, LoRA rank 16, alpha 32, every attention and MLP "
        "projection, 512 tokens, batch 4, AdamW 2e-4, cosine schedule, 1 epoch, 5% held out."
    )

    model: str = option(DEFAULT_MODEL, "bundled name, folder, hub id, .gguf or llmlite GPTQ checkpoint")
    data: str | None = option(
        None, "text (.txt/.jsonl/.parquet, corpus or hub dataset) or instruction JSONL (required)"
    )
    format: str = option(
        "auto",
        "text: packed; instruction: prompt/response or messages rows; auto: by the rows",
        choices=FORMATS,
    )
    method: str = option("lora", "lora, qlora (NF4 base), dora or full", choices=METHODS)
    rank: int = option(16, "adapter rank")
    alpha: float = option(32.0, "adapter alpha")
    dropout: float = option(0.0, "adapter dropout")
    rslora: bool = option(False, "scale by alpha/sqrt(rank) instead of alpha/rank")
    target_modules: str | None = option(
        None, "comma-separated module names", shown="every attention and MLP projection"
    )
    seqlen: int = option(512, "tokens per sequence")
    batch_size: int = option(4, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    group_by_length: bool = option(True, "batch sequences of similar length together (less padding)")
    lr: float = option(2e-4, "peak learning rate")
    epochs: float = option(1.0, "passes over the data")
    max_steps: int | None = option(None, "optimizer steps (overrides --epochs)")
    schedule: str = option("cosine", "learning-rate schedule", choices=SCHEDULES)
    warmup_ratio: float = option(0.03, "fraction of steps warming up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping, 0 = off")
    optimizer: str = option("adamw", "adamw, or bitsandbytes' 8-bit / paged ones (GPU)", choices=OPTIMIZERS)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass")
    compile: bool = option(True, "torch.compile each decoder layer (the first step is slower)")
    dtype: str = option(
        "auto", "base dtype; auto: bfloat16 on a GPU that has it, else float32", choices=DTYPES
    )
    eval_split: float = option(0.05, "fraction held out for the evaluation loss")
    eval_steps: int | None = option(None, "evaluate every N steps", shown="at each checkpoint")
    save_steps: int = option(100, "checkpoint every N steps")
    keep_checkpoints: int = option(2, "checkpoints kept")
    log_steps: int = option(10, "log every N steps")
    seed: int = option(0, "data order and initialisation seed")
    resume: bool = option(False, "continue the interrupted run of this --output")
    output: str | None = option(None, "folder for the adapter (required)")
    overwrite: bool = option(False, "replace an existing output folder")

    def validate(self) -> FinetuneConfig:
        _choice("method", self.method, METHODS)
        _choice("format", self.format, FORMATS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("dtype", self.dtype, DTYPES)
        if not self.data:
            raise LlmliteError(
                "finetune needs --data (a .txt/.jsonl/.parquet file, a corpus or a hub dataset)"
            )
        if not self.output:
            raise LlmliteError("finetune needs --output DIR (the folder for the adapter)")
        if self.rank < 1 and self.method != "full":
            raise LlmliteError(f"--rank {self.rank} is invalid; use 1 or more (8, 16 and 64 are common)")
        for name in ("seqlen", "batch_size", "grad_accum", "save_steps", "log_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise LlmliteError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.max_steps is not None and self.max_steps < 1:
            raise LlmliteError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise LlmliteError(f"--eval-steps must be at least 1, got {self.eval_steps}")
        if self.epochs <= 0:
            raise LlmliteError(f"--epochs must be positive, got {self.epochs}")
        if not 0 <= self.eval_split < 1:
            raise LlmliteError(f"--eval-split {self.eval_split} is out of range; use a fraction in [0, 1)")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise LlmliteError("--dropout and --warmup-ratio must be fractions in [0, 1)")
        if self.lr <= 0:
            raise LlmliteError(f"--lr must be positive, got {self.lr}")
        return self

    def targets(self) -> list[str] | None:
        if self.target_modules is None:
            return None
        names = self.target_modules
        names = names.split(",") if isinstance(names, str) else list(names)
        return [n.strip() for n in names if n.strip()]


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LlmliteError(f"--{name} {value} is not supported; use one of: {', '.join(allowed)}")
