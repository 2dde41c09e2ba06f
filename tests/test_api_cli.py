"""One way in: every verb through the Python API and through the CLI, with the same options, gives
the same result, and the same one-line error for a bad option (issue 23)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmlite
from llmlite.cli import main
from llmlite.errors import LlmliteError

pytestmark = pytest.mark.slow  # loads models, trains, writes checkpoints

WIKI = Path(__file__).resolve().parents[1] / "llmlite" / "corpora" / "wikitext-2" / "wiki.valid.tokens"


def cli(capsys, *argv: str) -> str:
    """Run the CLI in-process; its stdout (a failure shows stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    return out


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_quantize(capsys, tmp_path, tiny_dir):
    options = {"model": str(tiny_dir), "method": "rtn-clip", "group_size": 32, "samples": 4, "seqlen": 64}
    llmlite.quantize(**options, output=str(tmp_path / "api"), progress=False)
    cli(capsys, "quantize", *flags(options), "--output", str(tmp_path / "cli"), "--quiet")
    same_tensors(tmp_path / "api" / "model.safetensors", tmp_path / "cli" / "model.safetensors")


def test_evaluate(capsys, tmp_path, tiny_dir):
    options = {"model": str(tiny_dir), "ctx": 64, "max_windows": 3, "kv_bits": 4, "prefill": 16}
    api = llmlite.evaluate(**options, progress=False)
    cli(capsys, "eval", *flags(options), "--json", str(tmp_path / "e.json"), "--quiet")
    written = json.loads((tmp_path / "e.json").read_text())
    assert (
        api.perplexity == written["perplexity"] and api["nll"] == written["nll"] and api.measured.windows == 3
    )
    assert api.to_dict().keys() == written.keys()


def test_report_and_compare(capsys, tmp_path, tiny_dir):
    options = {"model": str(tiny_dir), "tasks": "calibration", "limit": 1, "ctx": 64, "cache": False}
    api = llmlite.report(**options, report=str(tmp_path / "api"), progress=False)
    cli(capsys, "eval", *flags(options), "--report", str(tmp_path / "cli"), "--quiet")
    written = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert api["models"][0]["metrics"] == written["models"][0]["metrics"]

    reports = [str(tmp_path / "api"), str(tmp_path / "cli")]
    table = llmlite.compare(reports, output=str(tmp_path / "cmp-api")).to_dict()
    cli(capsys, "compare", *reports, "--output", str(tmp_path / "cmp-cli"))
    assert table == json.loads((tmp_path / "cmp-cli" / "compare.json").read_text())


def test_finetune_and_merge(capsys, tmp_path, tiny_dir):
    data = tmp_path / "wiki.txt"
    data.write_text(WIKI.read_text(encoding="utf-8")[:8_000])
    options = {
        "model": str(tiny_dir), "data": str(data), "seqlen": 32, "batch_size": 2, "max_steps": 2,
        "compile": False, "eval_split": 0.0, "rank": 4,
    }  # fmt: skip
    api = llmlite.finetune(**options, output=str(tmp_path / "api"), progress=False)
    cli(capsys, "finetune", *flags(options), "--output", str(tmp_path / "cli"), "--quiet")
    same_tensors(
        tmp_path / "api" / "adapter_model.safetensors", tmp_path / "cli" / "adapter_model.safetensors"
    )
    assert api.steps == 2

    merged = llmlite.merge(str(tmp_path / "api"), output=str(tmp_path / "m-api"))
    cli(capsys, "merge", str(tmp_path / "api"), "--output", str(tmp_path / "m-cli"))
    same_tensors(Path(merged) / "model.safetensors", tmp_path / "m-cli" / "model.safetensors")


def test_generate(capsys, tiny_dir):
    options = {"model": str(tiny_dir), "max_new_tokens": 6, "kv_bits": 2, "kv_residual": 0}
    api = llmlite.generate(prompt="The capital of France is", **options)
    out = cli(capsys, "generate", "The capital of France is", *flags(options))
    assert out == api.text + "\n" and api.new_tokens == 6


def test_convert_gqa(capsys, tmp_path, tiny_dir):
    options = {"model": str(tiny_dir), "kv_heads": 1, "method": "weighted", "samples": 2, "seqlen": 32}
    llmlite.convert_gqa(**options, output=str(tmp_path / "api"), progress=False)
    cli(capsys, "convert-gqa", *flags(options), "--output", str(tmp_path / "cli"), "--quiet")
    same_tensors(tmp_path / "api" / "model.safetensors", tmp_path / "cli" / "model.safetensors")


BAD = [  # verb, API options, CLI arguments, the error both give
    ("quantize", {"bits": 5, "output": "q"}, "--bits 5 --output q", "5-bit weights are not"),
    ("evaluate", {"ctx": 1}, "eval --ctx 1", "--ctx 1 is too short"),
    ("evaluate", {"kv_sinks": 2}, "eval --kv-sinks 2", "--kv-sinks is a KV-cache option"),
    ("report", {"tasks": "piqa", "limit": 0}, "eval --tasks piqa --limit 0", "--limit must be"),
    ("compare", {"reports": ["nowhere"]}, "compare nowhere", "no report in nowhere"),
    ("finetune", {"data": "x.txt", "output": "o", "rank": 0}, "--data x.txt --output o --rank 0", "--rank 0"),
    ("merge", {"adapter": "nowhere", "output": "o"}, "nowhere --output o", "nowhere"),
    ("generate", {"prompt": "Hi", "max_new_tokens": 0}, "Hi --max-new-tokens 0", "--max-new-tokens must"),
    ("convert_gqa", {"kv_heads": 0, "output": "o"}, "--kv-heads 0 --output o", "--kv-heads must be"),
    ("quantize", {"method": "awqq"}, "--method awqq", "awqq"),
    ("export", {"model": "nowhere", "output": "m.gguf"}, "nowhere --output m.gguf", "nowhere"),
]


@pytest.mark.parametrize("verb,options,argv,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_the_same_error_through_both(capsys, tmp_path, monkeypatch, verb, options, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LlmliteError, match=message) as caught:
        getattr(llmlite, verb)(**options)
    command = verb.replace("_", "-") if verb not in ("evaluate", "report", "compare") else None
    try:
        code = main(([command] if command else []) + argv.split())
    except SystemExit as e:  # argparse's own refusals (an unknown choice) exit from the parser
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1]
    if "awqq" not in message:  # argparse refuses an unknown choice itself, listing the choices
        assert err[-1] == f"llmlite: error: {caught.value}"


def flags(options: dict) -> list[str]:
    """``{"group_size": 32, "cache": False}`` as ``--group-size 32 --no-cache``; eval takes its
    model as a positional argument."""
    out = []
    for key, value in options.items():
        if key == "model" and "ctx" in options:
            out.insert(0, value)
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out
