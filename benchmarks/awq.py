"""AWQ beside RTN and GPTQ on the bundled model, with its two GQA-era choices switched off in turn.

    .venv/bin/python benchmarks/awq.py [--windows 16] [--only NAME...]

Every quantization is one ``llmlite quantize`` process on the same 128 × 512 calibration windows
(WikiText-2 validation, seed 0, what ``quantize`` samples by default); every model is scored by the
same perplexity code on the first ``--windows`` non-overlapping 2,048-token windows of WikiText-2
raw test. Group 128, asymmetric and symmetric, 4 and 3 bits: the bundled weights are Q4_1
(group-32 asymmetric 4-bit) already, where the methods barely differ. Rows are cached in
``.bench/awq-results.json`` (an interrupted run resumes); the table goes to
``docs/benchmarks/awq.md`` and ``.json``.
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

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from llmlite.data import calibration_windows, eval_windows, load_text, tokenize  # noqa: E402
from llmlite.evaluation.perplexity import perplexity  # noqa: E402
from llmlite.models import load_model, resolve_model  # noqa: E402
from llmlite.runinfo import environment  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from quantize import ensure_llmc  # noqa: E402  (the peer's venv, made once in .bench)

BENCH = ROOT / ".bench"
LLMLITE = [sys.executable, "-m", "llmlite.cli"]
METHODS = {  # column -> quantize options
    "RTN": ["--method", "rtn"],
    "AWQ": ["--method", "awq"],
    "GPTQ": ["--method", "gptq"],
    "AWQ→GPTQ": ["--method", "awq-gptq"],
    "AWQ, no v→o": ["--method", "awq", "--no-awq-vo"],
    "AWQ, no clipping": ["--method", "awq", "--no-clip"],
}
GRIDS = [(3, "asym"), (4, "asym"), (3, "sym"), (4, "sym")]  # in the order they run
ABLATED = {(3, "asym"), (4, "asym")}  # the grids that also run the two ablations
# llm-compressor's AWQ, stacked with its quantizer as it requires; at group 64, because it refuses
# group 128 on SmolLM2's 576-wide rows; beside llmlite's methods at the same group
PEERS = {"llm-compressor AWQ": "rtn", "llm-compressor AWQ→GPTQ": "gptq"}
PEER_GRIDS = [(3, "asym")]
PEER_GROUP = 64


def runs() -> list[tuple[str, int, str, str, int]]:
    """(name, bits, grid, column, group) of every run, in the order they run."""
    out = []
    for bits, grid in GRIDS:
        for column in METHODS:
            if column.startswith("AWQ,") and (bits, grid) not in ABLATED:
                continue
            out.append((_name(column, bits, 128, grid), bits, grid, column, 128))
    for bits, grid in PEER_GRIDS:
        for column in [c for c in METHODS if not c.startswith("AWQ,")] + list(PEERS):
            out.append((_name(column, bits, PEER_GROUP, grid), bits, grid, column, PEER_GROUP))
    return out


def _name(column: str, bits: int, group: int, grid: str) -> str:
    name = f"{column}-w{bits}g{group}-{grid}"
    return name.replace("→", "-").replace(", ", "-").replace(" ", "-").lower()


def quantize_peer(python: str, name: str, bits: int, grid: str, column: str, group: int) -> dict:
    """One llm-compressor run (``benchmarks/peers/llmcompressor_awq.py``) in its own venv."""
    out = BENCH / "runs" / name
    script = ROOT / "benchmarks" / "peers" / "llmcompressor_awq.py"
    cmd = [python, str(script), str(resolve_model("smollm2-135m")), str(calibration_file()), str(out)]
    cmd += ["--bits", str(bits), "--group-size", str(group), "--then", PEERS[column]]
    cmd += ["--asym"] if grid == "asym" else []
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"  # the peer's progress bars, to follow a run of an hour: tail -f
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{log.read_text()[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    versions = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('llmcompressor'))"],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    command = f"llm-compressor {versions}: AWQModifier + {PEERS[column]} w{bits} g{group} {grid}"
    return {"command": command, "process_s": time.perf_counter() - start, "quantize_s": result["seconds"],
            "path": str(out), "tool": "llm-compressor"}  # fmt: skip


def calibration_file() -> Path:
    """The 128 × 512 calibration windows ``llmlite quantize`` samples by default, saved for the peer."""
    path = BENCH / "awq-calibration.pt"
    if not path.exists():
        tokenizer = load_model("smollm2-135m")[1]
        ids = tokenize(tokenizer, load_text("wikitext2-valid"))
        torch.save(calibration_windows(ids, 128, 512, 0), path)
    return path


def score(row: dict, windows: torch.Tensor) -> float:
    if row.get("tool") == "llm-compressor":  # its smoothed, fake-quantized weights in the float model
        model = load_model("smollm2-135m")[0]
        weights = load_file(str(Path(row["path"]) / "weights.safetensors"))
        missing = set(weights) - set(model.state_dict())
        assert not missing, missing
        model.load_state_dict(weights, strict=False)
    else:
        model = load_model(row["path"])[0]
    return perplexity(model, windows, progress=False).perplexity


def quantize(name: str, bits: int, grid: str, column: str, group: int = 128) -> dict:
    out = BENCH / "runs" / name
    cmd = [
        *LLMLITE,
        "quantize",
        "--calibration",
        "wikitext2-valid",  # the windows the peer gets
        *METHODS[column],
        "--bits",
        str(bits),
        "--group-size",
        str(group),
        f"--{grid}",
    ]
    start = time.perf_counter()
    done = subprocess.run(
        [*cmd, "--output", str(out), "--overwrite", "--quiet"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    record = json.loads((out / "llmlite.json").read_text())
    return {
        "command": " ".join(cmd[3:]),
        "process_s": time.perf_counter() - start,
        "quantize_s": record["report"]["seconds"],
        "path": str(out),
    }


def gap_table(cache: dict, n: int, columns: list[str], grids: list[tuple[int, str, int]]) -> list[str]:
    """Markdown rows: per (bits, grid, group), each column's perplexity and the share of RTN's gap to
    the float model it closes (grids without an RTN row are left out)."""
    fp = cache[f"fp32@{n}"]
    header = " | ".join(f"{c} ppl | gap closed" if c != "RTN" else "RTN ppl" for c in columns)
    lines = [f"| bits | grid | {header} |", "| --- | --- |" + " ---: |" * (2 * len(columns) - 1)]
    for bits, grid, group in grids:
        row = {
            c: cache.get(f"{name}@{n}") for name, b, g, c, gs in runs() if (b, g, gs) == (bits, grid, group)
        }
        if not row.get("RTN"):
            continue
        rtn = row["RTN"]["perplexity"]
        cells = [str(bits), grid, f"{rtn:.3f}"]
        for c in columns[1:]:
            r = row.get(c)
            cells += (
                ["–", "–"]
                if not r
                else [f"{r['perplexity']:.3f}", f"{(rtn - r['perplexity']) / (rtn - fp):.0%}"]
            )
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def markdown(cache: dict, n: int, tokens: int) -> str:
    fp = cache[f"fp32@{n}"]
    env = environment()
    lines = [
        "# AWQ beside RTN and GPTQ",
        "",
        "Generated by `benchmarks/awq.py`; every figure below was measured by it.",
        "",
        f"- Model: SmolLM2-135M-Instruct (bundled), float32. Unquantized perplexity **{fp:.3f}**.",
        f"- Perplexity: WikiText-2 raw test, first {n} non-overlapping windows of 2,048 tokens ({tokens:,} "
        "tokens). Calibration: 128 windows × 512 tokens of WikiText-2 validation, seed 0, the same for "
        "every method. Group 128 (SmolLM2's 576-wide rows: 4.5 groups, the last one short).",
        "- Methods: `llmlite quantize --method ...` with its defaults: RTN; AWQ (duo-scaling search on "
        "all four mappings, v_proj → o_proj included, then round to nearest with each group's clipping "
        "searched); GPTQ (act-order with static groups, GPTAQ's correction measured on every calibration "
        "window, each group's range searched (`--mse`), damping 0.003, scale refit: the defaults since "
        "80ed87e; rows of earlier commits ran the earlier ones, 16 windows, no `--mse`, damping 0.01); "
        "AWQ→GPTQ (AWQ's scales, each candidate scored by what plain GPTQ makes of it, then that GPTQ; "
        "rows before 5c88a35 scored the candidates with round to nearest, as the peers do). "
        "Gap closed = (RTN − method) / (RTN − float).",
        f"- Threads: {env['threads']}; torch {env['torch']}, transformers {env['transformers']}. Time: the "
        "quantization itself (model loading excluded), one process each, on the machine its row names in "
        "the last table (compare times on one machine only).",
        "- Grids and rows that are not in the tables have not been run yet (`--only NAME` runs one).",
        "",
    ]
    columns = [c for c in METHODS if not c.startswith("AWQ,")]
    lines += gap_table(cache, n, columns, [(bits, grid, 128) for bits, grid in GRIDS])
    lines += [
        "",
        "## What each AWQ choice buys (AWQ, group 128)",
        "",
        "| bits | grid | AWQ | without v_proj → o_proj | without the clipping search |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for bits, grid in sorted(ABLATED, reverse=True):
        row = {c: cache.get(f"{name}@{n}") for name, b, g, c, gs in runs() if (b, g, gs) == (bits, grid, 128)}
        cells = [str(bits), grid] + [
            f"{row[c]['perplexity']:.3f}" if row.get(c) else "–"
            for c in ("AWQ", "AWQ, no v→o", "AWQ, no clipping")
        ]
        lines.append(f"| {' | '.join(cells)} |")
    peer_columns = [c for c in METHODS if not c.startswith("AWQ,")] + list(PEERS)
    lines += [
        "",
        f"## Against llm-compressor (group {PEER_GROUP})",
        "",
        f"llm-compressor refuses group 128 on SmolLM2's 576-wide rows, so this comparison runs at group "
        f"{PEER_GROUP}, every row on the same calibration windows (`benchmarks/peers/llmcompressor_awq.py`, "
        "its own venv; its AWQ is stacked with its round-to-nearest `QuantizationModifier` or its "
        "`GPTQModifier`, as it requires; its mappings skip v_proj → o_proj on this GQA model).",
        "",
    ]
    lines += gap_table(cache, n, peer_columns, [(bits, grid, PEER_GROUP) for bits, grid in PEER_GRIDS])
    lines += [
        "",
        "## Time and provenance",
        "",
        "| run | quantize (s) | machine | date | commit |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for name, *_ in runs():
        r = cache.get(f"{name}@{n}")
        if r:
            machine = r.get("cpu", "–")
            lines.append(
                f"| `{r['command']}` | {r['quantize_s']:.0f} | {machine} | {r['date']} | {r['commit']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--only", nargs="*", help="run names to (re)run")
    p.add_argument(
        "--llmc-python", help="python of a venv with llmcompressor (default: .bench/venv-llmcompressor)"
    )
    a = p.parse_args()
    BENCH.mkdir(exist_ok=True)
    cache_file = BENCH / "awq-results.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    model, tokenizer = load_model("smollm2-135m")
    windows = eval_windows(tokenize(tokenizer, load_text("wikitext2")), 2048, a.windows)
    if f"fp32@{a.windows}" not in cache:
        cache[f"fp32@{a.windows}"] = perplexity(model, windows, progress=False).perplexity
    del model
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    for name, bits, grid, column, group in runs():
        key = f"{name}@{a.windows}"
        if (key in cache and not (a.only and name in a.only)) or (a.only and name not in a.only):
            continue
        print(f"running {name} ...", flush=True)
        if column in PEERS:
            row = quantize_peer(ensure_llmc(a.llmc_python), name, bits, grid, column, group)
        else:
            row = quantize(name, bits, grid, column, group)
        row.update(date=time.strftime("%Y-%m-%d"), commit=commit.stdout.strip(), cpu=environment()["cpu"])
        row["perplexity"] = score(row, windows)
        cache[key] = row
        cache_file.write_text(json.dumps(cache, indent=2))
        print(f"  {name}: ppl {row['perplexity']:.3f}, {row['quantize_s']:.0f} s", flush=True)
    text = markdown(cache, a.windows, int(windows.numel()))
    out = ROOT / "docs" / "benchmarks"
    (out / "awq.md").write_text(text)
    rows = {k: v for k, v in cache.items() if k.endswith(f"@{a.windows}")}
    (out / "awq.json").write_text(json.dumps({"environment": environment(), "rows": rows}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
