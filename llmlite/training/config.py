"""Options of ``llmlite finetune`` / ``llmlite.finetune`` (the CLI, the API and recipes share them)."""

from __future__ import annotations

from dataclasses import dataclass

from llmlite.errors import LlmliteError
from llmlite.models import DEFAULT_MODEL
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

    model: str = DEFAULT_MODEL
    data: str | None = None
    format: str = "auto"  # text: packed; instruction: prompt/response or messages rows
    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False  # scale by alpha/sqrt(rank) instead of alpha/rank
    target_modules: str | None = None  # comma-separated; default: every attention and MLP projection
    seqlen: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    group_by_length: bool = True  # batch sequences of similar length together (less padding)
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    compile: bool = True  # torch.compile each decoder layer (needs a C++ compiler on the CPU)
    dtype: str = "auto"  # auto: bfloat16 on a GPU that has it, else float32
    eval_split: float = 0.05
    eval_steps: int | None = None  # default: at every checkpoint
    save_steps: int = 100
    keep_checkpoints: int = 2
    log_steps: int = 10
    seed: int = 0
    resume: bool = False
    output: str | None = None
    overwrite: bool = False

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
