"""The ``llmlite`` command: each verb a thin wrapper over the Python API.

User mistakes print one line (``llmlite: error: ...``) and exit with 2; Ctrl-C exits with 130
after removing any partial output.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import signal
import sys
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"llmlite: error: {message}; see {self.prog} --help\n")


@dataclass(frozen=True)
class Verb:
    """A command: its configs (whose fields become its options), the API function it calls (by
    module and name, imported when it runs), what it prints, and whether it shows progress."""

    name: str
    help: str
    configs: tuple[str, ...]  # "module:Class"; a second config adds its own fields (eval + report)
    function: str  # "module:function"
    show: Callable[[Any, Any], None]  # (result, config)
    quiet: bool = True  # has progress bars that --quiet turns off


def _load(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _parser() -> argparse.ArgumentParser:
    from llmlite import __version__

    root = _Parser(prog="llmlite", description="Quantize, fine-tune and evaluate LLMs.")
    root.add_argument("--version", action="version", version=f"llmlite {__version__}")
    commands = root.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    for verb in VERBS.values():
        configs = [_load(c) for c in verb.configs]
        parser = commands.add_parser(
            verb.name, help=verb.help, description=configs[0].ABOUT, argument_default=argparse.SUPPRESS
        )
        seen: set[str] = set()
        for config in configs:
            _add_fields(parser, config, seen)
        parser.add_argument("--recipe", help="YAML file of these options (explicit options win)")
        if verb.quiet:
            parser.add_argument("--quiet", action="store_true", help="no progress bars")
        parser.set_defaults(verb_name=verb.name)
    return root


def _add_fields(parser: argparse.ArgumentParser, config: type, seen: set[str]) -> None:
    """One argument per field of ``config`` (not in ``seen``), described by its ``option``."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if f.name in seen or "help" not in f.metadata:
            continue
        seen.add(f.name)
        meta, kind = f.metadata, _kind(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        text = (meta["help"] + _default_text(f, meta, kind)).replace("%", "%%")
        if meta["positional"]:
            nargs = None if meta["positional"] == "1" else meta["positional"]
            parser.add_argument(f.name, nargs=nargs, help=text)
        elif kind is bool and meta["negative"]:
            group = parser.add_mutually_exclusive_group()
            group.add_argument(*(meta["flags"] or (flag,)), dest=f.name, action="store_true", help=text)
            group.add_argument(meta["negative"], dest=f.name, action="store_false", help="the opposite")
        elif kind is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(*(meta["flags"] or (flag,)), dest=f.name, action=action, help=text)
        else:
            flags = meta["flags"] or (flag,)
            parser.add_argument(*flags, dest=f.name, type=kind, choices=meta["choices"], help=text)


def _kind(hint) -> type:
    """The type an option's text is parsed to: ``bool``, ``str``, ``int`` or ``float`` (a union
    that takes text, such as ``list[str] | str``, is parsed as text and resolved by the config)."""
    args = set(typing.get_args(hint)) - {type(None)} or {hint}
    for kind in (bool, str, int, float):
        if kind in args:
            return kind
    return str


def _default_text(f: dataclasses.Field, meta, kind: type) -> str:
    if meta["shown"] is not None:
        return f" (default: {meta['shown']})"
    default = f.default if f.default is not dataclasses.MISSING else None
    if kind is bool:
        return f" (default: {'on' if default else 'off'})"
    return "" if default in (None, "") else f" (default: {default})"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logger = logging.getLogger("llmlite")
    for old in [h for h in logger.handlers if getattr(h, "llmlite_cli", False)]:
        logger.removeHandler(old)  # main() called again in one process: one handler, today's stderr
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("llmlite: %(message)s"))
    handler.llmlite_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    from llmlite.errors import LlmliteError

    handled = (signal.SIGTERM, signal.SIGHUP)
    before = {}
    if threading.current_thread() is threading.main_thread():
        before = {signum: signal.signal(signum, _terminate) for signum in handled}
    try:
        return _run(VERBS[args.verb_name], args)
    except LlmliteError as e:
        print(f"llmlite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"llmlite: {_stop_reason(e)}; no output was written", file=sys.stderr)
        return _exit_code(e)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _run(verb: Verb, args: argparse.Namespace) -> int:
    """Build the verb's config (defaults < recipe < options: the API's rules), check what the
    CLI needs on top, call the API function, print its result."""
    from llmlite.errors import LlmliteError
    from llmlite.recipes import build

    options = {k: v for k, v in vars(args).items() if k not in ("verb", "verb_name")}
    recipe, quiet = options.pop("recipe", None), options.pop("quiet", False)
    if quiet:  # transformers' own bars too ("Loading weights")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    configs = [_load(c) for c in verb.configs]
    config, function = configs[0], _load(verb.function)
    if verb.name == "eval":
        config, function = _eval_or_report(options, configs)
    cfg = build(config, recipe, **options)
    for f in dataclasses.fields(cfg):
        needed = f.metadata.get("cli_required")
        if needed and getattr(cfg, f.name) in (None, ""):
            raise LlmliteError(f"{verb.name} needs --{f.name.replace('_', '-')} DIR ({needed})")
    kwargs = {"progress": not quiet} if verb.quiet else {}
    try:
        result = function(cfg, recipe=recipe, **kwargs)
    except KeyboardInterrupt as e:
        if not getattr(e, "resumable", False):
            raise
        print(f"llmlite: {e}", file=sys.stderr)  # where the last checkpoint is, how to resume
        return _exit_code(e.__context__ or e)
    verb.show(result, cfg)
    return 0


def _eval_or_report(options: dict, configs: list[type]):
    """``eval`` runs the report when a report option is given, else plain perplexity; the
    options of the other one are refused with the reason."""
    from llmlite.api import evaluate
    from llmlite.config import KV_OPTIONS
    from llmlite.errors import LlmliteError
    from llmlite.evaluation.report import report

    plain, full = ({f.name for f in dataclasses.fields(c)} for c in configs)
    if not any(k in options for k in full - plain):
        return configs[0], evaluate
    for name in options.keys() - full:
        flag = "--" + name.replace("_", "-")
        if name == "kv_bits" or name in KV_OPTIONS:
            raise LlmliteError(
                f"{flag} is not a report option; run llmlite eval --kv-bits N without --tasks/--report"
            )
        raise LlmliteError(f"{flag} is not a report option; with --tasks/--report use --limit and --ctx")
    return configs[1], report


def _show_quantize(result, cfg) -> None:
    s = result.summary()
    grid = f"{s['bits']}-bit, group {s['group_size']}, {'sym' if s['sym'] else 'asym'}"
    print(
        f"{s['method']} {grid}: {s['modules']} linear layers in {s['seconds']:.1f} s, "
        f"peak RSS {_gb(s['peak_rss_bytes'])} -> {s['output']} ({_mb(s['size_bytes'])})"
    )


def _show_eval(result, cfg) -> None:
    from llmlite.evaluation.report import ReportResult

    if isinstance(result, ReportResult):
        return _show_report(result)
    result = result.to_dict()
    rows = [result, result["baseline"]] if "baseline" in result else [result]
    for r in rows:
        kv = ""
        if "kv_cache" in r:
            kv = (
                f" through the {r['kv_cache']['bits']}-bit KV cache (prefill {r['prefill']}, "
                f"chunk {r['chunk']}; {r['cache_bytes_per_token']:.0f} bytes/token, "
                f"{r['ratio_to_float16']:.2f}x smaller than float16)"
            )
        print(
            f"{r['model']}: perplexity {r['perplexity']:.4f} on {r['text']}{kv} "
            f"({r['windows']} windows x {r['ctx']} tokens, {r['tokens']} tokens scored) | "
            f"params {r['params'] / 1e6:.1f}M | disk {_mb(r['size_bytes'])} | "
            f"{r['seconds']:.1f} s | peak RSS {_gb(r['peak_rss_bytes'])}"
        )
    if "change" in result:
        change = ", ".join(f"{k} x{v:.3f}" for k, v in result["change"].items())
        print(f"change vs baseline: {change}")


def _show_report(result) -> None:
    from llmlite.evaluation.render import markdown

    out = result.to_dict()
    print(markdown(out), end="")
    if out["settings"]["report"]:
        print(f"report written to {out['settings']['report']}")


def _show_compare(result, cfg) -> None:
    from llmlite.evaluation.render import compare_markdown

    print(compare_markdown(result.to_dict()), end="")
    if cfg.output:
        print(f"comparison written to {cfg.output}")


def _show_finetune(r, cfg) -> None:
    losses = ""
    if r.eval_loss_before is not None:
        losses = f" | eval loss {r.eval_loss_before:.4f} -> {r.eval_loss_after:.4f}"
    print(
        f"{r.method} on {r.train_examples} {r.data_format} examples: {r.steps} steps, "
        f"{r.train_tokens} tokens in {r.seconds:.1f} s ({r.tokens_per_second:.0f} tokens/s), "
        f"peak memory {_gb(r.peak_memory_bytes)}{losses} -> {r.output}"
    )


def _show_merge(result, cfg) -> None:
    print(f"merged {result.adapter} -> {result.output}")


def _show_generate(r, cfg) -> None:
    print(r.text)
    cache = "float cache" if r.kv_bits is None else f"{r.kv_bits}-bit KV cache"
    ratio = r.float16_cache_bytes / r.cache_bytes if r.cache_bytes else 1.0
    versus = f"{ratio:.2f}x smaller than" if ratio > 1 else f"{1 / ratio:.2f}x the size of"
    print(
        f"llmlite: {r.new_tokens} tokens after a {r.prompt_tokens}-token prompt in {r.seconds:.2f} s "
        f"({r.tokens_per_second:.1f} tokens/s, {r.loop} decode loop); {cache} holds "
        f"{_mb(r.cache_bytes)}, {versus} float16",
        file=sys.stderr,
    )


def _show_export(result, cfg) -> None:
    print(f"{cfg.model} -> {result.output} ({result.format}, {result.weight_type}, {_mb(result.size_bytes)})")


def _show_prune(result, cfg) -> None:
    s = result.summary()
    if cfg.structure:
        config = ", ".join(f"{k} {v}" for k, v in s["config"].items())
        unit = "layers" if cfg.structure == "layers" else f"{cfg.structure} from every layer"
        recovered = ""
        if r := s["recovery"]:
            kl = f"KL {r['loss_first']:.4f} -> {r['loss_last']:.4f}"
            recovered = f", recovered on {r['tokens']:,} tokens ({kl})"
        print(
            f"--structure {cfg.structure}: {s['removed_per_layer']} of {s['units_per_layer']} {unit} "
            f"removed, {s['params_before']:,} -> {s['params_after']:,} decoder parameters "
            f"({s['removed_fraction']:.2%} removed, target {s['target']:.0%}; {config}){recovered} in "
            f"{s['seconds']:.1f} s, peak RSS {_gb(s['peak_rss_bytes'])} -> {s['output']}"
        )
        return
    what = f"{cfg.pattern} pattern" if cfg.pattern else f"{s['target_sparsity']:.0%} unstructured"
    zeros = f"{s['sparsity']:.2%} zeros"
    if cfg.bits is not None:
        what += f" + {cfg.bits}-bit GPTQ ({cfg.format})"
        zeros += f" ({s['pruned']:.2%} pruned, the rest kept weights rounded to 0)"
    print(
        f"{s['method']} {what}: {s['modules']} linear layers at {zeros} in "
        f"{s['seconds']:.1f} s, peak RSS {_gb(s['peak_rss_bytes'])} -> {s['output']}"
    )


def _show_lowrank(result, cfg) -> None:
    s = result.summary()
    size = f"rank {cfg.rank}" if cfg.rank is not None else f"{cfg.ratio:.0%} kept ({cfg.allocation})"
    form = "merged to dense" if cfg.merge else "as two linears each"
    print(
        f"{s['method']} {size}: {s['factorised']} of {s['modules']} linear layers factorised {form}, "
        f"{s['params']:,} of {s['dense_params']:,} weights ({s['kept']:.2%}) in {s['seconds']:.1f} s, "
        f"peak RSS {_gb(s['peak_rss_bytes'])} -> {s['output']}"
    )


def _show_convert_gqa(result, cfg) -> None:
    r, config = result.record, result.config
    kib = r["kv_cache_bytes_per_token_fp16_before"] / 1024, r["kv_cache_bytes_per_token_fp16_after"] / 1024
    up = r["uptraining"]
    kl = ""
    if up:
        kl = f", uptrained on {up['tokens']} tokens (KL {up['loss_first']:.4f} -> {up['loss_last']:.4f})"
    print(
        f"{config.method}: {r['layers']} layers, {r['kv_heads_before']} -> {r['kv_heads_after']} key/value "
        f"heads (KV cache {kib[0]:.1f} -> {kib[1]:.1f} KiB/token in float16){kl} in {r['seconds']:.1f} s "
        f"-> {config.output}"
    )


VERBS = {
    v.name: v
    for v in (
        Verb(
            "quantize",
            "quantize a model and save a checkpoint (GPTQ, AWQ, compressed-tensors or GGUF)",
            ("llmlite.config:QuantizeConfig",),
            "llmlite.api:quantize",
            _show_quantize,
        ),
        Verb(
            "eval",
            "perplexity and efficiency metrics of a model, or with --tasks/--report the report",
            ("llmlite.config:EvalConfig", "llmlite.evaluation.report:ReportConfig"),
            "llmlite.api:evaluate",
            _show_eval,
        ),
        Verb(
            "finetune",
            "fine-tune with LoRA, DoRA, QLoRA (NF4 base) or fully; LoRA on GPTQ checkpoints too",
            ("llmlite.training.config:FinetuneConfig",),
            "llmlite.api:finetune",
            _show_finetune,
        ),
        Verb(
            "generate",
            "generate text, optionally with a quantized KV cache",
            ("llmlite.kvcache.generate:GenerateConfig",),
            "llmlite.api:generate",
            _show_generate,
            quiet=False,
        ),
        Verb(
            "convert-gqa",
            "convert attention to fewer key/value heads (GQA/MQA), or more; optional uptraining",
            ("llmlite.gqa.api:GQAConfig",),
            "llmlite.api:convert_gqa",
            _show_convert_gqa,
        ),
        Verb(
            "prune",
            "set weights to zero (unstructured, N:M) or remove channels, heads or layers (--structure)",
            ("llmlite.pruning.api:PruneConfig",),
            "llmlite.api:prune",
            _show_prune,
        ),
        Verb(
            "lowrank",
            "factorise linears as U·V (SVD, ASVD, SVD-LLM) to a fraction of the weights; two linears each",
            ("llmlite.lowrank.api:LowrankConfig",),
            "llmlite.api:lowrank",
            _show_lowrank,
        ),
        Verb(
            "merge",
            "merge a LoRA/DoRA adapter into its base and save a full-precision model",
            ("llmlite.training.merge:MergeConfig",),
            "llmlite.api:merge",
            _show_merge,
            quiet=False,
        ),
        Verb(
            "export",
            "write a quantized checkpoint as GGUF (llama.cpp) or as a GPTQ, AWQ or compressed-tensors folder",
            ("llmlite.config:ExportConfig",),
            "llmlite.api:export",
            _show_export,
            quiet=False,
        ),
        Verb(
            "compare",
            "merge earlier reports into one table and Pareto plots",
            ("llmlite.evaluation.report:CompareConfig",),
            "llmlite.api:compare",
            _show_compare,
            quiet=False,
        ),
    )
}


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _terminate(signum: int, frame) -> None:
    """Turn SIGTERM/SIGHUP into an exception in the main thread (once: a second one during the
    cleanup is ignored), so that partial outputs are removed as after Ctrl-C."""
    from llmlite.errors import Terminated

    signal.signal(signum, signal.SIG_IGN)
    raise Terminated(signum)


def _exit_code(e: BaseException) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended: 130 for Ctrl-C."""
    from llmlite.errors import Terminated

    return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)


def _stop_reason(e: KeyboardInterrupt) -> str:
    from llmlite.errors import Terminated

    return f"terminated ({e})" if isinstance(e, Terminated) else "interrupted"


if __name__ == "__main__":
    sys.exit(main())
