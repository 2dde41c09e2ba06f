"""Speed of pruned and factorised models on the CPU: prefill, decode and peak memory of the outputs of
``llmlite prune`` (zeros, N:M, MLP channels, key/value groups, layers) and ``llmlite lowrank``
beside the dense model, each loaded from its saved folder and run through the same path.

    .venv/bin/python benchmarks/shrink_speed.py [--prompt 128] [--new-tokens 64] [--rounds 5] [--threads 2]

Batch 1, greedy, llmlite's lean decode loop (eager) in one process; every model runs once per round,
rounds alternate the models, the table quotes medians and ratios to the dense model of the same
rounds. Prefill: one forward over a random prompt; decode: tokens/s after the first new token. Peak
RSS: a fresh process per model that loads it and decodes 16 tokens (``benchmarks/speed.py``'s). The
folders are built once in .bench/shrink with the CLI: the zeros with magnitude pruning (a dense
layer's speed does not depend on which weights are zero), the structured and low-rank models from
32 × 512 WikiText-2 validation windows (the shapes, not the quality, set the speed: see
docs/benchmarks/structured.md and lowrank.md for the quality). Writes docs/benchmarks/shrink_speed.md
and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # not ROOT: its kernels/ would shadow a package

import torch  # noqa: E402
from speed import lean, peak_rss  # noqa: E402  (the same lean-loop timing and fresh-process RSS)

from llmlite.models import load_model  # noqa: E402
from llmlite.runinfo import environment  # noqa: E402

BENCH = ROOT / ".bench" / "shrink"
OUT = ROOT / "docs" / "benchmarks"
CALIBRATION = ["--calibration", "wikitext2-valid", "--samples", "32"]
# name -> the llmlite command that writes its folder (None: the bundled dense model)
MODELS: dict[str, list[str] | None] = {
    "dense": None,
    "50% zeros": ["prune", "--method", "magnitude", "--sparsity", "0.5"],
    "2:4 zeros": ["prune", "--method", "magnitude", "--pattern", "2:4"],
    "MLP channels −20%": ["prune", "--structure", "channels", "--sparsity", "0.2", *CALIBRATION],
    "KV groups −20%": ["prune", "--structure", "heads", "--sparsity", "0.2", *CALIBRATION],
    "layers −20%": ["prune", "--structure", "layers", "--sparsity", "0.2", *CALIBRATION],
    "SVD-LLM 80%": ["lowrank", "--method", "svd-llm", "--ratio", "0.8", *CALIBRATION],
    "SVD-LLM 60%": ["lowrank", "--method", "svd-llm", "--ratio", "0.6", *CALIBRATION],
    "SVD-LLM 60%, merged": ["lowrank", "--method", "svd-llm", "--ratio", "0.6", "--merge", *CALIBRATION],
}


def folder(name: str) -> str:
    """The model's source for ``load_model``: built once with the CLI."""
    command = MODELS[name]
    if command is None:
        return "smollm2-135m"
    out = BENCH / name.replace(" ", "-").replace("%", "").replace(":", "of").replace("−", "minus-").lower()
    out = out.with_name(out.name.replace(",", ""))
    if not out.exists():
        cmd = [sys.executable, "-m", "llmlite.cli", *command, "--output", str(out), "--quiet"]
        subprocess.run(cmd, check=True)
    return str(out)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def markdown(rows: list[dict], settings: dict, env: dict) -> str:
    lines = [
        "# Speed of pruned and factorised models on the CPU",
        "",
        "Written by `benchmarks/shrink_speed.py`; do not edit by hand.",
        "",
        f"- Machine: {env['cpu']} ({settings['isa']}), {settings['threads']} threads; torch {env['torch']}, "
        f"transformers {env['transformers']}; llmlite commit {settings['commit']}.",
        f"- Bundled SmolLM2-135M-Instruct, float32; batch 1, a {settings['prompt']}-token prompt, "
        f"{settings['new_tokens']} new tokens, greedy, llmlite's lean loop (eager); {settings['rounds']} "
        "rounds alternating the models, medians; × dense: the ratio to the dense model's median.",
        "- Each model loaded from the folder the CLI wrote (commands in the json). Peak RSS: a fresh "
        "process that loads the model and decodes 16 tokens.",
        "",
        "| model | parameters | prefill ms | × dense | decode tokens/s | × dense | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dense = rows[0]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} M | {1000 * r['prefill_s']:.0f} | "
            f"{dense['prefill_s'] / r['prefill_s']:.2f} | {r['decode_tps']:.1f} | "
            f"{r['decode_tps'] / dense['decode_tps']:.2f} | {r['peak_rss'] / 2**20:.0f} MiB |"
        )
    lines += ["", *settings["notes"], ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    BENCH.mkdir(parents=True, exist_ok=True)
    sources = {name: folder(name) for name in MODELS}
    torch.set_num_threads(a.threads)
    models = {name: load_model(source)[0] for name, source in sources.items()}
    vocab = models["dense"].config.vocab_size
    ids = torch.randint(0, vocab, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    for model in models.values():  # warm-up: allocator and thread pools, not a model's first round
        lean(model, ids, a.new_tokens, False)
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for i in range(a.rounds):
        for name, model in models.items():
            runs[name].append(lean(model, ids, a.new_tokens, False))
            print(i, name, runs[name][-1], flush=True)
    rows = []
    for name, model in models.items():
        rows.append(
            {
                "model": name,
                "command": MODELS[name],
                "params": params(model),
                "prefill_s": statistics.median(r["prefill_s"] for r in runs[name]),
                "decode_tps": statistics.median(r["decode_tps"] for r in runs[name]),
                "rounds": runs[name],
                **peak_rss(sources[name], a.prompt),
            }
        )
    env = environment()
    embedding = models["dense"].get_input_embeddings().weight.numel()
    flags = Path("/proc/cpuinfo").read_text()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    settings = {
        "prompt": a.prompt,
        "new_tokens": a.new_tokens,
        "rounds": a.rounds,
        "threads": a.threads,
        "isa": "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2",
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "notes": [
            "Zeros (unstructured and 2:4) are dense tensors: the same work and the same memory as the "
            "dense model, so no speed-up; torch's 2:4 semi-structured kernels exist on CUDA only and "
            "were not measured (no GPU here).",
            f"The embedding and the tied head ({embedding / 1e6:.1f} M of {rows[0]['params'] / 1e6:.1f} M "
            f"parameters) are never pruned or factorised, and the head's {vocab:,}-wide matrix product is "
            "a fixed share of every step.",
        ],
    }
    out = {"settings": settings, "rows": rows, "environment": env}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "shrink_speed.json").write_text(json.dumps(out, indent=2) + "\n")
    (OUT / "shrink_speed.md").write_text(markdown(rows, settings, env))
    print(markdown(rows, settings, env))


if __name__ == "__main__":
    main()
