"""Every verb against bad and hostile input: the table behind ``test_bad_inputs.py`` and
``docs/errors.md``.

Each case runs the real CLI (``llmlite.cli.main``, in this process) inside a workspace of real
inputs (a tiny Llama, its RTN checkpoint, a LoRA adapter, a report, a GPT-2, a BERT, corrupt copies,
text and recipe files) and must give exit code 2, one ``llmlite: error:`` line naming what it
names, no traceback, and leave every file of the workspace as it was (nothing created, deleted or
changed). ``python tests/bad_inputs.py`` writes the table of inputs and messages to docs/errors.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

LLMLITE = str(Path(sys.executable).parent / "llmlite")

# name -> (verb and arguments, texts the error line must hold); paths are relative to the workspace,
# which is the current folder of every run
Q = ["quantize", "--model", "tiny", "--method", "rtn", "--quiet"]
QO = [*Q, "--output", "out"]
E = ["eval", "tiny", "--max-windows", "1", "--ctx", "64", "--ppl", "text.txt", "--quiet"]
R = ["eval", "tiny", "--tasks", "efficiency", "--quiet"]
F = ["finetune", "--model", "tiny", "--data", "text.txt", "--max-steps", "1", "--no-compile", "--quiet"]
FO = [*F, "--output", "out"]
G = ["generate", "hello", "--model", "tiny", "--max-new-tokens", "2"]
C = ["convert-gqa", "--model", "tiny", "--method", "mean", "--quiet"]
CO = [*C, "--kv-heads", "1", "--output", "out"]
P = ["prune", "--model", "tiny", "--method", "wanda", "--samples", "2", "--seqlen", "32", "--quiet"]
PO = [*P, "--output", "out"]
L = ["lowrank", "--model", "tiny", "--method", "svd-llm", "--samples", "2", "--seqlen", "32", "--quiet"]
LO = [*L, "--output", "out"]
S = ["prune", "--model", "tiny", "--samples", "2", "--seqlen", "32", "--quiet", "--output", "out"]

CASES: dict[str, tuple[list[str], list[str]]] = {
    # quantize: outputs
    "quantize: --format gguf at group 128": (
        [*Q, "--format", "gguf", "--output", "m.gguf"],
        ["--format gguf", "--group-size 32"],
    ),
    "quantize: --format gguf at 3 bits": (
        [*Q, "--format", "gguf", "--group-size", "32", "--bits", "3", "--output", "m.gguf"],
        ["--format gguf", "--bits 4"],
    ),
    "quantize: --format onnx": ([*Q, "--format", "onnx", "--output", "m"], ["--format", "invalid choice"]),
    "quantize: --format awq at 3 bits": (
        [*QO, "--format", "awq", "--bits", "3"],
        ["--format awq holds 4-bit", "--bits 4", "--format gptq"],
    ),
    "quantize: --format compressed-tensors at 2 bits": (
        [*QO, "--format", "compressed-tensors", "--bits", "2"],
        ["--format compressed-tensors holds 4 or 8-bit", "--format gptq"],
    ),
    "quantize: --format awq with --quantize-head": (
        [*QO, "--format", "awq", "--quantize-head"],
        ["--format awq", "lm_head", "--format gptq or compressed-tensors"],
    ),
    "quantize: output is the current folder": ([*Q, "--output", "."], ["--output .", "current folder"]),
    "quantize: output is a parent of it": ([*Q, "--output", ".."], ["--output ..", "parent"]),
    "quantize: output is the model": ([*Q, "--output", "tiny", "--overwrite"], ["--output tiny", "--model"]),
    "quantize: output inside the model": ([*Q, "--output", "tiny/q"], ["lies inside --model"]),
    "quantize: output resolves to cwd": ([*Q, "--output", "tiny/..", "--overwrite"], ["current folder"]),
    "quantize: output is a symlink to the model": ([*Q, "--output", "link", "--overwrite"], ["--model"]),
    "quantize: output contains the calibration text": (
        [*Q, "--calibration", "texts/calib.txt", "--output", "texts", "--overwrite"],
        ["contains --calibration"],
    ),
    "quantize: output is the recipe": (
        [*Q, "--recipe", "good.yaml", "--output", "good.yaml", "--overwrite"],
        ["--output good.yaml", "--recipe"],
    ),
    "quantize: output is an existing file": ([*Q, "--output", "plain.txt"], ["existing file", "--output"]),
    "quantize: output under a file": (
        [*Q, "--output", "plain.txt/out"],
        ["--output plain.txt/out", "a file"],
    ),
    "quantize: output in /proc": ([*Q, "--output", "/proc/llmlite-out"], ["--output /proc/llmlite-out"]),
    "quantize: output exists": ([*Q, "--output", "exists"], ["already exists", "--overwrite"]),
    "quantize: output empty": ([*Q, "--output", ""], ["--output"]),
    "quantize: no output": (Q, ["--output"]),
    # quantize: models
    "quantize: missing model folder": ([*QO, "--model", "./missing"], ["no such model", "./missing"]),
    "quantize: unknown model name": ([*QO, "--model", "nonesuch"], ["unknown model", "nonesuch"]),
    "quantize: a text file as model": ([*QO, "--model", "plain.txt"], ["plain.txt", "not a model"]),
    "quantize: folder without config.json": ([*QO, "--model", "exists"], ["exists", "config.json"]),
    "quantize: already quantized": ([*QO, "--model", "ckpt"], ["ckpt", "already", "float model"]),
    "quantize: GPT-2 (no nn.Linear)": ([*QO, "--model", "gpt2"], ["GPT2LMHeadModel"]),
    "quantize: BERT encoder": ([*QO, "--model", "bert"], ["bert", "not a causal language model"]),
    "quantize: corrupt config.json": ([*QO, "--model", "broken-config"], ["broken-config", "config.json"]),
    "quantize: truncated weights": ([*QO, "--model", "truncated"], ["truncated"]),
    "quantize: weights that miss tensors": ([*QO, "--model", "missing-tensor"], ["missing-tensor"]),
    "quantize: checkpoint scales of the wrong shape": (
        [*QO, "--model", "bad-scales"],
        ["bad-scales", "scales"],
    ),
    "quantize: checkpoint bits in config unsupported": ([*QO, "--model", "bad-bits"], ["bad-bits", "bits"]),
    # quantize: options
    "quantize: --bits 5": ([*QO, "--bits", "5"], ["5-bit", "--bits"]),
    "quantize: --bits five": ([*QO, "--bits", "five"], ["--bits", "invalid int"]),
    "quantize: --group-size 0": ([*QO, "--group-size", "0"], ["group size 0"]),
    "quantize: --group-size -2": ([*QO, "--group-size", "-2"], ["group size -2"]),
    "quantize: --damp 2": ([*QO, "--method", "gptq", "--damp", "2"], ["--damp 2"]),
    "quantize: --damp 0": ([*QO, "--method", "gptq", "--damp", "0"], ["--damp 0"]),
    "quantize: --samples 0": ([*QO, "--method", "gptq", "--samples", "0"], ["--samples"]),
    "quantize: --seqlen 0": ([*QO, "--method", "gptq", "--seqlen", "0"], ["--seqlen"]),
    "quantize: --seqlen above the model": ([*QO, "--method", "gptq", "--seqlen", "100000"], ["--seqlen"]),
    "quantize: --v2-alpha 0": ([*QO, "--method", "gptq", "--v2-alpha", "0"], ["--v2-alpha 0"]),
    "quantize: --v2-windows -1": ([*QO, "--method", "gptq", "--v2-windows", "-1"], ["--v2-windows -1"]),
    "quantize: --refit with rtn": ([*QO, "--refit"], ["--refit", "gptq"]),
    "quantize: --v2 with rtn": ([*QO, "--v2"], ["--v2", "gptq"]),
    "quantize: --method awqq": ([*QO, "--method", "awqq"], ["--method", "invalid choice"]),
    "quantize: --clip with gptq": ([*QO, "--method", "gptq", "--clip"], ["--clip", "awq"]),
    "quantize: --awq-vo with rtn": ([*QO, "--awq-vo"], ["--awq-vo", "awq"]),
    # quantize: mixed precision
    "quantize: --avg-bits and --budget-mb": (
        [*QO, "--avg-bits", "3.5", "--budget-mb", "20"],
        ["--avg-bits and --budget-mb", "give one"],
    ),
    "quantize: --avg-bits outside the candidate widths": (
        [*QO, "--avg-bits", "9"],
        ["--avg-bits 9", "outside the candidate widths 2 to 8"],
    ),
    "quantize: --avg-bits with --bits": (
        [*QO, "--avg-bits", "3.5", "--bits", "3"],
        ["--bits 3 and --avg-bits", "drop --bits"],
    ),
    "quantize: --avg-bits with --format awq": (
        [*QO, "--avg-bits", "3.5", "--format", "awq"],
        ["--format awq holds one weight width", "--format compressed-tensors or gptq"],
    ),
    "quantize: --budget-mb with --format gguf": (
        [*Q, "--budget-mb", "20", "--format", "gguf", "--output", "m.gguf"],
        ["--format gguf holds one weight width", "--budget-mb", "--format compressed-tensors or gptq"],
    ),
    "quantize: --bits-candidates the format cannot hold": (
        [*QO, "--avg-bits", "4", "--format", "compressed-tensors", "--bits-candidates", "3,4"],
        ["--bits-candidates 3", "compressed-tensors holds 4 or 8-bit"],
    ),
    "quantize: --bits-candidates not widths": (
        [*QO, "--avg-bits", "3", "--bits-candidates", "three"],
        ["--bits-candidates 'three'", "3,4,8"],
    ),
    "quantize: --bits-candidates without a budget": (
        [*QO, "--bits-candidates", "3,4"],
        ["--bits-candidates", "--avg-bits or --budget-mb"],
    ),
    "quantize: --budget-mb 0": ([*QO, "--budget-mb", "0"], ["--budget-mb 0", "positive"]),
    "quantize: --budget-mb below the smallest allocation": (
        [*QO, "--budget-mb", "1"],
        ["--budget-mb 1 is below the smallest allocation", "raise it to at least"],
    ),
    "quantize: --avg-bits with --quantize-head": (
        [*QO, "--avg-bits", "3.5", "--quantize-head"],
        ["--avg-bits", "drop --quantize-head"],
    ),
    "quantize: AWQ on a layout without its mappings (OPT)": (
        [*QO, "--method", "awq", "--model", "opt"],
        ["--method awq", "Llama layer layout", "OPTForCausalLM"],
    ),
    "quantize: --dtype int8": ([*QO, "--dtype", "int8"], ["--dtype", "invalid choice"]),
    "quantize: unknown option": ([*QO, "--bitz", "3"], ["--bitz"]),
    "quantize: missing calibration file": (
        [*QO, "--method", "gptq", "--calibration", "./nope.txt"],
        ["nope.txt"],
    ),
    "quantize: calibration shorter than a window": (
        [*QO, "--method", "gptq", "--calibration", "short.txt"],
        ["fewer than one window", "--seqlen"],
    ),
    "quantize: binary calibration file": (
        [*QO, "--method", "gptq", "--calibration", "binary.bin"],
        ["binary"],
    ),
    "quantize: calibration mix names a source twice": (
        [*QO, "--method", "gptq", "--calibration", "self+self"],
        ["--calibration", "name each source once"],
    ),
    "quantize: fewer windows than calibration sources": (
        [*QO, "--method", "gptq", "--calibration", "text.txt+self", "--samples", "1"],
        ["--samples 1", "fewer than the 2 calibration sources"],
    ),
    # recipes (quantize)
    "quantize: missing recipe": ([*QO, "--recipe", "nope.yaml"], ["no such recipe", "nope.yaml"]),
    "quantize: binary recipe": ([*QO, "--recipe", "binary.bin"], ["recipe binary.bin"]),
    "quantize: recipe is a list": ([*QO, "--recipe", "list.yaml"], ["recipe list.yaml", "mapping"]),
    "quantize: recipe with unknown key": ([*QO, "--recipe", "badkey.yaml"], ["bitz"]),
    "quantize: recipe with a wrong type": ([*QO, "--recipe", "badtype.yaml"], ["bits", "whole number"]),
    "quantize: recipe is a folder": ([*QO, "--recipe", "exists"], ["recipe exists"]),
    "quantize: invalid YAML recipe": ([*QO, "--recipe", "invalid.yaml"], ["recipe invalid.yaml"]),
    # eval
    "eval: --json is the current folder": ([*E, "--json", "."], ["--json .", "current folder"]),
    "eval: --json is a folder": ([*E, "--json", "exists"], ["--json exists", "folder"]),
    "eval: --json under a file": ([*E, "--json", "plain.txt/r.json"], ["--json plain.txt/r.json"]),
    "eval: --json in /proc": ([*E, "--json", "/proc/r.json"], ["--json /proc/r.json"]),
    "eval: --json inside the model": ([*E, "--json", "tiny/config.json"], ["--json", "--model"]),
    "eval: --json is the text": ([*E, "--json", "text.txt"], ["--json text.txt", "--ppl"]),
    "eval: --report is the model": ([*R, "--report", "tiny", "--overwrite"], ["--report tiny", "--model"]),
    "eval: --report inside the model": ([*R, "--report", "tiny/report"], ["--report", "lies inside"]),
    "eval: --report is the current folder": ([*R, "--report", ".", "--overwrite"], ["current folder"]),
    "eval: --report exists": ([*R, "--report", "exists"], ["--report exists", "already exists"]),
    "eval: --report is a file": ([*R, "--report", "plain.txt", "--overwrite"], ["--report", "existing file"]),
    "eval: --report under a file": ([*R, "--report", "plain.txt/r"], ["--report plain.txt/r"]),
    "eval: --report in /proc": ([*R, "--report", "/proc/r"], ["--report /proc/r"]),
    "eval: --report is the baseline": (
        [*R, "--baseline", "ckpt", "--report", "ckpt", "--overwrite"],
        ["--report ckpt", "--baseline"],
    ),
    "eval: missing model": ([*E, "--baseline", "./missing"], ["no such model", "./missing"]),
    "eval: unknown model": (["eval", "nonesuch", "--quiet"], ["unknown model"]),
    "eval: BERT encoder": (
        ["eval", "bert", "--max-windows", "1", "--quiet"],
        ["not a causal language model"],
    ),
    "eval: truncated weights": (["eval", "truncated", "--quiet"], ["truncated"]),
    "eval: checkpoint scales of the wrong shape": (["eval", "bad-scales", "--quiet"], ["bad-scales"]),
    "eval: --ctx 1": ([*E, "--ctx", "1"], ["--ctx 1"]),
    "eval: --ctx above the model": ([*E, "--ctx", "100000"], ["--ctx 100000", "maximum"]),
    "eval: --max-windows 0": ([*E, "--max-windows", "0"], ["--max-windows"]),
    "eval: --batch-size 0": ([*E, "--batch-size", "0"], ["--batch-size"]),
    "eval: missing text": ([*E, "--ppl", "./nope.txt"], ["nope.txt"]),
    "eval: text shorter than a window": (
        [*E, "--ppl", "short.txt", "--ctx", "512"],
        ["fewer than one window"],
    ),
    "eval: binary text": ([*E, "--ppl", "binary.bin"], ["binary.bin"]),
    "eval: --kv-bits 3": ([*E, "--kv-bits", "3"], ["--kv-bits"]),
    "eval: --kv-residual above --ctx": ([*E, "--kv-bits", "4", "--kv-residual", "9999"], ["--kv-residual"]),
    "eval: --prefill 0": ([*E, "--kv-bits", "4", "--prefill", "0"], ["--prefill"]),
    "eval: --chunk 0": ([*E, "--kv-bits", "4", "--prefill", "16", "--chunk", "0"], ["--chunk"]),
    "eval: --kv-scheme bogus": ([*E, "--kv-bits", "4", "--kv-scheme", "bogus"], ["bogus"]),
    "eval: --kv-salient 2": ([*E, "--kv-bits", "2", "--kv-salient", "2"], ["salient"]),
    "eval: --kv-group-size 0": ([*E, "--kv-bits", "4", "--kv-group-size", "0"], ["group"]),
    "eval: KV option without --kv-bits": ([*E, "--kv-residual", "8"], ["--kv-residual", "--kv-bits"]),
    "eval: --kv-bits with --batch-size": (
        [*E, "--kv-bits", "4", "--prefill", "16", "--batch-size", "2"],
        ["--batch-size"],
    ),
    "eval: unknown task": ([*R, "--tasks", "bogus"], ["bogus"]),
    "eval: bad --limit": ([*R, "--limit", "x=y=z"], ["--limit"]),
    "eval: --limit for a task not run": ([*R, "--limit", "piqa=5"], ["--limit", "piqa"]),
    "eval: --ppl with --tasks": ([*R, "--ppl", "text.txt"], ["--ppl", "report option"]),
    "eval: --kv-bits with --tasks": ([*R, "--kv-bits", "4"], ["--kv-bits", "report option"]),
    "eval: --json with --report": ([*R, "--json", "r.json", "--report", "r"], ["--json"]),
    "eval: --report --ctx above the model": (
        ["eval", "tiny", "--tasks", "wikitext", "--ctx", "100000", "--quiet"],
        ["--ctx 100000"],
    ),
    "eval: binary recipe": ([*E, "--recipe", "binary.bin"], ["recipe binary.bin"]),
    "eval: recipe of another verb": ([*E, "--recipe", "good.yaml"], ["good.yaml", "bits"]),
    "eval: --ctx x": ([*E, "--ctx", "x"], ["--ctx", "invalid int"]),
    # compare
    "compare: missing report": (["compare", "./missing"], ["./missing"]),
    "compare: a file as report": (["compare", "plain.txt"], ["plain.txt"]),
    "compare: folder without report.json": (["compare", "exists"], ["exists", "report.json"]),
    "compare: report.json without models": (["compare", "report-nomodels"], ["report-nomodels", "models"]),
    "compare: report.json not JSON": (["compare", "report-notjson"], ["report-notjson"]),
    "compare: output is the report": (
        ["compare", "report", "--output", "report", "--overwrite"],
        ["--output report", "REPORT"],
    ),
    "compare: output inside the report": (["compare", "report", "--output", "report/c"], ["lies inside"]),
    "compare: output DIR/.. is cwd": (
        ["compare", "report", "--output", "report/..", "--overwrite"],
        ["current folder"],
    ),
    "compare: output is a parent": (["compare", "report", "--output", ".."], ["parent"]),
    "compare: output is a file": (["compare", "report", "--output", "plain.txt"], ["existing file"]),
    "compare: output in /proc": (["compare", "report", "--output", "/proc/c"], ["--output /proc/c"]),
    "compare: output exists": (["compare", "report", "--output", "exists"], ["already exists"]),
    "compare: no report": (["compare"], ["reports"]),
    # finetune
    "finetune: output is the current folder": ([*F, "--output", "."], ["current folder"]),
    "finetune: output is the model": ([*F, "--output", "tiny", "--overwrite"], ["--model"]),
    "finetune: output is the data": (
        [*F, "--output", "text.txt", "--overwrite"],
        ["--output text.txt", "--data"],
    ),
    "finetune: output contains the data": (
        [*F, "--data", "texts/calib.txt", "--output", "texts", "--overwrite"],
        ["contains --data"],
    ),
    "finetune: output under a file": ([*F, "--output", "plain.txt/a"], ["--output plain.txt/a"]),
    "finetune: output in /proc": ([*F, "--output", "/proc/a"], ["--output /proc/a"]),
    "finetune: output exists": ([*F, "--output", "exists"], ["already exists"]),
    "finetune: no output": (F, ["--output"]),
    "finetune: resume a finished run": ([*F, "--output", "adapter", "--resume"], ["adapter", "resume"]),
    "finetune: resume with nothing to resume": ([*FO, "--resume"], ["resume"]),
    "finetune: missing data": ([*FO, "--data", "./nope.txt"], ["nope.txt"]),
    "finetune: malformed JSONL": ([*FO, "--data", "bad.jsonl"], ["bad.jsonl", "line 2"]),
    "finetune: JSONL rows without text": ([*FO, "--data", "noresp.jsonl"], ["noresp.jsonl", "line 2"]),
    "finetune: empty data": ([*FO, "--data", "empty.txt"], ["empty.txt"]),
    "finetune: binary data": ([*FO, "--data", "binary.bin"], ["binary.bin"]),
    "finetune: --seqlen above the model": ([*FO, "--seqlen", "1000000"], ["--seqlen 1000000", "maximum"]),
    "finetune: --rank 0": ([*FO, "--rank", "0"], ["--rank"]),
    "finetune: --lr -1": ([*FO, "--lr", "-1"], ["--lr"]),
    "finetune: --epochs 0": ([*FO, "--epochs", "0"], ["--epochs"]),
    "finetune: --batch-size 0": ([*FO, "--batch-size", "0"], ["--batch-size"]),
    "finetune: --grad-accum 0": ([*FO, "--grad-accum", "0"], ["--grad-accum"]),
    "finetune: --eval-split 1.5": ([*FO, "--eval-split", "1.5"], ["--eval-split"]),
    "finetune: --warmup-ratio 2": ([*FO, "--warmup-ratio", "2"], ["--warmup-ratio"]),
    "finetune: --dropout 1.5": ([*FO, "--dropout", "1.5"], ["--dropout"]),
    "finetune: --save-steps 0": ([*FO, "--save-steps", "0"], ["--save-steps"]),
    "finetune: --keep-checkpoints 0": ([*FO, "--keep-checkpoints", "0"], ["--keep-checkpoints"]),
    "finetune: --max-steps 0": ([*FO, "--max-steps", "0"], ["--max-steps"]),
    "finetune: unknown target modules": ([*FO, "--target-modules", "nonesuch"], ["nonesuch"]),
    "finetune: 8-bit optimizer on a CPU": ([*FO, "--optimizer", "adamw_8bit"], ["adamw_8bit"]),
    "finetune: --method bogus": ([*FO, "--method", "bogus"], ["--method", "invalid choice"]),
    "finetune: BERT encoder": ([*FO, "--model", "bert"], ["not a causal language model"]),
    "finetune: missing model": ([*FO, "--model", "./missing"], ["no such model"]),
    "finetune: binary recipe": ([*FO, "--recipe", "binary.bin"], ["recipe binary.bin"]),
    # merge
    "merge: missing adapter": (["merge", "./missing", "--output", "out"], ["no such adapter", "missing"]),
    "merge: a file as adapter": (["merge", "plain.txt", "--output", "out"], ["plain.txt"]),
    "merge: a model as adapter": (["merge", "tiny", "--output", "out"], ["tiny", "adapter_config.json"]),
    "merge: truncated adapter weights": (
        ["merge", "adapter-truncated", "--output", "out"],
        ["adapter-truncated"],
    ),
    "merge: invalid adapter config": (
        ["merge", "adapter-badconfig", "--output", "out"],
        ["adapter-badconfig"],
    ),
    "merge: output is the adapter": (["merge", "adapter", "--output", "adapter", "--overwrite"], ["ADAPTER"]),
    "merge: output inside the adapter": (["merge", "adapter", "--output", "adapter/m"], ["lies inside"]),
    "merge: output is the base": (
        ["merge", "adapter", "--base", "tiny", "--output", "tiny", "--overwrite"],
        ["--base"],
    ),
    "merge: output is the current folder": (["merge", "adapter", "--output", "."], ["current folder"]),
    "merge: output exists": (["merge", "adapter", "--output", "exists"], ["already exists"]),
    "merge: output is a file": (["merge", "adapter", "--output", "plain.txt"], ["existing file"]),
    "merge: output in /proc": (["merge", "adapter", "--output", "/proc/m"], ["--output /proc/m"]),
    "merge: missing base": (["merge", "adapter", "--base", "./missing", "--output", "out"], ["./missing"]),
    "merge: base of another shape": (["merge", "adapter", "--base", "gpt2", "--output", "out"], ["gpt2"]),
    "merge: no output": (["merge", "adapter"], ["--output"]),
    # generate
    "generate: no prompt": (["generate", "", "--model", "tiny"], ["PROMPT"]),
    "generate: --max-new-tokens 0": ([*G, "--max-new-tokens", "0"], ["--max-new-tokens"]),
    "generate: --temperature -1": ([*G, "--temperature", "-1"], ["--temperature"]),
    "generate: --top-p 0": ([*G, "--top-p", "0"], ["--top-p"]),
    "generate: --kv-bits 3": ([*G, "--kv-bits", "3"], ["--kv-bits"]),
    "generate: --kv-scheme bogus": ([*G, "--kv-bits", "4", "--kv-scheme", "bogus"], ["bogus"]),
    "generate: --compile with --kv-bits": ([*G, "--kv-bits", "4", "--compile"], ["--compile", "--kv-bits"]),
    "generate: missing model": ([*G, "--model", "./missing"], ["no such model"]),
    "generate: BERT encoder": ([*G, "--model", "bert"], ["not a causal language model"]),
    "generate: checkpoint scales of the wrong shape": ([*G, "--model", "bad-scales"], ["bad-scales"]),
    "generate: binary recipe": ([*G, "--recipe", "binary.bin"], ["recipe binary.bin"]),
    "generate: --max-new-tokens x": ([*G, "--max-new-tokens", "x"], ["--max-new-tokens", "invalid int"]),
    # convert-gqa
    "convert-gqa: no --kv-heads": ([*C, "--output", "out"], ["--kv-heads"]),
    "convert-gqa: --kv-heads 0": ([*CO, "--kv-heads", "0"], ["--kv-heads"]),
    "convert-gqa: --kv-heads 3 of 4 heads": ([*CO, "--kv-heads", "3"], ["--kv-heads 3"]),
    "convert-gqa: --kv-heads 5": ([*CO, "--kv-heads", "5"], ["--kv-heads 5"]),
    "convert-gqa: output is the model": (
        [*C, "--kv-heads", "1", "--output", "tiny", "--overwrite"],
        ["--model"],
    ),
    "convert-gqa: output is the current folder": (
        [*C, "--kv-heads", "1", "--output", "."],
        ["current folder"],
    ),
    "convert-gqa: output exists": ([*C, "--kv-heads", "1", "--output", "exists"], ["already exists"]),
    "convert-gqa: output in /proc": ([*C, "--kv-heads", "1", "--output", "/proc/g"], ["--output /proc/g"]),
    "convert-gqa: no output": ([*C, "--kv-heads", "1"], ["--output"]),
    "convert-gqa: quantized model": ([*CO, "--model", "ckpt"], ["ckpt"]),
    "export: a float model": (["export", "tiny", "--output", "m.gguf"], ["tiny", "not a quantized llmlite"]),
    "export: group 128": (["export", "ckpt", "--output", "m.gguf"], ["groups of 32", "--group-size 32"]),
    "export: no output": (["export", "ckpt"], ["--output"]),
    "export: output is the checkpoint": (
        ["export", "ckpt", "--output", "ckpt", "--overwrite"],
        ["--output ckpt"],
    ),
    "export: missing checkpoint": (["export", "./nope", "--output", "m.gguf"], ["nope"]),
    "export: --format onnx": (
        ["export", "ckpt", "--format", "onnx", "--output", "m.gguf"],
        ["--format", "onnx"],
    ),
    "export: --embeddings q4_0": (
        ["export", "ckpt", "--embeddings", "q4_0", "--output", "m.gguf"],
        ["--embeddings", "invalid choice"],
    ),
    "export: --format awq of a 3-bit checkpoint": (
        ["export", "ckpt3", "--format", "awq", "--output", "out"],
        ["--format awq cannot hold", "4-bit", "3-bit", "--format gptq"],
    ),
    "export: --format compressed-tensors of a 3-bit checkpoint": (
        ["export", "ckpt3", "--format", "compressed-tensors", "--output", "out"],
        ["--format compressed-tensors cannot hold", "4- or 8-bit", "--format gptq"],
    ),
    "export: --format awq of a float model": (
        ["export", "tiny", "--format", "awq", "--output", "out"],
        ["tiny", "not a quantized llmlite"],
    ),
    "export: --type with --format awq": (
        ["export", "ckpt", "--format", "awq", "--type", "q4_0", "--output", "out"],
        ["--type", "GGUF option", "--format awq"],
    ),
    "export: --format awq into an existing folder": (
        ["export", "ckpt", "--format", "awq", "--output", "exists"],
        ["already exists", "--overwrite"],
    ),
    "export: --type q9_9": (
        ["export", "ckpt", "--type", "q9_9", "--output", "m.gguf"],
        ["--type", "invalid choice"],
    ),
    "convert-gqa: GPT-2": ([*CO, "--model", "gpt2"], ["gpt2"]),
    "convert-gqa: BERT encoder": ([*CO, "--model", "bert"], ["not a causal language model"]),
    "convert-gqa: --method bogus": ([*CO, "--method", "bogus"], ["--method", "invalid choice"]),
    "convert-gqa: --samples 0": ([*CO, "--method", "aligned", "--samples", "0"], ["--samples"]),
    "convert-gqa: --seqlen above the model": ([*CO, "--seqlen", "100000"], ["--seqlen 100000", "maximum"]),
    "convert-gqa: --uptrain-tokens -1": ([*CO, "--uptrain-tokens", "-1"], ["--uptrain-tokens"]),
    "convert-gqa: missing calibration": (
        [*CO, "--method", "aligned", "--calibration", "./nope.txt"],
        ["nope.txt"],
    ),
    "convert-gqa: binary recipe": ([*CO, "--recipe", "binary.bin"], ["recipe binary.bin"]),
    # prune
    "prune: --sparsity 0": ([*PO, "--sparsity", "0"], ["--sparsity 0", "(0, 1)"]),
    "prune: --sparsity 1": ([*PO, "--sparsity", "1"], ["--sparsity 1", "(0, 1)"]),
    "prune: --sparsity 1.5": ([*PO, "--sparsity", "1.5"], ["--sparsity 1.5", "(0, 1)"]),
    "prune: --sparsity -0.5": ([*PO, "--sparsity=-0.5"], ["--sparsity -0.5", "(0, 1)"]),
    "prune: --sparsity half": ([*PO, "--sparsity", "half"], ["--sparsity", "invalid float"]),
    "prune: --pattern 4:2": ([*PO, "--pattern", "4:2"], ["--pattern 4:2", "0 < N < M"]),
    "prune: --pattern 2:2": ([*PO, "--pattern", "2:2"], ["--pattern 2:2", "0 < N < M"]),
    "prune: --pattern 0:4": ([*PO, "--pattern", "0:4"], ["--pattern 0:4", "0 < N < M"]),
    "prune: --pattern 2/4": ([*PO, "--pattern", "2/4"], ["--pattern '2/4'", "N:M"]),
    "prune: --pattern and --sparsity": ([*PO, "--pattern", "2:4", "--sparsity", "0.5"], ["give one"]),
    "prune: --pattern 2:16 on in-features of 200": (
        [*PO, "--pattern", "2:16"],
        ["M = 16", "divisible by 16", "200"],
    ),
    "prune: --method obs": ([*PO, "--method", "obs"], ["--method", "invalid choice"]),
    "prune: --samples 0": ([*PO, "--samples", "0"], ["--samples"]),
    "prune: --seqlen above the model": ([*PO, "--seqlen", "100000"], ["--seqlen 100000", "maximum"]),
    "prune: --damp 0": ([*PO, "--method", "sparsegpt", "--damp", "0"], ["--damp 0"]),
    "prune: --true-sequential with magnitude (no calibration)": (
        [*PO, "--method", "magnitude", "--true-sequential"],
        ["--true-sequential", "magnitude", "--method wanda or sparsegpt"],
    ),
    "prune: GPT-2 (a family the map does not know)": ([*PO, "--model", "gpt2"], ["gpt2", "not supported"]),
    "prune: BERT encoder": ([*PO, "--model", "bert"], ["not a causal language model"]),
    "prune: already quantized": ([*PO, "--model", "ckpt"], ["ckpt", "already", "prune the float model"]),
    "prune: output exists": ([*P, "--output", "exists"], ["already exists", "--overwrite"]),
    "prune: output is the model": ([*P, "--output", "tiny", "--overwrite"], ["--output tiny", "--model"]),
    "prune: no output": (P, ["--output"]),
    "prune: joint --bits 5": ([*PO, "--bits", "5"], ["5-bit", "--bits 2, 3, 4 or 8"]),
    "prune: joint --group-size without --bits": ([*PO, "--group-size", "64"], ["--group-size", "add --bits"]),
    "prune: joint --asym without --bits": ([*PO, "--asym"], ["--asym", "add --bits"]),
    "prune: joint --format awq without --bits": ([*PO, "--format", "awq"], ["--format", "add --bits"]),
    "prune: joint --format awq at 3 bits": (
        [*PO, "--bits", "3", "--format", "awq"],
        ["--format awq holds 4-bit", "--format gptq"],
    ),
    "prune: joint --format gguf": ([*PO, "--bits", "4", "--format", "gguf"], ["--format", "invalid choice"]),
    "prune: joint --group-size 0": ([*PO, "--bits", "4", "--group-size", "0"], ["group size 0"]),
    "prune: joint output contains the second calibration source": (
        [*P, "--bits", "4", "--calibration", "text.txt+texts/calib.txt", "--output", "texts", "--overwrite"],
        ["contains --calibration"],
    ),
    # prune --structure (tiny: 2 layers, 200 MLP channels, 2 key/value groups of 2 query heads)
    "prune: --structure channels --sparsity 0": (
        [*S, "--structure", "channels", "--sparsity", "0"],
        ["(0, 1)"],
    ),
    "prune: --structure heads --sparsity 1": ([*S, "--structure", "heads", "--sparsity", "1"], ["(0, 1)"]),
    "prune: --structure heads below one key/value group (splits GQA groups)": (
        [*S, "--structure", "heads", "--sparsity", "0.05"],
        ["--sparsity 0.05", "less than one key/value group", "GQA groups", "--sparsity 0.081 or more"],
    ),
    "prune: --structure heads removing every key/value group": (
        [*S, "--structure", "heads", "--sparsity", "0.3"],
        ["would remove all 2 key/value groups", "at most 1", "--sparsity 0.242 or less"],
    ),
    "prune: --structure channels removing every channel": (
        [*S, "--structure", "channels", "--sparsity", "0.9"],
        ["would remove all 200 MLP channels"],
    ),
    "prune: --structure layers removing every layer": (
        [*S, "--structure", "layers", "--sparsity", "0.8"],
        ["would remove all 2 decoder layers"],
    ),
    "prune: --structure mlp": ([*S, "--structure", "mlp"], ["--structure", "invalid choice"]),
    "prune: --structure with --pattern": (
        [*S, "--structure", "channels", "--pattern", "2:4"],
        ["--pattern is for unstructured pruning"],
    ),
    "prune: --structure with --bits": (
        [*S, "--structure", "heads", "--bits", "4"],
        ["--bits", "unstructured"],
    ),
    "prune: --structure with --method": ([*S, "--structure", "layers", "--method", "wanda"], ["--method"]),
    "prune: --structure with --true-sequential": (
        [*S, "--structure", "layers", "--true-sequential"],
        ["--true-sequential is for unstructured pruning"],
    ),
    "prune: --recover-tokens without --structure": (
        [*S, "--recover-tokens", "4096"],
        ["--recover-tokens", "add --structure"],
    ),
    "prune: --recover-lr without --recover-tokens": (
        [*S, "--structure", "channels", "--recover-lr", "1e-3"],
        ["--recover-lr", "add --recover-tokens"],
    ),
    "prune: --structure on GPT-2 (a family the map does not know)": (
        [*S, "--structure", "channels", "--model", "gpt2"],
        ["gpt2", "not supported"],
    ),
    # lowrank
    "lowrank: --ratio 0": ([*LO, "--ratio", "0"], ["--ratio 0", "(0, 1]"]),
    "lowrank: --ratio 1.5": ([*LO, "--ratio", "1.5"], ["--ratio 1.5", "(0, 1]"]),
    "lowrank: --ratio -0.5": ([*LO, "--ratio=-0.5"], ["--ratio -0.5", "(0, 1]"]),
    "lowrank: --ratio that keeps less than rank 1": ([*LO, "--ratio", "0.001"], ["--ratio 0.001", "rank 1"]),
    "lowrank: --rank 0": ([*LO, "--rank", "0"], ["--rank 0", "keeps nothing"]),
    "lowrank: --rank above a linear's": ([*LO, "--rank", "49"], ["--rank 49", "k_proj (48x96)"]),
    "lowrank: --ratio and --rank": ([*LO, "--ratio", "0.5", "--rank", "8"], ["give one"]),
    "lowrank: --method qr": ([*LO, "--method", "qr"], ["--method", "invalid choice"]),
    "lowrank: --alpha with svd-llm": ([*LO, "--alpha", "1"], ["--alpha", "ASVD"]),
    "lowrank: GPT-2 (a family the map does not know)": ([*LO, "--model", "gpt2"], ["gpt2", "not supported"]),
    "lowrank: already quantized": ([*LO, "--model", "ckpt"], ["ckpt", "already", "factorise the float"]),
    "lowrank: output is the model": ([*L, "--output", "tiny", "--overwrite"], ["--output tiny", "--model"]),
    "lowrank: no output": (L, ["--output"]),
    # the command itself
    "generate: --runtime llama.cpp with --kv-bits": (
        [*G, "--runtime", "llama.cpp", "--kv-bits", "4"],
        ["--kv-bits", "llama.cpp"],
    ),
    "generate: --runtime onnx": ([*G, "--runtime", "onnx"], ["--runtime", "invalid choice"]),
    "llmlite: no verb": ([], ["verb"]),
    "llmlite: unknown verb": (["quantise"], ["quantise"]),
}
if importlib.util.find_spec("llama_cpp") is None:  # a runtime this machine does not have
    CASES["generate: --runtime llama.cpp without llama-cpp-python"] = (
        [*G, "--runtime", "llama.cpp"],
        ["llama-cpp-python", "pip install"],
    )


@dataclass
class Outcome:
    code: int | None
    errors: list[str]  # the "llmlite: error:" lines
    stderr: str
    traceback: str | None  # an exception that escaped the CLI


def run(argv: list[str], cwd: Path) -> Outcome:
    """The CLI in this process, as a user runs it: exit code, error lines, any escaped exception."""
    from llmlite.cli import main

    err, out = io.StringIO(), io.StringIO()
    code, escaped = None, None
    previous = signal.signal(signal.SIGALRM, _too_long)
    signal.alarm(TIME_LIMIT)
    with _chdir(cwd), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:
            escaped = traceback.format_exc()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    stderr = err.getvalue()
    errors = [line for line in stderr.splitlines() if line.startswith("llmlite: error:")]
    return Outcome(code, errors, stderr, escaped)


TIME_LIMIT = 120  # seconds: bad input is refused before the work, so a case that runs is a failure


def _too_long(signum, frame):
    raise TimeoutError(f"still running after {TIME_LIMIT} s: the input was not refused before the work")


@contextlib.contextmanager
def _chdir(folder: Path):
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``root``: size and modification time (files), to see any change."""
    out = {}
    for path in root.rglob("*"):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_size if path.is_file() else -1, st.st_mtime_ns)
    return out


