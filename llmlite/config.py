"""The options of ``quantize`` and ``eval``, shared by the CLI, the Python API and YAML recipes
(``llmlite.recipes.build``: the defaults below < the recipe < options given explicitly)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from llmlite.data import DEFAULT_CALIBRATION_SET, DEFAULT_EVAL_TEXT
from llmlite.errors import LlmliteError
from llmlite.kvcache.defaults import KV_DEFAULTS, KV_HELP
from llmlite.models import DEFAULT_MODEL, refuse_quantized
from llmlite.quant.grid import SUPPORTED_BITS
from llmlite.quant.layouts import LAYOUTS, check_bits, check_head
from llmlite.quant.methods import METHODS, get
from llmlite.recipes import option

DTYPES = ("float16", "bfloat16", "float32")
KV_OPTIONS = ("kv_group_size", "kv_residual", "kv_sinks", "kv_scheme", "kv_salient", "prefill", "chunk")
# The on/off settings only some methods read (``Method.options``; None resolves to ``Method.defaults``),
# and what each does, for the refusal.
OPTION_HELP = {
    "mse": "searches each group's clipping range on the weights",
    "refit": "fits scales to calibration outputs",
    "v2": "corrects GPTQ's target and needs calibration",
    "clip": "searches AWQ's clipping ranges",
    "awq_vo": "smooths v_proj -> o_proj with AWQ's scales",
}


MODEL_HELP = "bundled name, local folder, .gguf file, hub id or llmlite checkpoint"


QUANTIZE_FORMATS = ("gptq", "awq", "compressed-tensors", "gguf")
EXPORT_FORMATS = ("gguf", "gptq", "awq", "compressed-tensors")
FORMAT_HELP = (
    "gptq (transformers + GPTQModel, vLLM, TGI), awq (AWQ GEMM, 4-bit) or compressed-tensors "
    "(pack-quantized, 4/8-bit: vLLM's native format): a checkpoint folder; gguf: a file for llama.cpp "
    "(group 32)"
)


@dataclass
class QuantizeConfig:
    """Options of ``llmlite quantize`` / ``llmlite.quantize``."""

    VERB: ClassVar[str] = "quantize"
    ABOUT: ClassVar[str] = (
        "Quantize the linear layers of every decoder layer and save a GPTQ-layout checkpoint; with no "
        "options: the bundled smollm2-135m, GPTQ 4-bit, group 128, symmetric, act-order, 128 "
        "calibration windows of 512 tokens."
    )

    model: str = option(DEFAULT_MODEL, "bundled name, local folder, .gguf file or hub id")
    method: str = option(
        "gptq", "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()), choices=tuple(METHODS)
    )
    bits: int = option(4, "bits per weight: 2, 3, 4 or 8")
    # Mixed precision (``quant/mixed.py``): each linear's width chosen for the least predicted loss
    avg_bits: float | None = option(
        None,
        "mixed precision: choose each linear's width (of --bits-candidates) for the least predicted loss "
        "at this average of code bits per weight (scales not counted: uniform 4-bit is 4.0)",
    )
    budget_mb: float | None = option(
        None,
        "mixed precision: as --avg-bits, with the checkpoint's tensors (quantized linears in --format's "
        "layout plus the float ones in --dtype) at most this many MiB",
    )
    bits_candidates: list[int] | str | None = option(
        None,
        "mixed precision: the widths to choose from, e.g. 3,4,8",
        shown="the widths --format holds: 2,3,4,8 for gptq, 4,8 for compressed-tensors",
    )
    group_size: int = option(128, "columns per scale; -1 = one group per output channel")
    sym: bool = option(True, "symmetric grid; --asym: asymmetric grid (zero-points)", negative="--asym")
    # static groups: no cost at inference; llm-compressor's default too
    act_order: bool = option(True, "GPTQ: quantize columns by decreasing Hessian diagonal (static groups)")
    calibration: str = option(
        DEFAULT_CALIBRATION_SET,
        "calibration text: file or corpus name, 'self' (text the model writes itself), or sources joined "
        "by '+' sharing the windows (wikitext2-valid+self)",
    )
    samples: int = option(128, "calibration windows")
    seqlen: int = option(512, "tokens per calibration window")
    seed: int = option(0, "calibration sampling seed")
    damp: float = option(0.003, "GPTQ damping, fraction of mean diag(H), raised when H cannot be factorised")
    mse: bool | None = option(
        None,
        "search each group's clipping range for the least rounding error (--no-mse: the full range)",
        shown="on for GPTQ",
    )
    # GPTAQ (GPTQModel's "v2"): aim each layer at the float model's outputs, the drift measured on
    # the first v2_windows calibration windows (0, the default: all). None: the method's default
    # (validate() resolves it; on for GPTQ).
    v2: bool | None = option(
        None,
        "GPTAQ (GPTQModel's v2): fit each layer to the float model's outputs, not its own "
        "(--no-v2: plain GPTQ)",
        shown="on for GPTQ",
    )
    v2_alpha: float = option(0.25, "strength of the --v2 correction, (0, 1]")
    v2_windows: int = option(0, "calibration windows that --v2 also runs through the float model; 0: all")
    # After GPTQ, each group's scale re-solved for the least layer-output error on the calibration
    # Hessian (codes and zero-points fixed). None: on for GPTQ (validate() resolves it).
    refit: bool | None = option(
        None,
        "after GPTQ, re-solve each group's scale for the least layer-output error on the calibration "
        "data (--no-refit: GPTQ's own scales)",
        shown="on for GPTQ",
    )
    # AWQ: each group's clipping range searched on the output error after smoothing (AutoAWQ's
    # clipping grid), and the v_proj -> o_proj mapping that both peers skip on GQA models.
    clip: bool | None = option(
        None,
        "AWQ: search each group's clipping range for the least output error (--no-clip: round to nearest)",
        shown="on for AWQ",
    )
    awq_vo: bool | None = option(
        None,
        "AWQ: also smooth v_proj -> o_proj, one scale per value channel shared by the query heads that "
        "read it (GQA)",
        shown="on for AWQ",
    )
    quantize_head: bool = option(False, "also quantize lm_head (untied from the embeddings)")
    dtype: str = option("float16", "storage of the tensors that stay unquantized", choices=DTYPES)
    output: str | None = option(
        None,
        "checkpoint folder to write (a .gguf file with --format gguf)",
        cli_required="the checkpoint folder, or the .gguf file with --format gguf, to write",
    )
    format: str = option("gptq", FORMAT_HELP, choices=QUANTIZE_FORMATS)
    overwrite: bool = option(False, "replace an existing output")

    def validate(self) -> QuantizeConfig:
        method = get(self.method)
        if self.format not in QUANTIZE_FORMATS:
            raise LlmliteError(
                f"--format {self.format} is not supported; use {' or '.join(QUANTIZE_FORMATS)}"
            )
        self._check_mixed()
        carried = self.group_size == 32 and (self.bits == 4 or (self.bits == 8 and self.sym))
        if self.format == "gguf" and not carried:
            raise LlmliteError(
                "--format gguf holds 4-bit weights in groups of 32 (q4_0 symmetric, q4_1 asymmetric) or "
                "8-bit symmetric ones (q8_0): add --group-size 32, with --bits 4, or --bits 8 --sym"
            )
        if self.bits not in SUPPORTED_BITS:
            raise LlmliteError(f"{self.bits}-bit weights are not supported; use --bits 2, 3, 4 or 8")
        if self.format in LAYOUTS:
            check_bits(self.format, self.bits)
            check_head(self.format, self.quantize_head)
        if self.group_size == 0 or self.group_size < -1:
            raise LlmliteError(
                f"group size {self.group_size} is invalid; use a positive size such as 128, "
                "or -1 for one group per output channel"
            )
        if self.samples < 1 or self.seqlen < 1:
            raise LlmliteError("--samples and --seqlen must be at least 1")
        if self.dtype not in DTYPES:
            raise LlmliteError(f"--dtype {self.dtype} is not supported; use one of: {', '.join(DTYPES)}")
        if not 0 < self.v2_alpha <= 1:
            raise LlmliteError(f"--v2-alpha {self.v2_alpha} is out of range; use a value in (0, 1]")
        for name in OPTION_HELP:  # None: the method's default
            if getattr(self, name) is None:
                setattr(self, name, name in method.defaults)
            if not isinstance(getattr(self, name), bool):
                raise LlmliteError(f"option {name} must be true or false, got {getattr(self, name)!r}")
        if self.v2_windows < 0:
            raise LlmliteError(f"--v2-windows {self.v2_windows} is invalid; use 0 (all windows) or more")
        for name, what in OPTION_HELP.items():
            if getattr(self, name) and name not in method.options:
                readers = [m.name for m in METHODS.values() if name in m.options]
                flag = "--" + name.replace("_", "-")
                raise LlmliteError(f"{flag} {what}; use it with --method {' or '.join(readers)}")
        if not 0 < self.damp <= 1:
            raise LlmliteError(f"--damp {self.damp} is out of range; use a value in (0, 1], e.g. 0.01")
        refuse_quantized(self.model, "quantize")  # before any work: there is no float weight left
        return self

    @property
    def mixed(self) -> bool:
        return self.avg_bits is not None or self.budget_mb is not None

    def _check_mixed(self) -> None:
        """Mixed-precision options: one budget, a format that holds several widths, the candidates
        resolved to a sorted list the format holds, and a budget they can meet."""
        if not self.mixed:
            if self.bits_candidates is not None:
                raise LlmliteError(
                    "--bits-candidates is read with --avg-bits or --budget-mb; add one of them"
                )
            return
        flag = "--avg-bits" if self.avg_bits is not None else "--budget-mb"
        if self.avg_bits is not None and self.budget_mb is not None:
            raise LlmliteError("--avg-bits and --budget-mb both set the size; give one of them")
        if self.format not in LAYOUTS or len(LAYOUTS[self.format].codec.bits) < 2:
            mixed = " or ".join(sorted(n for n, lay in LAYOUTS.items() if len(lay.codec.bits) > 1))
            raise LlmliteError(
                f"--format {self.format} holds one weight width for every linear, not the mixed widths of "
                f"{flag}; use --format {mixed}"
            )
        if self.bits != 4:
            raise LlmliteError(
                f"--bits {self.bits} and {flag} both set the width; drop --bits ({flag} picks each "
                "linear's width from --bits-candidates)"
            )
        if self.quantize_head:
            raise LlmliteError(
                f"{flag} chooses the widths of the decoder layers' linears; drop --quantize-head"
            )
        held = LAYOUTS[self.format].codec.bits
        widths = self.bits_candidates
        if widths is None:
            widths = list(held)
        elif isinstance(widths, str):
            try:
                widths = [int(w) for w in widths.replace(" ", "").split(",")]
            except ValueError:
                raise LlmliteError(
                    f"--bits-candidates {self.bits_candidates!r} is not a list of widths; use e.g. 3,4,8"
                ) from None
        bad = sorted(set(w for w in widths if w not in held))
        if not widths or bad:
            raise LlmliteError(
                f"--bits-candidates {','.join(map(str, bad)) or '(none)'}: --format {self.format} holds "
                f"{' or '.join(map(str, held))}-bit weights; choose among them"
            )
        self.bits_candidates = sorted(set(widths))
        low, high = self.bits_candidates[0], self.bits_candidates[-1]
        if self.avg_bits is not None and not low <= self.avg_bits <= high:
            raise LlmliteError(
                f"--avg-bits {self.avg_bits:g} is outside the candidate widths {low} to {high}; use a value "
                "between them (or change --bits-candidates)"
            )
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise LlmliteError(f"--budget-mb {self.budget_mb:g} must be a positive size in MiB")


@dataclass
class EvalConfig:
    """Options of ``llmlite eval`` / ``llmlite.evaluate``."""

    VERB: ClassVar[str] = "eval"
    ABOUT: ClassVar[str] = (
        "Perplexity over non-overlapping windows (the GPTQ/AWQ papers' protocol) plus parameters, "
        "size on disk, time and peak memory; with --tasks or --report, the report's tasks."
    )

    model: str = option(DEFAULT_MODEL, MODEL_HELP, positional="?")
    ppl: str = option(DEFAULT_EVAL_TEXT, "text: file or corpus name (wikitext2: the raw test split)")
    ctx: int = option(2048, "tokens per window")
    max_windows: int | None = option(None, "evaluate only the first N windows", shown="all")
    batch_size: int = option(1, "windows per forward pass")
    baseline: str | None = option(None, "also evaluate this model (e.g. the unquantized one) and compare")
    json: str | None = option(None, "write the results to this JSON file")
    kv_bits: int | None = option(None, KV_HELP["bits"])
    kv_group_size: int = option(KV_DEFAULTS["group_size"], KV_HELP["group_size"])
    kv_residual: int = option(KV_DEFAULTS["residual"], KV_HELP["residual"])
    kv_sinks: int = option(KV_DEFAULTS["sinks"], KV_HELP["sinks"])
    kv_scheme: str = option(KV_DEFAULTS["scheme"], KV_HELP["scheme"])
    kv_salient: float = option(KV_DEFAULTS["salient"], KV_HELP["salient"])
    prefill: int = option(256, "with --kv-bits: tokens of each window that fill the cache first")
    chunk: int = option(32, "with --kv-bits: tokens scored per step against the cache (1 = decoding)")

    def validate(self) -> EvalConfig:
        if self.ctx < 2:
            raise LlmliteError(f"--ctx {self.ctx} is too short; use 2 or more (2048 is the papers')")
        if self.max_windows is not None and (not isinstance(self.max_windows, int) or self.max_windows < 1):
            raise LlmliteError(f"--max-windows must be at least 1, got {self.max_windows}")
        if self.batch_size < 1:
            raise LlmliteError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.kv_bits is None:
            changed = [
                f.name for f in fields(self) if f.name in KV_OPTIONS and getattr(self, f.name) != f.default
            ]
            if changed:
                raise LlmliteError(
                    f"--{changed[0].replace('_', '-')} is a KV-cache option; add --kv-bits N to use the cache"
                )
        if self.kv_bits is not None:
            from llmlite.kvcache.cache import kv_spec

            kv_spec(self)
            if self.kv_residual > self.ctx:
                raise LlmliteError(
                    f"--kv-residual {self.kv_residual} is longer than the context (--ctx {self.ctx}), so "
                    "nothing would be quantized; lower it"
                )
            if not 1 <= self.prefill < self.ctx:
                raise LlmliteError(f"--prefill {self.prefill} must be at least 1 and below --ctx {self.ctx}")
            if self.chunk < 1:
                raise LlmliteError(f"--chunk {self.chunk} is invalid; use 1 (token by token) or more")
            if self.batch_size != 1:
                raise LlmliteError("--batch-size applies to plain perplexity; leave it out with --kv-bits")
        return self


GGUF_TYPES = ("q4_0", "q4_1", "q8_0")  # the block types that carry llmlite's grids exactly
EMBEDDING_TYPES = ("q8_0", "f16")


@dataclass
class ExportConfig:
    """Options of ``llmlite export`` / ``llmlite.export``."""

    VERB: ClassVar[str] = "export"
    ABOUT: ClassVar[str] = (
        "Write a quantized checkpoint in another runtime's format, its codes carried exactly: gguf for "
        "llama.cpp, ollama and LM Studio (Llama-family models quantized at group 32: 4-bit symmetric "
        "as q4_0, asymmetric as q4_1, 8-bit symmetric as q8_0); gptq, awq (AWQ GEMM, 4-bit) or "
        "compressed-tensors (pack-quantized, 4/8-bit) folders for transformers, GPTQModel, vLLM and SGLang."
    )

    model: str = option(
        "", "quantized checkpoint folder (llmlite quantize; gguf: --group-size 32)", positional="1"
    )
    format: str = option("gguf", "the format to write", choices=EXPORT_FORMATS)
    type: str | None = option(
        None, "GGUF block type", choices=GGUF_TYPES, shown="the smallest that holds the weights exactly"
    )
    embeddings: str = option(
        "q8_0",
        "the float embedding (and an unquantized lm_head): q8_0 as llama.cpp's quantizer writes it, or f16",
        choices=EMBEDDING_TYPES,
    )
    output: str | None = option(
        None, "the folder to write (gguf: the file)", cli_required="the folder (gguf: the file) to write"
    )
    overwrite: bool = option(False, "replace an existing output")

    def validate(self) -> ExportConfig:
        if not self.model:
            raise LlmliteError("export needs a CHECKPOINT folder (written by llmlite quantize)")
        if self.format not in EXPORT_FORMATS:
            raise LlmliteError(
                f"--format {self.format} is not supported; use one of: {', '.join(EXPORT_FORMATS)}"
            )
        if self.embeddings not in EMBEDDING_TYPES:
            raise LlmliteError(f"--embeddings {self.embeddings} is not one of: {', '.join(EMBEDDING_TYPES)}")
        if self.type is not None and self.type not in GGUF_TYPES:
            raise LlmliteError(
                f"--type {self.type} is not a GGUF type llmlite writes; use one of: {', '.join(GGUF_TYPES)}"
            )
        gguf_only = [("--type", self.type is not None), ("--embeddings", self.embeddings != "q8_0")]
        for name, given in gguf_only:
            if given and self.format != "gguf":
                raise LlmliteError(f"{name} is a GGUF option; leave it out with --format {self.format}")
        return self
