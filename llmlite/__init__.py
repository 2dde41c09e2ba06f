"""llmlite: quantize, fine-tune, serve and evaluate compressed LLMs.

Public API (imported lazily so that ``llmlite --help`` starts fast)::

    model, tokenizer = llmlite.load_model("smollm2-135m")
    result = llmlite.quantize(method="gptq", bits=4, group_size=128, output="out/w4g128")
    report = llmlite.evaluate(model="out/w4g128", max_windows=8)
    result = llmlite.finetune(data="train.jsonl", method="qlora", output="out/adapter")
    llmlite.merge("out/adapter", output="out/merged")
    print(llmlite.generate(prompt="The capital of France is", kv_bits=4).text)
    out = llmlite.report(model="out/w4g128", tasks=["wikitext", "piqa"], limit=50, report="out/report")
    table = llmlite.compare(["out/report", "out/other-report"], output="out/compare")
    result = llmlite.convert_gqa(kv_heads=1, output="out/mqa")
    result = llmlite.prune(method="sparsegpt", pattern="2:4", output="out/sparse24")
    result = llmlite.prune(structure="channels", sparsity=0.2, output="out/channels20")
    result = llmlite.lowrank(method="svd-llm", ratio=0.8, output="out/lowrank80")

Every verb takes an optional config (``QuantizeConfig``, ...), ``recipe=`` (a YAML file) and the
config's fields as keyword options, and returns a result dataclass (``result.to_dict()``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from llmlite.blas import enable_mkl_avx2

enable_mkl_avx2()

API_VERBS = (
    "quantize", "evaluate", "report", "compare", "finetune", "merge", "generate", "convert_gqa", "export",
    "prune", "lowrank",
)  # fmt: skip

_EXPORTS = {
    "load_model": "llmlite.models",
    **{verb: "llmlite.api" for verb in API_VERBS},
    "QuantizeConfig": "llmlite.config",
    "EvalConfig": "llmlite.config",
    "ExportConfig": "llmlite.config",
    "ReportConfig": "llmlite.evaluation.report",
    "CompareConfig": "llmlite.evaluation.report",
    "FinetuneConfig": "llmlite.training.config",
    "MergeConfig": "llmlite.training.merge",
    "GenerateConfig": "llmlite.kvcache.generate",
    "GQAConfig": "llmlite.gqa.api",
    "PruneConfig": "llmlite.pruning.api",
    "LowrankConfig": "llmlite.lowrank.api",
    "LlmliteError": "llmlite.errors",
    "QuantLinear": "llmlite.quant.linear",
    "QuantizedKVCache": "llmlite.kvcache.cache",
    "convert_gqa_model": "llmlite.gqa",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmlite' has no attribute {name!r}")
