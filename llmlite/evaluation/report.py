"""``llmlite eval --report``: the chosen tasks on a model and its baseline, cached per (model, task,
settings), written as ``report.json``, ``report.md`` and plots (see ``render``)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from llmlite.errors import LlmliteError
from llmlite.evaluation import tasks as runners
from llmlite.evaluation.tasks import ALL_TASKS, DEFAULT_TASKS
from llmlite.recipes import option
from llmlite.results import Result

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class ReportConfig:
    """Options of ``llmlite eval MODEL --report DIR`` / ``llmlite.report``."""

    VERB: ClassVar[str] = "eval"

    model: str = option("smollm2-135m", "the model to report on")
    baseline: str | None = option(
        None, "also report this model and compare", shown="the model a llmlite checkpoint came from"
    )
    tasks: list[str] | str = option(
        help="report tasks, comma-separated: wikitext, piqa, calibration, efficiency, kv_cache, passkey, "
        "needle, ppl_by_position, all, or any lm-eval task",
        factory=lambda: list(DEFAULT_TASKS),
        shown=",".join(DEFAULT_TASKS),
    )
    # per task: "N", or "N,piqa=M,..." / "piqa=M" (documents; windows for wikitext and calibration)
    limit: int | str | None = option(
        None, "documents per task (windows for wikitext and calibration): N, or N,TASK=M,... per task"
    )
    ctx: int = option(2048, "tokens per perplexity and calibration window")
    report: str | None = option(None, "write report.json, report.md and plots to this folder")
    cache: bool = option(True, "reuse cached task results (--no-cache: recompute them)")
    overwrite: bool = option(False, "replace an existing --report folder")

    def validate(self) -> ReportConfig:
        self._limits = parse_limit(self.limit)
        if self.ctx < 2:
            raise LlmliteError(f"--ctx {self.ctx} is too short; use 2 or more (2048 is the papers')")
        self.tasks = resolve_tasks(self.tasks)
        unknown = [t for t in self._limits if t is not None and t not in self.tasks]
        if unknown:
            raise LlmliteError(
                f"--limit names {unknown[0]}, which is not among --tasks {','.join(self.tasks)}"
            )
        return self

    def limit_for(self, task: str) -> int | None:
        return self._limits.get(task, self._limits.get(None))


@dataclass
class CompareConfig:
    """Options of ``llmlite compare`` / ``llmlite.compare``."""

    VERB: ClassVar[str] = "compare"
    ABOUT: ClassVar[str] = "Merge earlier reports into one table and Pareto plots."

    reports: list[str] = option(
        help="report folders written by llmlite eval --report", factory=list, positional="+"
    )
    output: str | None = option(None, "write compare.md, compare.json and plots to this folder")
    overwrite: bool = option(False, "replace an existing --output folder")

    def validate(self) -> CompareConfig:
        if not self.reports:
            raise LlmliteError("compare needs at least one report folder (written by llmlite eval --report)")
        return self


@dataclass
class ReportResult(Result):
    """``report``'s result: what ``report.json`` holds (settings, environment, each model's task
    metrics and details, and the table)."""

    settings: dict
    environment: dict
    models: list[dict]
    table: list[dict]


@dataclass
class CompareResult(Result):
    """``compare``'s result: every model of the reports once, and the table with Pareto points."""

    models: list[dict]
    table: list[dict]


def parse_limit(limit: int | str | None) -> dict[str | None, int]:
    """``16`` → every task 16; ``"16,piqa=500"`` → 16, PIQA 500; ``"piqa=500"`` → only PIQA capped."""
    if limit is None:
        return {}
    out: dict[str | None, int] = {}
    for part in str(limit).split(","):
        task, _, value = part.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise LlmliteError(f"--limit {limit}: '{part}' is not N or TASK=N") from None
        if n < 1:
            raise LlmliteError(f"--limit must be at least 1, got {n}; leave it out to run everything")
        out[task.strip() or None] = n
    return out


def resolve_tasks(names: list[str] | str) -> list[str]:
    """Task names checked against ours and lm-eval's; ``all`` is every task of ours."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: list[str] = []
    for name in (n.strip() for n in names):
        expanded = list(ALL_TASKS) if name == "all" else [name]
        out += [n for n in expanded if n not in out]
    unknown = [n for n in out if n not in ALL_TASKS]
    if unknown:
        from lm_eval.tasks import TaskManager

        from llmlite.evaluation.harness import TASKS_DIR

        known = set(TaskManager(include_path=str(TASKS_DIR)).all_tasks)
        missing = [n for n in unknown if n not in known]
        if missing:
            raise LlmliteError(
                f"unknown task '{missing[0]}': use {', '.join(ALL_TASKS)}, all, or an lm-eval task name"
            )
    if not out:
        raise LlmliteError("no tasks given: use --tasks wikitext,piqa,... or all")
    return out


def default_baseline(source: str) -> str | None:
    """The model a llmlite output was made from: a GPTQ checkpoint's ``quantization_config.meta``,
    else the ``config.model`` that ``llmlite.json`` records (prune, lowrank and the other commands)."""
    from llmlite.models import resolve_model

    try:
        where = Path(resolve_model(source))
        config = json.loads((where / "config.json").read_text())
        quantized = (config.get("quantization_config") or {}).get("meta", {}).get("source_model")
        if quantized or not (where / "llmlite.json").exists():
            return quantized
        model = json.loads((where / "llmlite.json").read_text()).get("config", {}).get("model")
        return model if model and Path(resolve_model(model)) != where else None
    except (LlmliteError, OSError, ValueError, AttributeError):
        return None


def fingerprint(source: str) -> str:
    """What identifies a model's contents cheaply: its files' names, sizes and modification times."""
    from llmlite.models import resolve_model

    where = resolve_model(source)
    if not isinstance(where, Path):
        return f"hub:{where}"
    files = [where] if where.is_file() else sorted(p for p in where.rglob("*") if p.is_file())
    stats = [(str(p.relative_to(where.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def _cache_file(source: str, task: str, settings: dict) -> Path:
    import lm_eval

    from llmlite import __version__
    from llmlite.models import cache_dir

    key = json.dumps(
        [CACHE_VERSION, __version__, lm_eval.__version__, fingerprint(source), task, settings], sort_keys=True
    )
    return cache_dir() / "eval" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _read_cached(path: Path) -> dict | None:
    """A cached task result, or ``None`` when there is none or it is unreadable (then it is
    recomputed and written again)."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = None
    if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
        log.warning("the cached result %s is unreadable; recomputing it", path)
        return None
    return result