def build_workspace(root: Path, tiny: Path) -> Path:
    """Real inputs, good and bad, for the cases (about 30 s: one RTN run, one fine-tuning step and
    one efficiency report of the tiny model)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        OPTConfig,
        OPTForCausalLM,
    )

    from llmlite.data import load_text

    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny, root / "tiny")
    (root / "link").symlink_to("tiny")
    text = load_text("wikitext2-valid")[:20000]
    (root / "text.txt").write_text(text)
    (root / "texts").mkdir()
    (root / "texts" / "calib.txt").write_text(text)
    (root / "short.txt").write_text("only a few words")
    (root / "empty.txt").write_text("")
    (root / "plain.txt").write_text("not a model")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (root / "exists").mkdir()
    (root / "exists" / "keep.txt").write_text("the user's file")
    (root / "good.yaml").write_text("bits: 4\ngroup-size: 64\n")
    (root / "list.yaml").write_text("- bits\n- 4\n")
    (root / "badkey.yaml").write_text("bitz: 3\n")
    (root / "badtype.yaml").write_text("bits: four\n")
    (root / "invalid.yaml").write_text("bits: [4\n")
    (root / "bad.jsonl").write_text('{"text": "a fine row"}\n{"text": "cut short\n')
    (root / "noresp.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    tokenizer = AutoTokenizer.from_pretrained(tiny)

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=256)
    )
    gpt2.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    opt = OPTForCausalLM(  # nn.Linear projections, but LayerNorms with biases: no AWQ mapping
        OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=2,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
        )
    )
    opt.save_pretrained(root / "opt")
    tokenizer.save_pretrained(root / "opt")
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
        )
    )
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")

    shutil.copytree(tiny, root / "broken-config")
    (root / "broken-config" / "config.json").write_text("{not json")
    shutil.copytree(tiny, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(tiny, root / "missing-tensor")
    state = load_file(root / "missing-tensor" / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, root / "missing-tensor" / "model.safetensors", metadata={"format": "pt"})

    made = [
        (["quantize", "--model", "tiny", "--method", "rtn", "--output", "ckpt", "--quiet"], "ckpt"),
        (
            ["quantize", "--model", "tiny", "--method", "rtn", "--bits", "3", "--output", "ckpt3", "--quiet"],
            "ckpt3",
        ),
        (["eval", "tiny", "--tasks", "efficiency", "--ctx", "64", "--report", "report", "--quiet"], "report"),
        (
            [
                "finetune",
                "--model",
                "tiny",
                "--data",
                "text.txt",
                "--max-steps",
                "1",
                "--no-compile",
                "--seqlen",
                "64",
                "--eval-split",
                "0",
                "--output",
                "adapter",
                "--quiet",
            ],
            "adapter",
        ),
    ]
    for argv, name in made:
        outcome = run(argv, root)
        assert outcome.code == 0 and (root / name).is_dir(), outcome.stderr + (outcome.traceback or "")

    shutil.copytree(root / "ckpt", root / "bad-scales")
    state = load_file(root / "bad-scales" / "model.safetensors")
    name = next(k for k in state if k.endswith(".scales"))
    state[name] = state[name][:, :-1].contiguous()
    save_file(state, root / "bad-scales" / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(root / "ckpt", root / "bad-bits")
    config = json.loads((root / "bad-bits" / "config.json").read_text())
    config["quantization_config"]["bits"] = 5
    (root / "bad-bits" / "config.json").write_text(json.dumps(config))

    for name, change in (("report-nomodels", "models"), ("report-notjson", None)):
        shutil.copytree(root / "report", root / name)
        report = root / name / "report.json"
        if change is None:
            report.write_text("{not json")
        else:
            data = json.loads(report.read_text())
            data.pop(change)
            report.write_text(json.dumps(data))
    shutil.copytree(root / "adapter", root / "adapter-truncated")
    weights = root / "adapter-truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "adapter", root / "adapter-badconfig")
    (root / "adapter-badconfig" / "adapter_config.json").write_text('{"peft_type": "NONESUCH"}')
    return root


def check(name: str, root: Path) -> Outcome:
    """Run one case; raise AssertionError naming what it got wrong."""
    argv, needles = CASES[name]
    before = snapshot(root)
    outcome = run(argv, root)
    after = snapshot(root)
    assert outcome.traceback is None, outcome.traceback
    assert outcome.code == 2, f"exit {outcome.code}: {outcome.stderr}"
    assert len(outcome.errors) == 1, outcome.stderr
    missing = [n for n in needles if n not in outcome.errors[0]]
    assert not missing, f"{outcome.errors[0]!r} does not name {missing}"
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"files changed: {changed}"
    return outcome


def start_quantize(out: Path, *extra: str) -> subprocess.Popen:
    """``llmlite quantize`` of the bundled model (GPTQ, long enough to be stopped) as a process."""
    command = [LLMLITE, "quantize", "--output", str(out), "--samples", "64", "--quiet", *extra]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:  # as in a terminal (a shell's background job inherits it ignored)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_stage(folder: Path, name: str, proc: subprocess.Popen) -> Path:
    """The run's temporary folder, which the guard creates before loading the model."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stage = folder / f".{name}.partial-{proc.pid}"
        if stage.exists():
            return stage
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.05)
    raise AssertionError("the run never staged its output")


