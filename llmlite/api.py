"""The Python API: one function per verb, each taking an optional config, ``recipe=`` and keyword
options (the config's fields) and returning a result dataclass. The CLI is generated from the same
configs (``llmlite.cli``). ``quantize`` and ``evaluate`` live here; the others beside their method."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmlite.calibration import calibration_set
from llmlite.config import EvalConfig, ExportConfig, QuantizeConfig
from llmlite.data import eval_windows, load_text, tokenize
from llmlite.errors import LlmliteError
from llmlite.evaluation.metrics import memory_bytes, param_count, size_on_disk
from llmlite.evaluation.perplexity import Perplexity, perplexity
from llmlite.evaluation.report import compare, report
from llmlite.gqa.api import convert_gqa_model
from llmlite.kvcache.cache import kv_cache_for, kv_spec
from llmlite.kvcache.evaluate import CachedPerplexity, cached_perplexity
from llmlite.kvcache.generate import generate
from llmlite.lowrank.api import lowrank
from llmlite.memory import RunStats, measure
from llmlite.models import check_window, load_model, local_source, model_path, own_weights
from llmlite.pruning.api import prune
from llmlite.quant.checkpoint import export_checkpoint, gptq_config, round_unquantized, save_checkpoint
from llmlite.quant.driver import (
    QuantReport,
    QuantSettings,
    check_quantizable,
    check_smoothable,
    quantize_model,
)
from llmlite.quant.gguf_file import check_gguf_family, write_gguf
from llmlite.quant.layouts import check_fits
from llmlite.quant.methods import get as get_method
from llmlite.quant.mixed import PLOT
from llmlite.quant.mixed import plan as plan_bits
from llmlite.quant.mixed import plot as plot_bits
from llmlite.recipes import build
from llmlite.results import Result
from llmlite.runinfo import environment, staged_output
from llmlite.training.merge import merge
from llmlite.training.train import finetune

__all__ = [
    "compare",
    "convert_gqa",
    "evaluate",
    "export",
    "finetune",
    "generate",
    "lowrank",
    "merge",
    "prune",
    "quantize",
    "report",
]
convert_gqa = convert_gqa_model

log = logging.getLogger("llmlite")


@dataclass
class QuantizeResult(Result):
    model: Any
    tokenizer: Any
    config: QuantizeConfig
    report: QuantReport
    stats: RunStats
    output: Path | None

    def summary(self) -> dict:
        errors = [m.output_error for m in self.report.modules if m.output_error is not None]
        return {
            "output": None if self.output is None else str(self.output),
            "format": self.config.format,
            "method": self.config.method,
            "bits": self.config.bits if self.report.mixed is None else self.report.settings.bits,
            **({} if self.report.mixed is None else {"average_bits": self.report.mixed["average_bits"]}),
            "group_size": self.config.group_size,
            "sym": self.config.sym,
            "act_order": self.config.act_order,
            "modules": len(self.report.modules),
            "mean_output_error": sum(errors) / len(errors) if errors else None,
            "seconds": round(self.stats.seconds, 2),
            "peak_rss_bytes": self.stats.peak_rss_bytes,
            "size_bytes": size_on_disk(self.output),
        }

    def to_dict(self) -> dict:
        return self.summary()


@dataclass
class EvalResult(Result):
    """``evaluate``'s result: a model's perplexity and efficiency (and its baseline's, with the
    ratios in ``change``). ``to_dict()`` is what ``--json`` writes."""

    model: str
    text: str
    measured: Perplexity | CachedPerplexity
    params: int
    size_bytes: int | None
    memory_bytes: int
    seconds: float
    peak_rss_bytes: int | None
    peak_rss_scope: str | None
    peak_gpu_bytes: int | None
    quantization: dict | None
    environment: dict
    kv_cache: dict | None = None
    baseline: EvalResult | None = None
    change: dict | None = None

    @property
    def perplexity(self) -> float:
        return self.measured.perplexity

    def to_dict(self) -> dict:
        out = {"model": self.model, "text": self.text, **asdict(self.measured)}
        for name in ("params", "size_bytes", "memory_bytes", "seconds", "peak_rss_bytes", "peak_rss_scope"):
            out[name] = getattr(self, name)
        out["peak_gpu_bytes"], out["quantization"] = self.peak_gpu_bytes, self.quantization
        if self.kv_cache is not None:
            out["kv_cache"] = self.kv_cache
        out["environment"] = self.environment
        if self.baseline is not None:
            out["baseline"], out["change"] = self.baseline.to_dict(), self.change
        return out


def quantize(
    config: QuantizeConfig | None = None, *, recipe: str | None = None, progress: bool = True, **options
) -> QuantizeResult:
    """Quantize a model with a method of ``llmlite/quant/methods`` (RTN, GPTQ, ...) and, when
    ``output`` is set, save a checkpoint in layout ``format`` (GPTQ, AWQ GEMM, compressed-tensors,
    or a GGUF file).

    Options are ``QuantizeConfig``'s fields (``llmlite.quantize(bits=3, output="out")``), or a
    ready ``config``; ``recipe`` names a YAML file of options that ``options`` override (with a
    ``config``, the file it was built from: an input the output must not replace).
    """
    cfg = config.validate() if config is not None else build(QuantizeConfig, recipe, **options)
    sources = [("--calibration", source) for source in cfg.calibration.split("+")]
    inputs = [("--model", local_source(cfg.model)), *sources, ("--recipe", recipe)]
    # checked, locked and staged before the long work: a bad --output fails in the first second
    kind = "file" if cfg.format == "gguf" else "folder"
    with staged_output(cfg.output, overwrite=cfg.overwrite, inputs=inputs, kind=kind) as tmp:
        with measure() as stats:
            model, tokenizer = load_model(cfg.model)
            check_quantizable(model)  # before any calibration work
            check_smoothable(model, get_method(cfg.method))
            if cfg.format == "gguf":
                check_gguf_family(model, cfg.model)
            else:  # what the layout cannot hold, refused before the work
                check_fits(model, cfg.format, cfg.bits, cfg.group_size, cfg.quantize_head)
            own_weights(model)  # so that replaced float weights are really freed
            windows = None
            if get_method(cfg.method).calibrated or cfg.mixed:
                check_window(model.config, cfg.seqlen, "--seqlen")
                windows = calibration_set(
                    cfg.calibration, model, tokenizer, cfg.samples, cfg.seqlen, cfg.seed, progress
                )
            dtype = getattr(torch, cfg.dtype)
            mixed = None
            if cfg.mixed:  # each linear's width, before any weight changes
                mixed = plan_bits(
                    model, windows, cfg.bits_candidates, cfg.group_size, cfg.sym, cfg.format, dtype,
                    cfg.avg_bits, cfg.budget_mb, progress,
                )  # fmt: skip
            settings = QuantSettings(
                method=cfg.method,
                bits=cfg.bits,
                group_size=cfg.group_size,
                sym=cfg.sym,
                act_order=cfg.act_order,
                damp=cfg.damp,
                mse=cfg.mse,
                v2_alpha=cfg.v2_alpha if cfg.v2 else 0.0,
                v2_windows=cfg.v2_windows,
                refit=cfg.refit,
                quantize_head=cfg.quantize_head,
                clip=cfg.clip,
                value_mapping=cfg.awq_vo,
                dtype=cfg.dtype,
                module_bits=None if mixed is None else mixed.bits,
            )
            if mixed is not None:
                settings.bits = mixed.top_bits
            with measure() as core:
                report = quantize_model(
                    model, settings, windows if get_method(cfg.method).calibrated else None, progress=progress
                )
            report.seconds = core.seconds
            report.mixed = None if mixed is None else mixed.to_dict()
            round_unquantized(model, dtype)
        if tmp is not None and cfg.format == "gguf":
            with tempfile.TemporaryDirectory() as folder:  # write_gguf reads the tokenizer's files
                tokenizer.save_pretrained(folder)
                write_gguf(model, Path(folder), tmp, Path(cfg.model).name)
        elif tmp is not None:
            qconfig = gptq_config(cfg)
            if mixed is not None:  # the most common width on top, the others in `dynamic`
                qconfig["bits"] = mixed.top_bits
                qconfig["meta"]["mixed"] = {"target": mixed.target, "average_bits": mixed.average_bits}
                plot_bits(mixed, tmp / PLOT)
            save_checkpoint(model, tokenizer, tmp, cfg.format, qconfig, dtype)
            record = {
                "config": asdict(cfg),
                "stats": asdict(stats),
                "report": report.to_dict(),
                "environment": environment(),
            }
            (tmp / "llmlite.json").write_text(json.dumps(record, indent=2) + "\n")
    output = Path(cfg.output) if cfg.output else None
    model.llmlite_source = str(output) if output else cfg.model
    return QuantizeResult(model, tokenizer, cfg, report, stats, output)


def evaluate(
    config: EvalConfig | None = None,
    *,
    recipe: str | None = None,
    progress: bool = True,
    tokenizer=None,
    **options,
) -> EvalResult:
    """Perplexity of a model on a text with the papers' window protocol, plus efficiency metrics.

    ``model`` is a name or path, or a model object in memory (e.g. ``quantize(...).model``) given
    with its ``tokenizer``.
    With ``baseline`` (a model name or path) the baseline is evaluated the same way and the
    result gains ``baseline`` and ``change`` (ratios). ``json`` also writes the result to a file.
    """
    model = None
    if not isinstance(options.get("model", ""), str):
        model = options.pop("model")
        options["model"] = getattr(model, "llmlite_source", "in-memory")
    cfg = config.validate() if config is not None else build(EvalConfig, recipe, **options)
    inputs = [
        ("--model", local_source(cfg.model)),
        ("--baseline", local_source(cfg.baseline)),
        ("--ppl", cfg.ppl),
        ("--recipe", recipe),
    ]
    # an existing JSON file is replaced (a results file, written again on each run)
    with staged_output(cfg.json, overwrite=True, inputs=inputs, option="--json", kind="file") as tmp:
        text = load_text(cfg.ppl)
        out = _evaluate_one(cfg, cfg.model, text, model, tokenizer, progress)
        if cfg.baseline:
            out.baseline = base = _evaluate_one(cfg, cfg.baseline, text, None, None, progress)
            new, old = out.to_dict(), base.to_dict()
            keys = ("perplexity", "size_bytes", "memory_bytes", "seconds")
            out.change = {k: new[k] / old[k] for k in keys if new[k] and old[k]}
        if tmp is not None:
            tmp.write_text(json.dumps(out.to_dict(), indent=2) + "\n")
    return out


def _evaluate_one(cfg: EvalConfig, source: str, text: str, model, tokenizer, progress: bool) -> EvalResult:
    with measure() as stats:
        if model is None:
            model, tokenizer = load_model(source)
        check_window(model.config, cfg.ctx, "--ctx")
        windows = eval_windows(tokenize(tokenizer, text), cfg.ctx, cfg.max_windows)
        if cfg.kv_bits is None:
            result = perplexity(model, windows, cfg.batch_size, progress=progress)
        else:
            spec = kv_spec(cfg)
            result = cached_perplexity(
                model, windows, lambda: kv_cache_for(model, spec, tokenizer), cfg.prefill, cfg.chunk, progress
            )
    kv = None
    if cfg.kv_bits is not None:
        kv = {k: v for k, v in asdict(spec).items() if k != "storage_dtype"}
    return EvalResult(
        model=source,
        text=cfg.ppl,
        measured=result,
        params=param_count(model),
        size_bytes=size_on_disk(model_path(model)),
        memory_bytes=memory_bytes(model),
        seconds=round(stats.seconds, 3),
        peak_rss_bytes=stats.peak_rss_bytes,
        peak_rss_scope=stats.peak_rss_scope,
        peak_gpu_bytes=stats.peak_gpu_bytes,
        quantization=getattr(model, "llmlite_quantization", None),
        kv_cache=kv,
        environment=environment(),
    )


@dataclass
class ExportResult(Result):
    """``export``'s result: the file written, its format and weight type, its size."""

    output: str
    format: str
    weight_type: str
    size_bytes: int


