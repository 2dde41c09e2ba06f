"""Structured pruning: perplexity, parameters and latency of the bundled SmolLM2-135M after removing
MLP channels, key/value groups of heads, or decoder layers at 10, 20 and 30% of the decoder
parameters, beside the dense model, from one calibration set.

    .venv/bin/python benchmarks/structured.py [--windows 16] [--samples 128] [--seqlen 512] \
        [--sparsities 0.1,0.2,0.3] [--structures channels,heads,layers] [--prompt 128] [--decode 32] \
        [--recover-tokens 16384] [--recover-lr 3e-4]

Perplexity follows the GPTQ/AWQ protocol on the bundled WikiText-2 raw test split (non-overlapping
2,048-token windows, the first ``--windows``); calibration: 128 × 512 windows of the bundled
WikiText-2 validation split, seed 0, as in ``benchmarks/prune.py`` and ``lowrank.py``, the same for
every row. Each row is the pruned model in memory (float32 holding the float16-rounded weights, as
``llmlite prune --structure`` saves and plain transformers reloads), so its perplexity is the saved
folder's. Latency: batch 1, greedy, ``evaluation.efficiency.latency`` (prefill of ``--prompt``
random tokens, then ``--decode`` steps; median of 5 runs after a warm-up), every row in this process
on this machine's threads; ``benchmarks/shrink_speed.py`` measures the saved folders with rounds
alternated. A target the model cannot take (heads at 30% of SmolLM2-135M: 3 key/value groups of
8.3% each) is a row saying why. Recovery: each pruned model is then evaluated again after
``llmlite prune --recover-tokens`` (the same function, ``pruning.api.recover``): distillation from the
dense model, every weight trained, on ``--recover-tokens`` tokens of the calibration text drawn with
seed 1 (not the pruning windows); its time is reported beside the pruning's.
Writes docs/benchmarks/structured.md and structured.json (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from llmlite.calibration import calibration_set
from llmlite.data import DEFAULT_CALIBRATION, eval_windows, load_text, tokenize
from llmlite.errors import LlmliteError
from llmlite.evaluation.efficiency import LatencySettings, latency
from llmlite.evaluation.perplexity import perplexity
from llmlite.models import load_model
from llmlite.pruning import STRUCTURES, PruneConfig, check_structured, prune_structured
from llmlite.pruning.api import RECOVERY_LR, recover
from llmlite.pruning.shrink import decoder_params
from llmlite.quant.checkpoint import round_unquantized
from llmlite.runinfo import environment

ROOT = Path(__file__).resolve().parent.parent  # not put on sys.path: its kernels/ would shadow a package
OUT = ROOT / "docs" / "benchmarks"


def run(a: argparse.Namespace) -> dict:
    model, tokenizer = load_model(a.model)
    windows = eval_windows(tokenize(tokenizer, load_text("wikitext2")), a.ctx, a.windows)
    calibration = calibration_set(a.calibration, model, tokenizer, a.samples, a.seqlen, 0, not a.quiet)
    timing = LatencySettings(prompt_tokens=a.prompt, decode_tokens=a.decode, batch_sizes=(1,))
    latency(model, timing)  # the process's first runs (allocator, thread pools) are not the dense row's
    rows = [_row("dense", None, model, windows, timing, None, 0.0)]
    print(_line(rows[-1]), flush=True)
    for structure in a.structures.split(","):
        for sparsity in (float(s) for s in a.sparsities.split(",")):
            pruned = copy.deepcopy(model)
            try:
                plan = check_structured(pruned, structure, sparsity)
            except LlmliteError as e:
                rows.append({"structure": structure, "target": sparsity, "refused": str(e)})
                print(f"{structure} {sparsity}: {e}", flush=True)
                continue
            start = time.perf_counter()
            report = prune_structured(pruned, plan, calibration, progress=not a.quiet)
            seconds = time.perf_counter() - start
            round_unquantized(pruned, torch.float16)  # what the saved folder reloads to
            rows.append(_row(structure, sparsity, pruned, windows, timing, report, seconds))
            print(_line(rows[-1]), flush=True)
            if a.recover_tokens:
                rows[-1]["recovered"] = _recovered(pruned, model, tokenizer, windows, structure, sparsity, a)
                print(f"  recovered: perplexity {rows[-1]['recovered']['perplexity']:.2f}", flush=True)
            del pruned
    settings = {
        "model": f"{a.model} (float32; weights rounded to float16 as saved)",
        "eval": f"wikitext2 raw test, {len(windows)} windows x {a.ctx} tokens, "
        f"{windows.shape[0] * (a.ctx - 1)} scored",
        "calibration": f"{a.calibration}, {a.samples} windows x {a.seqlen} tokens, seed 0",
        "latency": f"batch 1, {a.prompt}-token prompt, {a.decode} decode steps, median of 5 after a warm-up",
        "threads": torch.get_num_threads(),
        "recovery": (
            f"distillation from the dense model, every weight trained, {a.recover_tokens:,} tokens of "
            f"{a.calibration} ({math.ceil(a.recover_tokens / a.seqlen)} windows x {a.seqlen}, seed 1), "
            f"batch 4, AdamW lr {a.recover_lr:g} cosine to 0, weights rounded to float16 after"
            if a.recover_tokens
            else "none"
        ),
    }
    return {"settings": settings, "rows": rows, "environment": environment()}


def _row(structure, target, model, windows, timing, report, seconds: float) -> dict:
    start = time.perf_counter()
    result = perplexity(model, windows, progress=False)
    evaluated = time.perf_counter() - start
    timed = latency(model, timing)["batches"][0]
    config = {} if report is None else {k: v[1] for k, v in report.config.items()}
    return {
        "structure": structure,
        "target": target,
        "removed": 0.0 if report is None else report.removed_fraction,
        "decoder_params": decoder_params(model),
        "params": sum(p.numel() for p in model.parameters()),
        "config": config,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "prefill_ms": timed["prefill"]["p50_ms"],
        "decode_ms": timed["decode"]["p50_ms"],
        "decode_tokens_per_s": timed["decode_tokens_per_s"],
        "seconds": {"prune": round(seconds, 1), "eval": round(evaluated, 1)},
    }


def _recovered(pruned, dense, tokenizer, windows, structure, sparsity, a) -> dict:
    """Perplexity of ``pruned`` after ``llmlite prune --recover-tokens``'s distillation from ``dense``."""
    options = {"structure": structure, "sparsity": sparsity, "calibration": a.calibration, "seqlen": a.seqlen}
    cfg = PruneConfig(**options, recover_tokens=a.recover_tokens, recover_lr=a.recover_lr).validate()
    record = recover(pruned, dense, tokenizer, cfg, progress=not a.quiet)
    round_unquantized(pruned, torch.float16)  # what the saved folder reloads to
    result = perplexity(pruned, windows, progress=False)
    return {
        "perplexity": result.perplexity,
        "nll": result.nll,
        "kl_first": record["loss_first"],
        "kl_last_tenth": record["loss_last_tenth"],
        "steps": record["steps"],
        "seconds": record["seconds"],
    }