class _Loaded:
    """A model loaded on first use, with its lm-eval wrapper."""

    def __init__(self, source: str, ctx: int) -> None:
        self.source, self.ctx = source, ctx
        self._model = self._tokenizer = self._lm = None

    @property
    def model(self):
        if self._model is None:
            from llmlite.models import load_model

            self._model, self._tokenizer = load_model(self.source)
        return self._model

    def check_ctx(self) -> None:
        """Refuse a perplexity window longer than the model takes."""
        maximum = getattr(self.model.config, "max_position_embeddings", None)
        if maximum and self.ctx > maximum:
            raise LlmliteError(f"--ctx {self.ctx} is above {self.source}'s maximum of {maximum}; lower it")

    @property
    def tokenizer(self):
        return self.model and self._tokenizer

    @property
    def lm(self):
        if self._lm is None:
            from llmlite.evaluation.harness import LlmliteLM

            self._lm = LlmliteLM(
                self.model,
                tokenizer=self.tokenizer,
                rolling="papers",
                ppl_window=self.ctx,
            )
        return self._lm


def evaluate_model(source: str, cfg: ReportConfig, progress: bool = True) -> dict:
    """Every task of ``cfg`` on one model: ``{"model", "fingerprint", "metrics": {task: {...}},
    "details": {task: {...}}}``, each task from the cache when it was run before."""
    loaded = _Loaded(source, cfg.ctx)
    entry: dict = {"model": source, "fingerprint": fingerprint(source), "metrics": {}, "details": {}}
    for task in cfg.tasks:
        settings = {"limit": cfg.limit_for(task), "ctx": cfg.ctx}
        cached = _cache_file(source, task, settings)
        result = _read_cached(cached) if cfg.cache else None
        if result is not None:
            log.info("%s on %s: cached (%s)", task, source, cached.name)
        else:
            log.info("%s on %s: running", task, source)
            result = runners.run(task, loaded, cfg, progress)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".partial")
            tmp.write_text(json.dumps(result))
            tmp.replace(cached)
        entry["metrics"][task] = result["metrics"]
        entry["details"][task] = result.get("details", {})
    return entry


def report(
    config: ReportConfig | None = None, *, recipe: str | None = None, progress: bool = True, **options
) -> ReportResult:
    """Run the tasks on the model and its baseline; write the report folder when ``report`` is set.

    Options are ``ReportConfig``'s fields, or a ready ``config``; ``recipe`` names a YAML file of
    options that ``options`` override."""
    from llmlite.evaluation import render
    from llmlite.models import local_source
    from llmlite.recipes import build
    from llmlite.runinfo import environment, staged_output

    cfg = config.validate() if config is not None else build(ReportConfig, recipe, **options)
    baseline = cfg.baseline or default_baseline(cfg.model)
    inputs = [
        ("--model", local_source(cfg.model)),
        ("--baseline", local_source(baseline)),
        ("--recipe", recipe),
    ]
    # refused, locked and staged before hours of work, not after
    with staged_output(cfg.report, overwrite=cfg.overwrite, inputs=inputs, option="--report") as tmp:
        models = [evaluate_model(cfg.model, cfg, progress)]
        if baseline and baseline != cfg.model:
            models.insert(0, evaluate_model(baseline, cfg, progress))
        settings = {**asdict(cfg), "baseline": baseline}
        out = ReportResult(settings, environment(), models, render.table(models))
        if tmp is not None:
            render.write(out.to_dict(), tmp)
    return out


def compare(
    config: CompareConfig | list[str] | None = None,
    *,
    recipe: str | None = None,
    progress: bool = True,
    **options,
) -> CompareResult:
    """Merge earlier report folders (``llmlite eval --report``) into one table with Pareto points,
    every model once (the latest report wins); with ``output``, also write ``compare.json``,
    ``compare.md`` and the Pareto plots there (checked, locked and staged like every output).

    ``config`` may be the list of report folders itself (``compare([a, b], output=...)``)."""
    from llmlite.evaluation import render
    from llmlite.recipes import build
    from llmlite.runinfo import staged_output

    if isinstance(config, list | tuple):
        config, options["reports"] = None, list(config)
    cfg = config.validate() if config is not None else build(CompareConfig, recipe, **options)
    inputs = [*(("REPORT", r) for r in cfg.reports), ("--recipe", recipe)]
    with staged_output(cfg.output, overwrite=cfg.overwrite, inputs=inputs) as tmp:
        merged = render.merge_reports(cfg.reports)
        out = CompareResult(merged["models"], merged["table"])
        if tmp is not None:
            render.write_compare(out.to_dict(), tmp)
    return out
