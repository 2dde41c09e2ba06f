"""Quality, speed and memory of llmlite's RTN/GPTQ on the bundled model, beside llm-compressor.

    .venv/bin/python benchmarks/quantize.py [--windows 4] [--only NAME...] [--llmc-python PATH]

Every quantization runs in its own process, which records its own peak RSS (VmHWM); every
model is then scored by the same perplexity code on the same WikiText-2 test windows. llm-compressor
runs in its own venv (``--llmc-python``; by default ``.bench/venv-llmcompressor`` is created) and
gets exactly the calibration windows llmlite samples. Results are cached in ``.bench/`` so that an
interrupted run resumes; the table goes to ``docs/benchmarks/quantize.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmlite import blas  # noqa: E402
from llmlite.data import calibration_windows, eval_windows, load_text, tokenize  # noqa: E402
from llmlite.evaluation.perplexity import perplexity  # noqa: E402
from llmlite.models import load_model, resolve_model  # noqa: E402
from llmlite.runinfo import environment  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from earlier_defaults import earlier_flags  # noqa: E402

BENCH = ROOT / ".bench"
LLMLITE = [sys.executable, "-m", "llmlite.cli"]  # the llmlite on sys.path (PYTHONPATH wins)
SAMPLES, SEQLEN, SEED = 128, 512, 0
# Rows measured before rows recorded their CPU all ran on the 2-core AMD EPYC (AVX2) that the
# published table's machine line named until 2026-12-06.
OLD_ROWS_CPU = "AMD EPYC"
PUBLISHED_WINDOWS = 4  # the main table's; other counts write docs/benchmarks/quantize-<N>-windows.*

# GPTQ variants, each on the GPTQ defaults of the day these tables ran (before 80ed87e:
# ``earlier_defaults``): that default (the GPTAQ drift correction from the first 16 calibration
# windows, then the scale refit), plain GPTQ, and the drift correction from every window (no refit:
# GPTQModel's v2).
VARIANTS = {
    "default": earlier_flags([]),
    "plain": earlier_flags(["--no-v2", "--no-refit"]),
    "v2-all": earlier_flags(["--v2", "--v2-windows", "0", "--no-refit"]),
}
# (name, tool, method, bits, group, sym, variant), in the order they run: the speed comparison first.
# Every GPTQ row uses act-order with static groups (both tools' default).
# The speed rows run under two BLAS set-ups (see `mkl_env`): llmlite's default, its MKL shim
# (`llmlite.blas`), which llm-compressor's process then gets too (LD_PRELOAD) for a like-for-like
# comparison; and MKL as torch ships it ("-noshim": its generic kernels on an AMD CPU), which is
# how llm-compressor runs as installed.
RUNS = [
    ("rtn-w4g64-sym", "llmlite", "rtn", 4, 64, True, "plain"),
    ("gptq-w4g64-sym", "llmlite", "gptq", 4, 64, True, "plain"),
    ("gptq-v2w16-w4g64-sym", "llmlite", "gptq", 4, 64, True, "default"),
    ("llmc-gptq-w4g64-sym-shim", "llm-compressor", "gptq", 4, 64, True, "plain"),
    ("gptq-w4g64-sym-noshim", "llmlite", "gptq", 4, 64, True, "plain"),
    ("gptq-v2w16-w4g64-sym-noshim", "llmlite", "gptq", 4, 64, True, "default"),
    ("llmc-gptq-w4g64-sym", "llm-compressor", "gptq", 4, 64, True, "plain"),
]
for _bits in (4, 3):
    for _grid in ("sym", "asym"):
        _sym = _grid == "sym"
        RUNS += [
            (f"rtn-w{_bits}g128-{_grid}", "llmlite", "rtn", _bits, 128, _sym, "plain"),
            (f"rtn-clip-w{_bits}g128-{_grid}", "llmlite", "rtn-clip", _bits, 128, _sym, "plain"),
            (f"gptq-w{_bits}g128-{_grid}", "llmlite", "gptq", _bits, 128, _sym, "plain"),
            (f"gptq-v2w16-w{_bits}g128-{_grid}", "llmlite", "gptq", _bits, 128, _sym, "default"),
            (f"gptq-v2-w{_bits}g128-{_grid}", "llmlite", "gptq", _bits, 128, _sym, "v2-all"),
        ]


def mkl_env(name: str) -> dict[str, str]:
    """The environment of run ``name``: "-noshim" runs of llmlite get MKL as torch ships it, the
    "-shim" run of llm-compressor gets llmlite's MKL shim preloaded; others run as they are."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if name.endswith("-noshim"):
        env[blas.ENV] = "0"
    elif name.endswith("-shim"):
        if blas.shim_path() is None:
            raise SystemExit("llmlite's MKL shim was not compiled: reinstall llmlite with a C compiler")
        env["LD_PRELOAD"] = blas.shim_path()
    return env


