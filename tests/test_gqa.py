"""GQA conversion: the cores against float64 loop references, exactness of repetition, the weighted
and aligned methods, uptraining, checkpoints that plain transformers loads, and the command line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llmlite.cli import main
from llmlite.data import calibration_windows, eval_windows, load_text, tokenize
from llmlite.errors import LlmliteError
from llmlite.evaluation.perplexity import perplexity
from llmlite.gqa import (
    RECORD,
    align_keys,
    align_values,
    convert_gqa,
    convert_gqa_model,
    distillation_kl,
    key_weights,
    kv_cache_bytes_per_token,
    pool_heads,
    repeat_heads,
    uptrain,
    value_weights,
)
from llmlite.models import load_model

LLMLITE = str(Path(sys.executable).parent / "llmlite")
SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
SMALL_HEADS = dict(num_attention_heads=4, num_key_value_heads=2)


# --- references written out head by head, in float64 -------------------------------------------------


def _heads(w: torch.Tensor, heads: int) -> list[torch.Tensor]:
    rows = (w[:, None] if w.dim() == 1 else w).double()
    d = rows.shape[0] // heads
    return [rows[i * d : (i + 1) * d] for i in range(heads)]


def _as_matrix(weight: torch.Tensor, d: int) -> torch.Tensor:
    weight = weight.double()
    if weight.dim() == 0:
        return weight * torch.eye(d, dtype=torch.float64)
    return torch.diag(weight) if weight.dim() == 1 else weight


def ref_pool(w: torch.Tensor, heads: int, groups: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    parts, g = _heads(w, heads), heads // groups
    out = []
    for group in range(groups):
        members = parts[group * g : (group + 1) * g]
        if weights is None:
            out.append(sum(members) / g)
            continue
        mats = [_as_matrix(weights[group * g + k], members[0].shape[0]) for k in range(g)]
        out.append(torch.linalg.solve(sum(mats), sum(m @ x for m, x in zip(mats, members, strict=True))))
    out = torch.cat(out)
    return out[:, 0] if w.dim() == 1 else out


def ref_repeat(w: torch.Tensor, heads: int, times: int) -> torch.Tensor:
    out = torch.cat([part for part in _heads(w, heads) for _ in range(times)])
    return out[:, 0] if w.dim() == 1 else out


def _weights(kind: str, heads: int, d: int, generator: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "head":
        return torch.rand(heads, generator=generator) + 0.1
    if kind == "row":
        return torch.rand(heads, d, generator=generator) + 0.1
    a = torch.randn(heads, d, d, generator=generator, dtype=torch.float64)
    return a @ a.mT + 0.1 * torch.eye(d, dtype=torch.float64)


# --- pure cores ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "heads,groups,d,n", [(4, 2, 8, 16), (6, 2, 4, 5), (9, 3, 6, 7), (8, 1, 2, 3), (3, 3, 4, 4)]
)
@pytest.mark.parametrize("kind", ["none", "head", "row", "matrix"])
def test_pool_heads_matches_loop_reference(heads, groups, d, n, kind):
    generator = torch.Generator().manual_seed(heads * 100 + n)
    weight = torch.randn(heads * d, n, generator=generator)
    bias = torch.randn(heads * d, generator=generator)
    weights = _weights(kind, heads, d, generator)
    for w in (weight, bias):
        got = pool_heads(w, heads, groups, weights)
        assert got.shape == (groups * d, *w.shape[1:]) and got.dtype == w.dtype
        # float32 output of a float64 computation; the 1e-6 ridge moves the weighted result by < 1e-6
        torch.testing.assert_close(got.double(), ref_pool(w, heads, groups, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,times,d,n", [(2, 2, 8, 16), (3, 3, 64, 5), (1, 4, 3, 2), (5, 1, 2, 7)])
def test_repeat_heads_matches_loop_reference(heads, times, d, n):
    generator = torch.Generator().manual_seed(heads + times)
    for w in (torch.randn(heads * d, n, generator=generator), torch.randn(heads * d, generator=generator)):
        got = repeat_heads(w, heads, times)
        assert torch.equal(got.double(), ref_repeat(w, heads, times))


@pytest.mark.parametrize("heads,times", [(3, 3), (2, 2), (1, 9), (4, 7), (3, 5)])
def test_repeat_then_pool_gives_the_original_exactly(heads, times):
    generator = torch.Generator().manual_seed(times)
    for w in (torch.randn(heads * 64, 96, generator=generator), torch.randn(heads * 64, generator=generator)):
        assert torch.equal(pool_heads(repeat_heads(w, heads, times), heads * times, heads), w)
        for dtype in (torch.float16, torch.bfloat16):
            low = w.to(dtype)
            assert torch.equal(pool_heads(repeat_heads(low, heads, times), heads * times, heads), low)


def test_uniform_weights_equal_the_mean():
    generator = torch.Generator().manual_seed(0)
    heads, groups, d = 6, 2, 8
    w = torch.randn(heads * d, 20, generator=generator)
    mean = pool_heads(w, heads, groups)
    for weights in (
        torch.full((heads,), 3.0),
        torch.full((heads, d), 0.5),
        2 * torch.eye(d).repeat(heads, 1, 1),
    ):
        torch.testing.assert_close(pool_heads(w, heads, groups, weights), mean, rtol=1e-6, atol=1e-7)
    # all-zero weights (a dead head group) fall back to the mean instead of dividing by zero
    torch.testing.assert_close(
        pool_heads(w, heads, groups, torch.zeros(heads, d)), mean, rtol=1e-6, atol=1e-7
    )


def test_weighted_pool_minimises_its_objective():
    generator = torch.Generator().manual_seed(1)
    heads, d, n = 3, 6, 10
    w = torch.randn(heads * d, n, generator=generator, dtype=torch.float64)
    mats = _weights("matrix", heads, d, generator)
    parts = _heads(w, heads)

    def objective(merged: torch.Tensor) -> float:
        return float(
            sum(torch.trace((x - merged).T @ m @ (x - merged)) for x, m in zip(parts, mats, strict=True))
        )

    best = pool_heads(w, heads, 1, mats)
    assert objective(best) < objective(pool_heads(w, heads, 1))
    for _ in range(5):
        nudged = best + 1e-3 * torch.randn(best.shape, generator=generator, dtype=torch.float64)
        assert objective(best) < objective(nudged)


def test_key_weights_sum_the_query_energy_of_each_rotary_pair():
    energy = torch.arange(16, dtype=torch.float64).reshape(4, 4)  # 4 query heads, d = 4, pairs (0,2) (1,3)
    got = key_weights(energy, 2)  # kv head 0 is read by query heads 0, 1; kv head 1 by 2, 3
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for i in range(2):
        for j in (2 * i, 2 * i + 1):
            for c in range(2):
                pair = energy[j, c] + energy[j, c + 2]
                expected[i, c] += pair
                expected[i, c + 2] += pair
    assert torch.equal(got, expected)


def test_value_weights_match_a_loop_over_query_heads():
    generator = torch.Generator().manual_seed(2)
    o = torch.randn(12, 6 * 4, generator=generator)  # hidden 12, 6 query heads of d = 4
    got = value_weights(o, 6, 2)
    for i in range(2):
        expected = sum(
            o[:, j * 4 : (j + 1) * 4].double().T @ o[:, j * 4 : (j + 1) * 4].double()
            for j in range(3 * i, 3 * i + 3)
        )
        torch.testing.assert_close(got[i], expected)


def _rotate_pairs(rows: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Multiply each rotary pair (c, c + d/2) of ``rows`` [d, n], read as a complex number, by alpha[c]."""
    h = rows.shape[0] // 2
    out = rows.clone()
    for c in range(h):
        re, im = rows[c], rows[c + h]
        out[c] = alpha[c].real * re - alpha[c].imag * im
        out[c + h] = alpha[c].real * im + alpha[c].imag * re
    return out


