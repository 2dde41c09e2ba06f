"""The options of ``quantize`` and ``eval``, shared by the CLI, the Python API and YAML recipes
(``llmlite.recipes.build``: the defaults below < the recipe < options given explicitly)."""

from __future__ import annotations

from dataclasses import dataclass

from llmlite.data import DEFAULT_CALIBRATION, DEFAULT_EVAL_TEXT
from llmlite.errors import LlmliteError
from llmlite.kvcache.defaults import KV_DEFAULTS
from llmlite.models import DEFAULT_MODEL, refuse_quantized
from llmlite.quant.grid import SUPPORTED_BITS
from llmlite.quant.methods import METHODS, get

DTYPES = ("float16", "bfloat16", "float32")
# The settings only some methods read (``Method.options``), and what each does, for the refusal.
OPTION_HELP = {
    "mse": "searches each group's clipping range on the weights",
    "refit": "fits scales to calibration outputs",
    "v2": "corrects GPTQ's target and needs calibration",
}


@dataclass
class QuantizeConfig:
    """Options of ``llmlite quantize`` / ``llmlite.quantize``."""

    model: str = DEFAULT_MODEL
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel
    sym: bool = True
    act_order: bool = True  # static groups: no cost at inference; llm-compressor's default too
    calibration: str = DEFAULT_CALIBRATION
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    damp: float = 0.01
    mse: bool = False
    # GPTAQ (GPTQModel's "v2"): aim each layer at the float model's outputs, the drift measured on
    # the first v2_windows calibration windows (0: all). None: on for GPTQ (validate() resolves it).
    v2: bool | None = None
    v2_alpha: float = 0.25
    v2_windows: int = 16
    # After GPTQ, each group's scale re-solved for the least layer-output error on the calibration
    # Hessian (codes and zero-points fixed). None: on for GPTQ (validate() resolves it).
    refit: bool | None = None
    quantize_head: bool = False
    dtype: str = "float16"  # storage of the tensors that stay unquantized (embeddings, norms)
    output: str | None = None
    overwrite: bool = False

    def validate(self) -> QuantizeConfig:
        method = get(self.method)
        if self.bits not in SUPPORTED_BITS:
            raise LlmliteError(f"{self.bits}-bit weights are not supported; use --bits 2, 3, 4 or 8")
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
        if self.v2 is None:
            self.v2 = "v2" in method.options
        if self.refit is None:
            self.refit = "refit" in method.options
        for option in ("v2", "refit"):
            if not isinstance(getattr(self, option), bool):
                raise LlmliteError(f"option {option} must be true or false, got {getattr(self, option)!r}")
        if self.v2_windows < 0:
            raise LlmliteError(f"--v2-windows {self.v2_windows} is invalid; use 0 (all windows) or more")
        for option, what in OPTION_HELP.items():
            if getattr(self, option) and option not in method.options:
                readers = [m.name for m in METHODS.values() if option in m.options]
                raise LlmliteError(f"--{option} {what}; use it with --method {' or '.join(readers)}")
        if not 0 < self.damp <= 1:
            raise LlmliteError(f"--damp {self.damp} is out of range; use a value in (0, 1], e.g. 0.01")
        refuse_quantized(self.model, "quantize")  # before any work: there is no float weight left
        return self


@dataclass
class EvalConfig:
    """Options of ``llmlite eval`` / ``llmlite.evaluate``."""

    model: str = DEFAULT_MODEL
    ppl: str = DEFAULT_EVAL_TEXT
    ctx: int = 2048
    max_windows: int | None = None
    batch_size: int = 1
    baseline: str | None = None
    json: str | None = None
    kv_bits: int | None = None  # score through a KV cache: 2, 4, 8, or 16 (unquantized, same path)
    kv_group_size: int = KV_DEFAULTS["group_size"]
    kv_residual: int = KV_DEFAULTS["residual"]
    kv_sinks: int = KV_DEFAULTS["sinks"]
    kv_scheme: str = KV_DEFAULTS["scheme"]  # kivi, salient, or auto (salient at 2 bits)
    kv_salient: float = KV_DEFAULTS["salient"]  # salient scheme: fraction of key channels at 2x bits
    prefill: int = 256  # tokens of each window that fill the cache before scoring starts
    chunk: int = 32  # tokens scored per forward pass against the cache (1 = token by token)

    def validate(self) -> EvalConfig:
        if self.ctx < 2:
            raise LlmliteError(f"--ctx {self.ctx} is too short; use 2 or more (2048 is the papers')")
        if self.max_windows is not None and (not isinstance(self.max_windows, int) or self.max_windows < 1):
            raise LlmliteError(f"--max-windows must be at least 1, got {self.max_windows}")
        if self.batch_size < 1:
            raise LlmliteError(f"--batch-size must be at least 1, got {self.batch_size}")
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