def run_measured(cmd: list[str], name: str) -> float:
    """Run ``cmd``; return its wall time. (Peak memory comes from the process itself: ``wait4``'s
    ``ru_maxrss`` would start at this benchmark's own size, which survives ``exec``.)"""
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=mkl_env(name)
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def quantize_llmlite(name, method, bits, group, sym, variant) -> dict:
    out = BENCH / "runs" / name
    cmd = [*LLMLITE, "quantize", "--method", method, "--bits", str(bits), "--group-size", str(group)]
    cmd += ["--calibration", "wikitext2-valid"]  # the windows the peers get
    cmd += [
        "--sym" if sym else "--asym",
        "--samples",
        str(SAMPLES),
        "--seqlen",
        str(SEQLEN),
        "--seed",
        str(SEED),
    ]
    cmd += ["--act-order"] + ([] if method == "rtn" else list(VARIANTS[variant]))
    expected = {"method": method, "bits": bits, "group_size": group, "sym": sym, "act_order": True}
    expected.update(samples=SAMPLES, seqlen=SEQLEN, seed=SEED, v2=method == "gptq" and variant != "plain")
    if expected["v2"]:
        expected["v2_windows"] = 0 if variant == "v2-all" else 16
    expected["refit"] = method == "gptq" and variant == "default"
    if finished(out, expected):  # quantized earlier, scoring interrupted: score it now
        return {"process_s": None, "command": " ".join(cmd[2:]), **measured(name)}
    wall = run_measured([*cmd, "--output", str(out), "--overwrite", "--quiet"], name)
    return {"process_s": wall, "command": " ".join(cmd[2:]), **measured(name)}


def finished(out: Path, expected: dict) -> bool:
    """Whether ``out`` holds a complete llmlite checkpoint made with the ``expected`` options
    (checkpoints are written atomically, so an existing record means a finished run)."""
    record = out / "llmlite.json"
    if not record.exists():
        return False
    config = {"refit": False, **json.loads(record.read_text())["config"]}  # older runs had no refit
    return all(config.get(k) == v for k, v in expected.items())


def measured(name: str) -> dict:
    """Quantization time and peak RSS (VmHWM, reset before the model is loaded) as each tool's
    run recorded them."""
    out = BENCH / "runs" / name
    if (out / "llmlite.json").exists():
        record = json.loads((out / "llmlite.json").read_text())
        peak, seconds = record["stats"]["peak_rss_bytes"], record["report"]["seconds"]
    else:
        result = json.loads((out / "result.json").read_text())
        peak, seconds = int(result["peak_rss_mb"] * 2**20), result["seconds"]
    return {"quantize_s": seconds, "peak_rss": peak, "path": str(out)}


def quantize_llmc(python: str, name, bits, group, sym, calib: Path, model_dir: Path) -> dict:
    out = BENCH / "runs" / name
    script = ROOT / "benchmarks" / "peers" / "llmcompressor_gptq.py"
    cmd = [
        python,
        str(script),
        str(model_dir),
        str(calib),
        str(out),
        "--bits",
        str(bits),
        "--group-size",
        str(group),
        "--actorder",
    ]
    if (out / "result.json").exists():  # quantized earlier, scoring interrupted: score it now
        return {"process_s": None, **measured(name), "versions": peer_versions(python)}
    wall = run_measured([*cmd] + ([] if sym else ["--asym"]), name)
    return {"process_s": wall, **measured(name), "versions": peer_versions(python)}


