"""Decode and prefill speed of llmlite on the CPU: the float32 model and its 4-bit checkpoint, through
transformers' ``generate`` and through llmlite's lean loop (eager and compiled), beside llama.cpp on
llmlite's GGUF export and on the bundled Q4_1 file, in the same run.

    .venv/bin/python benchmarks/speed.py [--prompt 128] [--new-tokens 128] [--rounds 3] [--threads 1 2]
        [--llama-python PATH]   # a Python with llama-cpp-python (optional; its rows are left out without)

Batch 1, greedy. Every configuration runs once per round, rounds alternate the configurations, and
the table quotes medians. Prefill: the forward over the prompt; decode: tokens per second after the
first new token. The 4-bit checkpoint is RTN 4-bit, group 32, symmetric (the grid llama.cpp's Q4_0
carries exactly; GPTQ of the same grid runs at the same speed). Peak RSS is measured in a fresh
process per model (load, then 16 tokens; the kernel's VmHWM). Writes ``docs/benchmarks/speed.md``
and ``.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH = ROOT / ".bench" / "speed"
CHECKPOINT, GGUF = BENCH / "rtn-w4g32-sym", BENCH / "rtn-w4g32-sym.Q4_0.gguf"
MODELS = {"float32": "smollm2-135m", "4-bit": str(CHECKPOINT)}

LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, new, ids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
ctx = len(ids) + new + 8  # scores has n_batch rows, indexed by position: n_batch = n_ctx
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=ctx, n_batch=ctx,
            verbose=False)
out = []
for _ in range(2):  # a warm-up, then the measured run
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    token = int(llm.scores[llm.n_tokens - 1].argmax())
    start = time.perf_counter()
    for _ in range(new - 1):
        llm.eval([token])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
    out.append({"prefill_s": prefill, "decode_tps": (new - 1) / (time.perf_counter() - start)})
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({**out[-1], "peak_rss": int(hwm.split()[1]) * 1024}))
"""

RSS_SCRIPT = r"""
import json, sys, torch
import llmlite
from llmlite.decode import decode
from llmlite.models import load_model
rss = next(line for line in open("/proc/self/status") if line.startswith("VmRSS"))
model, _ = load_model(sys.argv[1])
ids = torch.randint(0, model.config.vocab_size, (1, int(sys.argv[2])))
list(decode(model, ids, 16, lambda logits: logits.argmax(-1)))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"peak_rss": int(hwm.split()[1]) * 1024, "imports_rss": int(rss.split()[1]) * 1024}))
"""


def prepare_files() -> None:
    import llmlite

    if not CHECKPOINT.exists():
        llmlite.quantize(
            method="rtn", bits=4, group_size=32, sym=True, output=str(CHECKPOINT), progress=False
        )
    if not GGUF.exists():
        llmlite.export(model=str(CHECKPOINT), format="gguf", output=str(GGUF))


def lean(model, ids, new: int, compile: bool) -> dict:
    from llmlite.decode import decode

    tokens = decode(model, ids, new, lambda logits: logits.argmax(-1), compile=compile)
    start = time.perf_counter()
    next(tokens)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    rest = sum(1 for _ in tokens)
    return {"prefill_s": prefill, "decode_tps": rest / (time.perf_counter() - start)}


def transformers_generate(model, ids, new: int) -> dict:
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False
        )
        total = time.perf_counter() - start
    return {"prefill_s": prefill, "decode_tps": (new - 1) / max(total - prefill, 1e-9)}


def llama_cpp(python: str, path: Path, threads: int, new: int, ids) -> dict:
    args = [python, "-c", LLAMA_SCRIPT, str(path), str(threads), str(new), json.dumps(ids[0].tolist())]
    return json.loads(
        subprocess.run(args, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
    )


def peak_rss(source: str, prompt: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, source, str(prompt)], check=True, capture_output=True
    )
    return json.loads(out.stdout.decode().splitlines()[-1])


