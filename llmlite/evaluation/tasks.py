"""One runner per report task: lm-eval tasks through ``LlmliteLM``, the rest computed here.

Each returns ``{"metrics": {name: value}, "details": {...}}``, JSON-ready (details feed the plots).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from llmlite.errors import LlmliteError

if TYPE_CHECKING:
    from llmlite.evaluation.report import ReportConfig

LM_EVAL_TASKS = {  # our names -> the lm-eval task configs under evals/
    "wikitext": "llmlite_wikitext",
    "piqa": "llmlite_piqa",
    "passkey": "llmlite_passkey",
    "needle": "llmlite_needle",
    "ppl_by_position": "llmlite_ppl_by_position",
}
NATIVE_TASKS = ("calibration", "efficiency", "kv_cache")
DEFAULT_TASKS = ("wikitext", "piqa", "calibration", "efficiency")
ALL_TASKS = (*LM_EVAL_TASKS, *NATIVE_TASKS)
NEEDS_SAMPLES = {"piqa", "passkey", "needle"}


def run(task: str, loaded, cfg: ReportConfig, progress: bool) -> dict:
    if task == "calibration":
        return calibration(loaded, cfg, progress)
    if task == "efficiency":
        return efficiency(loaded, cfg)
    if task == "kv_cache":
        return kv_cache(loaded, cfg, progress)
    return lm_eval_task(task, loaded, cfg)


def lm_eval_task(task: str, loaded, cfg: ReportConfig) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llmlite.evaluation.harness import TASKS_DIR
    from llmlite.evaluation.longcontext import LENGTHS

    name = LM_EVAL_TASKS.get(task, task)
    maximum = loaded.lm.max_length
    if task in ("passkey", "needle") and max(LENGTHS) > maximum:
        raise LlmliteError(
            f"{task} asks for {max(LENGTHS)} tokens but {loaded.source} takes at most {maximum}; "
            f"drop {task} from --tasks"
        )
    if task == "ppl_by_position" and maximum < 8192:
        raise LlmliteError(f"ppl_by_position needs 8192 tokens but {loaded.source} takes at most {maximum}")
    metadata = {"pretrained": loaded.source}
    limit = cfg.limit_for(task)
    loaded.lm.max_windows = None
    if task == "wikitext":
        loaded.check_ctx()
    if task == "wikitext" and limit:  # one document: --limit counts its windows (a few tokens to spare)
        metadata["max_tokens"] = limit * cfg.ctx + 16
        loaded.lm.max_windows, limit = limit, None
    manager = TaskManager(include_path=str(TASKS_DIR), metadata=metadata)
    try:
        out = lm_eval.simple_evaluate(
            model=loaded.lm,
            tasks=[name],
            limit=limit,
            task_manager=manager,
            log_samples=task in NEEDS_SAMPLES,
        )
    except (FileNotFoundError, ConnectionError) as e:  # the task's data: a missing file, or no hub
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        fix = (
            "reinstall llmlite"
            if task in LM_EVAL_TASKS
            else "connect to the Hugging Face hub or cache it first"
        )
        raise LlmliteError(f"task {task}: its data could not be loaded ({reason}); {fix}") from None
    results = out["results"][name]
    metrics = {
        k.split(",")[0]: v
        for k, v in results.items()
        if "," in k and "_stderr" not in k and isinstance(v, int | float)
    }
    samples = (out.get("samples") or {}).get(name, [])
    return {"metrics": metrics, "details": _details(task, samples)}


def _details(task: str, samples: list) -> dict:
    from llmlite.evaluation.calibration import reliability

    if task == "piqa":
        pairs = [s["ece"] for s in samples]
        return {"reliability": reliability([c for c, _ in pairs], [ok for _, ok in pairs])}
    if task in ("passkey", "needle"):
        cells: dict[str, list[float]] = defaultdict(list)
        for s in samples:
            cells[f"{s['doc']['length']}@{s['doc']['depth']}"].append(s["exact_match"])
        return {"exact_match_by_length_depth": {k: sum(v) / len(v) for k, v in cells.items()}}
    return {}


def calibration(loaded, cfg: ReportConfig, progress: bool) -> dict:
    """Next-token calibration on WikiText-2 raw test windows: ECE (15 bins), Brier and NLL."""
    from llmlite.data import eval_windows, load_text, tokenize
    from llmlite.evaluation.calibration import ece, reliability
    from llmlite.evaluation.perplexity import next_token_confidence

    loaded.check_ctx()
    windows = eval_windows(
        tokenize(loaded.tokenizer, load_text("wikitext2")), cfg.ctx, cfg.limit_for("calibration")
    )
    stats = next_token_confidence(loaded.model, windows, progress)
    conf, correct = stats["confidence"].double(), stats["correct"].double()
    metrics = {
        "ece": ece(conf.tolist(), correct.tolist()),
        "brier": float(((conf - correct) ** 2).mean()),
        "nll": float(stats["nll"].double().mean()),
        "top1_accuracy": float(correct.mean()),
        "mean_confidence": float(conf.mean()),
        "tokens": len(conf),
    }
    return {"metrics": metrics, "details": {"reliability": reliability(conf.tolist(), correct.tolist())}}


def efficiency(loaded, cfg: ReportConfig) -> dict:
    """Parameters, size on disk and in memory, MACs per token (from shapes), latency, memory, energy."""
    from llmlite.evaluation.efficiency import latency, llama_cpp_latency, macs_per_token
    from llmlite.evaluation.metrics import memory_bytes, param_count, size_on_disk
    from llmlite.models import model_path

    model = loaded.model
    timing = latency(model)
    b1 = timing["batches"][0]
    big = timing["batches"][-1]
    macs = macs_per_token(model, cfg.ctx)
    metrics = {
        "params": param_count(model),
        "size_bytes": size_on_disk(model_path(model)),
        "memory_bytes": memory_bytes(model),
        "macs_per_token": macs["total"],
        "prefill_ms_p50_b1": b1["prefill"]["p50_ms"],
        "prefill_ms_p90_b1": b1["prefill"]["p90_ms"],
        "decode_ms_p50_b1": b1["decode"]["p50_ms"],
        "decode_ms_p90_b1": b1["decode"]["p90_ms"],
        f"decode_ms_p50_b{big['batch']}": big["decode"]["p50_ms"],
        f"decode_ms_p90_b{big['batch']}": big["decode"]["p90_ms"],
        "prefill_tokens_per_s_b1": b1["prefill_tokens_per_s"],
        "decode_tokens_per_s_b1": b1["decode_tokens_per_s"],
        f"decode_tokens_per_s_b{big['batch']}": big["decode_tokens_per_s"],
        "peak_rss_bytes": timing["peak_rss_bytes"],
    }
    if timing["peak_gpu_bytes"] is not None:
        metrics["peak_gpu_bytes"] = timing["peak_gpu_bytes"]
    metrics["joules_per_token_b1"] = b1["joules_per_token"]  # None: not available on this machine
    served = llama_cpp_latency(loaded.source)  # the same model through llama.cpp, where it runs
    if "decode" in served:
        metrics["prefill_tokens_per_s_b1_llama_cpp"] = served["prefill_tokens_per_s"]
        metrics["decode_tokens_per_s_b1_llama_cpp"] = served["decode_tokens_per_s"]
    return {"metrics": metrics, "details": {"latency": timing, "llama_cpp": served, "macs": macs}}


KV_BITS = (16, 4, 2)


def kv_cache(loaded, cfg: ReportConfig, progress: bool) -> dict:
    """Perplexity read back through llmlite's KV cache at 16 (unquantized), 4 and 2 bits (default
    settings: KIVI at 4 bits, the salient scheme at 2; prefill 256 or half the window, chunks of
    32) on WikiText-2 raw test windows, with the cache's bytes per token and its ratio to a
    float16 cache."""
    from llmlite.data import eval_windows, load_text, tokenize
    from llmlite.kvcache.cache import KVSpec, kv_cache_for
    from llmlite.kvcache.evaluate import cached_perplexity

    loaded.check_ctx()
    windows = eval_windows(
        tokenize(loaded.tokenizer, load_text("wikitext2")), cfg.ctx, cfg.limit_for("kv_cache")
    )
    prefill = min(256, cfg.ctx // 2)
    metrics: dict = {}
    for bits in KV_BITS:
        spec = KVSpec(bits)
        r = cached_perplexity(
            loaded.model,
            windows,
            lambda s=spec: kv_cache_for(loaded.model, s, loaded.tokenizer),
            prefill,
            32,
            progress,
        )
        metrics[f"ppl_kv{bits}"] = r.perplexity
        metrics[f"bytes_per_token_kv{bits}"] = r.cache_bytes_per_token
        metrics[f"ratio_to_float16_kv{bits}"] = r.ratio_to_float16
    return {
        "metrics": metrics,
        "details": {"spec": {"prefill": prefill, "chunk": 32, "windows": len(windows)}},
    }
