"""Quality through llama.cpp: perplexity computed *by llama.cpp* of llmlite's GPTQ export beside
llama.cpp's own quantization of the same model, in the same run.

    .venv/bin/python benchmarks/llamacpp_quality.py --llama-python PATH [--windows 16]

PATH is a Python with llama-cpp-python. Files (``.bench/llamacpp/``): the bundled float model
written as a float32 GGUF file by llmlite's writer; llama.cpp's own F16, Q4_0 and Q4_K_M of it
(``llama_model_quantize``, its default settings, no importance matrix); llmlite's GPTQ at
``--group-size 32`` (on the GPTQ defaults before 80ed87e, ``earlier_defaults.py``, which these
rows ran with: those defaults; ``--mse``; ``--mse`` with 2,048-token calibration windows; ``--mse``
with GPTAQ's drift on every window) written as Q4_0 (``quantize --format gguf``).
Every file is scored by llama.cpp on the same token ids: WikiText-2 raw test tokenized by the
model's tokenizer, non-overlapping 2,048-token windows, the mean next-token NLL of each window's
last 2,047 tokens, exp. Scores are cached per file in ``.bench/llamacpp/scores.json``. Writes
``docs/benchmarks/llamacpp-quality.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
BENCH = ROOT / ".bench" / "llamacpp"

SCORE = r"""
import json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama

source, ids_file, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
ftypes = {"F16": 1, "Q4_0": 2, "Q4_K_M": 15}
out = {}
for name, target in json.loads(sys.argv[4]).items():  # llama.cpp's own quantizations of the float file
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftypes[name], threads
    if not __import__("os").path.exists(target):
        llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)