def signal_probe(folder: Path, tiny: Path) -> list[tuple[str, str, int | None, str, list[str]]]:
    """Stop real runs on the bundled model: (case, when, exit code, last stderr line, what is left
    in the folder afterwards)."""
    rows = []

    def left() -> list[str]:
        return sorted(p.name for p in folder.iterdir())

    def last(text: str) -> str:
        return (text.strip().splitlines() or [""])[-1]

    out = folder / "out"
    for signum in (signal.SIGINT, signal.SIGTERM):
        proc = start_quantize(out)
        wait_for_stage(folder, "out", proc)
        time.sleep(3)  # into the model loading or GPTQ
        proc.send_signal(signum)
        code = proc.wait(120)
        rows.append((signal.Signals(signum).name, "during quantize", code, last(proc.stderr.read()), left()))
    proc = start_quantize(out)
    wait_for_stage(folder, "out", proc)
    rtn = [LLMLITE, "quantize", "--model", str(tiny), "--method", "rtn", "--output", str(out), "--quiet"]
    second = subprocess.run([*rtn, "--overwrite"], capture_output=True, text=True, timeout=300)
    rows.append(
        (
            "a second run, same --output",
            "while the first runs",
            second.returncode,
            last(second.stderr),
            left(),
        )
    )
    proc.kill()
    code = 128 - proc.wait(60)  # Popen's -9 is what a shell reports as 137
    rows.append(("SIGKILL (kill -9)", "during quantize", code, "(none: nothing runs after SIGKILL)", left()))
    rerun = subprocess.run(rtn, capture_output=True, text=True, timeout=300)
    removed = next((line for line in rerun.stderr.splitlines() if "removed" in line), last(rerun.stderr))
    rows.append(("the next run", "after kill -9", rerun.returncode, removed, left()))
    return rows


