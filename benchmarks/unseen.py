"""Does a quantizer's gain carry over to text it was never calibrated or tuned on?

    .venv/bin/python benchmarks/unseen.py [--windows 16] [--only NAME...]

Every row is one ``llmlite quantize`` process (4-bit, group 128, asymmetric: the setting of issue
25's held-out goal), scored by the same perplexity code on two texts:

- WikiText-2 raw test, the first ``--windows`` 2,048-token windows: the text the project's
  defaults were chosen on (never calibrated on);
- PIQA prose, every 2,048-token window of the 1,838 validation goals, each followed by its correct
  solution, one per paragraph: text of another kind (short how-to instructions) that no default was
  chosen or calibrated on;
- the Python Language Reference (the topics CPython ships in ``pydoc_data.topics``, in name order),
  ``--windows`` windows spread evenly over it: a third kind of text (technical prose with code),
  added after the default's candidates were fixed, to check the choice on text nobody looked at.

A cached row lacking a text is scored from its saved checkpoint, without quantizing again.

Gap closed = (RTN − method) / (RTN − float) on each text. Rows are cached in
``.bench/unseen-results.json``; the table goes to ``docs/benchmarks/unseen.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmlite.data import eval_windows, load_text, tokenize  # noqa: E402
from llmlite.evaluation.perplexity import perplexity  # noqa: E402
from llmlite.models import load_model  # noqa: E402
from llmlite.runinfo import environment  # noqa: E402
from llmlite.training.data import piqa_instructions  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from earlier_defaults import earlier_flags  # noqa: E402

BENCH = ROOT / ".bench"
LLMLITE = [sys.executable, "-m", "llmlite.cli"]
SETTING = ["--bits", "4", "--group-size", "128", "--asym"]
WIKI, OWN, MIX = "WikiText-2 valid", "own text", "WikiText-2 valid + own text"
CALIBRATION = {
    WIKI: ["--calibration", "wikitext2-valid"],
    OWN: ["--calibration", "self"],
    MIX: ["--calibration", "wikitext2-valid+self"],
}
METHODS = {"gptq": "GPTQ", "awq-gptq": "AWQ→GPTQ"}
NOW = "**the default since 80ed87e**"


def lever(method: str, options: str, note: str = "") -> tuple[str, str, list[str]]:
    """A row on the default calibration mix: ``method`` with ``options`` on top of GPTQ's earlier
    defaults (the ones every row ran with), labelled by them."""
    label = f"{METHODS[method]}, `{options}`" + (f" ({note})" if note else "")
    return label, MIX, ["--method", method, *earlier_flags(options.split()), *CALIBRATION[MIX]]


ROWS = {  # name -> (method, calibration, quantize options)
    "rtn": ("RTN", "–", ["--method", "rtn"]),
    "gptq-plain": (
        "GPTQ, plain (`--no-v2 --no-refit`)",
        WIKI,
        ["--method", "gptq", *earlier_flags(["--no-v2", "--no-refit"]), *CALIBRATION[WIKI]],
    ),
    "gptq": ("GPTQ (earlier default)", WIKI, ["--method", "gptq", *earlier_flags([]), *CALIBRATION[WIKI]]),
    "gptq-mix": ("GPTQ (earlier default)", MIX, ["--method", "gptq", *earlier_flags([]), *CALIBRATION[MIX]]),
    "gptq-self": ("GPTQ (earlier default)", OWN, ["--method", "gptq", *earlier_flags([]), *CALIBRATION[OWN]]),
    "awq-gptq-mix": ("AWQ→GPTQ", MIX, ["--method", "awq-gptq", *earlier_flags([]), *CALIBRATION[MIX]]),
    # generic levers against over-fitting the calibration text, on the default mix
    **{
        name: lever(method, options, note)
        for name, method, options, note in [
            ("gptq-mix-v2all", "gptq", "--v2-windows 0", "every window through the float model"),
            ("gptq-mix-damp", "gptq", "--damp 0.1", ""),
            ("gptq-mix-256", "gptq", "--samples 256", ""),
            ("gptq-mix-v2all-a05", "gptq", "--v2-windows 0 --v2-alpha 0.5", ""),
            ("gptq-mix-v2all-a1", "gptq", "--v2-windows 0 --v2-alpha 1", ""),
            ("gptq-mix-v2all-mse", "gptq", "--v2-windows 0 --mse", ""),
            ("gptq-mix-v2all-a05-mse", "gptq", "--v2-windows 0 --v2-alpha 0.5 --mse", ""),
            ("awq-gptq-mix-v2all", "awq-gptq", "--v2-windows 0", ""),
            ("awq-gptq-mix-v2all-mse", "awq-gptq", "--v2-windows 0 --mse", ""),
            ("gptq-mix-v2all-mse-256", "gptq", "--v2-windows 0 --mse --samples 256", ""),
            (
                "gptq-mix-v2all-mse-2048",
                "gptq",
                "--v2-windows 0 --mse --samples 32 --seqlen 2048",
                "the same tokens, as long as the eval's",
            ),
            ("gptq-mix-v2all-mse-norefit", "gptq", "--v2-windows 0 --mse --no-refit", ""),
            ("gptq-mix-v2all-mse-damp003", "gptq", "--v2-windows 0 --mse --damp 0.003", NOW),
        ]
    },
    "awq-gptq-mix-now": (
        "AWQ→GPTQ (today's defaults, scales scored by GPTQ)",
        MIX,
        ["--method", "awq-gptq", *CALIBRATION[MIX]],
    ),
    "awq-gptq": ("AWQ→GPTQ", WIKI, ["--method", "awq-gptq", *earlier_flags([]), *CALIBRATION[WIKI]]),
    "awq": ("AWQ", WIKI, ["--method", "awq", *CALIBRATION[WIKI]]),
}
TEXTS = {"wikitext2": "WikiText-2 test", "piqa": "PIQA prose", "python": "Python reference"}


def piqa_prose() -> str:
    """Each PIQA validation goal followed by its correct solution, paragraphs apart."""
    return "\n\n".join(f"{r['prompt']} {r['response']}" for r in piqa_instructions())


def python_reference() -> str:
    """The Python Language Reference as CPython ships it for ``help()``: each topic, in name order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def spread(windows: Tensor, n: int) -> Tensor:
    """``n`` of ``windows`` ``[m, ctx]``, evenly spaced from the first (all when ``m <= n``)."""
    m = windows.shape[0]
    return windows if m <= n else windows[torch.arange(n) * m // n]


def texts(tokenizer, n: int) -> dict:
    wiki = eval_windows(tokenize(tokenizer, load_text("wikitext2")), 2048, n)
    python = spread(eval_windows(tokenize(tokenizer, python_reference()), 2048), n)
    piqa = eval_windows(tokenize(tokenizer, piqa_prose()), 2048)
    return {"wikitext2": wiki, "piqa": piqa, "python": python}


def quantize(name: str) -> dict:
    out = BENCH / "runs" / f"unseen-{name}"
    cmd = [*LLMLITE, "quantize", *ROWS[name][2], *SETTING, "--output", str(out), "--overwrite", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    record = json.loads((out / "llmlite.json").read_text())
    return {"command": " ".join(cmd[3:-4]), "quantize_s": record["report"]["seconds"], "path": str(out)}


def scores(model, windows: dict, done: dict | None = None) -> dict:
    """Perplexity on each text, keeping those already in ``done``."""
    done = dict(done or {})
    todo = {t: w for t, w in windows.items() if t not in done}
    return done | {t: perplexity(model, w, progress=False).perplexity for t, w in todo.items()}


def markdown(cache: dict, windows: dict) -> str:
    env = environment()
    fp, rtn = cache["fp32"]["perplexity"], cache.get("rtn", {}).get("perplexity")
    tokens = {t: f"{w.shape[0]} windows, {w.numel():,} tokens" for t, w in windows.items()}
    lines = [
        "# Quantization on text it was never tuned on",
        "",
        "Generated by `benchmarks/unseen.py`; every figure below was measured by it.",
        "",
        "- Model: SmolLM2-135M-Instruct (bundled), float32. Every method: `llmlite quantize "
        f"{' '.join(SETTING)} --method ...` with GPTQ's defaults before commit 80ed87e (drift on the "
        "first 16 windows, no `--mse`, `--damp 0.01`: `benchmarks/earlier_defaults.py`) unless the row "
        "names an option; every row ran before that commit, so its command names none of them. The "
        "row marked as the default is the setting these rows chose, `llmlite quantize`'s default since. "
        "Each calibrates on 128 "
        "windows of 512 tokens (seed 0): WikiText-2 validation (the default until this "
        "table), the model's own text (`--calibration self`: sampled at temperature 1 from its "
        "document-start token), or half of each "
        "(`--calibration wikitext2-valid+self`, the default since). The rows of commit 1e1fb1f ran before "
        "the default changed: their commands' calibration is WikiText-2 validation.",
        f"- {TEXTS['wikitext2']} ({tokens['wikitext2']}): the text the project's defaults were chosen on "
        "(never calibrated on).",
        f"- {TEXTS['piqa']} ({tokens['piqa']}), unseen: the 1,838 PIQA validation goals, each followed by "
        "its correct solution, one per paragraph; short how-to text that no default was chosen or "
        "calibrated on (but the rows below were compared on it).",
        f"- {TEXTS['python']} ({tokens['python']}, spread evenly over it), unseen and unlooked-at: the "
        f"Python Language Reference as CPython {env['python']} ships it (`pydoc_data.topics`, in name "
        "order); technical prose with code. Added after the candidates for the new default were "
        "fixed, and scored once on every saved checkpoint.",
        "- AWQ→GPTQ: the rows on earlier defaults ran before commit 5c88a35 and searched AWQ's scales "
        "with round to nearest (as the peers do); since then each candidate is scored by what GPTQ "
        "makes of it (the row on today's defaults).",
        "- Gap closed = (RTN − method) / (RTN − float), on each text. Rows that are not in the table "
        "have not been run yet (`--only NAME`).",
        f"- Machine: {env['cpu']}, {env['threads']} threads; torch {env['torch']}, transformers "
        f"{env['transformers']}.",
        "",
        "| method | calibration | " + " | ".join(f"{v} ppl | gap closed" for v in TEXTS.values()) + " |",
        "| --- | --- |" + " ---: | ---: |" * len(TEXTS),
        "| float32 | – | " + " | ".join(f"{fp[t]:.3f} | –" for t in TEXTS) + " |",
    ]
    for name, (what, calibration, _) in ROWS.items():
        row = cache.get(name)
        if not row:
            continue
        cells = [what, calibration]
        for t in TEXTS:
            ppl = row["perplexity"].get(t)
            if ppl is None:
                cells += ["–", "–"]
                continue
            gap = "–" if name == "rtn" or not rtn else f"{(rtn[t] - ppl) / (rtn[t] - fp[t]):.0%}"
            cells += [f"{ppl:.3f}", gap]
        lines.append(f"| {' | '.join(cells)} |")
    lines += ["", "| run | date | commit |", "| --- | --- | --- |"]
    lines += [
        f"| `{cache[n]['command']}` | {cache[n]['date']} | {cache[n]['commit']} |" for n in ROWS if n in cache
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows of 2,048 tokens")
    p.add_argument("--only", nargs="*", choices=list(ROWS), help="rows to (re)run")
    p.add_argument(
        "--table", action="store_true", help="quantize nothing: score the rows already run, write the table"
    )
    a = p.parse_args()
    BENCH.mkdir(exist_ok=True)
    cache_file = BENCH / f"unseen-results-{a.windows}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    model, tokenizer = load_model("smollm2-135m")
    windows = texts(tokenizer, a.windows)
    cache["fp32"] = {"perplexity": scores(model, windows, cache.get("fp32", {}).get("perplexity"))}
    del model
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    for name in ROWS:
        row = cache.get(name)
        if row and set(TEXTS) - set(row["perplexity"]) and Path(row["path"]).exists():
            print(f"scoring {name} on the texts it lacks ...", flush=True)
            row["perplexity"] = scores(load_model(row["path"])[0], windows, row["perplexity"])
            cache_file.write_text(json.dumps(cache, indent=2))
        if a.table or (name in cache and not (a.only and name in a.only)) or (a.only and name not in a.only):
            continue
        print(f"running {name} ...", flush=True)
        row = quantize(name)
        row.update(date=time.strftime("%Y-%m-%d"), commit=commit.stdout.strip())
        row["perplexity"] = scores(load_model(row["path"])[0], windows)
        cache[name] = row
        cache_file.write_text(json.dumps(cache, indent=2))
        print(f"  {name}: {row['perplexity']}, {row['quantize_s']:.0f} s", flush=True)
    text = markdown(cache, windows)
    out = ROOT / "docs" / "benchmarks"
    (out / "unseen.md").write_text(text)
    (out / "unseen.json").write_text(
        json.dumps({"environment": environment(), "rows": cache}, indent=2) + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