windows = np.load(ids_file)
for path in json.loads(sys.argv[5]):
    llm = Llama(path, n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    total, start = 0.0, time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        total += float((lse - logits[np.arange(len(w) - 1), w[1:]]).sum())
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    out[path] = {"nll": total / tokens, "ppl": float(np.exp(total / tokens)), "tokens": tokens,
                 "seconds": time.perf_counter() - start, "bytes": __import__("os").path.getsize(path)}
    del llm
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", required=True)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch
    from earlier_defaults import EARLIER

    import llmlite
    from llmlite.data import eval_windows, load_text, tokenize
    from llmlite.models import load_model, resolve_model
    from llmlite.quant.gguf_file import write_gguf
    from llmlite.runinfo import environment

    torch.set_num_threads(args.threads)
    BENCH.mkdir(parents=True, exist_ok=True)
    f32 = BENCH / "smollm2-f32.gguf"
    ours = {  # llmlite's exports: name -> (file, quantize options)
        "Q4_0, llmlite GPTQ (earlier defaults, --group-size 32)": (BENCH / "llmlite-gptq-g32.Q4_0.gguf", {}),
        "Q4_0, llmlite GPTQ --mse (--group-size 32)": (
            BENCH / "llmlite-gptq-mse-g32.Q4_0.gguf",
            {"mse": True},
        ),
        # GPTQ's own calibration setting: 128 windows of 2,048 tokens (the default is 512)
        "Q4_0, llmlite GPTQ --mse --seqlen 2048 (--group-size 32)": (
            BENCH / "llmlite-gptq-mse-s2048-g32.Q4_0.gguf",
            {"mse": True, "seqlen": 2048},
        ),
        # GPTAQ's drift measured on all 128 calibration windows (the earlier default: 16)
        "Q4_0, llmlite GPTQ --mse --v2-windows 0 (--group-size 32)": (
            BENCH / "llmlite-gptq-mse-v2all-g32.Q4_0.gguf",
            {"mse": True, "v2_windows": 0},
        ),
    }
    theirs = {name: BENCH / f"llama.cpp-{name}.gguf" for name in ("F16", "Q4_0", "Q4_K_M")}
    timings = {}
    model, tokenizer = load_model("smollm2-135m")
    if not f32.exists():
        write_gguf(model, resolve_model("smollm2-135m"), f32, "SmolLM2-135M-Instruct")
    for name, (file, options) in ours.items():
        if not file.exists():
            start = time.perf_counter()
            llmlite.quantize(
                group_size=32, format="gguf", calibration="wikitext2-valid", output=str(file),
                progress=False, **{**EARLIER, **options},
            )  # fmt: skip
            timings[f"{name}: quantize and write (s)"] = time.perf_counter() - start
    ids = tokenize(tokenizer, load_text("wikitext2"))
    windows = eval_windows(ids, 2048, args.windows).numpy().astype(np.int64)
    np.save(BENCH / "windows.npy", windows)
    files = [
        str(theirs["F16"]),
        str(theirs["Q4_0"]),
        *(str(f) for f, _ in ours.values()),
        str(theirs["Q4_K_M"]),
    ]
    # scores are kept per file (its time and size) and window count: a re-run scores what changed
    cache_file = BENCH / "scores.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}

    def stamp(f: str) -> list:
        return (
            [Path(f).stat().st_mtime, Path(f).stat().st_size, int(windows.shape[0])]
            if Path(f).exists()
            else []
        )

    todo = [f for f in files if not stamp(f) or cache.get(f, {}).get("stamp") != stamp(f)]
    if todo:
        argv = [args.llama_python, "-c", SCORE, str(f32), str(BENCH / "windows.npy"), str(args.threads)]
        argv += [json.dumps({k: str(v) for k, v in theirs.items()}), json.dumps(todo)]
        run = subprocess.run(argv, check=True, capture_output=True, text=True)
        for f, score in json.loads(run.stdout.splitlines()[-1]).items():
            cache[f] = {**score, "stamp": stamp(f)}
        cache_file.write_text(json.dumps(cache, indent=1))
    scores = {f: cache[f] for f in files}
    version = subprocess.run(
        [args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    names = {
        str(theirs["F16"]): "F16 (llama.cpp's conversion of the float model)",
        str(theirs["Q4_0"]): "Q4_0, llama.cpp's quantizer",
        **{str(f): name for name, (f, _) in ours.items()},
        str(theirs["Q4_K_M"]): "Q4_K_M, llama.cpp's quantizer",
    }
    f16 = scores[str(theirs["F16"])]["ppl"]
    q40 = scores[str(theirs["Q4_0"])]["ppl"]
    rows = [{"file": names[p], **{k: v for k, v in scores[p].items() if k != "stamp"}} for p in files]
    closed = {name: (q40 - scores[str(f)]["ppl"]) / (q40 - f16) for name, (f, _) in ours.items()}
    size = {
        name: scores[str(f)]["bytes"] / scores[str(theirs["Q4_0"])]["bytes"] - 1
        for name, (f, _) in ours.items()
    }
    env = environment()
    lines = [
        "# Quality through llama.cpp: llmlite's GPTQ export beside llama.cpp's own quantization",
        "",
        "Generated by `benchmarks/llamacpp_quality.py`; do not edit by hand.",
        "",
        f"- Machine: {env['cpu']}, {args.threads} threads; llama-cpp-python {version}, torch {env['torch']}.",
        f"- Bundled SmolLM2-135M-Instruct; perplexity computed by llama.cpp on WikiText-2 raw test, "
        f"{windows.shape[0]} non-overlapping windows of 2,048 tokens ({rows[0]['tokens']:,} scored tokens), "
        "the same token ids for every file.",
        "- llama.cpp's files: `llama_model_quantize` from llmlite's float32 GGUF of the model, default "
        "parameters, no importance matrix. llmlite's: `llmlite quantize --group-size 32 --format gguf`.",
        "",
        "| file | perplexity | size | scoring time |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['file']} | {r['ppl']:.3f} | {r['bytes'] / 2**20:.1f} MiB | {r['seconds']:.0f} s |"
        )
    lines += [
        "",
        *(
            f"- {name} closes {100 * closed[name]:.1f}% of llama.cpp-Q4_0's perplexity gap to F16, in a file "
            f"{100 * size[name]:+.2f}% the size of llama.cpp's Q4_0."
            for name in ours
        ),
        *(f"- {k}: {v:.0f}" for k, v in timings.items()),
        "",
    ]
    (ROOT / "docs/benchmarks/llamacpp-quality.md").write_text("\n".join(lines))
    record = {
        "env": env,
        "llama_cpp": version,
        "rows": rows,
        "closed": closed,
        "size": size,
        "timings": timings,
    }
    (ROOT / "docs/benchmarks/llamacpp-quality.json").write_text(json.dumps(record, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
