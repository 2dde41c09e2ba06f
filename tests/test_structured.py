"""Structured pruning (``llmlite prune --structure``): the importance cores against float64
references of their formulas on random data, the pruned model against the unpruned one with those
units zeroed, parameter counts against the target, the saved folder in plain transformers, and the
refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llmlite.errors import LlmliteError
from llmlite.pruning import (
    BlockInfluence,
    PruneConfig,
    channel_scores,
    check_structured,
    contribution_norms,
    group_scores,
    lowest,
    prune,
    prune_structured,
)
from llmlite.pruning.structured import group_columns

# 8 query heads reading 4 key/value heads (GQA, 2 per group), head_dim 12, 6 layers
SMALL = dict(
    vocab_size=128,
    hidden_size=96,
    intermediate_size=200,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=256,
)


def _llama(seed: int = 0, **changes) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, **changes})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
            else:  # norms away from 1, so that a wrong channel or head would show
                p.uniform_(0.5, 1.5)
    return model


def _calibration(seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(seed))


# --- the cores ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 4), (2, 6)])
def test_contribution_norms_are_the_rms_of_each_units_output(seed, k):
    """sqrt(tr(W_C H_CC W_Cᵀ)/2) from the float32 Hessian = sqrt(mean_t ‖W[:, C] x_t[C]‖²) in float64."""
    g = torch.Generator().manual_seed(seed)
    out, units, tokens = 20, 6, 300
    x = torch.randn(tokens, units * k, generator=g, dtype=torch.float64)
    x = x * torch.exp(torch.randn(units * k, generator=g, dtype=torch.float64))  # columns of other scales
    x[:, :k] += 2 * x[:, k : 2 * k]  # correlated units: the cross terms count
    w = torch.randn(out, units * k, generator=g, dtype=torch.float64)
    columns = torch.arange(units * k).view(units, k)
    expected = torch.stack([(x[:, c] @ w[:, c].T).pow(2).sum(1).mean().sqrt() for c in columns])
    h = (2 * x.T @ x / tokens).float()  # as the layer walk measures it
    got = contribution_norms(w.float(), h, columns)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    if k == 1:  # an MLP channel: Wanda's score of the whole down_proj column
        torch.testing.assert_close(channel_scores(w.float(), h), expected, rtol=1e-5, atol=0)
        wanda = w.norm(dim=0) * x.pow(2).mean(0).sqrt()
        torch.testing.assert_close(channel_scores(w.float(), h), wanda, rtol=1e-5, atol=0)


def test_group_scores_take_the_query_heads_that_read_each_key_value_head():
    """repeat_kv: query head h reads key/value head h // (heads / kv_heads)."""
    assert group_columns(4, 2, 3).tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    g = torch.Generator().manual_seed(3)
    heads, kv, d, tokens = 8, 4, 5, 200
    x = torch.randn(tokens, heads * d, generator=g, dtype=torch.float64)
    w = torch.randn(16, heads * d, generator=g, dtype=torch.float64)
    h = 2 * x.T @ x / tokens
    got = group_scores(w, h, heads, kv, d)
    for group in range(kv):
        c = slice(group * 2 * d, (group + 1) * 2 * d)  # query heads 2·group and 2·group + 1
        expected = (x[:, c] @ w[:, c].T).pow(2).sum(1).mean().sqrt()
        torch.testing.assert_close(got[group], expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_block_influence_is_one_minus_the_mean_cosine(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 17, 24, generator=g, dtype=torch.float64)
    y = x + 0.7 * torch.randn(3, 17, 24, generator=g, dtype=torch.float64)
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    expected = 1 - float(cos.mean())
    bi = BlockInfluence()
    for i in range(3):  # a chunk at a time, in float32 as the model computes
        bi.add(x[i].float(), y[i].float())
    assert bi.tokens == 51
    assert bi.value == pytest.approx(expected, abs=1e-6)
    same = BlockInfluence()
    same.add(x[0], 2 * x[0])
    assert same.value == pytest.approx(0, abs=1e-12)


def test_lowest_takes_the_first_of_equal_scores():
    assert lowest(torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0]), 2) == [1, 3]
    assert lowest(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]
    assert lowest(torch.tensor([4.0, 0.5, 9.0], dtype=torch.float64), 1) == [1]


