"""Pruning quality: perplexity of the bundled SmolLM2-135M after magnitude, Wanda and SparseGPT
pruning at 50% unstructured and 2:4, beside llm-compressor's Wanda and SparseGPT on the same
calibration windows, and 50% SparseGPT with 4-bit GPTQ in one pass beside each alone.

    .venv/bin/python benchmarks/prune.py [--windows 16] [--only NAME...] [--table]

Perplexity follows the GPTQ/AWQ protocol on the bundled WikiText-2 raw test split (non-overlapping
2,048-token windows, the first ``--windows``). Calibration: 128 × 512 windows of the bundled
WikiText-2 validation split, seed 0, the same windows for every method and for the peer
(``benchmarks/peers/llmcompressor_prune.py``, in the venv ``benchmarks/quantize.py`` makes). Prune
time: llmlite's layer walk and cores, the peer's ``oneshot`` (model loading excluded from both).
Rows are cached in .bench/prune-results.json (``--only`` reruns them); writes
docs/benchmarks/prune.md and prune.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # not ROOT: its kernels/ would shadow a package

import torch  # noqa: E402
from awq import calibration_file  # noqa: E402  (the 128 × 512 windows, saved once for the peers)
from quantize import ensure_llmc  # noqa: E402  (the peer's venv, made once in .bench)
from safetensors.torch import load_file  # noqa: E402

from llmlite.data import eval_windows, load_text, tokenize  # noqa: E402
from llmlite.evaluation.perplexity import perplexity  # noqa: E402
from llmlite.models import load_model, resolve_model  # noqa: E402
from llmlite.pruning import PruneSettings, parse_pattern, prune_model  # noqa: E402
from llmlite.quant.driver import quantize_model  # noqa: E402
from llmlite.quant.method import QuantSettings  # noqa: E402
from llmlite.runinfo import environment  # noqa: E402

BENCH = ROOT / ".bench"
OUT = ROOT / "docs" / "benchmarks"
JOINT = {"bits": 4, "group_size": 128, "sym": False}  # the joint rows' grid: 4-bit, group 128, asymmetric
# name -> (tool, method, target, with 4-bit GPTQ)
RUNS = {"dense": ("-", "dense", "-", False)}
for _target in ("0.5", "2:4"):
    for _method in ("magnitude", "wanda", "sparsegpt"):
        RUNS[f"{_method}-{_target}"] = ("llmlite", _method, _target, False)
    for _method in ("wanda", "sparsegpt"):
        RUNS[f"llm-compressor-{_method}-{_target}"] = ("llm-compressor", _method, _target, False)
    for _method in ("wanda", "sparsegpt"):  # each group calibrated after the layer's groups before it
        RUNS[f"{_method}-{_target}-true-sequential"] = ("llmlite", _method, _target, False)
# the same windows in reverse order: the same statistics up to float rounding, to show how far
# rounding alone moves a row
RUNS["wanda-2:4-reordered"] = ("llmlite", "wanda", "2:4", False)
RUNS["llm-compressor-wanda-2:4-reordered"] = ("llm-compressor", "wanda", "2:4", False)
RUNS["gptq-w4g128-asym"] = ("llmlite", "gptq", "-", True)
RUNS["sparsegpt-0.5-w4g128-asym"] = ("llmlite", "sparsegpt", "0.5", True)
RUNS["sparsegpt-0.5-w4g128-asym-true-sequential"] = ("llmlite", "sparsegpt", "0.5", True)


def run_one(name: str, model, calibration: torch.Tensor, windows: torch.Tensor, llmc: str | None) -> dict:
    tool, method, target, quantized = RUNS[name]
    pattern = parse_pattern(target) if ":" in target else None
    seconds = 0.0
    if tool == "llm-compressor":
        pruned, seconds = peer(name, method, target, llmc)
    else:
        pruned = copy.deepcopy(model)
    if method == "gptq":  # GPTQ alone, as the joint run quantizes (no GPTAQ, no clipping search)
        seconds = gptq_alone(pruned, calibration)
    elif tool == "llmlite":
        sparsity = 1 - pattern[0] / pattern[1] if pattern else float(target)
        extra = JOINT if quantized else {}
        walk = {"true_sequential": name.endswith("-true-sequential")}
        calibration = calibration.flip(0) if name.endswith("-reordered") else calibration
        report = prune_model(pruned, PruneSettings(method, sparsity, pattern, **extra, **walk), calibration)
        seconds = report.seconds
    start = time.perf_counter()
    result = perplexity(pruned, windows, progress=False)
    return {
        "tool": tool,
        "method": method,
        "target": target,
        "bits": JOINT["bits"] if quantized else None,
        "zeros": zeros(pruned),
        "perplexity": result.perplexity,
        "seconds": {"prune": round(seconds, 1), "eval": round(time.perf_counter() - start, 1)},
    }


def gptq_alone(model, calibration: torch.Tensor) -> float:
    """4-bit GPTQ as the joint run quantizes: act-order, scales re-solved, no GPTAQ, no clipping."""
    settings = QuantSettings("gptq", act_order=True, refit=True, dtype="float32", **JOINT)
    start = time.perf_counter()
    quantize_model(model, settings, calibration)
    return time.perf_counter() - start


def peer(name: str, method: str, target: str, llmc: str | None) -> tuple[torch.nn.Module, float]:
    """One llm-compressor run in its own venv: the float model holding its pruned weights, and the
    run's seconds."""
    python = ensure_llmc(llmc)
    out = BENCH / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    script = ROOT / "benchmarks" / "peers" / "llmcompressor_prune.py"
    calibration = calibration_file()
    if name.endswith("-reordered"):
        calibration = out / "calibration-reversed.pt"
        torch.save(torch.load(calibration_file()).flip(0), calibration)
    cmd = [python, str(script), str(resolve_model("smollm2-135m")), str(calibration), str(out)]
    cmd += ["--method", method] + (["--pattern", target] if ":" in target else ["--sparsity", target])
    with (out / "log.txt").open("w") as sink:
        done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{(out / 'log.txt').read_text()[-3000:]}")
    model = load_model("smollm2-135m")[0]
    weights = load_file(str(out / "weights.safetensors"))
    missing = set(weights) - set(model.state_dict())
    assert not missing, missing
    head = model.get_output_embeddings().weight
    if not torch.equal(weights.get("lm_head.weight", head), head):
        raise RuntimeError(f"{name}: the peer changed the head, which no row prunes")
    model.load_state_dict(weights, strict=False)
    return model, json.loads((out / "result.json").read_text())["seconds"]


