"""``lowrank``: load, factorise, save (the API behind ``llmlite lowrank``), with its options
``LowrankConfig``; ``load``: a saved folder back into memory.

The output is a Hugging Face folder in ``--dtype`` with the run record ``llmlite.json`` (each
linear's rank and weights): each factorised linear as two dense linears ``NAME.0`` (``V``,
``[r, in]``) and ``NAME.1`` (``U``, ``[out, r]``, with the bias), their ranks in ``config.json``
under ``low_rank.ranks`` (llmlite loads it; plain transformers after the module replacement of
docs/lowrank.md); or, with ``--merge``, a dense model (``U·V`` multiplied back) that plain
``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from llmlite.calibration import calibration_set
from llmlite.config import DTYPES
from llmlite.data import DEFAULT_CALIBRATION
from llmlite.errors import LlmliteError
from llmlite.layers.lowrank import CONFIG_KEY, LowRankLinear
from llmlite.lowrank.asvd import ALPHA
from llmlite.lowrank.methods import ALLOCATIONS, METHODS, LowrankSettings
from llmlite.lowrank.walk import LowrankReport, check_factorizable, factorize_model
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
from llmlite.quant.checkpoint import round_unquantized
from llmlite.recipes import option
from llmlite.results import Result
from llmlite.runinfo import environment, staged_output

RECORD = "llmlite.json"
LAYOUT = "NAME.0: Linear(in, rank, bias=False) holding V; NAME.1: Linear(rank, out, bias) holding U"


@dataclass
class LowrankConfig:
    """Options of ``llmlite lowrank`` / ``llmlite.lowrank``."""

    VERB: ClassVar[str] = "lowrank"
    ABOUT: ClassVar[str] = (
        "Replace the linears of the decoder layers by low-rank factors U·V (plain SVD, ASVD or SVD-LLM), "
        "with ranks chosen for a fraction of the weights kept, and save the factorised model (two dense "
        "linears each) or, with --merge, the dense model U·V."
    )

    model: str = option(DEFAULT_MODEL, "bundled name, local folder, .gguf file or hub id")
    method: str = option("svd-llm", "how each weight is factorised", choices=tuple(METHODS))
    ratio: float | None = option(
        None,
        "fraction of the decoder linears' weights kept, in (0, 1]; ranks per linear from --allocation",
        shown="0.8 unless --rank",
    )
    rank: int | None = option(None, "the same rank in every linear instead of --ratio")
    allocation: str = option(
        "global",
        "with --ratio: 'global' (ranks where the method's spectra lose least per weight) or 'uniform' "
        "(each linear keeps the same fraction)",
        choices=ALLOCATIONS,
    )
    alpha: float = option(ALPHA, "ASVD: the exponent of the input magnitude in the column scaling")
    calibration: str = option(
        DEFAULT_CALIBRATION,
        "calibration text (asvd, svd-llm): file or corpus name, 'self' (text the model writes itself), "
        "or sources joined by '+' sharing the windows (wikitext2-valid+self)",
    )
    samples: int = option(128, "calibration windows")
    seqlen: int = option(512, "tokens per calibration window")
    seed: int = option(0, "calibration sampling seed")
    damp: float = option(
        0.0, "SVD-LLM: damping of XᵀX, fraction of its mean diagonal (raised where it is singular)"
    )
    merge: bool = option(
        False, "save the dense model U·V (plain transformers loads it) instead of the factors"
    )
    dtype: str = option("float16", "storage of the saved weights", choices=DTYPES)
    output: str | None = option(
        None, "folder for the factorised model", cli_required="the folder for the factorised model"
    )
    overwrite: bool = option(False, "replace an existing output folder")

    def validate(self) -> LowrankConfig:
        if self.method not in METHODS:
            raise LlmliteError(f"unknown method '{self.method}'; use one of: {', '.join(METHODS)}")
        if self.ratio is not None and self.rank is not None:
            raise LlmliteError(f"--ratio {self.ratio:g} and --rank {self.rank} both set the size; give one")
        defaults = {f.name: f.default for f in fields(self)}
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int):
                raise LlmliteError(f"--rank must be a whole number, got {self.rank!r}")
            if self.rank < 1:
                raise LlmliteError(f"--rank {self.rank} keeps nothing; use a rank of at least 1")
            if self.allocation != defaults["allocation"]:
                raise LlmliteError("--allocation shares a --ratio between the linears; drop it with --rank")
        else:
            if self.ratio is None:
                self.ratio = 0.8
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float):
                raise LlmliteError(f"--ratio must be a number in (0, 1], got {self.ratio!r}")
            if not 0 < self.ratio <= 1:
                raise LlmliteError(
                    f"--ratio {self.ratio:g} is out of range; use the fraction of weights kept, in (0, 1], "
                    "e.g. 0.8"
                )
        if self.allocation not in ALLOCATIONS:
            raise LlmliteError(f"--allocation {self.allocation} is unknown; use global or uniform")
        if self.alpha != defaults["alpha"] and self.method != "asvd":
            raise LlmliteError(f"--alpha is ASVD's; --method {self.method} does not read it")
        if not 0 < self.alpha <= 4:
            raise LlmliteError(f"--alpha {self.alpha:g} is out of range; use a value in (0, 4], e.g. 0.5")
        if self.damp != defaults["damp"] and self.method != "svd-llm":
            raise LlmliteError(f"--damp is SVD-LLM's; --method {self.method} does not read it")
        if not 0 <= self.damp <= 1:
            raise LlmliteError(f"--damp {self.damp:g} is out of range; use a value in [0, 1], e.g. 0")
        for name in ("samples", "seqlen"):
            if getattr(self, name) < 1:
                raise LlmliteError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise LlmliteError(f"--dtype {self.dtype} is not supported; use one of: {', '.join(DTYPES)}")
        refuse_quantized(self.model, "factorise")  # before any work: there is no float weight left
        return self

    def settings(self) -> LowrankSettings:
        ratio = None if self.rank is not None else float(self.ratio)
        return LowrankSettings(self.method, ratio, self.rank, self.allocation, self.alpha, self.damp)


@dataclass
class LowrankResult(Result):
    model: Any
    tokenizer: Any
    config: LowrankConfig
    report: LowrankReport
    stats: RunStats
    output: Path | None

    def summary(self) -> dict:
        errors = [m.output_error for m in self.report.modules if m.output_error is not None]
        return {
            "output": None if self.output is None else str(self.output),
            "method": self.config.method,
            "ratio": self.config.ratio,
            "rank": self.config.rank,
            "kept": self.report.kept,
            "params": self.report.params,
            "dense_params": self.report.dense_params,
            "modules": len(self.report.modules),
            "factorised": len(self.report.ranks),
            "merged": self.config.merge,
            "mean_output_error": sum(errors) / len(errors) if errors else None,
            "seconds": round(self.stats.seconds, 2),
            "peak_rss_bytes": self.stats.peak_rss_bytes,
        }

    def to_dict(self) -> dict:
        return self.summary()


def lowrank(
    config: LowrankConfig | None = None, *, recipe: str | None = None, progress: bool = True, **options
) -> LowrankResult:
    """Factorise the linears of a model's decoder layers (``method`` svd, asvd or svd-llm) to keep
    ``ratio`` of their weights (ranks by ``allocation``) or at one ``rank``, and, when ``output`` is
    set, save the factorised model (or with ``merge`` the dense ``U·V``).

    Options are ``LowrankConfig``'s fields (``llmlite.lowrank(method="asvd", ratio=0.6,
    output="out")``) or a ready ``config``; ``recipe`` names a YAML file of options that ``options``
    override.
    """
    from llmlite.recipes import build

    cfg = config.validate() if config is not None else build(LowrankConfig, recipe, **options)
    settings = cfg.settings()
    calibrated = METHODS[cfg.method].calibrated
    sources = [("--calibration", s) for s in cfg.calibration.split("+")] if calibrated else []
    inputs = [("--model", local_source(cfg.model)), *sources, ("--recipe", recipe)]
    # checked, locked and staged before the long work: a bad --output fails in the first second
    with staged_output(cfg.output, overwrite=cfg.overwrite, inputs=inputs) as tmp:
        with measure() as stats:
            model, tokenizer = load_model(cfg.model)
            check_factorizable(model, settings)  # before any calibration work
            own_weights(model)  # so that replaced weights are really freed
            windows = None
            if calibrated:
                check_window(model.config, cfg.seqlen, "--seqlen")
                windows = calibration_set(
                    cfg.calibration, model, tokenizer, cfg.samples, cfg.seqlen, cfg.seed, progress
                )
            report = factorize_model(model, settings, windows, progress)
            dtype = getattr(torch, cfg.dtype)
            round_unquantized(model, dtype)  # what the checkpoint reloads to
            if cfg.merge:
                merge_factors(model)
                round_unquantized(model, dtype)
            else:
                setattr(
                    model.config, CONFIG_KEY, {"method": cfg.method, "layout": LAYOUT, "ranks": report.ranks}
                )
        if tmp is not None:
            save_float_model(model, tokenizer, tmp, dtype)
            record = {
                "config": asdict(cfg),
                "stats": asdict(stats),
                "report": report.to_dict(),
                "environment": environment(),
            }
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    output = Path(cfg.output) if cfg.output else None
    model.llmlite_source = str(output) if output else cfg.model
    return LowrankResult(model, tokenizer, cfg, report, stats, output)


@torch.no_grad()
def merge_factors(model: torch.nn.Module) -> int:
    """Replace every ``LowRankLinear`` of ``model`` by the dense ``nn.Linear`` of ``U·V`` (in place);
    returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_linear())
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return len(names)


def load(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A folder ``lowrank`` wrote (factorised or merged), as ``(model, tokenizer)``: ``load_model``,
    which puts a ``LowRankLinear`` in place of each linear the config lists before the weights load."""
    return load_model(str(folder), dtype)
