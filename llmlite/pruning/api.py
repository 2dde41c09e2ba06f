"""``prune``: load, prune, save (the API behind ``llmlite prune``), with its options ``PruneConfig``.

The output is a dense checkpoint (zeros in the pruned weights) in ``--dtype`` that plain
transformers and llmlite load, with the run record ``llmlite.json`` (each linear's sparsity).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from llmlite.config import DTYPES
from llmlite.data import DEFAULT_CALIBRATION, calibration_windows, load_text, tokenize
from llmlite.errors import LlmliteError
from llmlite.memory import RunStats, measure
from llmlite.models import (
    DEFAULT_MODEL,
    check_window,
    load_model,
    local_source,
    own_weights,
    refuse_quantized,
)
from llmlite.pruning.masks import parse_pattern
from llmlite.pruning.methods import METHODS, PruneSettings, get
from llmlite.pruning.walk import PruneReport, check_prunable, prune_model, remeasure
from llmlite.quant.checkpoint import round_unquantized
from llmlite.recipes import option
from llmlite.results import Result
from llmlite.runinfo import environment, staged_output

RECORD = "llmlite.json"


@dataclass
class PruneConfig:
    """Options of ``llmlite prune`` / ``llmlite.prune``."""

    VERB: ClassVar[str] = "prune"
    ABOUT: ClassVar[str] = (
        "Set a fraction of the weights of every linear in the decoder layers to zero (unstructured, or "
        "N:M such as 2:4) with magnitude, Wanda or SparseGPT, and save a dense model with those zeros "
        "that plain transformers loads. Zeros in dense tensors make nothing faster or smaller by "
        "themselves."
    )

    model: str = option(DEFAULT_MODEL, "bundled name, local folder, .gguf file or hub id")
    method: str = option("sparsegpt", "how weights are chosen and updated", choices=tuple(METHODS))
    sparsity: float | None = option(
        None, "fraction of each linear's weights set to zero, in (0, 1)", shown="0.5 unless --pattern"
    )
    pattern: str | int | None = option(  # int: what YAML makes of an unquoted 2:4 (refused)
        None, "N:M sparsity instead: N weights kept in every M consecutive inputs of a row, e.g. 2:4"
    )
    calibration: str = option(DEFAULT_CALIBRATION, "calibration text (wanda, sparsegpt): file or corpus name")
    samples: int = option(128, "calibration windows")
    seqlen: int = option(512, "tokens per calibration window")
    seed: int = option(0, "calibration sampling seed")
    damp: float = option(0.01, "SparseGPT damping, fraction of mean diag(H)")
    dtype: str = option("float16", "storage of the saved weights", choices=DTYPES)
    output: str | None = option(
        None, "folder for the pruned model", cli_required="the folder for the pruned model"
    )
    overwrite: bool = option(False, "replace an existing output folder")

    def validate(self) -> PruneConfig:
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
        if not 0 < self.damp <= 1:
            raise LlmliteError(f"--damp {self.damp} is out of range; use a value in (0, 1], e.g. 0.01")
        if self.dtype not in DTYPES:
            raise LlmliteError(f"--dtype {self.dtype} is not supported; use one of: {', '.join(DTYPES)}")
        refuse_quantized(self.model, "prune")  # before any work: there is no float weight left
        return self

    def settings(self) -> PruneSettings:
        pattern = None if self.pattern is None else parse_pattern(self.pattern)
        sparsity = 1 - pattern[0] / pattern[1] if pattern else float(self.sparsity)
        return PruneSettings(self.method, sparsity, pattern, self.damp)


@dataclass
class PruneResult(Result):
    model: Any
    tokenizer: Any
    config: PruneConfig
    report: PruneReport
    stats: RunStats
    output: Path | None

    def summary(self) -> dict:
        errors = [m.output_error for m in self.report.modules if m.output_error is not None]
        return {
            "output": None if self.output is None else str(self.output),
            "method": self.config.method,
            "pattern": self.config.pattern,
            "target_sparsity": self.report.settings.target,
            "sparsity": self.report.sparsity,
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
    to ``sparsity`` or an N:M ``pattern`` and, when ``output`` is set, save the dense model.

    Options are ``PruneConfig``'s fields (``llmlite.prune(method="wanda", pattern="2:4",
    output="out")``) or a ready ``config``; ``recipe`` names a YAML file of options that ``options``
    override.
    """
    from llmlite.recipes import build

    cfg = config.validate() if config is not None else build(PruneConfig, recipe, **options)
    settings = cfg.settings()
    inputs = [("--model", local_source(cfg.model)), ("--calibration", cfg.calibration), ("--recipe", recipe)]
    # checked, locked and staged before the long work: a bad --output fails in the first second
    with staged_output(cfg.output, overwrite=cfg.overwrite, inputs=inputs) as tmp:
        with measure() as stats:
            model, tokenizer = load_model(cfg.model)
            check_prunable(model, settings)  # before any calibration work
            own_weights(model)  # so that replaced weights are really freed
            windows = None
            if get(cfg.method).calibrated:
                check_window(model.config, cfg.seqlen, "--seqlen")
                ids = tokenize(tokenizer, load_text(cfg.calibration))
                windows = calibration_windows(ids, cfg.samples, cfg.seqlen, cfg.seed)
            report = prune_model(model, settings, windows, progress)
            dtype = getattr(torch, cfg.dtype)
            round_unquantized(model, dtype)  # what the checkpoint reloads to, zeros included
            remeasure(model, report)
        if tmp is not None:
            stored = model.dtype
            model.to(dtype)
            model.save_pretrained(tmp, safe_serialization=True)
            model.to(stored)
            tokenizer.save_pretrained(tmp)
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
