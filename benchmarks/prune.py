"""Pruning quality: perplexity of the bundled SmolLM2-135M after magnitude, Wanda and SparseGPT
pruning at 50% unstructured and 2:4, beside the dense model, from one calibration set.

    .venv/bin/python benchmarks/prune.py [--windows 16] [--samples 128] [--seqlen 512] [--targets 0.5,2:4]

A skeleton of issue 26's quality benchmark, not run yet: llm-compressor's ``SparseGPTModifier`` and
``WandaPruningModifier`` (the peers, installed for the benchmark only) are still to be added as rows
of the same run. Perplexity follows the GPTQ/AWQ protocol on the bundled WikiText-2 raw test split
(non-overlapping 2,048-token windows, the first ``--windows``); calibration: the bundled WikiText-2
validation split, the same windows for every method. Pruning time is the walk and the cores only
(model loading excluded). Writes docs/benchmarks/prune.md and prune.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from llmlite.data import DEFAULT_CALIBRATION, calibration_windows, eval_windows, load_text, tokenize
from llmlite.evaluation.perplexity import perplexity
from llmlite.models import load_model
from llmlite.pruning import METHODS, PruneSettings, parse_pattern, prune_model
from llmlite.runinfo import environment

ROOT = Path(__file__).resolve().parent.parent  # not put on sys.path: its kernels/ would shadow a package
OUT = ROOT / "docs" / "benchmarks"


def run(a: argparse.Namespace) -> dict:
    model, tokenizer = load_model("smollm2-135m")
    windows = eval_windows(tokenize(tokenizer, load_text("wikitext2")), 2048, a.windows)
    ids = tokenize(tokenizer, load_text(DEFAULT_CALIBRATION))
    calibration = calibration_windows(ids, a.samples, a.seqlen, seed=0)
    rows = [_row("dense", "-", model, windows, 0.0, None)]
    print(_line(rows[-1]), flush=True)
    for target in a.targets.split(","):
        pattern = parse_pattern(target) if ":" in target else None
        sparsity = 1 - pattern[0] / pattern[1] if pattern else float(target)
        for method in a.methods.split(","):
            pruned = copy.deepcopy(model)
            settings = PruneSettings(method, sparsity, pattern)
            start = time.perf_counter()
            report = prune_model(pruned, settings, calibration, progress=not a.quiet)
            rows.append(_row(method, target, pruned, windows, time.perf_counter() - start, report.sparsity))
            print(_line(rows[-1]), flush=True)
            del pruned
    settings = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct, float32)",
        "eval": f"wikitext2 raw test, {len(windows)} windows x 2048 tokens, {windows.shape[0] * 2047} scored",
        "calibration": f"{DEFAULT_CALIBRATION}, {a.samples} windows x {a.seqlen} tokens, seed 0",
        "threads": torch.get_num_threads(),
    }
    return {"settings": settings, "rows": rows, "environment": environment()}


def _row(method: str, target: str, model, windows, seconds: float, sparsity: float | None) -> dict:
    start = time.perf_counter()
    result = perplexity(model, windows, progress=False)
    return {
        "method": method,
        "target": target,
        "sparsity": sparsity,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "seconds": {"prune": round(seconds, 1), "eval": round(time.perf_counter() - start, 1)},
    }


def _line(r: dict) -> str:
    return f"{r['method']} {r['target']}: perplexity {r['perplexity']:.2f}, prune {r['seconds']['prune']} s"


def markdown(out: dict) -> str:
    s, env = out["settings"], out["environment"]
    lines = [
        "# Pruning: SmolLM2-135M, 50% unstructured and 2:4",
        "",
        "Written by `benchmarks/prune.py`. Methods and options: [docs/prune.md](../prune.md). Dense "
        "tensors with zeros: no speed-up and no size change by themselves.",
        "",
        "| method | target | zeros in the linears | WikiText-2 perplexity | prune s |",
        "|---|---|---:|---:|---:|",
    ]
    for r in out["rows"]:
        zeros = "–" if r["sparsity"] is None else f"{r['sparsity']:.2%}"
        lines.append(
            f"| {r['method']} | {r['target']} | {zeros} | {r['perplexity']:.2f} | {r['seconds']['prune']} |"
        )
    lines += ["", "Settings:", ""]
    lines += [f"- {k}: {v}" for k, v in s.items()]
    lines += [
        f"- machine: {env['cpu']} ({env['machine']})",
        f"- versions: llmlite {env['llmlite']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"Python {env['python']}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16, help="2,048-token evaluation windows (default 16)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--targets", default="0.5,2:4", help="sparsities and N:M patterns (default 0.5,2:4)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    start = time.perf_counter()
    out = run(a)
    out["settings"]["total_seconds"] = round(time.perf_counter() - start, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prune.json").write_text(json.dumps(out, indent=2) + "\n")
    (OUT / "prune.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
