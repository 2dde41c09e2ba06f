"""Low-rank factorisation (``llmlite lowrank``): each core against a float64 reference of its formula
on fresh random data (SVD-LLM's whitened truncation error is the sum of the dropped σ²), the rank
allocation against brute force, the walk on a tiny Llama, saving and loading (factorised and
merged) with the logits of the model in memory, and refusals."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llmlite.errors import LlmliteError
from llmlite.layers.lowrank import LowRankLinear, install_low_rank
from llmlite.lowrank import (
    DENSE,
    LowrankConfig,
    LowrankSettings,
    asvd,
    asvd_scale,
    check_factorizable,
    factorize_model,
    global_ranks,
    load,
    lowrank,
    max_rank,
    minimum_cost,
    svd,
    svd_llm,
    uniform_ranks,
    whitening,
)
from llmlite.lowrank.allocate import cost, loss


def _data(seed: int, rows: int = 24, cols: int = 40, tokens: int = 300):
    """A weight ``[rows, cols]`` and correlated inputs ``[tokens, cols]`` of uneven scales (float64)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, cols, generator=g, dtype=torch.float64
    )
    x += 0.3 * torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    x *= torch.exp(torch.randn(cols, generator=g, dtype=torch.float64))
    return w, x


def _hessian(x):
    return 2 * x.T @ x / x.shape[0]