def zeros(model) -> float:
    """The share of exact zeros in the decoder layers' linears (dequantized where quantized)."""
    total = zero = 0
    for layer in model.model.layers:
        for module in layer.modules():
            if hasattr(module, "dequantize"):
                weight = module.dequantize()
            elif isinstance(module, torch.nn.Linear):
                weight = module.weight
            else:
                continue
            total += weight.numel()
            zero += int((weight == 0).sum())
    return zero / total


def markdown(out: dict) -> str:
    s, env, rows = out["settings"], out["environment"], out["rows"]
    lines = [
        "# Pruning: SmolLM2-135M, 50% unstructured and 2:4",
        "",
        "Written by `benchmarks/prune.py`. Methods and options: [docs/prune.md](../prune.md). Each pruned "
        "model is a dense model with zeros: **no speed-up and no size change on the CPU by itself** "
        "(measured: [shrink_speed.md](shrink_speed.md)).",
        "",
        "| tool | method | target | zeros in the linears | WikiText-2 perplexity | prune s |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name in RUNS:
        r = rows.get(name)
        if r is None:
            continue
        method = r["method"] + (f" + {r['bits']}-bit GPTQ" if r["bits"] and r["method"] != "gptq" else "")
        method = f"{r['bits']}-bit GPTQ alone" if r["method"] == "gptq" else method
        method += ", `--true-sequential`" if name.endswith("-true-sequential") else ""
        method += ", calibration windows reversed" if name.endswith("-reordered") else ""
        lines.append(
            f"| {r['tool']} | {method} | {r['target']} | {r['zeros']:.2%} | {r['perplexity']:.2f} "
            f"| {r['seconds']['prune'] if r['method'] != 'dense' else '–'} |"
        )
    lines += ["", "Settings:", ""]
    lines += [f"- {k}: {v}" for k, v in s.items()]
    lines += [
        f"- machine: {env['cpu']} ({env['machine']}), {env['threads']} threads",
        f"- versions: llmlite {env['llmlite']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"Python {env['python']}; {s.get('peer', 'peer not run')}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16, help="2,048-token evaluation windows (default 16)")
    p.add_argument(
        "--only", nargs="*", choices=sorted(RUNS), help="runs to (re)run; default: those not cached"
    )
    p.add_argument("--table", action="store_true", help="only write the tables from the cached rows")
    p.add_argument(
        "--llmc-python", help="python of a venv with llmcompressor (default: .bench/venv-llmcompressor)"
    )
    a = p.parse_args()
    BENCH.mkdir(exist_ok=True)
    cache_file = BENCH / f"prune-results-{a.windows}.json"
    rows = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if not a.table:
        model, tokenizer = load_model("smollm2-135m")
        windows = eval_windows(tokenize(tokenizer, load_text("wikitext2")), 2048, a.windows)
        calibration = torch.load(calibration_file())
        for name in RUNS:
            if (a.only and name not in a.only) or (not a.only and name in rows):
                continue
            print(f"running {name} ...", flush=True)
            rows[name] = run_one(name, model, calibration, windows, a.llmc_python)
            print(f"{name}: perplexity {rows[name]['perplexity']:.3f}, {rows[name]['seconds']}", flush=True)
            cache_file.write_text(json.dumps(rows, indent=2) + "\n")
    settings = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct, float32)",
        "eval": f"wikitext2 raw test, {a.windows} windows x 2048 tokens",
        "calibration": "wikitext2-valid, 128 windows x 512 tokens, seed 0 (the same for every row)",
        "joint rows": "4-bit, group 128, asymmetric; GPTQ with act-order and re-solved scales, no GPTAQ",
    }
    llmc = Path(a.llmc_python or BENCH / "venv-llmcompressor" / "bin" / "python")
    if any(r["tool"] == "llm-compressor" for r in rows.values()) and llmc.exists():
        version = subprocess.run(
            [str(llmc), "-c", "import importlib.metadata as m; print(m.version('llmcompressor'))"],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        settings["peer"] = f"llm-compressor {version}"
    out = {"settings": settings, "rows": rows, "environment": environment()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prune.json").write_text(json.dumps(out, indent=2) + "\n")
    (OUT / "prune.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