# --- the model ----------------------------------------------------------------------------------


def _zeroed(model: LlamaForCausalLM, report) -> LlamaForCausalLM:
    """The unpruned model with the removed units zeroed: down_proj's columns (channels), o_proj's
    columns of each removed group's query heads (heads), o_proj and down_proj whole (layers: the
    layer adds nothing to the residual stream, so it is skipped)."""
    ref = copy.deepcopy(model)
    plan = report.plan
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            if plan.structure == "channels":
                layer.mlp.down_proj.weight[:, report.removed[i]] = 0
            elif plan.structure == "heads":
                width = plan.heads_per_group * plan.head_dim
                for group in report.removed[i]:
                    layer.self_attn.o_proj.weight[:, group * width : (group + 1) * width] = 0
            elif i in report.removed_layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return ref


@pytest.mark.parametrize(
    "structure,sparsity", [("channels", 0.2), ("channels", 0.3), ("heads", 0.2), ("layers", 0.3)]
)
def test_the_pruned_model_computes_what_the_model_with_those_units_zeroed_computes(structure, sparsity):
    model = _llama(1)
    pruned = copy.deepcopy(model)
    plan = check_structured(pruned, structure, sparsity)
    report = prune_structured(pruned, plan, _calibration(1), progress=False)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got, expected = pruned(ids).logits, _zeroed(model, report)(ids).logits
        unpruned = model(ids).logits
    assert (got - unpruned).abs().max() > 1e-2  # something was removed
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # float32 rounding only
    config = pruned.config
    layers = pruned.model.layers
    if structure == "channels":
        kept = 200 - plan.count
        assert config.intermediate_size == kept and all(
            len(report.removed[i]) == plan.count for i in range(6)
        )
        assert all(layer.mlp.down_proj.weight.shape == (96, kept) for layer in layers)
        assert all(layer.mlp.gate_proj.weight.shape == (kept, 96) for layer in layers)
    elif structure == "heads":
        kv = 4 - plan.count
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2 * kv, kv, 12)
        assert all(layer.self_attn.q_proj.weight.shape == (2 * kv * 12, 96) for layer in layers)
        assert all(layer.self_attn.k_proj.weight.shape == (kv * 12, 96) for layer in layers)
        assert all(layer.self_attn.o_proj.weight.shape == (96, 2 * kv * 12) for layer in layers)
        assert len(report.scores["group_norms"]) == 6
    else:
        assert config.num_hidden_layers == len(layers) == 6 - plan.count == 4
        assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
        influence = report.scores["block_influence"]
        assert sorted(report.removed_layers) == sorted(
            sorted(range(6), key=lambda i: influence[i])[: plan.count]
        )
    # decoding through the KV cache gives the logits of the full forward (layer_idx, head counts)
    with torch.no_grad():
        first = pruned(ids[:, :20], use_cache=True)
        step = pruned(ids[:, 20:21], cache=first.cache, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], got[:, 20], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("structure", ["channels", "heads", "layers"])
@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.3])
def test_parameter_counts_match_the_target_within_one_unit(structure, sparsity):
    model = _llama(2)
    before = sum(p.numel() for p in model.model.layers.parameters())
    if structure == "heads" and sparsity == 0.3:  # 3.7 groups of 4 (8.1% each) would round to all 4
        with pytest.raises(LlmliteError, match="would remove all 4 key/value groups of every layer"):
            check_structured(model, structure, sparsity)
        return
    plan = check_structured(model, structure, sparsity)
    report = prune_structured(model, plan, _calibration(2), progress=False)
    after = sum(p.numel() for p in model.model.layers.parameters())
    assert report.params_before == before and report.params_after == after
    assert before - after == plan.removed_params
    step = plan.unit_params * (1 if structure == "layers" else 6)  # one unit from every layer
    assert abs(before - after - sparsity * before) <= step / 2
    assert report.removed_fraction == pytest.approx((before - after) / before)