# --- the cores ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,shape", [(0, (24, 40)), (1, (40, 24)), (2, (16, 16))])
def test_svd_is_exact_at_full_rank_and_eckart_young_truncated(seed, shape):
    w, _ = _data(seed, *shape)
    k = min(shape)
    full = svd(w, k)
    torch.testing.assert_close(full.u @ full.v, w, rtol=0, atol=1e-12)
    s_ref = torch.linalg.svdvals(w)
    for r in (1, k // 3, k - 1):
        low = svd(w, r)
        assert low.u.shape == (shape[0], r) and low.v.shape == (r, shape[1])
        err = float(((w - low.u @ low.v) ** 2).sum())
        assert err == pytest.approx(float((s_ref[r:] ** 2).sum()), rel=1e-10) == pytest.approx(low.dropped)
        assert torch.linalg.matrix_rank(low.u @ low.v) == r
        # the singular values split evenly between the factors
        torch.testing.assert_close(low.u.norm(dim=0), low.v.norm(dim=1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asvd_is_the_svd_of_the_scaled_weight_and_exact_at_full_rank(seed):
    w, x = _data(seed)
    rms = x.pow(2).mean(0).sqrt()
    scale = asvd_scale(rms)
    torch.testing.assert_close(scale, rms.sqrt(), rtol=1e-12, atol=0)  # α = 0.5
    full = asvd(w, scale, min(w.shape))
    torch.testing.assert_close(full.u @ full.v, w, rtol=0, atol=1e-11)
    r = 7  # reference: truncate W·S by its SVD, then undo S
    u, s, vh = torch.linalg.svd(w * scale, full_matrices=False)
    reference = (u[:, :r] * s[:r]) @ vh[:r] / scale
    low = asvd(w, scale, r)
    torch.testing.assert_close(low.u @ low.v, reference, rtol=1e-9, atol=1e-11)
    assert low.u.shape == (24, r) and low.v.shape == (r, 40)
    # the scaled error is the dropped spectrum; the output error beats plain SVD's on these inputs
    assert float((((w - low.u @ low.v) * scale) ** 2).sum()) == pytest.approx(low.dropped, rel=1e-9)
    plain = svd(w, r)
    assert ((w - low.u @ low.v) @ x.T).norm() < ((w - plain.u @ plain.v) @ x.T).norm()


def test_asvd_scale_floors_inputs_that_never_fire():
    scale = asvd_scale(torch.tensor([4.0, 0.0, 1.0]), alpha=1.0)
    assert scale.tolist() == [4.0, 4e-6, 1.0]


@pytest.mark.parametrize("seed,shape", [(0, (24, 40)), (1, (40, 24)), (3, (30, 30))])
def test_svd_llm_truncation_error_is_the_sum_of_the_dropped_singular_values_squared(seed, shape):
    w, x = _data(seed, *shape)
    h = _hessian(x)
    chol, damp = whitening(h)
    assert damp == 0.0
    torch.testing.assert_close(chol @ chol.T, h, rtol=1e-12, atol=1e-10)
    sigma = torch.linalg.svdvals(w @ torch.linalg.cholesky(h))
    k = min(shape)
    for r in (1, 5, k - 1, k):
        low = svd_llm(w, chol, r)
        output_error = float(((w - low.u @ low.v) @ x.T).norm() ** 2)  # ‖(W − UV)Xᵀ‖_F²
        expected = x.shape[0] / 2 * float((sigma[r:] ** 2).sum())
        assert output_error == pytest.approx(expected, rel=1e-8, abs=1e-12 * float((w @ x.T).norm() ** 2))
        assert low.dropped == pytest.approx(float((sigma[r:] ** 2).sum()), rel=1e-10, abs=1e-20)
        if r < k:  # and it is the least of any rank-r weight: below plain SVD's and ASVD's
            others = (svd(w, r), asvd(w, asvd_scale(x.pow(2).mean(0).sqrt()), r))
            for other in others:
                assert output_error <= float(((w - other.u @ other.v) @ x.T).norm() ** 2) * (1 + 1e-9)


def test_svd_llm_damps_a_singular_gram_matrix_and_the_identity_holds_for_the_damped_one():
    w, x = _data(4, cols=40, tokens=20)  # 20 tokens, 40 inputs: XᵀX is singular
    x[:, 3] = 0  # and an input that never fires
    h = _hessian(x)
    chol, damp = whitening(h)
    assert damp > 0
    damped = h + damp * h.diagonal().mean() * torch.eye(40, dtype=h.dtype)
    torch.testing.assert_close(chol @ chol.T, damped, rtol=1e-10, atol=1e-10)
    low = svd_llm(w, chol, 6)
    diff = w - low.u @ low.v
    assert float(((diff @ chol) ** 2).sum()) == pytest.approx(low.dropped, rel=1e-8)
    assert torch.isfinite(low.v).all()


# --- the allocation -----------------------------------------------------------------------------

SHAPES = [(12, 10), (16, 6), (9, 9), (20, 8)]


def _energies(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for m, n in SHAPES:
        s = torch.sort(torch.rand(min(m, n), generator=g, dtype=torch.float64) ** 3, descending=True).values
        out.append(s / s.sum() * torch.rand(1, generator=g, dtype=torch.float64))
    return out


def _choices(shape):
    return [*range(1, max_rank(*shape) + 1), DENSE]


def _total(energies, ranks):
    return sum(cost(s, r) for s, r in zip(SHAPES, ranks, strict=True)), sum(
        loss(e, r) for e, r in zip(energies, ranks, strict=True)
    )


def _brute_force(energies, budget):
    best = None
    for ranks in itertools.product(*[_choices(s) for s in SHAPES]):
        c, lo = _total(energies, ranks)
        if c <= budget and (best is None or lo < best):
            best = lo
    return best


def _lagrangian(energies, lam):
    """Each linear alone at the least loss + λ·cost (brute force over its choices)."""
    return [
        min(_choices(s), key=lambda r, e=e, s=s: loss(e, r) + lam * cost(s, r))
        for e, s in zip(energies, SHAPES, strict=True)
    ]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_global_ranks_are_optimal_at_each_breakpoint_and_fill_the_budget_within_one_rank_step(seed):
    energies = _energies(seed)
    floor, full = minimum_cost(SHAPES), sum(m * n for m, n in SHAPES)
    # every budget: within it, and within one rank step of it unless every linear is dense
    for budget in range(floor, full + 1, 3):
        ranks = global_ranks(energies, SHAPES, budget)
        spent, _ = _total(energies, ranks)
        step = max((m + n for (m, n), r in zip(SHAPES, ranks, strict=True) if r is not DENSE), default=0)
        assert spent <= budget and (budget - spent < step or all(r is DENSE for r in ranks))
    # the Lagrangian points (λ between two consecutive gain-per-weight ratios): the greedy at their
    # cost equals the brute-force optimum over all allocations that cost no more
    ratios = sorted(
        {float(e[r] / (m + n)) for e, (m, n) in zip(energies, SHAPES, strict=True) for r in range(len(e))}
        | {
            float(e[max_rank(m, n) :].sum() / (m * n - max_rank(m, n) * (m + n)))
            for e, (m, n) in zip(energies, SHAPES, strict=True)
        }
    )
    checked = 0
    for lo, hi in itertools.pairwise(ratios):
        point = _lagrangian(energies, (lo + hi) / 2)
        budget, best = _total(energies, point)
        ranks = global_ranks(energies, SHAPES, budget)
        assert _total(energies, ranks)[1] == pytest.approx(_brute_force(energies, budget), abs=1e-15)
        assert _total(energies, ranks)[1] == pytest.approx(best, abs=1e-15)
        checked += 1
    assert checked > 10


def test_global_ranks_take_rank_where_the_spectrum_is_flat():
    flat = torch.full((10,), 0.1, dtype=torch.float64)
    shapes = [(10, 40), (10, 40)]  # max rank 7 (7·50 < 400)
    # from rank 1 each (100 weights), the flat one's whole way to dense (350 more, 0.9 less loss) is
    # worth more per weight than the other's second rank (50 more, 0.1 less)
    steep = torch.tensor([0.9, 0.1] + [0.0] * 8, dtype=torch.float64)
    assert global_ranks([flat, steep], shapes, 450) == [DENSE, 1]
    # with 300 left, dense does not fit: the other's second rank (0.15) first, then the flat one's
    # ranks, 0.1 each; the zero energies are never paid for
    steep = torch.tensor([0.9, 0.15] + [0.0] * 8, dtype=torch.float64)
    assert global_ranks([flat, steep], shapes, 400) == [6, 2]
    assert global_ranks([flat, steep], shapes, 10_000) == [DENSE, 2]


def test_uniform_ranks_and_rank_steps():
    assert max_rank(10, 10) == 4 and max_rank(1, 5) == 0 and max_rank(96, 96) == 47
    assert uniform_ranks([(96, 96), (48, 96)], 0.5) == [24, 16]
    assert uniform_ranks([(96, 96)], 1.0) == [DENSE]
    with pytest.raises(LlmliteError, match="less than rank 1"):
        uniform_ranks([(96, 96)], 0.01)
    with pytest.raises(LlmliteError, match="below rank 1"):
        global_ranks([torch.ones(9)], [(9, 9)], 17)


# --- the model walk -----------------------------------------------------------------------------


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


CALIBRATION = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
TOTAL = 2 * (2 * 96 * 96 + 2 * 48 * 96 + 3 * 200 * 96)  # the tiny model's decoder linear weights


@pytest.mark.parametrize("method", ["svd", "asvd", "svd-llm"])
@pytest.mark.parametrize("ratio", [0.8, 0.4])
def test_factorize_model_keeps_the_ratio_of_the_decoder_weights(method, ratio):
    model = _tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = LowrankSettings(method, ratio)
    report = factorize_model(model, settings, None if method == "svd" else CALIBRATION, progress=False)
    assert report.path == ("weights-only" if method == "svd" else "llama-staged")
    assert len(report.modules) == 14 and report.dense_params == TOTAL
    assert report.budget - 296 < report.params <= report.budget == int(ratio * TOTAL)
    for record in report.modules:
        module = model.get_submodule(record.name)
        if record.rank is None:
            assert isinstance(module, torch.nn.Linear) and record.params == record.dense_params
        else:
            assert isinstance(module, LowRankLinear) and module.rank == record.rank
            assert record.params == record.rank * sum(record.shape) < record.dense_params
            assert (record.output_error is None) == (method == "svd")
    assert report.kept == pytest.approx(report.params / TOTAL)
    kept = {n for n, _ in model.named_parameters()}
    for name, p in before.items():  # embeddings (tied head), norms untouched
        if "layers" not in name or "norm" in name:
            assert torch.equal(model.get_parameter(name), p) and name in kept


def test_the_walk_whitens_with_the_hessian_of_the_group_inputs():
    """Layer 0's q_proj: the walk's factors are the core's on the Hessian of the normed embeddings."""
    model = _tiny_llama(1)
    layer = model.model.layers[0]
    w = layer.self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(CALIBRATION)).reshape(-1, 96)
    report = factorize_model(model, LowrankSettings("svd-llm", rank=20), CALIBRATION, progress=False)
    chol, _ = whitening(_hessian(x.double()))
    expected = svd_llm(w, chol, 20)
    got = layer.self_attn.q_proj
    assert isinstance(got, LowRankLinear) and got.rank == 20
    torch.testing.assert_close(got.dense_weight().double(), expected.u @ expected.v, rtol=1e-4, atol=1e-5)
    record = next(r for r in report.modules if r.name == "model.layers.0.self_attn.q_proj")
    assert record.truncation == pytest.approx(expected.dropped / float((expected.sigma**2).sum()), rel=1e-4)
    assert record.output_error == pytest.approx(record.truncation, rel=1e-3)  # SVD-LLM: the same thing


def test_rank_keeps_dense_the_linears_it_would_not_shrink():
    model = _tiny_llama()
    report = factorize_model(model, LowrankSettings("svd", rank=40), progress=False)
    ranks = {r.name.split(".")[-1]: r.rank for r in report.modules}
    # q/o 96x96: 40·192 < 9216; k/v 48x96: 40·144 ≥ 4608 (dense); gate/up/down 200x96: 40·296 < 19200
    assert ranks == {"q_proj": 40, "k_proj": None, "v_proj": None, "o_proj": 40} | dict.fromkeys(
        ("gate_proj", "up_proj", "down_proj"), 40
    )


def test_refusals_before_any_work():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(LlmliteError, match="gpt2 models are not supported"):
        check_factorizable(gpt2, LowrankSettings("svd"))
    with pytest.raises(LlmliteError, match=r"--rank 49 is larger than model\.layers\.0\.self_attn\.k_proj"):
        check_factorizable(_tiny_llama(), LowrankSettings("svd", None, 49))
    with pytest.raises(LlmliteError, match=r"--ratio 0\.01 keeps .* less than rank 1"):
        check_factorizable(_tiny_llama(), LowrankSettings("svd", 0.01))
    with pytest.raises(LlmliteError, match=r"--ratio 0\.02 keeps .* less than rank 1"):
        check_factorizable(_tiny_llama(), LowrankSettings("svd", 0.02, allocation="uniform"))
    check_factorizable(_tiny_llama(), LowrankSettings("svd", 0.02))
    model = _tiny_llama()
    factorize_model(model, LowrankSettings("svd", rank=8), progress=False)
    with pytest.raises(LlmliteError, match="factorised already"):
        check_factorizable(model, LowrankSettings("svd"))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"ratio": 0}, "--ratio 0 is out of range"),
        ({"ratio": 1.5}, "--ratio 1.5 is out of range"),
        ({"ratio": -0.2}, "--ratio -0.2 is out of range"),
        ({"ratio": "most"}, "--ratio must be a number"),
        ({"rank": 0}, "--rank 0 keeps nothing"),
        ({"rank": 8, "ratio": 0.5}, "give one"),
        ({"rank": 8, "allocation": "uniform"}, "--allocation"),
        ({"method": "svd", "alpha": 1.0}, "--alpha is ASVD's"),
        ({"method": "asvd", "alpha": 0}, "--alpha 0 is out of range"),
        ({"method": "asvd", "damp": 0.1}, "--damp is SVD-LLM's"),
        ({"damp": 2}, "--damp 2 is out of range"),
        ({"method": "qr"}, "unknown method 'qr'"),
        ({"samples": 0}, "--samples"),
    ],
)
def test_config_refusals(options, message):
    with pytest.raises(LlmliteError, match=message):
        LowrankConfig(**options).validate()


