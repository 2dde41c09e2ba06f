"""Bad input refused where it is read: one line naming the file or option, exit code 2, nothing
written (issue 22: inputs that cannot be used, corrupt files, errors through lm-eval, messages that
name the right thing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmlite.cli import main
from llmlite.errors import LlmliteError
from llmlite.models import load_model

LM_EVAL = str(Path(sys.executable).parent / "lm_eval")


def cli_error(capsys, args: list[str], *needles: str) -> str:
    """Run the CLI in-process; check exit code 2 and one ``error:`` line holding ``needles``."""
    rc = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def nothing_written(folder: Path, name: str) -> None:
    assert [p.name for p in folder.iterdir() if p.name.startswith((name, f".{name}"))] == []


def rewrite_tensors(folder: Path, change) -> None:
    file = folder / "model.safetensors"
    state = load_file(file)
    change(state)
    save_file(state, file, metadata={"format": "pt"})


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def copy(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory, tiny_dir):
    """A 4-bit RTN checkpoint of the tiny model, written by ``llmlite quantize``."""
    out = tmp_path_factory.mktemp("gptq") / "ckpt"
    assert (
        main(["quantize", "--model", str(tiny_dir), "--method", "rtn", "--output", str(out), "--quiet"]) == 0
    )
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    """A tiny GPT-2 (its projections are transformers' Conv1D, not nn.Linear)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer):
    """A tiny BERT masked-LM encoder: not a causal language model."""
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
    )
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_dir):
    """A peft LoRA adapter of the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(folder)
    return folder


# --- 1. refuse what cannot be done ----------------------------------------------------------------


def test_quantize_refuses_a_gptq_checkpoint(capsys, tmp_path, gptq_dir, tiny_dir):
    out = tmp_path / "out"
    args = ["quantize", "--model", str(gptq_dir), "--method", "rtn", "--output", str(out), "--quiet"]
    cli_error(
        capsys,
        args,
        f"{gptq_dir} is already a 4-bit GPTQ checkpoint",
        "quantize the float model it came from",
        f"--model {Path(tiny_dir).resolve()}",
    )
    nothing_written(tmp_path, "out")


def test_convert_gqa_refuses_a_gptq_checkpoint(capsys, tmp_path, gptq_dir):
    out = tmp_path / "out"
    args = ["convert-gqa", "--model", str(gptq_dir), "--kv-heads", "1", "--output", str(out), "--quiet"]
    cli_error(capsys, args, "is already a 4-bit GPTQ checkpoint", "convert the float model")
    nothing_written(tmp_path, "out")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_refuses_a_model_without_linear_layers(capsys, tmp_path, gpt2_dir, method):
    out = tmp_path / "out"
    args = ["quantize", "--model", str(gpt2_dir), "--method", method, "--output", str(out), "--quiet"]
    args += ["--samples", "2", "--seqlen", "32"] if method == "gptq" else []
    cli_error(capsys, args, "GPT2LMHeadModel", "no nn.Linear", "Conv1D", "Llama")
    nothing_written(tmp_path, "out")


def test_an_encoder_is_not_a_causal_lm(capsys, bert_dir):
    args = ["eval", str(bert_dir), "--max-windows", "1", "--ctx", "64", "--quiet"]
    cli_error(capsys, args, f"{bert_dir} is a BertForMaskedLM, not a causal language model", "decoder-only")


DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda s: s.pop(DOWN), "1 tensors missing, e.g."),
        (lambda s: s.__setitem__(DOWN, torch.zeros(3, 3)), "1 tensors of the wrong shape, e.g."),
    ],
)
def test_weights_that_do_not_match_the_config(tmp_path, tiny_dir, change, needle):
    folder = copy(tiny_dir, tmp_path)
    rewrite_tensors(folder, change)
    with pytest.raises(LlmliteError, match=f"does not match its config \\({needle} {DOWN}\\); re-export"):
        load_model(str(folder))


Q = "model.layers.0.self_attn.q_proj"


def cut(state: dict, name: str, tensor: torch.Tensor) -> None:
    state[f"{Q}.{name}"] = tensor.clone()


@pytest.mark.parametrize(
    "change,needles",
    [
        (lambda s: cut(s, "scales", s[f"{Q}.scales"][:, :10]), [f"{Q}.scales has shape [1, 10]", "[1, 96]"]),
        (
            lambda s: cut(s, "qweight", s[f"{Q}.qweight"][:-1]),
            [f"{Q}.qweight has shape [11, 96]", "expected [12, 96]"],
        ),
        (lambda s: cut(s, "g_idx", s[f"{Q}.g_idx"][:-3]), [f"{Q}.g_idx has shape [93]", "expected [96]"]),
        (lambda s: cut(s, "g_idx", s[f"{Q}.g_idx"] + 5), [f"{Q}.g_idx holds groups outside 0..0"]),
        (lambda s: cut(s, "qzeros", s[f"{Q}.qzeros"].float()), [f"{Q}.qzeros is float32, expected int32"]),
    ],
)
def test_gptq_tensors_checked_against_the_config(capsys, tmp_path, gptq_dir, change, needles):
    folder = copy(gptq_dir, tmp_path)
    rewrite_tensors(folder, change)
    line = cli_error(capsys, ["eval", str(folder), "--max-windows", "1", "--ctx", "32", "--quiet"], *needles)
    assert "re-create the checkpoint" in line
    assert "expected" in line or "outside" in line


@pytest.mark.parametrize("key,value", [("bits", "4"), ("group_size", "128"), ("group_size", 0)])
def test_gptq_grid_of_the_wrong_type(tmp_path, gptq_dir, key, value):
    folder = copy(gptq_dir, tmp_path)
    edit_json(folder / "config.json", lambda c: c["quantization_config"].__setitem__(key, value))
    with pytest.raises(LlmliteError, match=f"quantization_config.{key} must be"):
        load_model(str(folder))


# --- 2. corrupt inputs caught where they are read -------------------------------------------------


def _truncate(folder: Path) -> None:
    file = folder / "adapter_model.safetensors"
    with file.open("r+b") as f:
        f.truncate(file.stat().st_size // 2)


@pytest.mark.parametrize(
    "spoil,needles",
    [
        (_truncate, ["adapter_model.safetensors", "truncated or corrupt"]),
        (
            lambda f: (f / "adapter_config.json").write_text('{"peft_type": \n'),
            ["adapter_config.json is not valid JSON", "line 2"],
        ),
        (
            lambda f: (f / "adapter_config.json").write_text('{"r": 4}\n'),
            ["adapter_config.json is not a peft adapter config", "no peft_type"],
        ),
        (
            lambda f: edit_json(f / "adapter_config.json", lambda c: c.__setitem__("r", "four")),
            ["adapter_config.json: r (the rank) must be a whole number", "'four'"],
        ),
        (
            lambda f: edit_json(f / "adapter_config.json", lambda c: c.__setitem__("target_modules", 5)),
            ["adapter_config.json: target_modules must be a list"],
        ),
        (lambda f: shutil.rmtree(f), ["no such adapter folder"]),
    ],
)
def test_merge_bad_adapters(capsys, tmp_path, adapter_dir, spoil, needles):
    folder = copy(adapter_dir, tmp_path, "adapter")
    spoil(folder)
    line = cli_error(capsys, ["merge", str(folder), "--output", str(tmp_path / "out")], *needles)
    assert "does not fit" not in line and "has no adapter_config.json" not in line
    nothing_written(tmp_path, "out")


@pytest.mark.parametrize(
    "content,needles",
    [
        ('{"settings": {}}', ["report.json is not an llmlite report", "'models'"]),
        ("{not json", ["report.json is not valid JSON"]),
        ('{"models": [{"model": "m"}]}', ["models[0] has no fingerprint, metrics"]),
        (None, ["no report in", "no such folder"]),
    ],
)
def test_compare_bad_reports(capsys, tmp_path, content, needles):
    folder = tmp_path / "report"
    if content is not None:
        folder.mkdir()
        (folder / "report.json").write_text(content)
    cli_error(capsys, ["compare", str(folder), "--output", str(tmp_path / "out")], *needles)
    nothing_written(tmp_path, "out")


@pytest.mark.parametrize(
    "content,needles",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", ["is not a text file"]),
        (b"- bits: 4\n- method: rtn\n", ["is a list", "mapping of option: value"]),
        (b"bits: 4\n  group: [1\n", ["at line 2, column"]),
    ],
)
def test_bad_recipe_files(capsys, tmp_path, content, needles):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    args = ["quantize", "--recipe", str(recipe), "--output", str(tmp_path / "out"), "--quiet"]
    cli_error(capsys, args, f"recipe {recipe}", *needles)
    nothing_written(tmp_path, "out")


GOOD = json.dumps({"prompt": "Name a colour.", "response": "Blue."})


@pytest.mark.parametrize(
    "lines,needles",
    [
        ([GOOD, "", '{"prompt": "x", "response": }'], ["line 3 is not valid JSON", "column"]),
        (
            [GOOD, json.dumps({"prompt": "x", "response": ["a"]})],
            ["line 2: its response is a list, not text"],
        ),
        ([GOOD, "", "", json.dumps({"prompt": "x"})], ["line 4 has no response field"]),
        ([GOOD, json.dumps(["a", "b"])], ["line 2 is not a JSON object"]),
    ],
)
def test_finetune_bad_jsonl_names_the_line(capsys, tmp_path, tiny_dir, lines, needles):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = ["finetune", "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "out")]
    cli_error(capsys, [*args, "--quiet"], str(data), *needles)
    nothing_written(tmp_path, "out")


def test_text_jsonl_names_the_line(tmp_path):
    from llmlite.data import load_text

    data = tmp_path / "text.jsonl"
    data.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(LlmliteError, match=r"text.jsonl line 3 is not valid JSON"):
        load_text(str(data))
    data.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(LlmliteError, match=r"text.jsonl line 2 has no text field"):
        load_text(str(data))
    data.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(LlmliteError, match=r"not UTF-8 text .* on line 2"):
        load_text(str(data))


# --- 3. errors through lm-eval --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"pretrained": "/nonexistent"}, "no such model file or folder: /nonexistent"),
        ({"rolling": "x"}, "rolling must be 'lm-eval' or 'papers', got 'x'"),
        ({"batch_tokens": "abc"}, "batch_tokens must be a whole number, got 'abc'"),
        ({"ppl_window": 1}, "ppl_window must be at least 2"),
        ({"max_windows": "-3"}, "max_windows must be at least 1, got -3"),
        ({"max_windows": 2.5}, "max_windows must be a whole number, got 2.5"),
        ({"device": "xyz"}, "device 'xyz' is not a torch device"),
    ],
)
def test_lm_eval_model_arguments(tiny_dir, kwargs, message):
    from llmlite.evaluation.harness import LlmliteLM

    with pytest.raises(LlmliteError) as caught:
        LlmliteLM(**{"pretrained": str(tiny_dir), **kwargs})
    assert type(caught.value) is LlmliteError
    assert message in str(caught.value)


def test_lm_eval_cli_ends_with_our_line(tmp_path):
    from llmlite.evaluation.harness import TASKS_DIR

    args = ["--model", "llmlite", "--model_args", "pretrained=/nonexistent", "--tasks", "llmlite_piqa"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [LM_EVAL, *args, "--include_path", str(TASKS_DIR)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("llmlite.errors.LlmliteError: no such model file or folder: /nonexistent"), last


# --- 4. messages that name the right thing --------------------------------------------------------


def test_corrupt_bundled_cache_says_delete_it(capsys, tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("LLMLITE_CACHE", str(tmp_path / "cache"))
    folder = copy(tiny_dir, tmp_path / "cache" / "models", "smollm2-135m")
    weights = folder / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    line = cli_error(
        capsys,
        ["eval", "smollm2-135m", "--max-windows", "1", "--ctx", "32", "--quiet"],
        f"the cached copy of the bundled model in {folder} is corrupt",
        "delete that folder and llmlite rebuilds it",
    )
    assert "re-download" not in line


def test_finetune_seqlen_above_the_model_limit(capsys, tmp_path, tiny_dir):
    data = tmp_path / "wiki.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    args = ["finetune", "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "out")]
    line = cli_error(
        capsys,
        [*args, "--seqlen", "1000000", "--quiet"],
        "--seqlen 1000000 is above the model's maximum of 512 positions; lower it",
    )
    assert "no usable rows" not in line
    nothing_written(tmp_path, "out")


def test_an_adapter_is_not_a_model(capsys, adapter_dir):
    args = ["eval", str(adapter_dir), "--max-windows", "1", "--ctx", "32", "--quiet"]
    cli_error(capsys, args, f"{adapter_dir} is a peft adapter, not a model", "llmlite merge")