def export(config: ExportConfig | None = None, *, recipe: str | None = None, **options) -> ExportResult:
    """Write the checkpoint ``model`` as ``output`` in ``format``: a GGUF file (llmlite's codes as
    llama.cpp's block types, exactly; see ``quant/gguf_file.py``) or a checkpoint folder in the
    GPTQ, AWQ GEMM or compressed-tensors layout (the same codes and scales; ``quant/layouts.py``)."""
    from llmlite.quant.compressed import compressed_linears

    cfg = config.validate() if config is not None else build(ExportConfig, recipe, **options)
    source = local_source(cfg.model)
    inputs = [("CHECKPOINT", source), ("--recipe", recipe)]
    kind = "file" if cfg.format == "gguf" else "folder"
    with staged_output(cfg.output, overwrite=cfg.overwrite, inputs=inputs, kind=kind) as tmp:
        model, tokenizer = load_model(cfg.model, backend="torch")  # no compute: no backend to prepare
        if not compressed_linears(model) or source is None or not source.is_dir():
            first = (
                "llmlite quantize --group-size 32 --output DIR"
                if kind == "file"
                else "llmlite quantize --output DIR"
            )
            raise LlmliteError(
                f"{cfg.model} is not a quantized llmlite checkpoint; run {first}, then export DIR"
            )
        if cfg.format == "gguf":
            weights = write_gguf(model, source, tmp, Path(cfg.model).name, cfg.type, cfg.embeddings)
        else:
            weights = export_checkpoint(model, tokenizer, source, tmp, cfg.format)
    output = Path(cfg.output)
    return ExportResult(str(output), cfg.format, weights, size_on_disk(output))