def write_doc(root: Path, doc: Path, signal_rows: list) -> None:
    """The table of docs/errors.md: every case, its exit code and its one line."""
    rows, bad = [], 0
    for name in CASES:
        argv, _ = CASES[name]
        try:
            outcome = check(name, root)
            status, line = "ok", outcome.errors[0]
        except AssertionError as e:
            bad += 1
            outcome = run(argv, root)
            status, line = "**FAILED**", str(e).splitlines()[0]
        shown = " ".join(a if a and " " not in a else repr(a) for a in ["llmlite", *argv])
        rows.append(f"| {name} | `{shown}` | {outcome.code} | {status} | {line.replace('|', '/')} |")
    text = doc.read_text()
    start, end = "<!-- cases -->", "<!-- /cases -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    table = "\n".join(
        ["| case | command | exit | checks | message |", "| --- | --- | --- | --- | --- |", *rows]
    )
    import platform

    import torch
    import transformers

    summary = (
        f"{len(CASES)} inputs, {len(CASES) - bad} handled as promised, {bad} not (Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__})."
    )
    stops = "\n".join(
        [
            "| stop | when | exit | last line on stderr | left in the folder |",
            "| --- | --- | --- | --- | --- |",
            *(f"| {a} | {b} | {c} | {d} | {', '.join(e) or 'nothing'} |" for a, b, c, d, e in signal_rows),
        ]
    )
    doc.write_text(f"{head}{start}\n{summary}\n\n{table}\n\n{stops}\n{end}{tail}")
    print(summary)
    print(stops)


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny
    from transformers import AutoTokenizer

    from llmlite.models import resolve_model

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
        tiny = Path(scratch) / "tiny-source"
        make_tiny(tokenizer).save_pretrained(tiny)
        tokenizer.save_pretrained(tiny)
        root = build_workspace(Path(scratch) / "workspace", tiny)
        stops = Path(scratch) / "stops"
        stops.mkdir()
        write_doc(root, Path(__file__).parents[1] / "docs" / "errors.md", signal_probe(stops, tiny))
