"""Option dataclasses shared by the CLI, the Python API and YAML recipes.

A recipe is a YAML mapping whose keys are the command's long options (``group-size`` or
``group_size``). Precedence: the defaults below < the recipe < options given explicitly.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from llmlite.data import DEFAULT_CALIBRATION, DEFAULT_EVAL_TEXT
from llmlite.errors import LlmliteError
from llmlite.kvcache.defaults import KV_DEFAULTS
from llmlite.models import DEFAULT_MODEL, refuse_quantized
from llmlite.quant.grid import SUPPORTED_BITS

METHODS = ("rtn", "gptq")
DTYPES = ("float16", "bfloat16", "float32")


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
        if self.method not in METHODS:
            raise LlmliteError(f"unknown method '{self.method}'; use one of: {', '.join(METHODS)}")
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
            self.v2 = self.method == "gptq"
        if not isinstance(self.v2, bool):
            raise LlmliteError(f"option v2 must be true or false, got {self.v2!r}")
        if self.v2_windows < 0:
            raise LlmliteError(f"--v2-windows {self.v2_windows} is invalid; use 0 (all windows) or more")
        if self.refit is None:
            self.refit = self.method == "gptq"
        if not isinstance(self.refit, bool):
            raise LlmliteError(f"option refit must be true or false, got {self.refit!r}")
        if self.refit and self.method != "gptq":
            raise LlmliteError("--refit fits scales to calibration outputs; use it with --method gptq")
        if self.v2 and self.method != "gptq":
            raise LlmliteError("--v2 corrects GPTQ's target and needs calibration; use it with --method gptq")
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
            kv_spec(self).validate()
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


@dataclass
class GenerateConfig:
    """Options of ``llmlite generate`` / ``llmlite.generate``."""

    prompt: str = ""
    model: str = DEFAULT_MODEL
    max_new_tokens: int = 64
    kv_bits: int | None = None  # None: transformers' default (unquantized) cache
    kv_group_size: int = KV_DEFAULTS["group_size"]
    kv_residual: int | None = None  # None: the default window, never an error on short contexts
    kv_sinks: int = KV_DEFAULTS["sinks"]
    kv_scheme: str = KV_DEFAULTS["scheme"]
    kv_salient: float = KV_DEFAULTS["salient"]
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    chat: bool = False  # wrap the prompt in the model's chat template

    def validate(self) -> GenerateConfig:
        if not self.prompt:
            raise LlmliteError("generate needs a PROMPT (the text to continue)")
        if self.max_new_tokens < 1:
            raise LlmliteError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise LlmliteError("--temperature must be 0 (greedy) or more and --top-p in (0, 1]")
        if self.kv_residual is not None and (
            isinstance(self.kv_residual, bool) or not isinstance(self.kv_residual, int)
        ):
            raise LlmliteError(f"option kv-residual must be a whole number, got {self.kv_residual!r}")
        if self.kv_bits is not None:
            kv_spec(self).validate()
        return self


def kv_spec(config: EvalConfig | GenerateConfig):
    """The KV-cache settings of an eval or generate config, checked (``auto`` resolved)."""
    from llmlite.kvcache.cache import KVSpec

    residual = KV_DEFAULTS["residual"] if config.kv_residual is None else config.kv_residual
    return KVSpec(
        config.kv_bits,
        config.kv_group_size,
        residual,
        config.kv_sinks,
        scheme=config.kv_scheme,
        salient=config.kv_salient,
    ).validate()


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The options in a YAML recipe, keys normalised to Python names."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmliteError(f"no such recipe: {path}") from None
    except IsADirectoryError:
        raise LlmliteError(f"recipe {path} is a folder; pass a YAML file of option: value") from None
    except UnicodeDecodeError:
        raise LlmliteError(
            f"recipe {path} is not a text file (not UTF-8); pass a YAML file of option: value"
        ) from None
    except (OSError, yaml.YAMLError) as e:
        raise LlmliteError(f"cannot read recipe {path}: {_yaml_problem(e)}; fix the YAML") from None
    if not isinstance(data, dict):
        found = "empty" if data is None else f"a {type(data).__name__}"
        raise LlmliteError(f"recipe {path} is {found}; it must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _yaml_problem(e: Exception) -> str:
    """A YAML error on one line: the problem and where (``line 2, column 8``)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


def build(cls: type, recipe: str | Path | None = None, **options: Any):
    """An options object from the defaults, an optional recipe, then ``options``."""
    names = {f.name for f in fields(cls)}
    merged = read_recipe(recipe) if recipe else {}
    unknown = sorted(set(merged) - names)
    if unknown:
        valid = ", ".join(sorted(n.replace("_", "-") for n in names))
        shown = ", ".join(k if k.isprintable() else repr(k) for k in unknown)
        raise LlmliteError(f"recipe {recipe}: unknown option(s) {shown}; valid: {valid}")
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    merged.update(options)
    try:
        config = cls(**merged)
    except TypeError as e:
        raise LlmliteError(f"bad recipe option: {e}") from None
    _check_types(config, recipe)
    return config.validate()


def _check_types(config: Any, recipe: Any) -> None:
    """Each option's value against its field's type hint (a recipe can hold any YAML value)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints.get(f.name, Any)
        if not _matches(value, hint):
            name = f.name.replace("_", "-")
            raise LlmliteError(f"option {name} must be {_describe(hint)}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # NaN and infinity are no settings
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