def test_head_counts_the_config_refuses_are_refused_with_the_counts_it_accepts():
    """12 heads on 6 key/value heads, hidden 96: removing one group leaves 10 heads, which
    LlamaConfig refuses (96 is not a multiple of 10); 2 to 5 groups leave 8, 6, 4 and 2."""
    model = _llama(3, num_attention_heads=12, num_key_value_heads=6)
    plan = check_structured(model, "heads", 0.1)
    share = plan.unit_params * 6 / plan.decoder_params
    with pytest.raises(LlmliteError, match=r"leaving 10 attention heads, which LlamaConfig refuses") as e:
        check_structured(model, "heads", 1.1 * share)
    assert f"2 (--sparsity {2 * share:.3f}), 3 (--sparsity {3 * share:.3f})" in str(e.value)
    assert f"5 (--sparsity {5 * share:.3f})" in str(e.value) and "accepts: 2 (" in str(e.value)
    report = prune_structured(model, plan, _calibration(3), progress=False)
    assert model.config.num_attention_heads == 12 - 2 * plan.count
    assert report.config["num_key_value_heads"] == [6, 6 - plan.count]


def test_per_layer_lists_of_the_config_keep_the_kept_layers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**{**SMALL, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3})
    model = Qwen2ForCausalLM(config).eval()
    types = list(config.layer_types)
    assert types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    plan = check_structured(model, "layers", 0.3)
    report = prune_structured(model, plan, _calibration(4), progress=False)
    gone = report.removed_layers
    assert model.config.layer_types == [t for i, t in enumerate(types) if i not in gone]
    assert model.config.max_window_layers == sum(1 for i in range(3) if i not in gone)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(4))


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "structure,sparsity,message",
    [
        ("heads", 0.03, r"less than one key/value group in every layer \(a key/value head and the 2 query "),
        ("heads", 0.03, r"break the GQA groups.*--sparsity 0\.041 or more"),
        ("channels", 0.0001, "less than one MLP channel in every layer"),
        ("layers", 0.05, "less than one decoder layer"),
        (
            "layers",
            0.95,
            r"would remove all 6 decoder layers; at most 5 can go: use --sparsity 0\.916 or less",
        ),
        ("channels", 0.9, "would remove all 200 MLP channels of every layer"),
    ],
)
def test_targets_below_one_unit_or_removing_everything_are_refused(structure, sparsity, message):
    with pytest.raises(LlmliteError, match=message):
        check_structured(_llama(), structure, sparsity)


def test_an_unknown_family_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(LlmliteError, match="gpt2 models are not supported"):
        check_structured(gpt2, "channels", 0.2)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"structure": "heads", "pattern": "2:4"}, "--pattern is for unstructured pruning"),
        ({"structure": "heads", "bits": 4}, "--bits is for unstructured pruning"),
        ({"structure": "layers", "method": "wanda"}, "--method is for unstructured pruning"),
        ({"structure": "layers", "damp": 0.1}, "--damp is for unstructured pruning"),
        ({"structure": "channels", "group_size": 64}, "--group-size is for unstructured pruning"),
        ({"structure": "channels", "sym": False}, "--asym is for unstructured pruning"),
        ({"structure": "heads", "true_sequential": True}, "--true-sequential is for unstructured pruning"),
        ({"structure": "mlp"}, "--structure mlp is unknown"),
        ({"structure": "channels", "sparsity": 1}, "--sparsity 1 is out of range"),
        ({"structure": "channels", "sparsity": 0}, "--sparsity 0 is out of range"),
        (
            {"recover_tokens": 4096},
            "--recover-tokens recovers a model whose units were removed; add --structure",
        ),
        ({"structure": "channels", "recover_tokens": -1}, "--recover-tokens must be 0 \\(none\\) or"),
        (
            {"structure": "channels", "recover_tokens": 512, "calibration": "wikitext2-valid+self"},
            "--recover-tokens 512 is less than one window of --seqlen 512 for each of the 2 "
            "calibration sources; give at least 1024",
        ),
        (
            {"structure": "channels", "recover_lr": 1e-4},
            "--recover-lr sets the recovery; add --recover-tokens",
        ),
        (
            {"structure": "channels", "recover_tokens": 2048, "recover_lr": 2},
            "--recover-lr 2 is out of range",
        ),
    ],
)
def test_config_refusals(options, message):
    with pytest.raises(LlmliteError, match=message):
        PruneConfig(**options).validate()


def test_config_default_sparsity():
    assert PruneConfig(structure="channels").validate().sparsity == 0.2
    assert PruneConfig().validate().sparsity == 0.5


