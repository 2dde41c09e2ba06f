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
"""

from __future__ import annotations

__version__ = "0.1.0"

from llmlite.blas import enable_mkl_avx2

enable_mkl_avx2()

_EXPORTS = {
    "load_model": "llmlite.models",
    "quantize": "llmlite.api",
    "evaluate": "llmlite.api",
    "QuantizeConfig": "llmlite.config",
    "EvalConfig": "llmlite.config",
    "report": "llmlite.evaluation.report",
    "ReportConfig": "llmlite.evaluation.report",
    "compare": "llmlite.evaluation.report",
    "LlmliteError": "llmlite.errors",
    "QuantLinear": "llmlite.quant.linear",
    "finetune": "llmlite.training.train",
    "FinetuneConfig": "llmlite.training.config",
    "merge": "llmlite.training.merge",
    "generate": "llmlite.kvcache.generate",
    "QuantizedKVCache": "llmlite.kvcache.cache",
    "convert_gqa_model": "llmlite.gqa",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmlite' has no attribute {name!r}")
