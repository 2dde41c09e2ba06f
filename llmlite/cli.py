"""The ``llmlite`` command: each verb a thin wrapper over the Python API.

User mistakes print one line (``llmlite: error: ...``) and exit with 2; Ctrl-C exits with 130
after removing any partial output.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"llmlite: error: {message}; see {self.prog} --help\n")


def _parser() -> argparse.ArgumentParser:
    from llmlite import __version__
    from llmlite.quant.methods import METHODS

    root = _Parser(prog="llmlite", description="Quantize, fine-tune and evaluate LLMs.")
    root.add_argument("--version", action="version", version=f"llmlite {__version__}")
    verbs = root.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    q = verbs.add_parser(
        "quantize",
        help=f"quantize a model ({', '.join(METHODS)}) and save a GPTQ-layout checkpoint",
        argument_default=argparse.SUPPRESS,
        description="Quantize the linear layers of every decoder layer; with no options: the bundled "
        "smollm2-135m, GPTQ 4-bit, group 128, symmetric, act-order, 128 calibration windows of 512 tokens.",
    )
    q.add_argument("--model", help="bundled name, local folder, .gguf file or hub id (default smollm2-135m)")
    q.add_argument(
        "--method",
        choices=list(METHODS),
        help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()) + " (default gptq)",
    )
    q.add_argument("--bits", type=int, help="2, 3, 4 (default) or 8")
    q.add_argument("--group-size", type=int, help="columns per scale (default 128); -1 = per output channel")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (zero-points)")
    q.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        help="GPTQ columns by descending Hessian diagonal, static groups (default on)",
    )
    q.add_argument(
        "--mse",
        action=argparse.BooleanOptionalAction,
        help="search each group's clipping range (GPTQ reference's mse grid)",
    )
    q.add_argument(
        "--v2",
        action=argparse.BooleanOptionalAction,
        help="GPTAQ (GPTQModel's v2): fit each layer to the float model's outputs, not its own "
        "(default on for GPTQ; --no-v2: plain GPTQ)",
    )
    q.add_argument("--v2-alpha", type=float, help="strength of the --v2 correction, (0, 1] (default 0.25)")
    q.add_argument(
        "--v2-windows",
        type=int,
        help="calibration windows that --v2 also runs through the float model (default 16; 0: all)",
    )
    q.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        help="after GPTQ, re-solve each group's scale for the least layer-output error on the "
        "calibration data (default on for GPTQ; --no-refit: GPTQ's own scales)",
    )
    q.add_argument("--calibration", help="calibration text: file or corpus name (default wikitext2-valid)")
    q.add_argument("--samples", type=int, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=int, help="tokens per calibration window (default 512)")
    q.add_argument("--seed", type=int, help="calibration sampling seed (default 0)")
    q.add_argument("--damp", type=float, help="GPTQ damping, fraction of mean diag(H) (default 0.01)")
    q.add_argument(
        "--quantize-head",
        action=argparse.BooleanOptionalAction,
        help="also quantize lm_head (untied from the embeddings)",
    )
    q.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="storage of unquantized tensors (default float16)",
    )
    q.add_argument("--recipe", help="YAML file of these options (explicit options win)")
    q.add_argument("--output", help="checkpoint folder to write (required)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_quantize)

    e = verbs.add_parser(
        "eval",
        help="perplexity and efficiency metrics of a model",
        argument_default=argparse.SUPPRESS,
        description="Perplexity over non-overlapping windows (the GPTQ/AWQ papers' protocol) plus "
        "parameters, size on disk, time and peak memory.",
    )
    e.add_argument(
        "model",
        nargs="?",
        help="bundled name, folder, .gguf file, hub id or checkpoint (default smollm2-135m)",
    )
    e.add_argument("--ppl", help="text: file or corpus name (default wikitext2, the raw test split)")
    e.add_argument("--ctx", type=int, help="tokens per window (default 2048)")
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    e.add_argument("--batch-size", type=int, help="windows per forward pass (default 1)")
    e.add_argument("--baseline", help="also evaluate this model (e.g. the unquantized one) and compare")
    e.add_argument("--json", help="write the results to this JSON file")
    e.add_argument(
        "--tasks",
        help="report tasks, comma-separated: wikitext, piqa, calibration, efficiency (the default), "
        "kv_cache, passkey, needle, ppl_by_position, all, or any lm-eval task",
    )
    e.add_argument(
        "--limit",
        help="documents per task (windows for wikitext and calibration): N, or N,TASK=M,... per task",
    )
    _kv_options(e)
    e.add_argument(
        "--prefill", type=int, help="with --kv-bits: tokens per window that fill the cache first (256)"
    )
    e.add_argument(
        "--chunk",
        type=int,
        help="with --kv-bits: tokens scored per step against the cache (32; 1 = decoding)",
    )
    e.add_argument("--report", help="write report.json, report.md and plots to this folder")
    e.add_argument("--no-cache", dest="cache", action="store_false", help="recompute cached task results")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --report folder")
    e.add_argument("--recipe", help="YAML file of these options (explicit options win)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_eval)

    _finetune_parser(verbs)
    _generate_parser(verbs)
    _convert_gqa_parser(verbs)
    m = verbs.add_parser(
        "merge",
        help="merge a LoRA/DoRA adapter into its base and save a full-precision model",
        description="Fold the adapter into its base (dequantized first when the base is NF4 or GPTQ) "
        "and write a float32 model that plain transformers loads.",
    )
    m.add_argument("adapter", help="adapter folder written by llmlite finetune (or peft)")
    m.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    m.add_argument("--output", required=True, help="folder for the merged model")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.set_defaults(func=_merge)

    c = verbs.add_parser("compare", help="merge earlier reports into one table and Pareto plots")
    c.add_argument("reports", nargs="+", help="report folders written by llmlite eval --report")
    c.add_argument("--output", help="write compare.md, compare.json and plots to this folder")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    c.set_defaults(func=_compare)
    return root


def _finetune_parser(verbs) -> None:
    f = verbs.add_parser(
        "finetune",
        help="fine-tune with LoRA, DoRA, QLoRA (NF4 base) or fully; LoRA on GPTQ checkpoints too",
        argument_default=argparse.SUPPRESS,
        description="Train adapters (peft format) on text (packed) or instruction JSONL (loss on the "
        "responses). Defaults: the bundled smollm2-135m, LoRA rank 16, alpha 32, every attention and "
        "MLP projection, 512 tokens, batch 4, AdamW 2e-4, cosine schedule, 1 epoch, 5%% held out.",
    )
    f.add_argument("--model", help="bundled name, folder, hub id, .gguf or llmlite GPTQ checkpoint")
    f.add_argument("--data", help="text (.txt/.jsonl/.parquet, corpus or hub dataset) or instruction JSONL")
    f.add_argument("--format", choices=["auto", "text", "instruction"], help="default auto (by the rows)")
    f.add_argument("--method", choices=["lora", "qlora", "dora", "full"], help="default lora")
    f.add_argument("--rank", type=int, help="adapter rank (default 16)")
    f.add_argument("--alpha", type=float, help="adapter alpha (default 32)")
    f.add_argument("--dropout", type=float, help="adapter dropout (default 0)")
    f.add_argument("--rslora", action=argparse.BooleanOptionalAction, help="scale by alpha/sqrt(rank)")
    f.add_argument("--target-modules", help="comma-separated module names (default: all projections)")
    f.add_argument("--seqlen", type=int, help="tokens per sequence (default 512)")
    f.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 4)")
    f.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    f.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        help="batch examples of similar length together (default on)",
    )
    f.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    f.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    f.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    f.add_argument("--schedule", choices=["cosine", "linear", "constant"], help="default cosine")
    f.add_argument("--warmup-ratio", type=float, help="fraction of steps warming up (default 0.03)")
    f.add_argument("--weight-decay", type=float, help="default 0")
    f.add_argument("--max-grad-norm", type=float, help="gradient clipping, 0 = off (default 1)")
    f.add_argument(
        "--optimizer",
        choices=["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"],
        help="default adamw; the others are bitsandbytes' (GPU)",
    )
    f.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile each decoder layer (default on; the first step is slower)",
    )
    f.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="recompute activations"
    )
    f.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="base dtype (default auto)"
    )
    f.add_argument("--eval-split", type=float, help="fraction held out for evaluation loss (default 0.05)")
    f.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: at each checkpoint)")
    f.add_argument("--save-steps", type=int, help="checkpoint every N steps (default 100)")
    f.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default 2)")
    f.add_argument("--log-steps", type=int, help="log every N steps (default 10)")
    f.add_argument("--seed", type=int, help="default 0")
    f.add_argument("--resume", action="store_true", help="continue the interrupted run of this --output")
    f.add_argument("--recipe", help="YAML file of these options (explicit options win)")
    f.add_argument("--output", help="folder for the adapter (required)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_finetune)


def _convert_gqa_parser(verbs) -> None:
    g = verbs.add_parser(
        "convert-gqa",
        help="convert attention to fewer key/value heads (GQA/MQA), or more; optional uptraining",
        argument_default=argparse.SUPPRESS,
        description="Merge the key/value heads of a Llama, Mistral or Qwen2 model into --kv-heads groups "
        "(or repeat them, an exact change), optionally uptrain by distillation from the original, and "
        "save a model plain transformers loads. Defaults: the bundled smollm2-135m, the aligned method "
        "on 16 calibration windows of 512 tokens, no uptraining.",
    )
    g.add_argument("--model", help="bundled name, local folder, .gguf file or hub id (default smollm2-135m)")
    g.add_argument("--kv-heads", type=int, help="key/value heads to keep (required)")
    g.add_argument(
        "--method",
        choices=["mean", "weighted", "aligned"],
        help="mean pooling; weighted by query energy and o_proj; aligned (default): merge aligned "
        "heads, folding the alignment into q_proj/o_proj",
    )
    g.add_argument("--calibration", help="calibration text: file or corpus name (default wikitext2-valid)")
    g.add_argument("--samples", type=int, help="calibration windows, weighted/aligned methods (default 16)")
    g.add_argument("--seqlen", type=int, help="tokens per calibration and uptraining window (default 512)")
    g.add_argument("--seed", type=int, help="sampling seed (default 0)")
    g.add_argument("--uptrain-tokens", type=int, help="distillation tokens after converting (default 0: off)")
    g.add_argument("--uptrain-lr", type=float, help="peak learning rate, cosine to 0 (default 1e-4)")
    g.add_argument(
        "--uptrain-params", choices=["attention", "all"], help="what uptraining trains (default attention)"
    )
    g.add_argument("--batch-size", type=int, help="uptraining windows per step (default 4)")
    g.add_argument("--recipe", help="YAML file of these options (explicit options win)")
    g.add_argument("--output", help="folder for the converted model (required)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=_convert_gqa)


def _convert_gqa(args: argparse.Namespace) -> int:
    from llmlite.errors import LlmliteError
    from llmlite.gqa import GQAConfig, convert_gqa_model
    from llmlite.recipes import build

    options, recipe, progress = _options(args)
    config = build(GQAConfig, recipe, **options)
    if not config.output:
        raise LlmliteError("convert-gqa needs --output DIR (the folder for the converted model)")
    r = convert_gqa_model(config, recipe=recipe, progress=progress).record
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
    return 0


def _kv_options(parser: argparse.ArgumentParser) -> None:
    from llmlite.kvcache.defaults import KV_DEFAULTS as d

    parser.add_argument(
        "--kv-bits", type=int, help="quantized KV cache: 2, 4 or 8 bits (16 = unquantized cache)"
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        help=f"channels per value group; KIVI: also tokens per key group ({d['group_size']})",
    )
    parser.add_argument(
        "--kv-residual", type=int, help=f"recent tokens kept in full precision ({d['residual']})"
    )
    parser.add_argument("--kv-sinks", type=int, help=f"first tokens kept in full precision ({d['sinks']})")
    parser.add_argument(
        "--kv-scheme",
        help="kivi (keys per channel in token groups), salient (keys per token, the most important "
        "channels at twice the bits; values rotated) or auto: salient at 2 bits, kivi otherwise (auto)",
    )
    parser.add_argument(
        "--kv-salient",
        type=float,
        help=f"salient scheme: fraction of key channels at twice the bits ({d['salient']})",
    )


def _generate_parser(verbs) -> None:
    g = verbs.add_parser(
        "generate",
        help="generate text, optionally with a quantized KV cache",
        argument_default=argparse.SUPPRESS,
        description="Continue PROMPT with the model (greedy unless --temperature). With --kv-bits the keys "
        "and values are stored in llmlite's quantized cache (--kv-scheme kivi or salient).",
    )
    g.add_argument("prompt", help="the text to continue")
    g.add_argument(
        "--model", help="bundled name, folder, .gguf file, hub id or checkpoint (default smollm2-135m)"
    )
    g.add_argument("--max-new-tokens", type=int, help="tokens to generate (default 64)")
    _kv_options(g)
    g.add_argument("--temperature", type=float, help="sampling temperature; 0 = greedy (default)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (default 1)")
    g.add_argument("--seed", type=int, help="sampling seed (default 0)")
    g.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, help="wrap the prompt in the chat template"
    )
    g.add_argument("--recipe", help="YAML file of these options (explicit options win)")
    g.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from llmlite.kvcache.generate import generate

    options, recipe, _ = _options(args)
    r = generate(recipe=recipe, **options)
    print(r.text)
    cache = "default cache" if r.kv_bits is None else f"{r.kv_bits}-bit KV cache"
    ratio = f", {r.float16_cache_bytes / r.cache_bytes:.2f}x smaller than float16" if r.cache_bytes else ""
    print(
        f"llmlite: {r.new_tokens} tokens after a {r.prompt_tokens}-token prompt in {r.seconds:.2f} s "
        f"({r.tokens_per_second:.1f} tokens/s); {cache} holds {_mb(r.cache_bytes)}{ratio}",
        file=sys.stderr,
    )
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from llmlite.training.train import TrainingInterrupted, finetune

    options, recipe, progress = _options(args)
    try:
        r = finetune(recipe=recipe, progress=progress, **options)
    except TrainingInterrupted as e:
        print(f"llmlite: {e}", file=sys.stderr)
        return _exit_code(e.__context__ or e)
    losses = ""
    if r.eval_loss_before is not None:
        losses = f" | eval loss {r.eval_loss_before:.4f} -> {r.eval_loss_after:.4f}"
    print(
        f"{r.method} on {r.train_examples} {r.data_format} examples: {r.steps} steps, "
        f"{r.train_tokens} tokens in {r.seconds:.1f} s ({r.tokens_per_second:.0f} tokens/s), "
        f"peak memory {_gb(r.peak_memory_bytes)}{losses} -> {r.output}"
    )
    return 0


def _merge(args: argparse.Namespace) -> int:
    from llmlite.training.merge import merge

    out = merge(args.adapter, args.output, base=args.base, overwrite=args.overwrite)
    print(f"merged {args.adapter} -> {out}")
    return 0


def _options(args: argparse.Namespace) -> tuple[dict, str | None, bool]:
    options = dict(vars(args))
    for key in ("verb", "func"):
        options.pop(key, None)
    quiet = options.pop("quiet", False)
    if quiet:  # transformers' own bars too ("Loading weights")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return options, options.pop("recipe", None), not quiet


def _quantize(args: argparse.Namespace) -> int:
    from llmlite.api import quantize
    from llmlite.config import QuantizeConfig
    from llmlite.errors import LlmliteError
    from llmlite.recipes import build

    options, recipe, progress = _options(args)
    config = build(QuantizeConfig, recipe, **options)
    if not config.output:
        raise LlmliteError("quantize needs --output DIR (the checkpoint folder to write)")
    result = quantize(config, recipe=recipe, progress=progress)
    s = result.summary()
    grid = f"{s['bits']}-bit, group {s['group_size']}, {'sym' if s['sym'] else 'asym'}"
    print(
        f"{s['method']} {grid}: {s['modules']} linear layers in {s['seconds']:.1f} s, "
        f"peak RSS {_gb(s['peak_rss_bytes'])} -> {s['output']} ({_mb(s['size_bytes'])})"
    )
    return 0


_REPORT_OPTIONS = ("tasks", "limit", "report", "cache", "overwrite")
_KV_OPTIONS = ("kv_group_size", "kv_residual", "kv_sinks", "kv_scheme", "kv_salient", "prefill", "chunk")


def _eval(args: argparse.Namespace) -> int:
    from llmlite.api import evaluate
    from llmlite.errors import LlmliteError

    options, recipe, progress = _options(args)
    if any(k in options for k in _REPORT_OPTIONS):
        return _report(options, recipe, progress)
    given = [k for k in _KV_OPTIONS if k in options]
    if given and "kv_bits" not in options and recipe is None:
        raise LlmliteError(
            f"--{given[0].replace('_', '-')} is a KV-cache option; add --kv-bits N to use the cache"
        )
    result = evaluate(recipe=recipe, progress=progress, **options)
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
    return 0


def _report(options: dict, recipe: str | None, progress: bool) -> int:
    from llmlite.errors import LlmliteError
    from llmlite.evaluation.render import markdown
    from llmlite.evaluation.report import report

    for kv in ("kv_bits", *_KV_OPTIONS):
        if kv in options:
            raise LlmliteError(
                f"--{kv.replace('_', '-')} is not a report option; "
                "run llmlite eval --kv-bits N without --tasks/--report"
            )
    for old in ("ppl", "max_windows", "batch_size", "json"):
        if old in options:
            flag = old.replace("_", "-")
            raise LlmliteError(
                f"--{flag} is not a report option; with --tasks/--report use --limit and --ctx"
            )
    out = report(recipe=recipe, progress=progress, **options)
    print(markdown(out), end="")
    if out["settings"]["report"]:
        print(f"report written to {out['settings']['report']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from llmlite.evaluation.render import compare_markdown
    from llmlite.evaluation.report import compare

    out = compare(args.reports, output=args.output, overwrite=args.overwrite)
    print(compare_markdown(out), end="")
    if args.output:
        print(f"comparison written to {args.output}")
    return 0


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


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
        return args.func(args)
    except LlmliteError as e:
        print(f"llmlite: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"llmlite: {_stop_reason(e)}; no output was written", file=sys.stderr)
        return _exit_code(e)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


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