def _line(r: dict) -> str:
    return (
        f"{r['structure']} {r['target']}: {r['removed']:.2%} removed, perplexity {r['perplexity']:.2f}, "
        f"prefill {r['prefill_ms']:.1f} ms, decode {r['decode_ms']:.2f} ms/token, "
        f"prune {r['seconds']['prune']} s"
    )


def markdown(out: dict) -> str:
    s, env = out["settings"], out["environment"]
    dense = out["rows"][0]
    lines = [
        "# Structured pruning: MLP channels, key/value groups, decoder layers at 10, 20 and 30%",
        "",
        "Written by `benchmarks/structured.py`. Method and options: [docs/prune.md](../prune.md). "
        "Recovery: see Settings. Speed-ups are relative to the dense row of the same run; recovery "
        "changes no shape, so the latency is the same after it.",
        "",
        "| structure | target | decoder params removed | parameters (model) | config | "
        "WikiText-2 perplexity | after recovery | prefill ms | decode ms/token | speed-up prefill / decode | "
        "prune s | recovery s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        target = "–" if r["target"] is None else f"{r['target']:.0%}"
        if "refused" in r:
            lines.append(f"| {r['structure']} | {target} | refused: {r['refused']} | | | | | | | | | |")
            continue
        config = ", ".join(f"`{k}` {v}" for k, v in r["config"].items()) or "–"
        speed = f"{dense['prefill_ms'] / r['prefill_ms']:.2f}x / {dense['decode_ms'] / r['decode_ms']:.2f}x"
        recovered = r.get("recovered")
        after, seconds = (
            ("–", "–") if recovered is None else (f"{recovered['perplexity']:.2f}", recovered["seconds"])
        )
        lines.append(
            f"| {r['structure']} | {target} | {r['removed']:.2%} | {r['params']:,} | {config} | "
            f"{r['perplexity']:.2f} | {after} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {speed} | "
            f"{r['seconds']['prune']} | {seconds} |"
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
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows (default 16)")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per evaluation window (default 2048)")
    p.add_argument("--structures", default=",".join(STRUCTURES))
    p.add_argument("--sparsities", default="0.1,0.2,0.3", help="fractions of the decoder parameters removed")
    p.add_argument(
        "--calibration",
        default=DEFAULT_CALIBRATION,
        help="calibration text (default: wikitext2-valid, as prune.py's)",
    )
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--prompt", type=int, default=128, help="latency: prompt tokens (default 128)")
    p.add_argument("--decode", type=int, default=32, help="latency: decode steps (default 32)")
    p.add_argument(
        "--recover-tokens",
        type=int,
        default=16384,
        help="recovery distillation tokens, 0: none (default 16384)",
    )
    p.add_argument("--recover-lr", type=float, default=RECOVERY_LR)
    p.add_argument("--out", type=Path, default=OUT, help="folder for structured.md and .json")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    start = time.perf_counter()
    out = run(a)
    out["settings"]["total_seconds"] = round(time.perf_counter() - start, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "structured.json").write_text(json.dumps(out, indent=2) + "\n")
    (a.out / "structured.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
