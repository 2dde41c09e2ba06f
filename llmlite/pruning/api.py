"""``prune``: load, prune, save (the API behind ``llmlite prune``), with its options ``PruneConfig``.

The output is a dense checkpoint (zeros in the pruned weights) in ``--dtype`` that plain
transformers and llmlite load, with the run record ``llmlite.json`` (each linear's sparsity);
with ``--bits``, the kept weights quantized by GPTQ in the same pass and written as a quantized
checkpoint (``--format`` gptq, awq or compressed-tensors) whose pruned weights are exact zeros.
With ``--structure`` (channels, heads, layers), whole units are removed instead (``shrink``): the
output is a smaller dense model with its config updated, the units removed in ``llmlite.json``;
``--recover-tokens`` then distils the unpruned model into it (every weight trains) before saving.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import nn

from llmlite.calibration import calibration_set
from llmlite.config import DTYPES
from llmlite.data import DEFAULT_CALIBRATION_SET
from llmlite.errors import LlmliteError
from llmlite.memory import RunStats, measure
from llmlite.models import (
    DEFAULT_MODEL,
    check_window,
    load_model,
    local_source,
    own_weights,
    refuse_quantized,
    save_float_model,
)
from llmlite.pruning.masks import parse_pattern
from llmlite.pruning.methods import METHODS, PruneSettings
from llmlite.pruning.shrink import StructuredReport, check_structured, prune_structured
from llmlite.pruning.structured import STRUCTURES
from llmlite.pruning.walk import PruneReport, calibrated, check_prunable, prune_model, remeasure
from llmlite.quant.checkpoint import gptq_config, round_unquantized, save_checkpoint
from llmlite.quant.grid import SUPPORTED_BITS
from llmlite.quant.layouts import LAYOUTS, check_bits, check_fits
from llmlite.recipes import option
from llmlite.results import Result
from llmlite.runinfo import environment, staged_output
from llmlite.training.distill import distill, distill_record

RECORD = "llmlite.json"
# The layouts that hold a pruned weight exactly: each stores integer codes and integer zero-points,
# and a pruned weight's code is its group's zero-point, so it reads back as (z − z)·s = 0. GGUF is
# not offered: q4_1 stores an asymmetric group's offset as a float16 minimum, not a zero-point.
FORMATS = tuple(LAYOUTS)
# The options that say how the kept weights are quantized: read only with --bits.
QUANT_OPTIONS = ("group_size", "sym", "act_order", "refit", "format")
# The options of unstructured pruning, refused with --structure (whole units are ranked by their
# calibration activations; nothing is quantized)
UNSTRUCTURED_OPTIONS = ("method", "pattern", "damp", "true_sequential", "bits")
STRUCTURED_SPARSITY = 0.2  # the default --sparsity with --structure
RECOVERY_BATCH = 4  # recovery windows per optimizer step
# GQA uptraining's best of 1e-4, 3e-4 and 1e-3 at a budget of 16k tokens (docs/gqa.md)
RECOVERY_LR = 3e-4


@dataclass
class PruneConfig:
    """Options of ``llmlite prune`` / ``llmlite.prune``."""

    VERB: ClassVar[str] = "prune"
    ABOUT: ClassVar[str] = (
        "Set a fraction of the weights of every linear in the decoder layers to zero (unstructured, or "
        "N:M such as 2:4) with magnitude, Wanda or SparseGPT, and save a dense model with those zeros "
        "that plain transformers loads. Zeros in dense tensors make nothing faster or smaller by "
        "themselves. With --structure, whole MLP channels, attention heads or decoder layers are "
        "removed instead, and the saved model is smaller."
    )

    model: str = option(DEFAULT_MODEL, "bundled name, local folder, .gguf file or hub id")
    method: str = option("sparsegpt", "how weights are chosen and updated", choices=tuple(METHODS))
    sparsity: float | None = option(
        None,
        "fraction of each linear's weights set to zero, in (0, 1); with --structure, the fraction of the "
        "decoder layers' parameters removed",
        shown="0.5 unless --pattern; 0.2 with --structure",
    )
    structure: str | None = option(
        None,
        "remove whole units and save a smaller dense model: channels (MLP neurons), heads (key/value "
        "groups of attention heads) or layers (decoder layers of least Block Influence), ranked on "
        "calibration activations, the same count from every layer",
        choices=STRUCTURES,
        shown="none: unstructured",
    )
    recover_tokens: int = option(
        0,
        "with --structure: recovery after pruning, distilling the unpruned model into the pruned one "
        f"(every weight trains, {RECOVERY_BATCH} windows of --seqlen per step) on this many tokens of "
        "--calibration text; 0: none",
    )
    recover_lr: float = option(RECOVERY_LR, "with --recover-tokens: peak learning rate, cosine to 0")
    pattern: str | int | None = option(  # int: what YAML makes of an unquoted 2:4 (refused)
        None, "N:M sparsity instead: N weights kept in every M consecutive inputs of a row, e.g. 2:4"
    )
    calibration: str = option(
        DEFAULT_CALIBRATION_SET,
        "calibration text (wanda, sparsegpt, --bits): file or corpus name, 'self' (text the model writes "
        "itself), or sources joined by '+' sharing the windows (wikitext2-valid+self)",
    )
    samples: int = option(128, "calibration windows")
    seqlen: int = option(512, "tokens per calibration window")
    seed: int = option(0, "calibration sampling seed")
    damp: float = option(0.01, "SparseGPT and GPTQ damping, fraction of mean diag(H)")
    true_sequential: bool = option(
        False,
        "wanda, sparsegpt, --bits: calibrate each group of a layer (q/k/v, o, gate/up, down) on the outputs "
        "of the layer's groups pruned before it, instead of measuring every group in one pass through the "
        "unpruned layer (the reference codes, llm-compressor)",
    )
    bits: int | None = option(
        None,
        "also quantize the kept weights with GPTQ in the same pass (2, 3, 4 or 8 bits; pruned weights "
        "stay exact zeros) and write a quantized checkpoint",
        shown="none: float weights",
    )
    group_size: int = option(128, "with --bits: columns per scale; -1 = one group per output channel")
    sym: bool = option(
        True, "with --bits: symmetric grid; --asym: asymmetric (zero-points)", negative="--asym"
    )
    act_order: bool = option(
        True, "with --bits: GPTQ's columns by decreasing Hessian diagonal (static groups)"
    )
    refit: bool = option(True, "with --bits: re-solve each group's scale after GPTQ (--no-refit: GPTQ's own)")
    format: str = option(
        "gptq",
        "with --bits: the checkpoint layout, gptq (transformers + GPTQModel, vLLM), awq (AWQ GEMM, 4-bit) "
        "or compressed-tensors (4/8-bit)",
        choices=FORMATS,
    )
    dtype: str = option(
        "float16", "storage of the saved weights (with --bits: of the unquantized ones)", choices=DTYPES
    )
    output: str | None = option(
        None, "folder for the pruned model", cli_required="the folder for the pruned model"
    )
    overwrite: bool = option(False, "replace an existing output folder")

    def validate(self) -> PruneConfig:
        if self.structure is not None:
            self._check_structure()
        if self.method not in METHODS:
            raise LlmliteError(f"unknown method '{self.method}'; use one of: {', '.join(METHODS)}")
        if self.sparsity is not None and self.pattern is not None:
            raise LlmliteError(
                f"--sparsity {self.sparsity} and --pattern {self.pattern} both set the sparsity; give one"
            )
        if isinstance(self.pattern, int) and not isinstance(self.pattern, bool):
            raise LlmliteError(
                f"pattern {self.pattern} is a number: YAML reads an unquoted N:M as base 60 (2:4 is 124); "
                "quote it in the recipe: pattern: '2:4'"
            )
        if self.pattern is not None:
            parse_pattern(self.pattern)
        else:
            if self.sparsity is None:
                self.sparsity = 0.5
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, int | float):
                raise LlmliteError(f"--sparsity must be a number in (0, 1), got {self.sparsity!r}")
            if not 0 < self.sparsity < 1:
                raise LlmliteError(
                    f"--sparsity {self.sparsity:g} is out of range; use a fraction in (0, 1), e.g. 0.5"
                )
        for name in ("samples", "seqlen"):
            if getattr(self, name) < 1:
                raise LlmliteError(f"--{name} must be at least 1, got {getattr(self, name)}")
        self._check_recovery()
        if not 0 < self.damp <= 1:
            raise LlmliteError(f"--damp {self.damp} is out of range; use a value in (0, 1], e.g. 0.01")
        if self.true_sequential and self.method == "magnitude" and self.bits is None:
            raise LlmliteError(
                "--true-sequential sets how calibration is gathered, and magnitude without --bits reads "
                "none; drop it, or use --method wanda or sparsegpt"
            )
        self._check_quantization()
        if self.dtype not in DTYPES:
            raise LlmliteError(f"--dtype {self.dtype} is not supported; use one of: {', '.join(DTYPES)}")
        refuse_quantized(self.model, "prune")  # before any work: there is no float weight left
        return self

    def _flag(self, name: str) -> str:
        """The command-line flag that set option ``name`` away from its default."""
        if name == "sym":
            return "--asym"
        flag = name.replace("_", "-")
        return f"--no-{flag}" if getattr(self, name) is False else f"--{flag}"

    def _check_structure(self) -> None:
        """``--structure``: a known one, without the options of unstructured pruning."""
        if self.structure not in STRUCTURES:
            known = ", ".join(STRUCTURES)
            raise LlmliteError(f"--structure {self.structure} is unknown; use one of: {known}")
        defaults = {f.name: f.default for f in fields(self)}
        for name in (*UNSTRUCTURED_OPTIONS, *QUANT_OPTIONS):
            if getattr(self, name) != defaults[name]:
                flag = self._flag(name)
                raise LlmliteError(
                    f"{flag} is for unstructured pruning; --structure {self.structure} ranks whole units by "
                    f"their calibration activations and keeps float weights: drop {flag}"
                )
        if self.sparsity is None:
            self.sparsity = STRUCTURED_SPARSITY

    def _check_recovery(self) -> None:
        """``--recover-tokens`` (with ``--structure`` only) and ``--recover-lr`` (with it only)."""
        tokens = self.recover_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise LlmliteError(f"--recover-tokens must be 0 (none) or a number of tokens, got {tokens!r}")
        if tokens and self.structure is None:
            raise LlmliteError(
                "--recover-tokens recovers a model whose units were removed; add --structure or drop it"
            )
        sources = len(self.calibration.split("+"))
        if tokens and math.ceil(tokens / self.seqlen) < sources:
            raise LlmliteError(
                f"--recover-tokens {tokens} is less than one window of --seqlen {self.seqlen} for each of "
                f"the {sources} calibration sources; give at least {sources * self.seqlen}"
            )
        if not tokens and self.recover_lr != RECOVERY_LR:
            raise LlmliteError("--recover-lr sets the recovery; add --recover-tokens (e.g. 16384) or drop it")
        if not 0 < self.recover_lr < 1:
            raise LlmliteError(
                f"--recover-lr {self.recover_lr} is out of range; use a value in (0, 1), e.g. {RECOVERY_LR}"
            )

    def _check_quantization(self) -> None:
        """``--bits`` and the options read with it: a width and a group size the layout holds; those
        options given without ``--bits`` are refused (they would be silently ignored)."""
        if self.bits is None:
            defaults = {f.name: f.default for f in fields(self)}
            changed = [name for name in QUANT_OPTIONS if getattr(self, name) != defaults[name]]
            if changed:
                flag = self._flag(changed[0])
                raise LlmliteError(
                    f"{flag} sets how the kept weights are quantized; add --bits (e.g. --bits 4) or drop it"
                )
            return
        if self.format == "gguf":
            raise LlmliteError(
                "--format gguf cannot hold a pruned asymmetric group exactly (q4_1 stores a float offset, "
                "not a zero-point); use --format gptq, awq or compressed-tensors"
            )
        if self.format not in FORMATS:
            raise LlmliteError(f"--format {self.format} is not supported; use one of: {', '.join(FORMATS)}")
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise LlmliteError(f"{self.bits}-bit weights are not supported; use --bits 2, 3, 4 or 8")
        check_bits(self.format, self.bits)
        if not isinstance(self.group_size, int) or self.group_size == 0 or self.group_size < -1:
            raise LlmliteError(
                f"group size {self.group_size} is invalid; use a positive size such as 128, "
                "or -1 for one group per output channel"
            )

    def settings(self) -> PruneSettings:
        pattern = None if self.pattern is None else parse_pattern(self.pattern)
        sparsity = 1 - pattern[0] / pattern[1] if pattern else float(self.sparsity)
        quant = {}
        if self.bits is not None:
            names = ("bits", "group_size", "sym", "act_order", "refit")
            quant = {name: getattr(self, name) for name in names}
        walk = {"true_sequential": self.true_sequential}
        return PruneSettings(self.method, sparsity, pattern, self.damp, **walk, **quant)

    def quantization_config(self) -> dict:
        """``quantization_config`` of the ``--bits`` checkpoint: GPTQ's (the layout's own keys are
        set when it is written), with the pruning in its ``meta``."""
        options = SimpleNamespace(
            model=self.model, method="gptq", bits=self.bits, group_size=self.group_size, sym=self.sym,
            act_order=self.act_order, damp=self.damp, quantize_head=False, mse=False, v2=False,
            v2_alpha=None, v2_windows=None, refit=self.refit,
        )  # fmt: skip
        qconfig = gptq_config(options)
        settings = self.settings()
        qconfig["meta"]["pruning"] = {
            "method": self.method,
            "sparsity": settings.target,
            "pattern": None if settings.pattern is None else f"{settings.pattern[0]}:{settings.pattern[1]}",
        }
        return qconfig


@dataclass
class PruneResult(Result):
    model: Any
    tokenizer: Any
    config: PruneConfig
    report: PruneReport | StructuredReport
    stats: RunStats
    output: Path | None

    def summary(self) -> dict:
        if isinstance(self.report, StructuredReport):
            r, recovery = self.report, self.report.recovery
            return {
                "output": None if self.output is None else str(self.output),
                "structure": r.plan.structure,
                "target": r.plan.target,
                "removed_fraction": r.removed_fraction,
                "removed_per_layer": r.plan.count,
                "recovery": recovery and {k: recovery[k] for k in ("tokens", "loss_first", "loss_last")},
                "units_per_layer": r.plan.units,
                "params_before": r.params_before,
                "params_after": r.params_after,
                "config": {k: v[1] for k, v in r.config.items()},
                "seconds": round(self.stats.seconds, 2),
                "peak_rss_bytes": self.stats.peak_rss_bytes,
            }
        errors = [m.output_error for m in self.report.modules if m.output_error is not None]
        return {
            "output": None if self.output is None else str(self.output),
            "method": self.config.method,
            "pattern": self.config.pattern,
            "target_sparsity": self.report.settings.target,
            "sparsity": self.report.sparsity,
            "pruned": self.report.pruned,
            "bits": self.config.bits,
            "format": None if self.config.bits is None else self.config.format,
            "modules": len(self.report.modules),
            "mean_output_error": sum(errors) / len(errors) if errors else None,
            "seconds": round(self.stats.seconds, 2),
            "peak_rss_bytes": self.stats.peak_rss_bytes,
        }

    def to_dict(self) -> dict:
        return self.summary()


def prune(
    config: PruneConfig | None = None, *, recipe: str | None = None, progress: bool = True, **options
) -> PruneResult:
    """Prune the linears of a model's decoder layers with ``method`` (magnitude, Wanda, SparseGPT)
    to ``sparsity`` or an N:M ``pattern`` and, when ``output`` is set, save the dense model; with
    ``bits``, quantize the kept weights in the same pass (GPTQ under the mask) and save a quantized
    checkpoint in ``format`` whose pruned weights read back as exact zeros. With ``structure``
    (channels, heads, layers), remove whole units to ``sparsity`` of the decoder parameters and save
    the smaller dense model.

    Options are ``PruneConfig``'s fields (``llmlite.prune(method="wanda", pattern="2:4",
    output="out")``) or a ready ``config``; ``recipe`` names a YAML file of options that ``options``
    override.
    """
    from llmlite.recipes import build

    cfg = config.validate() if config is not None else build(PruneConfig, recipe, **options)
    settings = None if cfg.structure else cfg.settings()
    sources = [("--calibration", source) for source in cfg.calibration.split("+")]
    inputs = [("--model", local_source(cfg.model)), *sources, ("--recipe", recipe)]
    # checked, locked and staged before the long work: a bad --output fails in the first second
    with staged_output(cfg.output, overwrite=cfg.overwrite, inputs=inputs) as tmp:
        with measure() as stats:
            model, tokenizer = load_model(cfg.model)
            if cfg.structure:  # before any calibration work
                plan = check_structured(model, cfg.structure, cfg.sparsity)
            else:
                check_prunable(model, settings)
            if cfg.bits is not None:  # what the layout cannot hold, refused before the work
                check_fits(model, cfg.format, cfg.bits, cfg.group_size, False)
            own_weights(model)  # so that replaced weights are really freed
            teacher = copy.deepcopy(model) if cfg.recover_tokens else None
            windows = None
            if cfg.structure or calibrated(settings):
                check_window(model.config, cfg.seqlen, "--seqlen")
                windows = calibration_set(
                    cfg.calibration, model, tokenizer, cfg.samples, cfg.seqlen, cfg.seed, progress
                )
            if cfg.structure:
                report = prune_structured(model, plan, windows, progress)
                if teacher is not None:
                    report.recovery = recover(model, teacher, tokenizer, cfg, progress)
                    del teacher
            else:
                report = prune_model(model, settings, windows, progress)
            dtype = getattr(torch, cfg.dtype)
            round_unquantized(model, dtype)  # what the checkpoint reloads to, zeros included
            if not cfg.structure:
                remeasure(model, report)
        if tmp is not None and cfg.bits is not None:
            save_checkpoint(model, tokenizer, tmp, cfg.format, cfg.quantization_config(), dtype)
        elif tmp is not None:
            save_float_model(model, tokenizer, tmp, dtype)
        if tmp is not None:
            record = {
                "config": asdict(cfg),
                "stats": asdict(stats),
                "report": report.to_dict(),
                "environment": environment(),
            }
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    output = Path(cfg.output) if cfg.output else None
    model.llmlite_source = str(output) if output else cfg.model
    return PruneResult(model, tokenizer, cfg, report, stats, output)


def recover(model: nn.Module, teacher: nn.Module, tokenizer, cfg: PruneConfig, progress: bool) -> dict:
    """Distil ``teacher`` (the unpruned model) into the pruned ``model``, every weight trained, on
    ``ceil(recover_tokens / seqlen)`` windows of the calibration text drawn with seed ``seed + 1``
    (not the pruning's windows); returns the run's record (``distill_record``)."""
    count = math.ceil(cfg.recover_tokens / cfg.seqlen)
    windows = calibration_set(cfg.calibration, teacher, tokenizer, count, cfg.seqlen, cfg.seed + 1, progress)
    start = time.perf_counter()
    trainable = list(model.parameters())
    desc = "recover" if progress else None
    losses = distill(model, teacher, windows, trainable, cfg.recover_lr, RECOVERY_BATCH, cfg.seed, desc)
    record = distill_record(windows, losses, cfg.recover_lr, RECOVERY_BATCH, time.perf_counter() - start)
    return {"text": cfg.calibration, **record, "trainable_params": sum(p.numel() for p in trainable)}
