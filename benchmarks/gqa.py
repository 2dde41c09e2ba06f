"""GQA conversion quality: perplexity of the bundled SmolLM2-135M after merging its 3 key/value heads
into 1 (multi-query attention), by each method, without and with uptraining, and the KV-cache size.

    .venv/bin/python benchmarks/gqa.py [--windows 8] [--uptrain-tokens 16384] [--lr 3e-4] [--samples 16]

Perplexity follows the GPTQ/AWQ protocol on the bundled WikiText-2 raw test split (non-overlapping
2,048-token windows, the first ``--windows`` of them). Calibration and uptraining text: the bundled
WikiText-2 validation split (no overlap with the test split). Everything runs in one process, one
row after the other, from the same loaded model; writes docs/benchmarks/gqa.md and gqa.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from llmlite.data import DEFAULT_CALIBRATION, calibration_windows, eval_windows, load_text, tokenize
from llmlite.evaluation.perplexity import perplexity
from llmlite.gqa import convert_gqa, kv_cache_bytes_per_token, uptrain
from llmlite.models import load_model
from llmlite.runinfo import environment

ROOT = Path(__file__).resolve().parent.parent  # not put on sys.path: its kernels/ would shadow a package
OUT = ROOT / "docs" / "benchmarks"


def run(a: argparse.Namespace) -> dict:
    model, tokenizer = load_model("smollm2-135m")
    windows = eval_windows(tokenize(tokenizer, load_text("wikitext2")), 2048, a.windows)
    ids = tokenize(tokenizer, load_text(DEFAULT_CALIBRATION))
    calibration = calibration_windows(ids, a.samples, a.seqlen, seed=0)
    train = calibration_windows(ids, math.ceil(a.uptrain_tokens / a.seqlen), a.seqlen, seed=1)
    rows = [_row("original", 0, model, windows, {"convert": 0.0})]
    print(_line(rows[-1]), flush=True)
    for method in a.methods.split(","):
        start = time.perf_counter()
        merged = copy.deepcopy(model)
        convert_gqa(merged, 1, method, calibration, progress=False)
        seconds = {"convert": time.perf_counter() - start}
        rows.append(_row(method, 0, merged, windows, seconds))
        print(_line(rows[-1]), flush=True)
        if method not in a.uptrain_methods.split(","):
            continue
        start = time.perf_counter()
        losses = uptrain(merged, model, train, a.lr, a.batch_size, "attention", seed=0, progress=not a.quiet)
        seconds["uptrain"] = time.perf_counter() - start
        rows.append(_row(method, train.numel(), merged, windows, seconds, losses))
        print(_line(rows[-1]), flush=True)
        del merged
    settings = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct, float32)",
        "eval": f"wikitext2 raw test, {len(windows)} windows x 2048 tokens, {windows.shape[0] * 2047} scored",
        "calibration": f"{DEFAULT_CALIBRATION}, {a.samples} windows x {a.seqlen} tokens, seed 0",
        "uptraining": f"{DEFAULT_CALIBRATION}, {train.numel()} tokens ({len(train)} windows x {a.seqlen}, "
        f"seed 1), batch {a.batch_size}, {math.ceil(len(train) / a.batch_size)} steps, AdamW lr {a.lr} "
        "cosine to 0, KL(teacher || student), q/k/v/o trained",
        "threads": torch.get_num_threads(),
    }
    return {"settings": settings, "rows": rows, "environment": environment()}


def _row(method, tokens, model, windows, seconds, losses=None) -> dict:
    start = time.perf_counter()
    result = perplexity(model, windows, progress=False)
    return {
        "method": method,
        "kv_heads": model.config.num_key_value_heads,
        "uptrain_tokens": tokens,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "kv_cache_bytes_per_token_fp16": kv_cache_bytes_per_token(model.config),
        "uptrain_kl_first": losses[0] if losses else None,
        "uptrain_kl_last": losses[-1] if losses else None,
        "seconds": {
            **{k: round(v, 1) for k, v in seconds.items()},
            "eval": round(time.perf_counter() - start, 1),
        },
    }


def _line(r: dict) -> str:
    up = f" + uptraining {r['uptrain_tokens']} tokens" if r["uptrain_tokens"] else ""
    return f"{r['method']}{up}: {r['kv_heads']} KV heads, perplexity {r['perplexity']:.2f}"


def markdown(out: dict) -> str:
    s, env = out["settings"], out["environment"]
    base = out["rows"][0]["perplexity"]
    lines = [
        "# GQA conversion: SmolLM2-135M, 3 → 1 key/value heads",
        "",
        "Written by `benchmarks/gqa.py`. Methods and options: [docs/gqa.md](../gqa.md).",
        "",
        "| model | KV heads | uptraining tokens | WikiText-2 perplexity | × original "
        "| KV cache, bytes/token (fp16) | uptraining KL first → last | convert s | uptrain s |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in out["rows"]:
        name = "original" if r["method"] == "original" else f"3 → 1, {r['method']}"
        kl = f"{r['uptrain_kl_first']:.3f} → {r['uptrain_kl_last']:.3f}" if r["uptrain_tokens"] else "–"
        lines.append(
            f"| {name} | {r['kv_heads']} | {r['uptrain_tokens'] or '–'} | {r['perplexity']:.2f} "
            f"| {r['perplexity'] / base:.2f} | {r['kv_cache_bytes_per_token_fp16']} | {kl} "
            f"| {r['seconds']['convert']} | {r['seconds'].get('uptrain', '–')} |"
        )
    lines += ["", "Settings:", ""]
    lines += [f"- {k}: {v}" for k, v in s.items()]
    lines += [
        f"- machine: {env['cpu']} ({env['machine']}), run pinned to one core "
        "(`taskset -c 1 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1`)",
        f"- versions: llmlite {env['llmlite']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"Python {env['python']}",
        "- KV cache bytes per token: 2 (keys and values) × 30 layers × KV heads × head_dim 64 × 2 bytes",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=8, help="2,048-token evaluation windows (default 8)")
    p.add_argument("--methods", default="mean,weighted,aligned")
    p.add_argument("--uptrain-methods", default="mean,weighted,aligned")
    p.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--uptrain-tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    start = time.perf_counter()
    out = run(a)
    out["settings"]["total_seconds"] = round(time.perf_counter() - start, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gqa.json").write_text(json.dumps(out, indent=2) + "\n")
    (OUT / "gqa.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
