"""Low-rank quality: perplexity of the bundled SmolLM2-135M after plain SVD, ASVD and SVD-LLM
factorisation at 80% and 60% of the decoder linears' weights kept, beside the dense model, from
one calibration set.

    .venv/bin/python benchmarks/lowrank.py [--windows 16] [--samples 128] [--seqlen 512] \
        [--ratios 0.8,0.6] [--methods svd,asvd,svd-llm] [--allocations global]

Perplexity follows the GPTQ/AWQ protocol on the bundled WikiText-2 raw test split (non-overlapping
2,048-token windows, the first ``--windows``); calibration: ``calibration.calibration_set`` on the
default calibration text (the bundled WikiText-2 validation split), the same windows for every
method (plain SVD reads none). Each row is the factorised model in memory (two linears per
factorised weight, float16-rounded factors as saved), so the perplexity is the saved folder's.
Factorisation time is the statistics walk, the spectra and the factors (model loading excluded).
Writes docs/benchmarks/lowrank.md and lowrank.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from llmlite.calibration import calibration_set
from llmlite.data import DEFAULT_CALIBRATION, eval_windows, load_text, tokenize
from llmlite.evaluation.perplexity import perplexity
from llmlite.lowrank import METHODS, LowrankSettings, factorize_model
from llmlite.models import load_model
from llmlite.quant.checkpoint import round_unquantized
from llmlite.runinfo import environment

ROOT = Path(__file__).resolve().parent.parent  # not put on sys.path: its kernels/ would shadow a package
OUT = ROOT / "docs" / "benchmarks"


def run(a: argparse.Namespace) -> dict:
    model, tokenizer = load_model("smollm2-135m")
    windows = eval_windows(tokenize(tokenizer, load_text("wikitext2")), 2048, a.windows)
    calibration = calibration_set(DEFAULT_CALIBRATION, model, tokenizer, a.samples, a.seqlen, 0, not a.quiet)
    total = sum(p.numel() for p in model.parameters())
    rows = [_row("dense", "-", "-", model, windows, 0.0, None, total)]
    print(_line(rows[-1]), flush=True)
    for ratio in (float(r) for r in a.ratios.split(",")):
        for allocation in a.allocations.split(","):
            for method in a.methods.split(","):
                factorised = copy.deepcopy(model)
                settings = LowrankSettings(method, ratio, allocation=allocation)
                start = time.perf_counter()
                report = factorize_model(factorised, settings, calibration, progress=not a.quiet)
                seconds = time.perf_counter() - start
                round_unquantized(factorised, torch.float16)  # what the saved folder reloads to
                params = sum(p.numel() for p in factorised.parameters())
                rows.append(_row(method, ratio, allocation, factorised, windows, seconds, report, params))
                print(_line(rows[-1]), flush=True)
                del factorised
    settings = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct, float32; factors rounded to float16)",
        "eval": f"wikitext2 raw test, {len(windows)} windows x 2048 tokens, {windows.shape[0] * 2047} scored",
        "calibration": f"{DEFAULT_CALIBRATION}, {a.samples} windows x {a.seqlen} tokens, seed 0",
        "threads": torch.get_num_threads(),
    }
    return {"settings": settings, "rows": rows, "environment": environment()}


def _row(method, ratio, allocation, model, windows, seconds: float, report, params: int) -> dict:
    start = time.perf_counter()
    result = perplexity(model, windows, progress=False)
    return {
        "method": method,
        "ratio": ratio,
        "allocation": allocation,
        "kept": None if report is None else report.kept,
        "factorised": None if report is None else len(report.ranks),
        "linears": None if report is None else len(report.modules),
        "params": params,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "seconds": {"factorise": round(seconds, 1), "eval": round(time.perf_counter() - start, 1)},
    }


def _line(r: dict) -> str:
    return (
        f"{r['method']} {r['ratio']} {r['allocation']}: perplexity {r['perplexity']:.2f}, "
        f"factorise {r['seconds']['factorise']} s"
    )


def markdown(out: dict) -> str:
    s, env = out["settings"], out["environment"]
    lines = [
        "# Low-rank factorisation: SmolLM2-135M at 80% and 60% of the decoder linears' weights",
        "",
        "Written by `benchmarks/lowrank.py`. Methods and options: [docs/lowrank.md](../lowrank.md). "
        "Perplexity only: no speed is measured here.",
        "",
        "| method | ratio | allocation | weights kept (linears) | factorised | parameters (model) | "
        "WikiText-2 perplexity | factorise s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in out["rows"]:
        kept = "–" if r["kept"] is None else f"{r['kept']:.2%}"
        count = "–" if r["factorised"] is None else f"{r['factorised']} / {r['linears']}"
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['allocation']} | {kept} | {count} | {r['params']:,} | "
            f"{r['perplexity']:.2f} | {r['seconds']['factorise']} |"
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
    p.add_argument(
        "--ratios", default="0.8,0.6", help="fractions of the linears' weights kept (default 0.8,0.6)"
    )
    p.add_argument("--allocations", default="global", help="global, uniform or both (default global)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args()
    start = time.perf_counter()
    out = run(a)
    out["settings"]["total_seconds"] = round(time.perf_counter() - start, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lowrank.json").write_text(json.dumps(out, indent=2) + "\n")
    (OUT / "lowrank.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