def peer_versions(python: str) -> dict:
    """Versions of the packages in the peer's venv that decide its speed and results."""
    names = ["llmcompressor", "compressed-tensors", "transformers", "torch"]
    code = f"import json, importlib.metadata as m; print(json.dumps({{n: m.version(n) for n in {names}}}))"
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def score(row: dict, windows: torch.Tensor, base_dir: Path) -> float:
    if row["tool"] == "llm-compressor":  # its fake-quantized weights, put into the float model
        model, _ = load_model(str(base_dir))
        weights = load_file(str(Path(row["path"]) / "weights.safetensors"))
        missing = set(weights) - set(model.state_dict())
        assert not missing, missing
        model.load_state_dict(weights, strict=False)
    else:
        model, _ = load_model(row["path"])
    return perplexity(model, windows, progress=False).perplexity


def published(n_windows: int) -> dict:
    """The rows of the published table (``docs/benchmarks/quantize.json``), as a starting cache on a
    machine without ``.bench/``: each keeps the date and commit it was measured at."""
    path = ROOT / "docs" / "benchmarks" / "quantize.json"
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    if doc["windows"] != n_windows:
        return {}
    cache = {f"fp32@{n_windows}": doc["fp32"]}
    cache.update({f"{name}@{n_windows}": row for name, row in doc["rows"].items() if row})
    return cache


