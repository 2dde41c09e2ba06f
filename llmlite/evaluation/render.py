"""Reports as tables and plots: ``report.md`` (metric, baseline, compressed, change), PNG plots, and
``llmlite compare`` over several report folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Metrics that are rates in [0, 1] change by a difference; the rest by a ratio.
_RATES = ("acc", "acc_norm", "exact_match", "em_", "ece", "brier", "top1_accuracy", "mean_confidence")
ACCURACY = ("piqa", "acc")  # the quality axis of the Pareto plots


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not available"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.4g}"


def _change(name: str, base, new) -> str:
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (base, new)):
        return ""
    if name.startswith(_RATES):
        return f"{new - base:+.4f}"
    return f"{new / base:.3f}×" if base else ""


def table(models: list[dict]) -> list[dict]:
    """One row per (task, metric): the value for each model, and the change from the first to the last."""
    keys: dict[tuple[str, str], None] = {}
    for m in models:
        keys.update({(task, name): None for task, metrics in m["metrics"].items() for name in metrics})
    rows = []
    for task, name in keys:
        values = [m["metrics"].get(task, {}).get(name) for m in models]
        row = {"task": task, "metric": name, "values": values}
        if len(models) > 1:
            row["change"] = _change(name, values[0], values[-1])
        rows.append(row)
    return rows


def markdown(out: dict) -> str:
    models = out["models"]
    heads = ["baseline", "compressed"] if len(models) == 2 else ["model"]
    lines = [
        "# llmlite evaluation report",
        "",
        *[f"- {h}: `{m['model']}`" for h, m in zip(heads, models, strict=True)],
        f"- settings: {json.dumps({k: out['settings'][k] for k in ('tasks', 'limit', 'ctx')})}",
        f"- environment: {json.dumps(out['environment'])}",
        "",
        "| task | metric | " + " | ".join(heads) + (" | change |" if len(models) == 2 else " |"),
        "| --- | --- | " + " | ".join("---" for _ in heads) + (" | --- |" if len(models) == 2 else " |"),
    ]
    for row in out["table"]:
        cells = [_fmt(v) for v in row["values"]]
        change = [row.get("change", "")] if len(models) == 2 else []
        lines.append(f"| {row['task']} | {row['metric']} | " + " | ".join([*cells, *change]) + " |")
    lines += [
        "",
        "Changes: rates (accuracy, exact match, ECE, Brier) as differences, the rest as ratios.",
        "MACs per token are counted from the model's shapes at the perplexity context, not measured;",
        "latency, throughput, memory and energy are measured on this machine (efficiency details in",
        "report.json).",
    ]
    return "\n".join(lines) + "\n"


def write(out: dict, folder: Path) -> None:
    """report.json, report.md and the plots into ``folder``."""
    (folder / "report.json").write_text(json.dumps(out, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(out))
    plots(out["models"], folder)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(models: list[dict], folder: Path) -> list[Path]:
    """Perplexity by position, reliability diagrams, accuracy against size and against latency."""
    plt = _pyplot()
    written = []
    positional = [m for m in models if m["metrics"].get("ppl_by_position")]
    if positional:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in positional:
            items = m["metrics"]["ppl_by_position"]
            labels = [k.removeprefix("ppl_").replace("_", "–") for k in items]
            ax.plot(labels, list(items.values()), marker="o", label=_short(m["model"]))
        ax.set(xlabel="token position", ylabel="perplexity", title="Perplexity by position")
        ax.legend()
        written.append(_save(fig, folder / "ppl_by_position.png"))
    for task in ("piqa", "calibration"):
        shown = [m for m in models if m["details"].get(task, {}).get("reliability")]
        if not shown:
            continue
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
        for m in shown:
            bins = [(c, a) for c, a, n in m["details"][task]["reliability"] if n]
            ax.plot([c for c, _ in bins], [a for _, a in bins], marker="o", label=_short(m["model"]))
        what = "PIQA answer" if task == "piqa" else "next-token (top-1)"
        ax.set(xlabel="confidence", ylabel="accuracy", title=f"Reliability: {what}", xlim=(0, 1), ylim=(0, 1))
        ax.legend()
        written.append(_save(fig, folder / f"reliability_{task}.png"))
    for axis, label in (
        ("size_bytes", "size on disk (MiB)"),
        ("decode_ms_p50_b1", "decode latency p50, batch 1 (ms)"),
    ):
        points = pareto_points(models, axis)
        if points:
            written.append(_pareto_plot(plt, points, label, folder / f"pareto_{axis.split('_')[0]}.png"))
    return written


def pareto_points(models: list[dict], axis: str) -> list[tuple[str, float, float, bool]]:
    """(model, cost, accuracy, on the Pareto front) for models with both figures."""
    task, metric = ACCURACY
    pts = []
    for m in models:
        cost = m["metrics"].get("efficiency", {}).get(axis)
        acc = m["metrics"].get(task, {}).get(metric)
        if cost is not None and acc is not None:
            pts.append((m["model"], float(cost), float(acc)))
    front = [not any(c2 <= c and a2 >= a and (c2, a2) != (c, a) for _, c2, a2 in pts) for _, c, a in pts]
    return [(*p, f) for p, f in zip(pts, front, strict=True)]


def _pareto_plot(plt, points, label: str, path: Path) -> Path:
    scale = 2**20 if "MiB" in label else 1
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, cost, acc, front in points:
        ax.scatter(cost / scale, acc, color="C3" if front else "C0", zorder=3)
        ax.annotate(_short(name), (cost / scale, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted((c / scale, a) for _, c, a, f in points if f)
    ax.step([c for c, _ in front], [a for _, a in front], where="post", color="C3", label="Pareto front")
    ax.set(xlabel=label, ylabel="PIQA accuracy", title="Accuracy against cost")
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    return path


def _short(name: str) -> str:
    return Path(name).name or name


def merge_reports(folders: list[str]) -> dict:
    """Merge earlier reports: every model once (the latest report wins), one table, Pareto points."""
    models: dict[str, dict] = {}
    for folder in folders:
        for m in read_report(folder)["models"]:
            models[m["fingerprint"]] = m
    merged = list(models.values())
    return {"models": merged, "table": table(merged)}


def read_report(folder: str | Path) -> dict:
    """The ``report.json`` of a report folder, checked to hold what ``compare`` reads."""
    from llmlite.errors import LlmliteError

    path = Path(folder) / "report.json"
    rerun = f"re-run `llmlite eval MODEL --report {folder} --overwrite`"
    if not path.is_file():
        what = "no such folder" if not Path(folder).exists() else "no report.json"
        raise LlmliteError(
            f"no report in {folder} ({what}); run `llmlite eval MODEL --report {folder}` first"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise LlmliteError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); {rerun}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not models:
        raise LlmliteError(f"{path} is not an llmlite report (it has no 'models' list); {rerun}")
    for i, m in enumerate(models):
        problem = _model_entry_problem(m)
        if problem:
            raise LlmliteError(f"{path}: models[{i}] {problem}; {rerun}")
        m.setdefault("details", {})
    return data


def _model_entry_problem(m) -> str | None:
    """What is wrong with one ``models`` entry of a report, or ``None``."""
    if not isinstance(m, dict):
        return f"is a {type(m).__name__}, not a mapping"
    missing = [k for k in ("model", "fingerprint", "metrics") if k not in m]
    if missing:
        return f"has no {', '.join(missing)}"
    metrics = m["metrics"]
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        return "has metrics that are not a mapping of task: {metric: value}"
    return None


def compare_markdown(out: dict) -> str:
    models = out["models"]
    names = [_short(m["model"]) for m in models]
    lines = [
        "| task | metric | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for row in out["table"]:
        lines.append(
            f"| {row['task']} | {row['metric']} | " + " | ".join(_fmt(v) for v in row["values"]) + " |"
        )
    return "\n".join(lines) + "\n"


def write_compare(out: dict, folder: Path) -> None:
    (folder / "compare.json").write_text(json.dumps(out, indent=2) + "\n")
    (folder / "compare.md").write_text(compare_markdown(out))
    plt = _pyplot()
    for axis, label in (
        ("size_bytes", "size on disk (MiB)"),
        ("decode_ms_p50_b1", "decode latency p50, batch 1 (ms)"),
    ):
        points = pareto_points(out["models"], axis)
        if points:
            _pareto_plot(plt, points, label, folder / f"pareto_{axis.split('_')[0]}.png")