# --- saved and loaded ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("small-structured")
    model = _llama(
        4, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("structure,sparsity", [("channels", 0.2), ("heads", 0.2), ("layers", 0.3)])
def test_the_saved_folder_loads_in_plain_transformers_with_the_logits_in_memory(
    tmp_path, small_folder, structure, sparsity
):
    out = tmp_path / structure
    result = prune(
        model=str(small_folder),
        structure=structure,
        sparsity=sparsity,
        samples=4,
        seqlen=32,
        output=str(out),
        progress=False,
    )
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.dtype == torch.float32
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 44, 12]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, result.model(ids).logits)
    assert sum(p.numel() for p in plain.model.layers.parameters()) == result.report.params_after
    saved = json.loads((out / "config.json").read_text())
    record = json.loads((out / "llmlite.json").read_text())["report"]
    assert record["structure"] == structure and record["params_after"] == result.report.params_after
    for key, (_, after) in record["config"].items():
        assert saved[key] == after
    if structure == "layers":
        assert saved["num_hidden_layers"] == 6 - len(record["removed_layers"])
    else:
        assert sorted(record["removed"]) == [str(i) for i in range(6)]
    summary = result.summary()
    assert summary["params_after"] < summary["params_before"]


def test_recovery_distils_the_unpruned_model_into_the_pruned_one(tmp_path, small_folder, tokenizer):
    from llmlite.calibration import calibration_set
    from llmlite.gqa import distillation_kl

    options = {"model": str(small_folder), "structure": "channels", "sparsity": 0.3, "samples": 4}
    options |= {"seqlen": 32, "calibration": "wikitext2-valid", "progress": False}
    plain = prune(**options)
    out = tmp_path / "recovered"
    recovered = prune(**options, recover_tokens=32 * 32 - 5, recover_lr=3e-4, output=str(out))
    record = json.loads((out / "llmlite.json").read_text())["report"]["recovery"]
    assert (record["tokens"], record["windows"], record["steps"], record["batch_size"]) == (1024, 32, 8, 4)
    assert record["trainable_params"] == sum(p.numel() for p in recovered.model.parameters())
    pairs = zip(plain.model.named_parameters(), recovered.model.parameters(), strict=True)
    assert all(not torch.equal(p, q) for (_, p), q in pairs), "every weight trains"
    teacher = AutoModelForCausalLM.from_pretrained(small_folder, dtype=torch.float32).eval()
    windows = calibration_set("wikitext2-valid", teacher, tokenizer, 32, 32, seed=1, progress=False)
    before = distillation_kl(plain.model, teacher, windows)
    after = distillation_kl(recovered.model, teacher, windows)
    assert after < 0.9 * before  # trained on those windows, toward the teacher (0.44 -> 0.37)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 44, 12]])
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, recovered.model(ids).logits)


def test_the_cli_prints_what_it_removed(tmp_path, small_folder, capsys):
    from llmlite.cli import main

    out = tmp_path / "cli"
    argv = ["prune", "--model", str(small_folder), "--structure", "layers", "--sparsity", "0.3"]
    assert main([*argv, "--samples", "2", "--seqlen", "32", "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "--structure layers: 2 of 6 layers removed" in printed and "num_hidden_layers 4" in printed
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_the_cli_prints_the_recovery(tmp_path, small_folder, capsys):
    from llmlite.cli import main

    out = tmp_path / "cli-recovered"
    argv = ["prune", "--model", str(small_folder), "--structure", "channels"]
    argv += ["--calibration", "wikitext2-valid"]
    argv += ["--samples", "2", "--seqlen", "32", "--recover-tokens", "100", "--output", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert ", recovered on 128 tokens (KL " in printed  # 100 tokens: 4 whole windows of 32


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_shrinks_the_bundled_model_and_transformers_loads_it(tmp_path):
    from llmlite.cli import main

    out = tmp_path / "channels"
    argv = ["prune", "--structure", "channels", "--sparsity", "0.2", "--samples", "8", "--seqlen", "128"]
    assert main([*argv, "--output", str(out), "--quiet"]) == 0
    record = json.loads((out / "llmlite.json").read_text())["report"]
    assert record["removed_fraction"] == pytest.approx(0.2, abs=0.01)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == record["config"]["intermediate_size"][1] < 1536
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