def git_commit() -> str:
    """The checked-out commit, with ``+`` when the working tree has changes."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    status = [*git, "status", "--porcelain", "--untracked-files=no"]
    dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+" if dirty else "") if head.returncode == 0 else "unknown"


def ensure_llmc(python: str | None) -> str:
    if python:
        return python
    venv = BENCH / "venv-llmcompressor"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build
        subprocess.run([*pip, "llmcompressor"], check=True)
    return str(venv / "bin" / "python")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--windows", type=int, default=PUBLISHED_WINDOWS, help="WikiText-2 test windows of 2,048 tokens"
    )
    p.add_argument("--llmc-python", help="python of a venv with llmcompressor installed")
    p.add_argument("--only", nargs="*", help="run names to (re)run")
    a = p.parse_args()

    BENCH.mkdir(exist_ok=True)
    cache_file = BENCH / "quantize-results.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else published(a.windows)
    base_dir = resolve_model("smollm2-135m")
    model, tokenizer = load_model(str(base_dir))
    windows = eval_windows(tokenize(tokenizer, load_text("wikitext2")), 2048, a.windows)
    calib = BENCH / "calibration.pt"
    ids = tokenize(tokenizer, load_text("wikitext2-valid"))
    torch.save(calibration_windows(ids, SAMPLES, SEQLEN, SEED), calib)  # what `llmlite quantize` samples
    key = f"fp32@{a.windows}"
    if key not in cache:
        cache[key] = perplexity(model, windows, progress=False).perplexity
    del model
    llmc_python = None

    for name, tool, method, bits, group, sym, variant in RUNS:
        key = f"{name}@{a.windows}"
        if key in cache and not (a.only and name in a.only):
            continue
        if a.only and name not in a.only:
            continue
        print(f"running {name} ...", flush=True)
        if tool == "llmlite":
            row = quantize_llmlite(name, method, bits, group, sym, variant)
        else:
            llmc_python = llmc_python or ensure_llmc(a.llmc_python)
            row = quantize_llmc(llmc_python, name, bits, group, sym, calib, base_dir)
        row.update(name=name, tool=tool, method=method, bits=bits, group=group, sym=sym, variant=variant)
        row.update(date=time.strftime("%Y-%m-%d"), commit=git_commit(), cpu=environment()["cpu"])
        row["perplexity"] = score(row, windows, base_dir)
        cache[key] = row
        cache_file.write_text(json.dumps(cache, indent=2))
        print(
            f"  {name}: ppl {row['perplexity']:.3f}, {row['quantize_s']:.1f} s, "
            f"{row['peak_rss'] / 2**30:.2f} GiB",
            flush=True,
        )

    for row in cache.values():  # figures as the runs recorded them (also for older caches)
        if isinstance(row, dict) and (BENCH / "runs" / row["name"]).exists():
            row.update(measured(row["name"]))
    write_report(cache, a.windows, int(windows.numel()))


def write_report(cache: dict, n_windows: int, n_tokens: int) -> None:
    fp = cache[f"fp32@{n_windows}"]
    rows = {name: cache.get(f"{name}@{n_windows}") for name, *_ in RUNS}
    peer = next((r["versions"] for r in rows.values() if r and "versions" in r), "versions not recorded")
    lines = [
        "# Weight quantization: quality, speed and memory",
        "",
        "Generated by `benchmarks/quantize.py`; every figure below was measured by it (rows are cached in "
        "`.bench/`, so they may come from several invocations and machines: each row's CPU is in the last "
        "table; – = not run).",
        "",
        f"- Model: SmolLM2-135M-Instruct (bundled), float32 on the CPU. Unquantized perplexity **{fp:.3f}**.",
        f"- Perplexity: WikiText-2 raw test, first {n_windows} non-overlapping windows of 2,048 tokens "
        f"({n_tokens:,} tokens), the GPTQ/AWQ papers' protocol, the same code for every model.",
        f"- Calibration (GPTQ): {SAMPLES} windows × {SEQLEN} tokens of WikiText-2 validation, seed {SEED}; "
        "llm-compressor gets exactly the same token windows. Damping 0.01, block 128, "
        "act-order with static groups.",
        "- `lm_head` (tied to the embeddings), the embeddings and the norms stay unquantized in every row: "
        "float16 in llmlite's checkpoints (the default `--dtype`), float32 in llm-compressor's scoring.",
        f"- Machine of this invocation: {json.dumps(environment())}; each row's CPU is in the last table "
        "(compare figures only between rows of the same CPU and day).",
        f"- llm-compressor's venv: {json.dumps(peer)}",
        "",
        "## GPTQ against RTN (group 128)",
        "",
        "Gap closed = (RTN − GPTQ) / (RTN − unquantized), at the same bits, group and grid. Every GPTQ "
        "column is `llmlite quantize` with act-order (static groups): **default** = its defaults until "
        "2026-12-07 (commit 80ed87e; `--v2-windows 16 --no-mse --damp 0.01` since, which every row below "
        "ran with unless it names another value; today's default is measured in "
        "[gptq-default.md](gptq-default.md) and [unseen.md](unseen.md)), plain "
        "GPTQ plus GPTAQ's drift correction (α 0.25) measured on the first 16 calibration windows, "
        "then each group's scale refit to the layer's output (`--refit`); plain = `--no-v2 --no-refit`; "
        "v2 all = `--v2 --v2-windows 0 --no-refit` (the correction measured on all 128 windows, "
        "GPTQModel's v2). rtn-clip = `--method rtn-clip`: RTN with each group's range clipped for the "
        "least layer-output error on the same calibration data (no error compensation). "
        "Times are in the speed table below, where every row ran on the same day "
        "on an otherwise idle machine.",
        "",
        "| bits | grid | RTN ppl | rtn-clip ppl | gap closed | default ppl | gap closed | plain ppl "
        "| gap closed | v2 all ppl | gap closed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for bits in (4, 3):
        for grid in ("sym", "asym"):
            r = rows[f"rtn-w{bits}g128-{grid}"]
            if not r:
                continue
            cells = [str(bits), grid, f"{r['perplexity']:.3f}"]
            for prefix in ("rtn-clip", "gptq-v2w16", "gptq", "gptq-v2"):
                g = rows[f"{prefix}-w{bits}g128-{grid}"]
                if not g:
                    cells += ["–"] * 2
                    continue
                closed = (r["perplexity"] - g["perplexity"]) / (r["perplexity"] - fp)
                cells += [f"{g['perplexity']:.3f}", f"**{closed:.0%}**"]
            lines.append(f"| {' | '.join(cells)} |")
    lines += [
        "",
        "## Beside llm-compressor (4-bit, group 64)",
        "",
        "llm-compressor refuses group 128 on SmolLM2's 576-wide layers (576 is not a multiple of 128) and "
        "crashes when told to skip that check, so the comparison is at group 64. Both tools run GPTQ with "
        "static act-order (their default), damping 0.01, block 128. Time = the quantization "
        "call alone (`quantize_model` / `oneshot`, model loading excluded); process = the whole command; "
        "peak RSS = the process's high-water mark (`VmHWM`, reset just before the model is loaded, so "
        "model loading, calibration data and saving are included). Ratios are taken only between rows "
        "measured on the same day.",
        "",
        "Each row runs under one of two BLAS set-ups. **shim**: llmlite's default, MKL's AVX2 kernels "
        "through `llmlite.blas` ([measured alone](blas.md)), given to llm-compressor's process too "
        "(`LD_PRELOAD` of the same library) for a like-for-like row; **as shipped**: MKL as torch ships "
        "it, whose generic kernels an AMD CPU gets (llmlite with `LLMLITE_MKL_AVX2=0`; llm-compressor "
        "as installed). Time ratios are against llm-compressor under the same set-up, and against "
        "llm-compressor as installed (what a user of it gets on this machine).",
        "",
        "| tool | MKL | ppl | time (s) | process (s) | peak RSS (GiB) | vs llm-compressor, same MKL "
        "| vs llm-compressor as installed | memory ratio | date |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    peers = {"shim": rows["llmc-gptq-w4g64-sym-shim"], "as shipped": rows["llmc-gptq-w4g64-sym"]}
    rtn_row = rows["rtn-w4g64-sym"]
    if rtn_row:
        lines.append(f"| RTN (llmlite) | – | {rtn_row['perplexity']:.3f} | – | – | – | – | – | – | – |")

    def ratio(row: dict, peer: dict | None) -> str:
        if not peer or row is peer or row.get("date") != peer.get("date"):
            return "–"
        return f"{peer['quantize_s'] / row['quantize_s']:.2f}× faster"

    for label, mkl, name in (
        ("llmlite GPTQ (default until 2026-12-07)", "shim", "gptq-v2w16-w4g64-sym"),
        ("llmlite GPTQ `--no-v2 --no-refit`", "shim", "gptq-w4g64-sym"),
        ("llm-compressor GPTQ", "shim", "llmc-gptq-w4g64-sym-shim"),
        ("llmlite GPTQ (default until 2026-12-07)", "as shipped", "gptq-v2w16-w4g64-sym-noshim"),
        ("llmlite GPTQ `--no-v2 --no-refit`", "as shipped", "gptq-w4g64-sym-noshim"),
        ("llm-compressor GPTQ", "as shipped", "llmc-gptq-w4g64-sym"),
    ):
        row, peer = rows[name], peers[mkl]
        if not row:
            continue
        mem = "–" if not peer or row is peer else f"{row['peak_rss'] / peer['peak_rss']:.2f}× of peer"
        process = "–" if row.get("process_s") is None else f"{row['process_s']:.0f}"
        cells = [label, mkl, f"{row['perplexity']:.3f}", f"{row['quantize_s']:.0f}", process]
        cells += [f"{row['peak_rss'] / 2**30:.2f}", ratio(row, peer), ratio(row, peers["as shipped"])]
        cells += [mem, row.get("date", "–")]
        lines.append(f"| {' | '.join(cells)} |")
    lines += [
        "",
        "## When and where each row was measured",
        "",
        "| row | date | commit | CPU |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        if row:
            when = row.get("date", "2026-11-25 or earlier")
            cpu = row.get("cpu", OLD_ROWS_CPU)
            lines.append(f"| {name} | {when} | {row.get('commit', 'not recorded')} | {cpu} |")
    out = ROOT / "docs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    stem = "quantize" if n_windows == PUBLISHED_WINDOWS else f"quantize-{n_windows}-windows"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(
        json.dumps({"fp32": fp, "windows": n_windows, "rows": rows}, indent=2) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
