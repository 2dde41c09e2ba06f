"""Quality, memory and decode speed of llmlite's quantized KV cache on the bundled model, beside
transformers' own ``QuantizedCache`` (HQQ and quanto back ends) in the same process.

    .venv/bin/python benchmarks/kvcache.py [--windows 4] [--long-windows 1] [--peers .bench/kv-peers]

Perplexity is read back through the cache (each window's first ``prefill`` tokens fill it, the
rest is scored ``chunk`` tokens at a time against it), on WikiText-2 raw test at 2,048 tokens and
at 8,192 (long context). Cache bytes are counted from the tensors each cache holds after the last
token of a window. The peers are installed into ``--peers`` (``pip install --target``) on first
use. Results are cached in ``.bench/kvcache-results.json``; the table goes to
``docs/benchmarks/kvcache.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH = ROOT / ".bench"
PEERS = BENCH / "kv-peers"
PEER_PACKAGES = ["optimum-quanto==0.2.7", "hqq==0.2.8.post1", "termcolor"]

# name, cache (ours: its scheme), bits, group, residual, sinks
OURS = [
    ("llmlite 16-bit (float16 cache)", "ours", 16, 64, 0, 0),
    ("llmlite 8-bit g64 r0", "kivi", 8, 64, 0, 0),
    ("llmlite 4-bit g64 r32 s4 (default)", "kivi", 4, 64, 32, 4),
    ("llmlite 4-bit g64 r0 (kv-4bit recipe)", "kivi", 4, 64, 0, 0),
    ("llmlite 4-bit salient g128 r0 s4", "salient", 4, 128, 0, 4),
    ("llmlite 2-bit salient g64 r32 s4 (default)", "salient", 2, 64, 32, 4),
    ("llmlite 2-bit salient g128 r0 s4 (kv-2bit recipe)", "salient", 2, 128, 0, 4),
    ("llmlite 2-bit kivi g64 r32 s4", "kivi", 2, 64, 32, 4),
    ("llmlite 2-bit kivi g64 r0", "kivi", 2, 64, 0, 0),
    ("llmlite 2-bit kivi g32 r128 s4", "kivi", 2, 32, 128, 4),
]
SPEED_RUNS = {  # rows whose decode speed is measured too, after transformers' default cache
    "llmlite 16-bit (float16 cache)",
    "llmlite 4-bit g64 r32 s4 (default)",
    "llmlite 4-bit g64 r0 (kv-4bit recipe)",
    "llmlite 2-bit salient g64 r32 s4 (default)",
    "llmlite 2-bit salient g128 r0 s4 (kv-2bit recipe)",
    "llmlite 2-bit kivi g64 r32 s4",
    "transformers HQQ 4-bit g64 r32",
}
SLOW_LONG = (
    "HQQ was not run at 8,192 tokens: transformers re-quantizes the whole cache each time its residual "
    "fills, with HQQ's iterative optimizer, which took 91 s per 2,048-token window here and grows with "
    "the square of the length."
)
PEER_RUNS = [
    ("transformers HQQ 4-bit g64 r32", "hqq", 4, 64, 32, 0),
    ("transformers HQQ 2-bit g64 r32", "hqq", 2, 64, 32, 0),
    ("transformers quanto 4-bit g64 r32", "quanto", 4, 64, 32, 0),
    ("transformers quanto 2-bit g64 r32", "quanto", 2, 64, 32, 0),
]


def ensure_peers(target: Path) -> None:
    if not (target / "hqq").exists():
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
        subprocess.run([*pip, *PEER_PACKAGES], check=True)
    sys.path.insert(0, str(target))


def make_cache(model, tokenizer, kind: str, bits: int, group: int, residual: int, sinks: int):
    from transformers import QuantizedCache

    from llmlite.kvcache.cache import KVSpec, kv_cache_for

    if kind in ("ours", "kivi", "salient"):
        scheme = "auto" if kind == "ours" else kind
        return kv_cache_for(model, KVSpec(bits, group, residual, sinks, scheme=scheme), tokenizer)
    if kind == "dynamic":
        from transformers import DynamicCache

        return DynamicCache()
    # transformers' documented axes: quanto quantizes along axis 0, HQQ along axis 1
    axis = 0 if kind == "quanto" else 1
    return QuantizedCache(
        backend=kind,
        config=model.config,
        nbits=bits,
        q_group_size=group,
        residual_length=residual,
        axis_key=axis,
        axis_value=axis,
    )


def decode_speed(model, tokenizer, prompt_ids, kind, bits, group, residual, sinks, new_tokens, repeats):
    """Median decode tokens/s: (time for prompt + N tokens − time for prompt + 1 token) / (N − 1)."""

    def timed(n: int) -> float:
        cache = make_cache(model, tokenizer, kind, bits, group, residual, sinks)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                prompt_ids,
                attention_mask=torch.ones_like(prompt_ids),
                cache=cache,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        return time.perf_counter() - start

    timed(4)  # warm-up
    rates = [(new_tokens - 1) / (timed(new_tokens) - timed(1)) for _ in range(repeats)]
    return statistics.median(rates)


def markdown(results: dict, env: dict, settings: dict) -> str:
    lines = [
        "# KV-cache quantization: llmlite against transformers' QuantizedCache",
        "",
        "Generated by `benchmarks/kvcache.py`; do not edit by hand.",
        "",
        "- Model: bundled SmolLM2-135M-Instruct (float32 on the CPU; 30 layers, 3 KV heads of 64).",
        f"- Machine: {env['cpu']}, {env['threads']} thread(s); torch {env['torch']}, transformers "
        f"{env['transformers']}, optimum-quanto {settings['quanto']}, hqq {settings['hqq']}; llmlite "
        f"commit {settings['commit']}.",
        f"- Perplexity through the cache on WikiText-2 raw test: {settings['windows']} windows of 2,048 "
        f"tokens (prefill {settings['prefill']}, chunks of {settings['chunk']}) and "
        f"{settings['long_windows']} of 8,192 (prefill {settings['long_prefill']}, chunks of "
        f"{settings['long_chunk']}); only tokens after the prefill are scored, each chunk reading "
        "everything before it from the cache.",
        "- Bytes: every tensor the cache holds after the window's last token (storages counted once), "
        "against a float16 cache of the same tokens (2 bytes per key and value element). "
        "transformers' caches keep their full-precision residual in the model's dtype (float32 here).",
        "- Schemes (docs/kvcache.md): KIVI (the default at 4 and 8 bits) quantizes keys per channel in "
        "groups of `g` tokens and values per token in groups of `g` channels; salient (the default at 2 "
        "bits) quantizes keys per token after a per-channel normalisation, with the 20% of key channels "
        "that matter most (query energy × variance) at twice the bits, and values per token in groups "
        "of `g` channels after a Hadamard rotation within each head.",
        "- `g` = group size, `r` = recent tokens kept in "
        "full precision, `s` = first tokens kept in full precision (sinks). transformers' caches: its "
        "documented axes (quanto 0, HQQ 1), the same group and residual. " + SLOW_LONG,
        "",
        "| cache | ppl 2k | vs 16-bit | bytes/token 2k | smaller than fp16 (2k) | ppl 8k | vs 16-bit | "
        "smaller than fp16 (8k) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = results.get(OURS[0][0], {})
    for name, *_ in OURS + PEER_RUNS:
        r = results.get(name)
        if not r:
            continue
        row = [name]
        for key in ("short", "long"):
            q = r.get(key)
            if not q:
                row += ["not run (slow)"] + ["n/a"] * (3 if key == "short" else 2)
                continue
            b = base.get(key, {}).get("perplexity")
            change = f"{(q['perplexity'] / b - 1) * 100:+.1f}%" if b else ""
            if key == "short":
                row += [
                    f"{q['perplexity']:.3f}",
                    change,
                    f"{q['bytes'] / q['tokens']:.0f}",
                    f"{q['ratio']:.2f}x",
                ]
            else:
                row += [f"{q['perplexity']:.3f}", change, f"{q['ratio']:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"## Decode speed (batch 1, {settings['prompt']}-token prompt, {settings['new_tokens']} new tokens, "
        f"median of {settings['repeats']})",
        "",
        "| cache | decode tokens/s | vs transformers' default cache |",
        "| --- | ---: | ---: |",
    ]
    speeds = results.get("speed", {})
    default = speeds.get("transformers DynamicCache (float32)")
    for name, rate in speeds.items():
        lines.append(
            f"| {name} | {rate:.1f} | {rate / default:.2f}x |" if default else f"| {name} | {rate:.1f} | |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4, help="2,048-token windows")
    p.add_argument("--long-windows", type=int, default=1, help="8,192-token windows")
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--long-prefill", type=int, default=1024)
    p.add_argument("--long-chunk", type=int, default=128)
    p.add_argument("--peers", type=Path, default=PEERS)
    p.add_argument("--skip", nargs="*", default=[], help="cache kinds to leave out (e.g. quanto)")
    p.add_argument("--only", nargs="*", help="run names to (re)run")
    a = p.parse_args()
    ensure_peers(a.peers)

    from importlib.metadata import version

    from llmlite.data import eval_windows, load_text, tokenize
    from llmlite.kvcache.evaluate import cached_perplexity
    from llmlite.models import load_model
    from llmlite.runinfo import environment

    BENCH.mkdir(exist_ok=True)
    store = BENCH / "kvcache-results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenize(tokenizer, load_text("wikitext2"))
    short = eval_windows(ids, 2048, a.windows)
    long = eval_windows(ids, 8192, a.long_windows)
    for name, kind, bits, group, residual, sinks in OURS + PEER_RUNS:
        if kind in a.skip or (a.only and name not in a.only):
            continue
        row = {} if a.only else results.get(name, {})
        for key, windows, prefill, chunk in (
            ("short", short, a.prefill, a.chunk),
            ("long", long, a.long_prefill, a.long_chunk),
        ):
            if key in row or (key == "long" and kind == "hqq"):  # HQQ: see SLOW_LONG
                continue
            start = time.perf_counter()
            r = cached_perplexity(
                model,
                windows,
                lambda spec=(kind, bits, group, residual, sinks): make_cache(model, tokenizer, *spec),
                prefill,
                chunk,
                True,
            )
            row[key] = {
                "perplexity": r.perplexity,
                "bytes": r.cache_bytes,
                "tokens": r.ctx,
                "ratio": r.ratio_to_float16,
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(name, key, row[key], flush=True)
            results[name] = row
            store.write_text(json.dumps(results, indent=2))

    if "speed" not in results or a.only:
        prompt = short[0, :512][None]
        default = ("transformers DynamicCache (float32)", "dynamic", 16, 0, 0, 0)
        runs = [default, *(row for row in OURS + PEER_RUNS if row[0] in SPEED_RUNS)]
        results["speed"] = {
            name: decode_speed(model, tokenizer, prompt, kind, bits, g, r, s, 128, 3)
            for name, kind, bits, g, r, s in runs
            if kind not in a.skip
        }
        print(results["speed"], flush=True)
        store.write_text(json.dumps(results, indent=2))

    settings = {
        "windows": a.windows,
        "long_windows": a.long_windows,
        "prefill": a.prefill,
        "chunk": a.chunk,
        "long_prefill": a.long_prefill,
        "long_chunk": a.long_chunk,
        "prompt": 512,
        "new_tokens": 128,
        "repeats": 3,
        "quanto": version("optimum-quanto"),
        "hqq": version("hqq"),
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
    }
    env = environment()
    out = ROOT / "docs" / "benchmarks" / "kvcache.md"
    text = markdown(results, env, settings)
    out.write_text(text)
    (out.with_suffix(".json")).write_text(
        json.dumps({"results": results, "settings": settings, "environment": env}, indent=2)
    )
    print(text)


if __name__ == "__main__":
    main()
