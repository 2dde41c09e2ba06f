"""Fine-tuning end to end: only adapters train, merging is exact, resuming is exact, QLoRA on the
CPU learns, adapters load in plain peft, LoRA on a GPTQ checkpoint, bad input on the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmlite.training.adapters import add_adapters, load_base
from llmlite.training.train import CausalLMLoss, TrainingInterrupted, finetune

pytestmark = pytest.mark.slow  # trains and compiles

WIKI = Path(__file__).resolve().parents[1] / "llmlite" / "corpora" / "wikitext-2" / "wiki.valid.tokens"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "wiki.txt"
    path.write_text(WIKI.read_text(encoding="utf-8")[:40_000])
    return str(path)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
            for a in range(6) for b in range(6)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


SMALL = dict(seqlen=32, batch_size=2, log_steps=1, eval_split=0.1, seed=0, compile=False)


def test_lora_step_changes_only_adapter_weights(bundled_dir):
    model, _ = load_base("smollm2-135m", "lora", torch.float32, torch.device("cpu"))
    model = add_adapters(model, "lora", ["q_proj", "v_proj", "down_proj"], 8, 16, 0.0, False, False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    CausalLMLoss(model)(ids, ids, 46.0).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora_b = {n for n in before if ".lora_B." in n}
    assert len(lora_b) == 30 * 3 and lora_b <= changed
    assert all(".lora_" in n for n in changed)  # the base, embeddings and norms stay as they were


def test_adapter_loads_in_plain_peft_and_merges_exactly(tmp_path, text_file, bundled_dir):
    out = tmp_path / "adapter"
    r = finetune(data=text_file, output=str(out), max_steps=2, rank=4, alpha=8, progress=False, **SMALL)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert r.steps == 2 and r.train_tokens == 2 * 2 * 32 and r.eval_loss_before is not None
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(bundled_dir) and config["r"] == 4

    base = AutoModelForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(1))
    # independent reference: W + (alpha / r) B A on every adapted layer, the whole model in float64
    weights = load_file(out / "adapter_model.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).double().eval()
    modules = dict(reference.named_modules())
    for key, a in weights.items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = weights[key.replace("lora_A", "lora_B")]
            modules[name].weight.data += 2.0 * b.double() @ a.double()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    # each float32 path within 1e-4 (+1e-5 relative) of the float64 truth: float32 alone is already
    # ~6e-5 off on this model's logits (up to ~35), and rounding W + BA adds as much again
    peft_model = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(_logits(peft_model, ids).double(), expected, atol=1e-4, rtol=1e-5)
    untrained = AutoModelForCausalLM.from_pretrained(bundled_dir)
    assert not torch.allclose(_logits(untrained, ids).double(), expected, atol=1e-3)

    from llmlite.training.merge import merge

    merge(str(out), output=str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged, ids).double(), expected, atol=1e-4, rtol=1e-5)


def test_resume_ends_with_the_uninterrupted_adapter(tmp_path, tiny_dir, text_file):
    options = dict(model=str(tiny_dir), data=text_file, max_steps=5, save_steps=2, dropout=0.1,
                   grad_accum=2, progress=False, **{**SMALL, "compile": True})  # fmt: skip
    finetune(output=str(tmp_path / "a"), **options)

    def stop(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match=r"step 3 of 5.*step-2.*--resume"):
        finetune(output=str(tmp_path / "b"), on_step=stop, **options)
    assert not (tmp_path / "b").exists()
    assert (tmp_path / ".b.partial" / "checkpoints" / "step-2").is_dir()
    r = finetune(output=str(tmp_path / "b"), resume=True, **options)
    assert r.resumed_from == 2 and not (tmp_path / ".b.partial").exists()
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = json.loads((tmp_path / "a" / "llmlite_finetune.json").read_text())["log"]
    log_b = json.loads((tmp_path / "b" / "llmlite_finetune.json").read_text())["log"]
    assert [e.get("loss") for e in log_a] == [e.get("loss") for e in log_b]


def test_qlora_on_cpu_lowers_heldout_loss_and_merges(tmp_path, text_file, caplog):
    import bitsandbytes as bnb

    out = tmp_path / "qlora"
    r = finetune(data=text_file, method="qlora", output=str(out), max_steps=6, lr=2e-3, warmup_ratio=0,
                 progress=False, **{**SMALL, "batch_size": 4, "seqlen": 48})  # fmt: skip
    assert r.eval_loss_after < r.eval_loss_before - 0.05, (r.eval_loss_before, r.eval_loss_after)

    from llmlite.training.merge import merge

    merge(str(out), output=str(tmp_path / "merged"))
    assert "quantized (NF4)" in caplog.text
    nf4, _ = load_base("smollm2-135m", "qlora", torch.float32, torch.device("cpu"))
    assert isinstance(nf4.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    trained = PeftModel.from_pretrained(nf4, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(merged, ids), _logits(trained, ids), atol=1e-4, rtol=0)


def test_qlora_base_holds_no_view_of_the_checkpoint_file(bundled_dir):
    import bitsandbytes as bnb

    nf4, _ = load_base("smollm2-135m", "qlora", torch.float32, torch.device("cpu"))
    maps = Path("/proc/self/maps").read_text().splitlines()
    mapped = [[int(a, 16) for a in line.split()[0].split("-")] for line in maps if ".safetensors" in line]
    tensors = [t for t in [*nf4.parameters(), *nf4.buffers()] if not isinstance(t, bnb.nn.Params4bit)]
    assert tensors and not any(a <= t.data_ptr() < b for t in tensors for a, b in mapped)
    layer = nf4.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and "forward" in vars(layer)  # llmlite's NF4 path


def test_lora_on_a_gptq_checkpoint_trains_adapters_and_merges(tmp_path, tiny_dir, chat_file):
    from llmlite.api import quantize
    from llmlite.models import load_model
    from llmlite.quant.linear import QuantLinear
    from llmlite.training.merge import merge

    checkpoint = tmp_path / "gptq"
    quantize(model=str(tiny_dir), method="rtn", bits=4, group_size=32, output=str(checkpoint), progress=False)
    out = tmp_path / "adapter"
    r = finetune(model=str(checkpoint), data=chat_file, output=str(out), max_steps=3, lr=1e-2,
                 progress=False, **{**SMALL, "seqlen": 96})  # fmt: skip
    assert r.data_format == "instruction" and r.trainable_params > 0
    merge(str(out), output=str(tmp_path / "merged"))
    quantized, _ = load_model(str(checkpoint), backend="torch")  # float32, as the merged model computes
    assert isinstance(quantized.model.layers[0].mlp.down_proj, QuantLinear)
    from peft import LoraConfig
    from peft.tuners.lora.gptq import GPTQLoraLinear

    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(3))
    untrained = _logits(quantized, ids)
    config = LoraConfig.from_pretrained(out)
    config._register_custom_module({QuantLinear: GPTQLoraLinear})
    trained = PeftModel.from_pretrained(quantized, out, config=config).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged, ids), _logits(trained, ids), atol=1e-4, rtol=0)
    assert not torch.allclose(untrained, _logits(trained, ids), atol=1e-3)


@pytest.mark.parametrize("method,rslora", [("dora", False), ("lora", True), ("full", False)])
def test_dora_rslora_and_full(tmp_path, tiny_dir, text_file, method, rslora):
    out = tmp_path / method
    finetune(model=str(tiny_dir), data=text_file, method=method, rslora=rslora, output=str(out), max_steps=2,
             lr=1e-2, progress=False, **SMALL)  # fmt: skip
    ids = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(4))
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    if method == "full":
        tuned = AutoModelForCausalLM.from_pretrained(out).eval()
    else:
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["use_dora"] is (method == "dora") and config["use_rslora"] is rslora
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out).eval()
    assert not torch.allclose(_logits(tuned, ids), _logits(base, ids), atol=1e-4)


def test_compiled_training_matches_eager(tmp_path, tiny_dir, chat_file):
    options = dict(model=str(tiny_dir), data=chat_file, max_steps=2, lr=1e-2, progress=False, **SMALL)
    options["seqlen"] = 96
    eager = finetune(output=str(tmp_path / "eager"), **options)
    compiled = finetune(output=str(tmp_path / "compiled"), **{**options, "compile": True})
    for e, c in zip(eager.log, compiled.log, strict=True):
        assert e.keys() == c.keys()
        for key in ("loss", "eval_loss"):
            if key in e:
                assert abs(e[key] - c[key]) < 1e-5 * abs(e[key]), (key, e, c)
    a = load_file(tmp_path / "eager" / "adapter_model.safetensors")
    b = load_file(tmp_path / "compiled" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # Adam normalises each update: a 1e-7 gradient difference can move a weight by lr/100
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=0)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)


@pytest.mark.parametrize("compiled", [False, True])
def test_gradient_checkpointing_and_bfloat16_give_the_same_losses(tmp_path, tiny_dir, text_file, compiled):
    options = dict(model=str(tiny_dir), data=text_file, max_steps=2, progress=False, **SMALL)
    options["compile"] = compiled
    plain = finetune(output=str(tmp_path / "plain"), **options)
    checkpointed = finetune(output=str(tmp_path / "ckpt"), gradient_checkpointing=True, **options)
    for a, b in zip(plain.log, checkpointed.log, strict=True):
        for key in ("loss", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5 * abs(a[key])
    if not compiled:
        bf16 = finetune(output=str(tmp_path / "bf16"), dtype="bfloat16", **options)
        for a, b in zip(plain.log, bf16.log, strict=True):
            if "loss" in a:
                assert abs(a["loss"] - b["loss"]) < 0.05 * abs(a["loss"])  # bfloat16 base weights
