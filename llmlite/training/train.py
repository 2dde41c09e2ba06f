"""``finetune``: the training loop (single process, or DDP/FSDP under ``accelerate launch``).

Work happens in ``.NAME.partial/`` beside the output folder: checkpoints every ``save_steps``
(written to a temporary folder, then renamed, so Ctrl-C never leaves a torn one) and the log.
``--resume`` continues from the newest checkpoint there with the same data order, optimizer,
schedule and random state, so it ends with the adapter an uninterrupted run would give. The output
folder appears only when training has finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlite.errors import LlmliteError
from llmlite.models import check_window, load_config, load_tokenizer, local_source
from llmlite.results import Result
from llmlite.runinfo import check_output, staged_output
from llmlite.training.adapters import add_adapters, load_base, pick_dtype, target_modules
from llmlite.training.config import FinetuneConfig
from llmlite.training.data import Example, collate, epoch_batches, load_examples, split
from llmlite.training.loop import Local, Step
from llmlite.training.loop import train as run_loop
from llmlite.training.loss import IGNORE, CausalLMLoss, shift_targets

log = logging.getLogger("llmlite")
SUMMARY = "llmlite_finetune.json"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the last checkpoint is."""

    resumable = True  # the CLI prints the message instead of "no output was written"


@dataclass
class FinetuneResult(Result):
    output: str
    method: str
    data_format: str
    steps: int
    train_examples: int
    eval_examples: int
    trainable_params: int
    total_params: int
    train_tokens: int
    seconds: float
    tokens_per_second: float
    peak_memory_bytes: int
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    resumed_from: int | None = None
    log: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("log")
        return out

    def to_dict(self) -> dict:
        return self.summary()


