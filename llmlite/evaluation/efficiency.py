"""Deployment efficiency, measured: latency of prefill and decode, throughput, peak memory, energy.

Also multiply-accumulates per token, counted from the model's shapes (not measured; stated so).
Every figure comes with the settings it was measured under (device, dtype, threads, batch, lengths).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers.modeling_outputs
from torch import Tensor, nn

from llmlite.decode import StaticCache, forward, unsupported
from llmlite.memory import measure
from llmlite.quant.compressed import is_compressed

RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


@dataclass
class LatencySettings:
    prompt_tokens: int = 128
    decode_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 4)
    repeats: int = 5  # timed runs per batch size, after one untimed warm-up run


def macs_per_token(model: nn.Module, context: int) -> dict:
    """Multiply-accumulates to process one token at ``context`` tokens of history, from shapes.

    ``linear``: every linear layer (quantized ones as their logical ``in × out``), the output head
    included; ``attention``: the score and value products, 2 · heads · head_dim · context per layer.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) or is_compressed(m)]
    linear = sum(m.in_features * m.out_features for m in linears)
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 0)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // max(heads, 1)
    attention = 2 * cfg.num_hidden_layers * heads * head_dim * context
    return {"context": context, "linear": linear, "attention": attention, "total": linear + attention}


def _energy_joules() -> float | None:
    """Cumulative energy of the CPU package (RAPL) or the GPU (NVML), or None where not exposed."""
    if torch.cuda.is_available():
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
        except Exception:
            return None
    try:
        return int(RAPL.read_text()) / 1e6
    except (OSError, ValueError):
        return None


# transformers 5.2x renamed ``past_key_values`` to ``cache``; older releases know only the former
_CACHE_ARG = (
    "cache" if hasattr(transformers.modeling_outputs.CausalLMOutputWithPast, "cache") else "past_key_values"
)


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def percentiles(seconds: list[float]) -> dict:
    q = statistics.quantiles(seconds, n=10, method="inclusive") if len(seconds) > 1 else seconds * 9
    return {"p50_ms": 1000 * statistics.median(seconds), "p90_ms": 1000 * q[8]}


@dataclass
class BatchLatency:
    batch: int
    prefill: dict = field(default_factory=dict)  # p50_ms, p90_ms of one forward over the prompt
    decode: dict = field(default_factory=dict)  # p50_ms, p90_ms of one step of one new token per row
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    joules_per_token: float | None = None


def _transformers_run(model: nn.Module, ids: Tensor, new: int) -> tuple[float, list[float]]:
    """(prefill seconds, seconds of each decode step) through transformers' forward and cache."""
    _sync()
    start = time.perf_counter()
    out = model(ids, use_cache=True)
    _sync()
    took = time.perf_counter() - start
    cache, nxt = _cache_of(out), out.logits[:, -1].argmax(-1, keepdim=True)
    steps = []
    for _ in range(new):
        _sync()
        start = time.perf_counter()
        out = model(nxt, **{_CACHE_ARG: cache}, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync()
        steps.append(time.perf_counter() - start)
        cache = _cache_of(out)
    return took, steps


def _lean_run(model: nn.Module, ids: Tensor, new: int) -> tuple[float, list[float]]:
    """The same through llmlite's lean loop (``llmlite.decode``: static cache, no framework)."""
    batch, prompt = ids.shape
    cache = StaticCache.allocate(model, batch, prompt + new)
    _sync()
    start = time.perf_counter()
    nxt = forward(model, ids, cache, torch.arange(prompt, device=ids.device)).argmax(-1, keepdim=True)
    _sync()
    took = time.perf_counter() - start
    steps = []
    for i in range(new):
        _sync()
        start = time.perf_counter()
        nxt = forward(model, nxt, cache, torch.tensor([prompt + i], device=ids.device)).argmax(
            -1, keepdim=True
        )
        _sync()
        steps.append(time.perf_counter() - start)
    return took, steps


@torch.no_grad()
def _one_batch(model: nn.Module, batch: int, s: LatencySettings, generator: torch.Generator) -> BatchLatency:
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    run_once = (
        _lean_run if unsupported(model, s.prompt_tokens + s.decode_tokens) is None else _transformers_run
    )
    prefill, decode = [], []
    energy_start, tokens = _energy_joules(), 0
    for run in range(s.repeats + 1):
        ids = torch.randint(0, vocab, (batch, s.prompt_tokens), generator=generator).to(device)
        took, steps = run_once(model, ids, s.decode_tokens)
        if run == 0:  # warm-up
            energy_start = _energy_joules()
            continue
        prefill.append(took)
        decode += steps
        tokens += batch * (s.prompt_tokens + s.decode_tokens)
    energy_end = _energy_joules()
    result = BatchLatency(batch, percentiles(prefill), percentiles(decode))
    result.prefill_tokens_per_s = batch * s.prompt_tokens / statistics.median(prefill)
    result.decode_tokens_per_s = batch / statistics.median(decode)
    if energy_start is not None and energy_end is not None and energy_end >= energy_start:
        result.joules_per_token = (energy_end - energy_start) / tokens
    return result


def latency(model: nn.Module, settings: LatencySettings | None = None, seed: int = 0) -> dict:
    """Prefill and decode latency (p50/p90), tokens per second, peak memory and energy per token."""
    s = settings or LatencySettings()
    if not s.batch_sizes or min(s.batch_sizes) < 1 or s.prompt_tokens < 1 or s.repeats < 1:
        raise ValueError("latency settings need batch sizes ≥ 1, prompt_tokens ≥ 1 and repeats ≥ 1")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    with measure() as stats:
        batches = [asdict(_one_batch(model, b, s, generator)) for b in s.batch_sizes]
    energy = "RAPL" if device.type == "cpu" else "NVML"
    why_not = unsupported(model, s.prompt_tokens + s.decode_tokens)
    return {
        "settings": asdict(s),
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "loop": "llmlite lean loop" if why_not is None else f"transformers ({why_not})",
        "batches": batches,
        "peak_rss_bytes": stats.peak_rss_bytes,
        "peak_rss_scope": stats.peak_rss_scope,
        "peak_gpu_bytes": stats.peak_gpu_bytes,
        "energy": energy if batches[0]["joules_per_token"] is not None else "not available",
    }


def llama_cpp_latency(source: str, settings: LatencySettings | None = None) -> dict:
    """Batch-1 prefill and decode latency of ``source`` served by llama.cpp (its GGUF file, or a
    group-32 checkpoint exported to one), in the form of ``latency``'s batches; ``{"runtime":
    "not run: why"}`` without llama-cpp-python or where the model has no GGUF form."""
    from llmlite import llamacpp
    from llmlite.errors import LlmliteError

    s = settings or LatencySettings()
    if not llamacpp.available():
        return {"runtime": "not run: llama-cpp-python is not installed"}
    try:
        with llamacpp.gguf_file(source) as path:
            prefill, steps = llamacpp.timed_runs(path, s.prompt_tokens, s.decode_tokens, s.repeats)
            name = path.name
    except LlmliteError as err:
        return {"runtime": f"not run: {err}"}
    return {
        "runtime": f"llama.cpp (llama-cpp-python {llamacpp.version()})",
        "file": name,
        "threads": torch.get_num_threads(),
        "batch": 1,
        "prefill": percentiles(prefill),
        "decode": percentiles(steps),
        "prefill_tokens_per_s": s.prompt_tokens / statistics.median(prefill),
        "decode_tokens_per_s": 1 / statistics.median(steps),
    }