def markdown(rows: list[dict], env: dict, settings: dict) -> str:
    lines = [
        "# Speed on the CPU: float32 and 4-bit, transformers, llmlite's lean loop, llama.cpp",
        "",
        "Generated by `benchmarks/speed.py`; do not edit by hand.",
        "",
        f"- Machine: {env['cpu']} ({settings['isa']}); torch {env['torch']}, transformers "
        f"{env['transformers']}, llama-cpp-python {settings['llama_cpp'] or 'not installed'}; llmlite commit "
        f"{settings['commit']}.",
        f"- Bundled SmolLM2-135M-Instruct; batch 1, a {settings['prompt']}-token prompt, "
        f"{settings['new_tokens']} new tokens, greedy; {settings['rounds']} rounds alternating every "
        "configuration, medians.",
        "- 4-bit: RTN 4-bit, group 32, symmetric (Q4_0's grid); llmlite's `auto` backend chose per layer "
        f"shape: {settings['choices']}.",
        "- Prefill: one forward over the prompt. Decode: tokens/s after the first new token. Peak RSS: a "
        "fresh process that loads the model and decodes 16 tokens (llama.cpp: its benchmark process).",
        "",
        "| threads | model | runtime | prefill ms | decode tokens/s | decode × float32 transformers "
        "| decode × llama.cpp Q4_0 | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rss = f"{r['peak_rss'] / 2**20:.0f} MiB" if r.get("peak_rss") else ""
        q40 = f"{r['vs_llama_q4_0']:.2f}" if r.get("vs_llama_q4_0") else ""
        lines.append(
            f"| {r['threads']} | {r['model']} | {r['runtime']} | {1000 * r['prefill_s']:.0f} | "
            f"{r['decode_tps']:.1f} | {r['vs_float_transformers']:.2f} | {q40} | {rss} |"
        )
    lines += ["", *settings["notes"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--llama-python", default=None)
    args = parser.parse_args()

    import torch

    from llmlite.models import BUNDLED, load_model
    from llmlite.runinfo import environment

    BENCH.mkdir(parents=True, exist_ok=True)
    prepare_files()
    float_model, _ = load_model("smollm2-135m")
    quant_model, _ = load_model(str(CHECKPOINT))
    package, filename, _ = BUNDLED["smollm2-135m"]
    bundled = Path(importlib.util.find_spec(package).origin).parent / filename
    ids = torch.randint(
        0, float_model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0)
    )
    new = args.new_tokens
    configs = {
        ("float32", "transformers generate"): lambda: transformers_generate(float_model, ids, new),
        ("float32", "llmlite lean loop"): lambda: lean(float_model, ids, new, False),
        ("float32", "llmlite lean loop, compiled"): lambda: lean(float_model, ids, new, True),
        ("4-bit", "transformers generate"): lambda: transformers_generate(quant_model, ids, new),
        ("4-bit", "llmlite lean loop"): lambda: lean(quant_model, ids, new, False),
        ("4-bit", "llmlite lean loop, compiled"): lambda: lean(quant_model, ids, new, True),
    }
    if args.llama_python:
        for name, path in (("Q4_0 (llmlite's export)", GGUF), ("Q4_1 (bundled GGUF)", bundled)):
            configs[(name, "llama.cpp")] = lambda p=path: llama_cpp(args.llama_python, p, threads, new, ids)
    results: dict = {}
    for threads in args.threads:  # warm-up (compiles the steps), then the measured rounds
        torch.set_num_threads(threads)
        for run in configs.values():
            run()
    for _ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for key, run in configs.items():
                results.setdefault((threads, *key), []).append(run())
                print(threads, key, results[(threads, *key)][-1], flush=True)
    measured = {model: peak_rss(source, args.prompt) for model, source in MODELS.items()}
    rss = {model: m["peak_rss"] for model, m in measured.items()}
    rows = []
    for (threads, model, runtime), runs in results.items():
        row = {
            "threads": threads,
            "model": model,
            "runtime": runtime,
            "prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "decode_tps": statistics.median(r["decode_tps"] for r in runs),
            "peak_rss": statistics.median(r["peak_rss"] for r in runs)
            if "peak_rss" in runs[0]
            else rss.get(model),
        }
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["threads"] == row["threads"] and r["model"] == "float32")
        row["vs_float_transformers"] = row["decode_tps"] / base["decode_tps"]
        q40 = [r for r in rows if r["threads"] == row["threads"] and r["model"].startswith("Q4_0")]
        row["vs_llama_q4_0"] = row["decode_tps"] / q40[0]["decode_tps"] if q40 else None
    quant_layers = [m for m in quant_model.modules() if hasattr(m, "cpu_choice")]
    choices = sorted(
        {
            f"{m.in_features}→{m.out_features}: decode {m.cpu_choice[0]}, prefill {m.cpu_choice[1]}"
            for m in quant_layers
        }
    )
    flags = Path("/proc/cpuinfo").read_text().split()
    isa = "AMX, AVX-512" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    llama_version = None
    if args.llama_python:
        llama_version = subprocess.run(
            [args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    settings = {
        "prompt": args.prompt,
        "new_tokens": new,
        "rounds": args.rounds,
        "threads": args.threads,
        "isa": isa,
        "llama_cpp": llama_version,
        "commit": commit.stdout.strip(),
        "choices": "; ".join(choices),
        "notes": [
            f"The Python process with torch, transformers and llmlite imported, before any model, holds "
            f"{measured['float32']['imports_rss'] / 2**20:.0f} MiB of the peak RSS of llmlite's rows.",
        ],
    }
    env = environment()
    (ROOT / "docs/benchmarks/speed.json").write_text(
        json.dumps({"env": env, "settings": settings, "rows": rows}, indent=1)
    )
    (ROOT / "docs/benchmarks/speed.md").write_text(markdown(rows, env, settings))
    print(markdown(rows, env, settings))


if __name__ == "__main__":
    main()
