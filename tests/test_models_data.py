"""Loading models from every source, text sources and windows, and the perplexity protocol."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from llmlite.data import calibration_windows, eval_windows, load_text, tokenize
from llmlite.errors import LlmliteError
from llmlite.evaluation.perplexity import perplexity, window_nll
from llmlite.models import BUNDLED, load_model, own_weights


def test_bundled_model_is_smollm2(bundled_dir):
    model, tokenizer = load_model("smollm2-135m")
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "quantization_config" not in json.loads((bundled_dir / "config.json").read_text())
    ids = tokenize(tokenizer, "The capital of France is")
    assert ids.tolist() == tokenizer("The capital of France is").input_ids


@pytest.mark.slow
def test_gguf_file_loads_and_saves(tmp_path, bundled_dir):
    package, file, _ = BUNDLED["smollm2-135m"]
    gguf = Path(importlib.util.find_spec(package).origin).parent / file
    model, tokenizer = load_model(str(gguf))
    model.save_pretrained(tmp_path / "saved")  # transformers refuses this for a raw GGUF load
    reference, _ = load_model(str(bundled_dir))
    x = torch.tensor([tokenize(tokenizer, "Hello there, general").tolist()])
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference(x).logits)


@pytest.mark.parametrize(
    "source,message",
    [
        ("smollm3-tiny", "unknown model 'smollm3-tiny'"),
        ("./no/such/folder", "no such model file or folder"),
        ("missing.gguf", "no such model file or folder"),
        ("someorg/no-such-model", "cannot get 'someorg/no-such-model'"),
    ],
)
def test_bad_model_sources(source, message):
    with pytest.raises(LlmliteError, match=message):
        load_model(source)


def test_corrupt_and_wrong_files(tmp_path, tiny_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LlmliteError, match="truncated or corrupt"):
        load_model(str(broken))
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LlmliteError, match="cannot read the GGUF file"):
        load_model(str(bad_gguf))
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(LlmliteError, match="is not a model"):
        load_model(str(text))
    with pytest.raises(LlmliteError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_text_sources(tmp_path):
    assert load_text("wikitext2").startswith(" = Robert Boulter = \n")
    assert "\r" not in load_text("wikitext2-valid")
    (tmp_path / "a.txt").write_text("line one\r\nline two\n")
    assert load_text(str(tmp_path / "a.txt")) == "line one\nline two\n"
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    assert load_text(str(tmp_path / "a.jsonl")) == "first\n\nsecond"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x y", "z"]}), tmp_path / "a.parquet")
    assert load_text(str(tmp_path / "a.parquet")) == "x y\n\nz"
    (tmp_path / "b.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(LlmliteError, match="no text field"):
        load_text(str(tmp_path / "b.jsonl"))
    with pytest.raises(LlmliteError, match="no such text file"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(LlmliteError, match="cannot load the text"):
        load_text("someorg/no-such-dataset")


def test_windows():
    ids = torch.arange(1000)
    w = eval_windows(ids, 300)
    assert w.shape == (3, 300) and torch.equal(w.flatten(), ids[:900])
    assert eval_windows(ids, 300, max_windows=2).shape == (2, 300)
    with pytest.raises(LlmliteError, match="fewer than one window"):
        eval_windows(ids, 2048)
    a = calibration_windows(ids, 16, 100, seed=3)
    assert torch.equal(a, calibration_windows(ids, 16, 100, seed=3))
    assert not torch.equal(a, calibration_windows(ids, 16, 100, seed=4))
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 100)) for row in a)  # real substrings
    assert calibration_windows(ids, 2, 1000, seed=0).shape == (2, 1000)  # exactly one window's worth
    with pytest.raises(LlmliteError, match="fewer than one window"):
        calibration_windows(ids, 4, 1001)


def test_perplexity_equals_transformers_loss(tiny_dir):
    model, _ = load_model(str(tiny_dir))
    windows = torch.randint(0, model.config.vocab_size, (3, 70))
    ours = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows]
    assert ours.perplexity == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    assert (ours.windows, ours.tokens, ours.ctx) == (3, 3 * 69, 70)


def test_own_weights_copies_out_of_the_file_and_keeps_ties(tiny_dir):
    model, _ = load_model(str(tiny_dir))
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    own_weights(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.data_ptr() != before[n][1], n
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.slow
def test_window_nll_equals_float64_on_the_real_model(bundled_dir):
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenize(tokenizer, load_text("wikitext2"))[:256].view(2, 128)
    ours = window_nll(model, ids)
    with torch.no_grad():
        logp = model.double()(ids).logits[:, :-1].log_softmax(-1)
    ref = -logp.gather(-1, ids[:, 1:, None])[..., 0].sum(1)
    assert ours == pytest.approx(ref, rel=1e-6)  # float32 log_softmax sums were 4e-5 off