def test_aligned_merge_is_exact_for_heads_that_differ_by_rope_safe_maps():
    """Key heads that differ by a complex factor per rotary pair (queries compensated) and value heads
    that differ by an invertible map (o_proj compensated) merge without error; plain averaging fails."""
    generator = torch.Generator().manual_seed(3)
    heads, d, n = 4, 8, 10
    k1 = torch.randn(d, n, generator=generator, dtype=torch.float64)
    re, im = torch.randn(2, d // 2, generator=generator, dtype=torch.float64)
    alpha = torch.complex(re, im)
    k = torch.cat([k1, _rotate_pairs(k1, alpha)])  # 2 kv heads: k2 = alpha * k1
    q = torch.randn(heads * d, n, generator=generator, dtype=torch.float64)
    x = torch.randn(50, n, generator=generator, dtype=torch.float64)
    energy = torch.rand(heads, d, generator=generator, dtype=torch.float64) + 0.1
    new_k, new_q = align_keys(k, q, energy, x.T @ x / 50, 1)
    for j in range(heads):  # query head j reads kv head j // 2; scores before and after must agree
        old = q[j * d : (j + 1) * d] @ x.T, k[(j // 2) * d : (j // 2 + 1) * d] @ x.T
        new = new_q[j * d : (j + 1) * d] @ x.T, new_k @ x.T
        freqs = 10000.0 ** -(torch.arange(d // 2, dtype=torch.float64) / (d // 2))
        for m, p in ((0, 0), (5, 2), (17, 3)):  # RoPE: query at position m, key at position p
            rq, rk = (torch.polar(torch.ones_like(freqs), pos * freqs) for pos in (m, p))
            before = _rotate_pairs(old[0], rq).T @ _rotate_pairs(old[1], rk)
            after = _rotate_pairs(new[0], rq).T @ _rotate_pairs(new[1], rk)
            torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    v1 = torch.randn(d, n, generator=generator, dtype=torch.float64)
    t = torch.randn(d, d, generator=generator, dtype=torch.float64) + 3 * torch.eye(d, dtype=torch.float64)
    v = torch.cat([v1, t @ v1])
    o = torch.randn(12, heads * d, generator=generator, dtype=torch.float64)
    new_v, new_o = align_values(v, o, x.T @ x / 50, heads, 1)
    out_before = sum(
        o[:, j * d : (j + 1) * d] @ v[(j // 2) * d : (j // 2 + 1) * d] @ x.T for j in range(heads)
    )
    out_after = sum(new_o[:, j * d : (j + 1) * d] @ new_v @ x.T for j in range(heads))
    torch.testing.assert_close(out_after, out_before, rtol=1e-6, atol=1e-6)
    mean_v = pool_heads(v, 2, 1)
    out_mean = sum(o[:, j * d : (j + 1) * d] @ mean_v @ x.T for j in range(heads))
    assert (out_mean - out_before).abs().max() > 1.0


# --- models --------------------------------------------------------------------------------------------


def tiny_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, **SMALL_HEADS))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**SMALL, **SMALL_HEADS))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**SMALL, **SMALL_HEADS, attention_bias=True))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def _ids(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bundled():
    return load_model("smollm2-135m")


@torch.no_grad()
def test_expanding_keeps_the_logits_and_pooling_back_the_weights(tokenizer):
    model = make_tiny(tokenizer)
    x = _ids((2, 48))
    wide = copy.deepcopy(model)
    convert_gqa(wide, 4)  # 2 -> 4 key/value heads: multi-head attention
    assert wide.config.num_key_value_heads == 4 and wide.model.layers[0].self_attn.num_key_value_groups == 1
    assert wide.model.layers[0].self_attn.k_proj.out_features == 4 * 24
    # the same products summed in the same order, up to the attention kernel's grouping: float32 noise
    torch.testing.assert_close(wide(x).logits, model(x).logits, rtol=0, atol=1e-5)
    convert_gqa(wide, 2)
    original = model.state_dict()
    assert all(torch.equal(t, original[name]) for name, t in wide.state_dict().items())


@torch.no_grad()
def test_bundled_model_as_multi_head_attention_gives_the_same_logits(bundled):
    model, _ = bundled
    wide = copy.deepcopy(model)
    convert_gqa(wide, 9)  # 3 -> 9 key/value heads (MHA)
    attn = wide.model.layers[0].self_attn
    assert (attn.k_proj.out_features, attn.v_proj.out_features, attn.num_key_value_groups) == (576, 576, 1)
    x = _ids((1, 64), seed=1)
    # float32 logits of magnitude ~20: 1e-4 allows reordered sums, not a wrong head mapping
    torch.testing.assert_close(wide(x).logits, model(x).logits, rtol=0, atol=1e-4)
    convert_gqa(wide, 3)
    original = model.state_dict()
    assert all(torch.equal(t, original[name]) for name, t in wide.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("method", ["mean", "weighted", "aligned"])
@torch.no_grad()
def test_each_architecture_converts(arch, method):
    model = tiny_model(arch)
    x = _ids((1, 32))
    merged = copy.deepcopy(model)
    convert_gqa(merged, 1, method, _ids((4, 64), seed=2), progress=False)
    attn, old = merged.model.layers[0].self_attn, model.model.layers[0].self_attn
    assert merged.config.num_key_value_heads == 1 and attn.num_key_value_groups == 4
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (16, 64)
    assert (attn.k_proj.bias is None) == (old.k_proj.bias is None)
    logits = merged(x).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, model(x).logits, atol=1e-3)
    if method == "mean" and old.k_proj.bias is not None:
        torch.testing.assert_close(attn.k_proj.bias, (old.k_proj.bias[:16] + old.k_proj.bias[16:]) / 2)
    wide = copy.deepcopy(model)
    convert_gqa(wide, 4, method)
    torch.testing.assert_close(wide(x).logits, model(x).logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_aligned_undoes_an_expansion_and_beats_mean_pooling(tokenizer):
    model = make_tiny(tokenizer)
    ids = tokenize(tokenizer, load_text("wikitext2-valid")[:200_000])
    calibration, held_out = calibration_windows(ids, 4, 128, seed=0), calibration_windows(ids, 4, 128, seed=9)
    wide = copy.deepcopy(model)
    convert_gqa(wide, 4)
    convert_gqa(wide, 2, "aligned", calibration, progress=False)
    assert distillation_kl(wide, model, held_out) < 1e-9  # identical heads in a group: nothing to lose
    kl = {}
    for method in ("mean", "weighted", "aligned"):
        merged = copy.deepcopy(model)
        convert_gqa(merged, 1, method, calibration, progress=False)
        kl[method] = distillation_kl(merged, model, held_out)
    assert all(torch.isfinite(torch.tensor(v)) for v in kl.values())
    assert kl["aligned"] < 0.75 * kl["mean"], kl


@torch.no_grad()
def test_calibrated_methods_beat_mean_pooling_on_the_bundled_model(bundled):
    model, tokenizer = bundled
    calibration = calibration_windows(tokenize(tokenizer, load_text("wikitext2-valid")), 4, 256)
    windows = eval_windows(tokenize(tokenizer, load_text("wikitext2")), 512, 1)
    ppl = {}
    for method in ("mean", "weighted", "aligned"):
        merged = copy.deepcopy(model)
        convert_gqa(merged, 1, method, calibration, progress=False)
        ppl[method] = perplexity(merged, windows, progress=False).perplexity
        del merged
    assert ppl["aligned"] < ppl["weighted"] < ppl["mean"], ppl


def test_uptraining_lowers_the_held_out_kl_and_trains_only_attention(tokenizer):
    teacher = make_tiny(tokenizer)
    student = copy.deepcopy(teacher)
    convert_gqa(student, 1)
    ids = tokenize(tokenizer, load_text("wikitext2-valid")[:300_000])
    train, held_out = calibration_windows(ids, 32, 128, seed=1), calibration_windows(ids, 4, 128, seed=9)
    before = distillation_kl(student, teacher, held_out)
    snapshot = copy.deepcopy(student.state_dict())
    losses = uptrain(student, teacher, train, lr=1e-3, batch_size=4, progress=False)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert distillation_kl(student, teacher, held_out) < before - 0.01
    after = student.state_dict()
    for name, tensor in after.items():
        trained = any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert torch.equal(tensor, snapshot[name]) != trained, name
    assert all(p.requires_grad for p in student.parameters()) and not student.training


# --- API and command line ------------------------------------------------------------------------------


def test_api_saves_a_model_plain_transformers_loads(tmp_path, tiny_dir):
    out = tmp_path / "gqa"
    result = convert_gqa_model(
        model=str(tiny_dir), kv_heads=1, method="aligned", samples=2, seqlen=64,
        uptrain_tokens=512, batch_size=2, uptrain_lr=1e-3, output=str(out), progress=False,
    )  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.num_key_value_heads == 1
    assert loaded.model.layers[1].self_attn.v_proj.weight.shape == (24, 96)
    x = _ids((1, 40), seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, result.model(x).logits, rtol=0, atol=1e-6)
    record = json.loads((out / RECORD).read_text())
    assert (record["kv_heads_before"], record["kv_heads_after"]) == (2, 1)
    assert record["kv_cache_bytes_per_token_fp16_before"] == 2 * 2 * 2 * 24 * 2
    assert (
        record["kv_cache_bytes_per_token_fp16_after"]
        == kv_cache_bytes_per_token(loaded.config)
        == 2 * 2 * 24 * 2
    )
    up = record["uptraining"]
    assert (up["tokens"], up["steps"], up["params"]) == (512, 4, "attention") and len(up["losses"]) == 4
    assert record["calibration"] == {"text": "wikitext2-valid", "windows": 2, "seqlen": 64}
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_cli_with_a_recipe_matches_the_in_memory_conversion(tmp_path, tiny_dir, capsys):
    recipe = tmp_path / "gqa.yaml"
    recipe.write_text("kv-heads: 1\nmethod: mean\n")
    out = tmp_path / "out"
    assert (
        main(
            [
                "convert-gqa",
                "--model",
                str(tiny_dir),
                "--recipe",
                str(recipe),
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "2 -> 1 key/value heads" in summary[0], summary
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    convert_gqa(expected, 1)
    x = _ids((2, 30), seed=4)
    with torch.no_grad():
        assert loaded.config.num_key_value_heads == 1
        torch.testing.assert_close(loaded(x).logits, expected(x).logits, rtol=0, atol=1e-6)


def _user_error(capsys, argv: list[str], *needles: str) -> None:
    capsys.readouterr()  # drop what the setup printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # transformers' loading bars aside
    assert len(errors) == 1 and errors[0].startswith("llmlite: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_unsupported_architecture_and_quantized_checkpoints_are_refused(
    tmp_path, tokenizer, tiny_dir, capsys
):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=0,
            eos_token_id=0,
            n_embd=32,
            n_layer=1,
            n_head=2,
            n_positions=64,
        )
    ).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    out = tmp_path / "out"
    _user_error(
        capsys,
        ["convert-gqa", "--model", str(gpt2), "--kv-heads", "1", "--output", str(out), "--quiet"],
        "'gpt2'",
        "llama, mistral, qwen2",
    )
    from llmlite.api import quantize

    quantize(model=str(tiny_dir), method="rtn", output=str(tmp_path / "w4"), progress=False)
    _user_error(
        capsys,
        ["convert-gqa", "--model", str(tmp_path / "w4"), "--kv-heads", "1", "--output", str(out)],
        "is already a 4-bit GPTQ checkpoint",
        "convert the float model it came from",
    )
    _user_error(capsys, ["convert-gqa", "--model", str(tiny_dir), "--output", str(out)], "--kv-heads")
    _user_error(
        capsys,
        ["convert-gqa", "--model", str(tiny_dir), "--kv-heads", "3", "--output", str(out)],
        "--kv-heads 3",
        "use one of 1, 2, 4",
    )
    _user_error(capsys, ["convert-gqa", "--model", str(tiny_dir), "--kv-heads", "1"], "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "w4"]
    with pytest.raises(LlmliteError, match="needs calibration windows"):
        convert_gqa(make_tiny(tokenizer), 1, "weighted")


def test_existing_output_is_refused_and_left_alone(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _user_error(
        capsys,
        ["convert-gqa", "--model", str(tiny_dir), "--kv-heads", "1", "--output", str(out)],
        "already exists",
        "--overwrite",
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_non_dividing_head_count_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [LLMLITE, "convert-gqa", "--kv-heads", "2", "--output", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert (
        len(errors) == 1 and "--kv-heads 2" in errors[0] and "9 query heads and 3 key/value" in errors[0]
    ), errors
    assert "use one of 1, 3, 9" in errors[0]
    assert not (tmp_path / "out").exists()