def test_config_defaults_and_settings():
    assert LowrankConfig().validate().settings() == LowrankSettings("svd-llm", 0.8, None, "global", 0.5, 0.0)
    assert LowrankConfig(rank=16, method="svd").validate().settings() == LowrankSettings("svd", None, 16)
    assert LowrankConfig(ratio=1).validate().settings().ratio == 1.0


# --- saved and loaded ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    from conftest import make_tiny

    folder = tmp_path_factory.mktemp("tiny-lowrank")
    make_tiny(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", ["svd", "svd-llm"])
def test_the_saved_folder_loads_back_with_the_logits_of_the_model_in_memory(tmp_path, tiny_folder, method):
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    out = tmp_path / "lr"
    result = lowrank(
        model=str(tiny_folder),
        method=method,
        ratio=0.6,
        samples=4,
        seqlen=32,
        output=str(out),
        progress=False,
    )
    record = json.loads((out / "llmlite.json").read_text())
    config = json.loads((out / "config.json").read_text())
    ranks = config["low_rank"]["ranks"]
    assert ranks == result.report.ranks and len(ranks) > 0
    assert {m["name"]: m["rank"] for m in record["report"]["modules"] if m["rank"]} == ranks
    assert record["report"]["params"] == sum(m["params"] for m in record["report"]["modules"])
    assert record["report"]["params"] <= 0.6 * record["report"]["dense_params"]
    expected = _logits(result.model, ids)
    ours, _ = load(out)  # llmlite.load_model through llmlite.lowrank.load
    assert isinstance(ours.get_submodule(next(iter(ranks))), LowRankLinear)
    assert torch.equal(_logits(ours, ids), expected)
    # plain transformers, with the module replacement of docs/lowrank.md
    from safetensors.torch import load_file
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(out)
    plain = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    for name, rank in hf_config.low_rank["ranks"].items():
        old = plain.get_submodule(name)
        kw = {"dtype": old.weight.dtype}
        plain.set_submodule(
            name,
            torch.nn.Sequential(
                torch.nn.Linear(old.in_features, rank, bias=False, **kw),
                torch.nn.Linear(rank, old.out_features, bias=old.bias is not None, **kw),
            ),
        )
    missing, unexpected = plain.load_state_dict(load_file(out / "model.safetensors"), strict=False)
    plain.tie_weights()
    assert missing == ["lm_head.weight"] and unexpected == []
    assert torch.equal(_logits(plain.eval(), ids), expected)


def test_merge_writes_a_dense_model_plain_transformers_loads(tmp_path, tiny_folder):
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    common = dict(model=str(tiny_folder), method="asvd", ratio=0.6, samples=4, seqlen=32, progress=False)
    factorised = lowrank(**common).model
    out = tmp_path / "merged"
    result = lowrank(**common, merge=True, output=str(out))
    assert not any(isinstance(m, LowRankLinear) for m in result.model.modules())
    assert "low_rank" not in json.loads((out / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(_logits(plain, ids), _logits(result.model, ids))
    # the product of the float16 factors, rounded once more to float16: close to the factorised model
    torch.testing.assert_close(_logits(plain, ids), _logits(factorised, ids), rtol=0, atol=2e-2)


def test_install_low_rank_refuses_ranks_a_linear_cannot_hold():
    with pytest.raises(LlmliteError, match="rank 97"):
        install_low_rank(_tiny_llama(), {"model.layers.0.self_attn.q_proj": 97})
    with pytest.raises(LlmliteError, match="not a linear"):
        install_low_rank(_tiny_llama(), {"model.layers.0.self_attn": 4})


def test_the_cli_and_the_api_write_the_same_model(tmp_path, tiny_folder, capsys):
    from safetensors.torch import load_file

    from llmlite.cli import main

    options = {"model": str(tiny_folder), "method": "svd", "ratio": 0.5, "allocation": "uniform"}
    lowrank(**options, output=str(tmp_path / "api"), progress=False)
    argv = ["--model", str(tiny_folder), "--method", "svd", "--ratio", "0.5", "--allocation", "uniform"]
    assert main(["lowrank", *argv, "--output", str(tmp_path / "cli"), "--quiet"]) == 0
    assert "svd 50% kept (uniform): 14 of 14 linear layers factorised" in capsys.readouterr().out
    a, b = (
        load_file(tmp_path / "api" / "model.safetensors"),
        load_file(tmp_path / "cli" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.0.mlp.down_proj.1.weight" in a and a[
        "model.layers.0.mlp.down_proj.1.weight"
    ].shape == (96, 32)