def finetune(
    config: FinetuneConfig | None = None,
    *,
    recipe: str | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    **options,
) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the adapter (peft's format) or, for
    ``method="full"``, the whole model to ``config.output``. ``on_step(step)`` runs after each
    optimizer step (and its checkpoint)."""
    from llmlite.recipes import build

    config = config.validate() if config is not None else build(FinetuneConfig, recipe, **options)
    inputs = [("--model", local_source(config.model)), ("--data", config.data), ("--recipe", recipe)]
    output = check_output(config.output, overwrite=True, inputs=inputs)  # resolved, never an input
    work = output.with_name(f".{output.name}.partial")  # checkpoints, kept for --resume
    _check_folders(output, work, config)
    accelerator = _accelerator()
    staged = config.output if accelerator.is_main_process else None
    # checked, locked and staged before the work: a bad --output fails in the first second
    with staged_output(staged, overwrite=config.overwrite, inputs=inputs) as tmp:
        result, model, tokenizer = _train(config, work, accelerator, progress, on_step)
        if tmp is not None:
            _write_output(tmp, config, model, tokenizer, result)
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _train(
    config: FinetuneConfig, work: Path, accelerator, progress: bool, on_step: Callable[[int], None] | None
) -> tuple[FinetuneResult, nn.Module, object]:
    """Setup, resume, the steps (``training.loop``), checkpoints into ``work``, held-out loss."""
    device = accelerator.device
    if accelerator.num_processes > 1:
        log.info("process %d of %d on %s", accelerator.process_index + 1, accelerator.num_processes, device)
    torch.manual_seed(config.seed)

    tokenizer = load_tokenizer(config.model)
    check_window(load_config(config.model), config.seqlen, "--seqlen")  # before the data is cut to it
    examples, fmt = load_examples(config.data, tokenizer, config.seqlen, config.format)
    train, held_out = split(examples, config.eval_split, config.seed)
    dtype = pick_dtype(config.dtype, device)
    model, _ = load_base(config.model, config.method, dtype, device)
    targets = None if config.method == "full" else target_modules(model, config.targets())
    model = add_adapters(
        model,
        config.method,
        targets or [],
        config.rank,
        config.alpha,
        config.dropout,
        config.rslora,
        config.gradient_checkpointing,
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if config.compile:
        compile_layers(model)
    loss_module = CausalLMLoss(model)
    optimizer = _optimizer(config, list(trainable.values()), device)
    world, rank = accelerator.num_processes, accelerator.process_index
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.max_steps or max(
        1, math.ceil(config.epochs * batches_per_epoch / (config.grad_accum * world))
    )
    scheduler = _scheduler(config, optimizer, total)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    pad_id = _pad_id(tokenizer)

    step, history, resumed = 0, [], None
    if config.resume:
        step, history = _load_checkpoint(_latest(work), trainable, optimizer, scheduler, device)
        resumed = step
        log.info("resuming from step %d of %d (%s)", step, total, work)
    work.mkdir(parents=True, exist_ok=True)

    lengths = [len(e.input_ids) for e in train]
    epochs: dict[int, list[list[int]]] = {}

    def batch_at(micro: int) -> list[Example]:
        epoch, b = divmod(micro * world + rank, batches_per_epoch)
        if epoch not in epochs:
            epochs.clear()
            epochs[epoch] = epoch_batches(
                lengths, config.batch_size, config.seed, epoch, config.group_by_length
            )
        return [train[i] for i in epochs[epoch][b]]

    paused = 0.0  # seconds spent evaluating, left out of the throughput

    def evaluate() -> float | None:
        nonlocal paused
        if not held_out:
            return None
        t = time.perf_counter()
        loss = _eval_loss(loss_module, held_out, config.batch_size, pad_id, device)
        paused += time.perf_counter() - t
        return loss

    main = accelerator.is_main_process
    show = progress and main
    eval_every = config.eval_steps or config.save_steps
    before = next((h["eval_loss"] for h in history if h.get("step") == 0 and "eval_loss" in h), None)
    if step == 0 and held_out:
        before = evaluate()
        history.append({"step": 0, "eval_loss": before})
    tokens = window_tokens = 0
    start = window_start = time.perf_counter() - paused

    def micro_batches(s: int) -> list[dict]:
        """Step ``s``'s micro-batches as ``CausalLMLoss``'s arguments, each loss divided by the
        target tokens of the whole step (so that the step's gradient is their mean)."""
        nonlocal tokens, window_tokens
        micro = [collate(batch_at(s * config.grad_accum + j), pad_id) for j in range(config.grad_accum)]
        normaliser = sum(int((shift_targets(b["labels"]) != IGNORE).sum()) for b in micro)
        real = sum(int(b["lengths"].sum()) for b in micro)
        tokens, window_tokens = tokens + real, window_tokens + real
        return [
            {
                "input_ids": b["input_ids"].to(device),
                "labels": b["labels"].to(device),
                "normaliser": max(normaliser, 1),
            }
            for b in micro
        ]

    def after_step(done: Step) -> dict:
        """Log, evaluate, checkpoint and call ``on_step`` after a step; the progress bar's postfix."""
        nonlocal step, window_tokens, window_start
        step = done.step
        lr = scheduler.get_last_lr()[0]
        entry = None
        if step % config.log_steps == 0 or step == total:
            now = time.perf_counter() - paused
            entry = {
                "step": step,
                "loss": done.loss,
                "lr": lr,
                "tokens_per_second": window_tokens / max(now - window_start, 1e-9),
                "peak_memory_bytes": peak_memory(device),
            }
            window_tokens, window_start = 0, now
        if held_out and (step % eval_every == 0 or step == total):
            entry = {**(entry or {"step": step}), "eval_loss": evaluate()}
            if show:
                tqdm.write(f"step {step}: eval loss {entry['eval_loss']:.4f}")
        if entry:
            history.append(entry)
        speed = tokens / (time.perf_counter() - paused - start)
        postfix = {"loss": f"{done.loss:.3f}", "lr": f"{lr:.2e}", "tok_s": f"{speed:.0f}"}
        if main and step % config.save_steps == 0 and step < total:
            _save_checkpoint(work, step, trainable, optimizer, scheduler, history, config.keep_checkpoints)
        if on_step is not None:
            on_step(step)
        return postfix

    try:
        run_loop(
            loss_module,
            micro_batches,
            optimizer,
            scheduler,
            list(trainable.values()),
            total,
            start=step,
            max_grad_norm=config.max_grad_norm,
            backend=accelerator,
            desc="finetune" if show else None,
            on_step=after_step,
        )
    except KeyboardInterrupt:
        last = _latest(work, required=False)
        where = (
            f"the last checkpoint is {last}; rerun the same command with --resume"
            if last
            else ("no checkpoint was written yet; rerun to start again")
        )
        raise TrainingInterrupted(f"training interrupted at step {step} of {total}: {where}") from None
    seconds = time.perf_counter() - paused - start
    after = next(
        (h["eval_loss"] for h in reversed(history) if h.get("step") == total and "eval_loss" in h), None
    )
    result = FinetuneResult(
        output=str(config.output),
        method=config.method,
        data_format=fmt,
        steps=total,
        train_examples=len(train),
        eval_examples=len(held_out),
        trainable_params=sum(p.numel() for p in trainable.values()),
        total_params=sum(p.numel() for p in model.parameters()),
        train_tokens=tokens,
        seconds=seconds,
        tokens_per_second=tokens / max(seconds, 1e-9),
        peak_memory_bytes=peak_memory(device),
        eval_loss_before=before,
        eval_loss_after=after,
        resumed_from=resumed,
        log=history,
    )
    accelerator.wait_for_everyone()
    return result, accelerator.unwrap_model(loss_module).model, tokenizer


class _SingleProcess(Local):
    """The few ``accelerate.Accelerator`` methods ``finetune`` uses, for one process: no wrapping, no
    hooks (accelerate's own single-process path costs ~250 MB of peak memory here)."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, *objects):
        return objects

    def wait_for_everyone(self) -> None:
        pass

    def unwrap_model(self, module: nn.Module) -> nn.Module:
        return module


def _accelerator():
    """accelerate's ``Accelerator`` under ``accelerate launch`` / ``torchrun`` (DDP, FSDP), else a
    plain single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        return Accelerator(cpu=not torch.cuda.is_available())
    return _SingleProcess()


def compile_layers(model: nn.Module) -> bool:
    """Compile each decoder layer with ``torch.compile`` (dynamic shapes: one graph for every
    sequence length). Fuses the elementwise work around the matrix products (norms, rotary
    embeddings, activations, adapter scaling) and keeps fewer activations for the backward pass.
    Skipped, with a note, where no C++ compiler is found for the CPU."""
    from llmlite.arch import decoder_layers

    device = next(model.parameters()).device
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        log.warning("no C++ compiler found: training without torch.compile (install g++ for ~1.2x speed)")
        return False
    import torch._inductor.config

    # Dropout draws from torch's own generator, as in eager mode: a resumed run (compiled at a
    # later step) then sees the random numbers an uninterrupted one would.
    torch._inductor.config.fallback_random = True
    for layer in decoder_layers(model):
        layer.compile(dynamic=True)
    return True


def peak_memory(device: torch.device) -> int:
    """The CUDA allocator's peak on a GPU, else the process's peak resident set (bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    from llmlite.memory import rss_peak_bytes

    return rss_peak_bytes()


@torch.no_grad()
def _eval_loss(
    loss_module: nn.Module, examples: list[Example], batch_size: int, pad_id: int, device
) -> float:
    """Mean next-token loss over ``examples`` (per target token)."""
    was_training = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id)
        n = int((shift_targets(batch["labels"]) != IGNORE).sum())
        total += float(loss_module(batch["input_ids"].to(device), batch["labels"].to(device), 1.0))
        count += n
    loss_module.train(was_training)
    return total / max(count, 1)


def _check_folders(output: Path, work: Path, config: FinetuneConfig) -> None:
    """The output (already checked against the inputs) and its checkpoints for this start or
    resume: a finished run is not resumed, an interrupted one not silently restarted."""
    if config.resume:
        if output.exists():
            raise LlmliteError(
                f"{output} is already a finished run; nothing to resume (choose another --output)"
            )
        _latest(work)
        return
    check_output(output, config.overwrite)
    if work.exists():
        if not config.overwrite:
            raise LlmliteError(
                f"an interrupted run of {output} is in {work}; pass --resume to continue it or "
                "--overwrite to start again"
            )
        shutil.rmtree(work)


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _optimizer(config: FinetuneConfig, params: list[Tensor], device: torch.device) -> torch.optim.Optimizer:
    if not params:
        raise LlmliteError("nothing to train: no parameter requires a gradient; check --target-modules")
    if config.optimizer == "adamw":
        # torch's fused kernel (the Trainer's default too): on the CPU a quarter of the time of the
        # per-parameter loop for a 135M model's full fine-tuning, same update
        fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    if device.type != "cuda":
        raise LlmliteError(
            f"--optimizer {config.optimizer} (bitsandbytes) needs a CUDA GPU; on the CPU use adamw"
        )
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }[config.optimizer]
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(config: FinetuneConfig, optimizer, total: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.schedule == "constant" else config.schedule
    warmup = round(config.warmup_ratio * total)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _latest(work: Path, required: bool = True) -> Path | None:
    found = sorted((work / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if not found and required:
        raise LlmliteError(f"no checkpoint to resume from in {work}; run without --resume to start")
    return found[-1] if found else None


def _save_checkpoint(
    work: Path, step: int, trainable: dict[str, Tensor], optimizer, scheduler, history: list[dict], keep: int
) -> None:
    folder = work / "checkpoints"
    tmp = folder / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, tmp / "trainable.safetensors")
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, tmp / "state.pt")
    (tmp / "log.json").write_text(json.dumps(history))
    tmp.rename(folder / f"step-{step}")
    for old in sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(
    folder: Path, trainable: dict[str, Tensor], optimizer, scheduler, device
) -> tuple[int, list]:
    try:
        weights = load_file(folder / "trainable.safetensors")
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        history = json.loads((folder / "log.json").read_text())
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError, pickle.UnpicklingError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LlmliteError(
            f"cannot read checkpoint {folder} ({first}); delete it to resume from an earlier one"
        ) from None
    if set(weights) != set(trainable):
        raise LlmliteError(
            f"checkpoint {folder} was made with other settings (its trained tensors differ); "
            "resume with the options of the interrupted run"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            trainable[name].copy_(tensor.to(device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), [h for h in history if h.get("step", 0) <= state["step"]]


def _write_output(folder: Path, config: FinetuneConfig, model: nn.Module, tokenizer, result) -> None:
    from llmlite.runinfo import environment

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    summary = {
        "base_model": config.model,
        "settings": dataclasses.asdict(config),
        "result": result.summary(),
        "log": result.log,
        "environment": environment(),
    }
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2))
