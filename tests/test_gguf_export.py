"""``llmlite export --format gguf`` (issue 24, item 1): a checkpoint quantized at group 32 becomes a
GGUF file that an independent reader, transformers' GGUF loader (llama.cpp's tensor names, rotary
order and block types), loads back to the same weights, logits and tokens."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import llmlite
from llmlite.cli import main
from llmlite.config import QuantizeConfig
from llmlite.errors import LlmliteError
from llmlite.models import load_model
from llmlite.quant.checkpoint import gptq_config, round_unquantized, save_gptq_checkpoint
from llmlite.quant.driver import QuantSettings, quantize_model
from llmlite.quant.gguf_file import rotary_rows

pytestmark = pytest.mark.slow  # quantizes, writes and loads models

TEXT = "The capital of France is Paris; 12345 apples."


def float_model(tokenizer, seed: int) -> LlamaForCausalLM:
    """A random Llama whose widths are whole GGML blocks (GQA 4/2 heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def checkpoint(tokenizer, folder, bits, sym, group=32):
    """``float_model`` GPTQ-quantized and saved."""
    model = float_model(tokenizer, bits)
    calib = torch.randint(0, len(tokenizer), (2, 32))
    quantize_model(model, QuantSettings("gptq", bits, group, sym, act_order=True), calib, progress=False)
    round_unquantized(model, torch.float16)
    folder.mkdir()
    options = QuantizeConfig(bits=bits, group_size=group, sym=sym, v2=False, refit=False)
    save_gptq_checkpoint(model, tokenizer, folder, gptq_config(options), torch.float16)
    return folder


@pytest.mark.parametrize("bits,sym,kind", [(4, True, "q4_0"), (4, False, "q4_1"), (8, True, "q8_0")])
def test_export_loads_back_with_the_same_weights_and_tokens(tmp_path, tokenizer, capsys, bits, sym, kind):
    ckpt = checkpoint(tokenizer, tmp_path / "ckpt", bits, sym)
    result = llmlite.export(model=str(ckpt), output=str(tmp_path / "api.gguf"), embeddings="f16")
    assert (result.weight_type, result.format) == (kind, "gguf") and result.size_bytes > 0
    assert main(["export", str(ckpt), "--embeddings", "f16", "--output", str(tmp_path / "cli.gguf")]) == 0
    assert kind in capsys.readouterr().out
    assert (tmp_path / "api.gguf").read_bytes() == (tmp_path / "cli.gguf").read_bytes()

    ours, _ = load_model(str(ckpt), backend="torch")  # the float32 reference
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="api.gguf", dtype=torch.float32).eval()
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="api.gguf")
    assert gguf_tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    if kind == "q4_1":  # m = −z·s in float16: within 1% of a step per weight
        assert (a - b).abs().max() < 1e-2 * a.abs().max()
    else:
        assert torch.equal(a, b)


def test_what_gguf_cannot_carry_is_refused_before_writing(tmp_path, tokenizer):
    ckpt = checkpoint(tokenizer, tmp_path / "g64", 4, True, group=64)
    with pytest.raises(LlmliteError, match="not in groups of 32 columns: re-quantize with --group-size 32"):
        llmlite.export(model=str(ckpt), output=str(tmp_path / "m.gguf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g64"]


def test_type_chooses_among_the_types_that_hold_the_weights(tmp_path, tokenizer):
    """Symmetric 4-bit fits q4_1 too (m = −8·d, exact): the same logits as q4_0; a type that cannot
    hold the weights is refused with the one that can, and nothing is written."""
    ckpt = checkpoint(tokenizer, tmp_path / "sym", 4, True)
    assert llmlite.export(model=str(ckpt), type="q4_1", output=str(tmp_path / "a.gguf")).weight_type == "q4_1"
    llmlite.export(model=str(ckpt), output=str(tmp_path / "b.gguf"))
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f, dtype=torch.float32)
            .eval()(ids)
            .logits
            for f in ("a.gguf", "b.gguf")
        ]
    assert torch.equal(*logits)
    with pytest.raises(LlmliteError, match=r"--type q8_0 cannot hold .* q4_0 in GGUF terms.*--type q4_0"):
        llmlite.export(model=str(ckpt), type="q8_0", output=str(tmp_path / "c.gguf"))
    assert not (tmp_path / "c.gguf").exists()


def test_quantize_format_gguf_writes_the_export_in_one_step(tmp_path, tokenizer):
    """``quantize --format gguf`` gives the file that ``quantize`` then ``export`` give."""
    float_model(tokenizer, 0).save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    options = dict(model=str(tmp_path / "float"), method="rtn", group_size=32, progress=False)
    llmlite.quantize(**options, format="gguf", output=str(tmp_path / "one.gguf"))
    llmlite.quantize(**options, output=str(tmp_path / "ckpt"))
    llmlite.export(model=str(tmp_path / "ckpt"), output=str(tmp_path / "two.gguf"))
    reader = [GGUFReader(tmp_path / f) for f in ("one.gguf", "two.gguf")]
    for a, b in zip(*(r.tensors for r in reader), strict=True):
        assert a.name == b.name and np.array_equal(a.data, b.data)


def test_embeddings_are_q8_0_as_llama_cpp_writes_them(tmp_path, tokenizer):
    """By default the float embedding is written as llama.cpp's own quantizer writes it for a Q4_0
    file (Q8_0; gguf's quantizer is byte-identical to llama.cpp's), the linears untouched."""
    ckpt = checkpoint(tokenizer, tmp_path / "ckpt", 4, True)
    small = llmlite.export(model=str(ckpt), output=str(tmp_path / "q8.gguf"))
    exact = llmlite.export(model=str(ckpt), output=str(tmp_path / "f16.gguf"), embeddings="f16")
    assert small.size_bytes < exact.size_bytes
    q8, f16 = ({t.name: t for t in GGUFReader(tmp_path / f).tensors} for f in ("q8.gguf", "f16.gguf"))
    embedding = load_model(str(ckpt))[0].get_input_embeddings().weight.detach().float().numpy()
    assert q8["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    want = gguf.quants.quantize(embedding, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.asarray(q8["token_embd.weight"].data).reshape(want.shape), want)
    assert all(np.array_equal(q8[n].data, f16[n].data) for n in q8 if n != "token_embd.weight")


def test_rotary_rows_interleave_each_heads_halves():
    """llama.cpp's q/k row order: head h's rows (h, 0..d/2) and (h, d/2..d) interleaved."""
    assert rotary_rows(8, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    rows = rotary_rows(576, 9)
    assert sorted(rows.tolist()) == list(range(576)) and rows[:4].tolist() == [0, 32, 1, 33]
    assert json.dumps(rows.tolist())  # a permutation of plain ints
