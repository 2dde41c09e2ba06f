"""Pruning (``llmlite prune``): each core against a float64 reference of its formula on fresh random
data (``reference.py``), N:M counts, edge shapes, the model walk on a tiny Llama, refusals, and one
end-to-end run of the CLI on the bundled model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import reference as ref
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llmlite.errors import LlmliteError
from llmlite.pruning import (
    PruneConfig,
    PruneSettings,
    check_prunable,
    drop_lowest,
    keep_n_of_m,
    keep_per_row,
    keep_per_tensor,
    magnitude,
    parse_pattern,
    prune_model,
    pruned_count,
    remeasure,
    sparsegpt,
    wanda,
    wanda_scores,
)

PATTERNS = [(2, 4), (1, 4), (3, 8), (4, 8)]


def _data(seed: int, rows: int = 24, cols: int = 200, tokens: int = 512, correlated: bool = False):
    """A weight ``[rows, cols]`` and inputs ``[tokens, cols]`` (float64): columns of different
    scales, or (``correlated``) a few shared factors plus noise, as activations have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if correlated:
        x = torch.randn(tokens, 8, generator=g, dtype=torch.float64) @ torch.randn(
            8, cols, generator=g, dtype=torch.float64
        )
        x += 0.3 * torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
        x *= torch.exp(torch.randn(cols, generator=g, dtype=torch.float64))
    return w, x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def _output_error(w, w_hat, x) -> float:
    return float(((w - w_hat) @ x.T).norm())


# --- masks and patterns -------------------------------------------------------------------------


def test_pattern_text():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(" 3 : 8 ") == (3, 8)
    for bad in ("4:2", "2:2", "0:4", "2-4", "a:b", "2:4:8", ""):
        with pytest.raises(LlmliteError, match="--pattern"):
            parse_pattern(bad)


def test_pruned_count_is_the_nearest_whole_number():
    assert [pruned_count(n, 0.5) for n in (0, 1, 2, 3, 200)] == [0, 1, 1, 2, 100]
    assert pruned_count(10, 0.33) == 3 and pruned_count(10, 0.35) == 4 and pruned_count(7, 0.999) == 7


@pytest.mark.parametrize("pattern", PATTERNS)
def test_n_of_m_masks_keep_exactly_n_of_every_m(pattern):
    n, m = pattern
    w, x = _data(1, rows=16, cols=96)
    h = _hessian(x)
    pruned = {
        "mask": keep_n_of_m(w.abs(), n, m).double(),
        "magnitude": magnitude(w, pattern=pattern),
        "wanda": wanda(w, x.norm(dim=0), pattern=pattern),
        "sparsegpt": sparsegpt(w, h, pattern=pattern).weight,
    }
    for name, t in pruned.items():
        kept = (t != 0).reshape(16, 96 // m, m).sum(-1)
        assert (kept == n).all(), name  # N kept in every group of M: 2:4 has 2 non-zeros in every 4


@pytest.mark.parametrize("seed,sparsity", [(2, 0.5), (3, 0.3), (4, 0.7)])
def test_per_row_and_per_tensor_masks_drop_the_lowest_scores(seed, sparsity):
    scores = torch.rand(12, 50, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    row = keep_per_row(scores, sparsity)
    assert ((~row).sum(1) == pruned_count(50, sparsity)).all()
    assert (scores.where(row, np.inf).amin(1) >= scores.where(~row, -np.inf).amax(1)).all()
    expected = [ref.keep_lowest_pruned(s, pruned_count(50, sparsity)) for s in scores.numpy()]
    np.testing.assert_array_equal(row.numpy(), np.stack(expected))
    whole = keep_per_tensor(scores, sparsity)
    assert int((~whole).sum()) == pruned_count(600, sparsity)
    assert scores[whole].min() >= scores[~whole].max()


def test_equal_scores_are_dropped_in_order_as_a_stable_sort_would():
    """The bundled model's weights are a 4-bit grid dequantized: equal magnitudes are common."""
    g = torch.Generator().manual_seed(21)
    scores = torch.randint(0, 4, (10, 40), generator=g).double()
    for k in (0, 1, 13, 20, 39, 40):
        expected = np.stack([ref.keep_lowest_pruned(s, k) for s in scores.numpy()])
        np.testing.assert_array_equal(drop_lowest(scores, k).numpy(), expected)
    whole = keep_per_tensor(scores, 0.45)
    np.testing.assert_array_equal(
        whole.numpy(), ref.keep_lowest_pruned(scores.numpy(), pruned_count(400, 0.45))
    )


def test_n_of_m_refuses_in_features_it_does_not_divide():
    w, x = _data(5, rows=4, cols=90)
    with pytest.raises(LlmliteError, match="divisible by 4; a linear has 90"):
        magnitude(w, pattern=(2, 4))
    with pytest.raises(LlmliteError, match="M = 4"):
        sparsegpt(w, _hessian(x), pattern=(2, 4))


# --- magnitude and Wanda ------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_magnitude_is_one_threshold_per_linear(sparsity):
    w, _ = _data(6)
    out = magnitude(w, sparsity)
    zero = out == 0
    assert int(zero.sum()) == pruned_count(w.numel(), sparsity)
    assert w.abs()[~zero].min() >= w.abs()[zero].max()
    assert torch.equal(out[~zero], w[~zero])  # no update


@pytest.mark.parametrize("seed,sparsity,pattern", [(7, 0.5, None), (8, 0.3, None), (9, None, (2, 4))])
def test_wanda_scores_and_masks_match_the_reference(seed, sparsity, pattern):
    w, x = _data(seed)
    scores, expected = ref.wanda(w.numpy(), x.numpy(), sparsity, pattern)
    np.testing.assert_allclose(wanda_scores(w, x.norm(dim=0)).numpy(), scores, rtol=1e-12)
    out = wanda(w, x.norm(dim=0), sparsity, pattern)
    np.testing.assert_array_equal(out.numpy(), expected)
    # the walk's per-token RMS (sqrt(diag(H) / 2)) is the norm over √tokens: the same masks
    rms = (_hessian(x).diagonal() / 2).sqrt()
    assert torch.equal(wanda(w, rms, sparsity, pattern) != 0, out != 0)


# --- SparseGPT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 5, 37])
def test_sparsegpt_one_weight_is_the_obs_closed_form(q):
    """Pruning only ``w_q`` of one row: the columns before ``q`` stay, those from ``q`` on move by
    OBS's ``−w_q / [H_F⁻¹]_qq · [H_F⁻¹]_{q,:}``, ``H_F`` the damped Hessian of columns ``q..``
    (for q = 0 the whole Hessian: the textbook formula)."""
    w, x = _data(10, rows=3, cols=50, tokens=200, correlated=True)
    h = _hessian(x)
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[1, q] = False
    out = sparsegpt(w, h, keep=keep, damp=0.01, block_size=16).weight.numpy()
    hd = h.numpy() + 0.01 * np.mean(np.diag(h.numpy())) * np.eye(50)
    hinv = np.linalg.inv(hd[q:, q:])
    expected = w.numpy().copy()
    expected[1, q:] -= w[1, q].item() / hinv[0, 0] * hinv[0, :]
    assert expected[1, q] == pytest.approx(0, abs=1e-12)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-10)
    assert out[1, q] == 0


@pytest.mark.parametrize(
    "seed,kw",
    [
        (11, {"sparsity": 0.5}),
        (12, {"sparsity": 0.3}),
        (13, {"pattern": (2, 4)}),
        (14, {"pattern": (3, 8)}),
        (15, {"sparsity": 0.5, "block_size": 128}),
    ],
)
def test_sparsegpt_matches_the_sequential_obs_reference(seed, kw):
    """200 columns: blocks of 64 (or 128) end with a short one."""
    kw = {"block_size": 64, **kw}
    w, x = _data(seed, correlated=seed % 2 == 0)
    h = _hessian(x)
    out = sparsegpt(w, h, **kw)
    expected, keep = ref.sparsegpt(w.numpy(), h.numpy(), **kw)
    np.testing.assert_array_equal(out.weight.numpy() != 0, keep)
    np.testing.assert_allclose(out.weight.numpy(), expected, rtol=0, atol=1e-9)
    assert out.damp == 0.01


@pytest.mark.parametrize("seed", [16, 17, 18])
@pytest.mark.parametrize("target", [0.5, (2, 4)])
def test_sparsegpt_loses_less_output_than_wanda_and_wanda_than_magnitude(seed, target):
    sparsity, pattern = (None, target) if isinstance(target, tuple) else (target, None)
    w, x = _data(seed, rows=64, cols=128, tokens=1024, correlated=True)
    h = _hessian(x)
    errors = {
        "sparsegpt": _output_error(w, sparsegpt(w.float(), h.float(), sparsity, pattern).weight.double(), x),
        "wanda": _output_error(w, wanda(w, x.norm(dim=0), sparsity, pattern), x),
    }
    assert errors["sparsegpt"] < 0.6 * errors["wanda"], errors
    w, x = _data(seed, rows=64, cols=128, tokens=1024)  # columns of very different scales
    assert _output_error(w, wanda(w, x.norm(dim=0), sparsity, pattern), x) < 0.6 * _output_error(
        w, magnitude(w, sparsity, pattern), x
    )


def test_sparsegpt_gives_each_linear_of_a_group_its_exact_share():
    w, x = _data(19, rows=40, cols=200)
    out = sparsegpt(w, _hessian(x), 0.37, segments=[8, 24, 8], block_size=64).weight
    for a, b in ((0, 8), (8, 32), (32, 40)):
        assert int((out[a:b] == 0).sum()) == pruned_count((b - a) * 200, 0.37)
    with pytest.raises(ValueError, match="segments"):
        sparsegpt(w, _hessian(x), 0.5, segments=[8, 8])


def test_sparsegpt_edge_inputs():
    w, x = _data(20, rows=6, cols=90)
    one = sparsegpt(w.float(), _hessian(x[:1]).float(), 0.5).weight  # one token: rank-1 Hessian, damped
    assert torch.isfinite(one).all() and int((one == 0).sum()) == pruned_count(w.numel(), 0.5)
    h = _hessian(x)
    h[:, 3] = h[3, :] = 0  # a dead input: its weights are free to drop
    dead = sparsegpt(w, h, 0.5).weight
    assert (dead[:, 3] == 0).all() and int((dead == 0).sum()) == pruned_count(w.numel(), 0.5)
    out = sparsegpt(w.half(), h, pattern=(1, 3))  # computed in float32, returned in the input's dtype
    assert out.weight.dtype == torch.float16
    assert ((out.weight != 0).reshape(6, 30, 3).sum(-1) == 1).all()


# --- the model walk -----------------------------------------------------------------------------


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize(
    "method,sparsity,pattern,true_sequential",
    [
        ("magnitude", 0.5, None, False),
        ("wanda", 0.3, None, False),
        ("sparsegpt", 0.5, (2, 4), False),
        ("sparsegpt", 0.4, None, True),
    ],
)
def test_prune_model_prunes_every_decoder_linear_and_nothing_else(method, sparsity, pattern, true_sequential):
    model = _tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calibration = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(method, sparsity, pattern, true_sequential=true_sequential)
    report = prune_model(model, settings, None if method == "magnitude" else calibration, progress=False)
    path = "llama-staged" if true_sequential else "one-pass"
    assert report.path == ("weights-only" if method == "magnitude" else path)
    assert len(report.modules) == 14
    for record in report.modules:
        module = model.model.get_submodule(record.name)
        zeros = float((module.weight == 0).float().mean())
        # Wanda rounds per row: within half a weight of a row of the target
        assert record.sparsity == zeros == pytest.approx(settings.target, abs=0.5 / module.in_features)
        assert (record.output_error is None) == (method == "magnitude")
        if pattern:
            n, m = pattern
            assert ((module.weight != 0).reshape(module.out_features, -1, m).sum(-1) == n).all()
    pruned = {f"model.{r.name}.weight" for r in report.modules}
    for name, p in model.named_parameters():
        if name not in pruned:
            assert torch.equal(p, before[name]), name  # embeddings (tied head), norms
    assert report.to_dict()["sparsity"] == pytest.approx(settings.target, abs=0.5 / 96)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, :3] = 0  # as float16 rounding may
    remeasure(model, report)
    record = next(r for r in report.modules if r.name == "layers.1.mlp.up_proj")
    assert record.sparsity == float((model.model.layers[1].mlp.up_proj.weight == 0).float().mean())


def test_the_walk_hands_sparsegpt_the_hessian_of_the_group_inputs():
    """Layer 0's q/k/v: the walk's result is the core run on the stacked weights with the Hessian
    of the normed embeddings, each projection's mask chosen alone."""
    model = _tiny_llama(1)
    calibration = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    layer = model.model.layers[0]
    attn = layer.self_attn
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().clone()
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(calibration)).reshape(-1, 96)
    expected = sparsegpt(w, _hessian(x.double()).float(), 0.5, segments=[96, 48, 48]).weight
    prune_model(model, PruneSettings("sparsegpt", 0.5), calibration, progress=False)
    got = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(got != 0, expected != 0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _group_inputs(layer: torch.nn.Module, hidden: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    """Each linear's input ``[tokens, in]`` (float64) in one forward of ``layer``."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> None:  # a pre-hook returning a value would replace the input
        seen[name] = x.reshape(-1, x.shape[-1])

    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: keep(n, args[0]))
        for n, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        out = layer(hidden, **kw)
    for handle in handles:
        handle.remove()
    return {n: x.double() for n, x in seen.items()}, out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("true_sequential", [True, False])
def test_one_pass_measures_each_layer_unpruned_and_feeds_the_next_its_pruned_outputs(true_sequential):
    """``walk_groups(true_sequential=False)``: every group of layer ``i`` gets the Hessian of its
    inputs through the *unpruned* layer ``i`` fed by the pruned layers before it (float64
    reference, to float32 rounding); true-sequential, the o/down groups see the pruned q/k/v and
    gate/up instead, and only q/k/v match."""
    from llmlite.quant.driver import walk_groups

    model = _tiny_llama()
    reference = copy.deepcopy(model)
    calibration = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(7))
    seen: dict[str, tuple[list[str], torch.Tensor]] = {}

    def cut(layer: torch.nn.Module, names: list[str]) -> None:  # a stand-in pruning: half the columns
        for name in names:
            layer.get_submodule(name).weight[:, ::2] = 0

    def visit(prefix, layer, names, stats):
        seen[prefix + names[0]] = (names, stats.hessian)
        cut(layer, names)

    path = walk_groups(model, calibration, visit, progress=False, true_sequential=true_sequential)
    assert path == ("llama-staged" if true_sequential else "one-pass")
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    groups += [["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert [names for names, _ in seen.values()] == groups * 2
    body = reference.model
    with torch.no_grad():
        hidden = body.embed_tokens(calibration)
        positions = torch.arange(calibration.shape[1])[None]
        kw = {"position_embeddings": body.rotary_emb(hidden, positions), "attention_mask": None}
        for i, layer in enumerate(body.layers):
            inputs, _ = _group_inputs(layer, hidden, **kw)
            for names in groups:
                expected = _hessian(inputs[names[0]])
                got = seen[f"layers.{i}.{names[0]}"][1].double()
                error = float((got - expected).norm() / expected.norm())
                if not true_sequential:
                    assert error < 1e-5, (i, names, error)
                elif names[0] == "self_attn.q_proj":  # the staged walk keeps the MLP's inner values in fp16
                    assert error < (1e-5 if i == 0 else 1e-2), (i, names, error)
                else:
                    assert error > 0.05, (i, names, error)
            for names in groups:
                cut(layer, names)
            hidden = _group_inputs(layer, hidden, **kw)[1]  # the pruned layer's outputs feed the next
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)  # the same cuts: the walk left every weight at its visit's values


def test_unknown_architectures_and_patterns_that_do_not_fit_are_refused_before_any_work():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(LlmliteError, match="gpt2 models are not supported"):
        check_prunable(gpt2, PruneSettings("wanda"))
    with pytest.raises(LlmliteError, match=r"M = 16 .* layers\.0\.mlp\.down_proj has 200"):
        check_prunable(_tiny_llama(), PruneSettings("wanda", pattern=(2, 16)))
    check_prunable(_tiny_llama(), PruneSettings("wanda", pattern=(2, 8)))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"sparsity": 0}, "--sparsity 0 is out of range"),
        ({"sparsity": 1}, "--sparsity 1 is out of range"),
        ({"sparsity": 1.5}, "--sparsity 1.5 is out of range"),
        ({"sparsity": -0.1}, "--sparsity -0.1 is out of range"),
        ({"sparsity": "half"}, "--sparsity must be a number"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "2:4:8"}, "is not N:M"),
        ({"pattern": "2:4", "sparsity": 0.5}, "give one"),
        ({"method": "obs"}, "unknown method 'obs'"),
        ({"samples": 0}, "--samples"),
        ({"damp": 0}, "--damp 0"),
        ({"method": "magnitude", "true_sequential": True}, "--true-sequential sets how calibration"),
    ],
)
def test_config_refusals(options, message):
    with pytest.raises(LlmliteError, match=message):
        PruneConfig(**options).validate()


def test_an_unquoted_pattern_in_a_recipe_is_refused_with_the_fix(tmp_path):
    from llmlite.recipes import build

    recipe = tmp_path / "p.yaml"
    recipe.write_text("verb: prune\npattern: 2:4\n")
    with pytest.raises(LlmliteError, match=r"pattern 124 is a number.*quote it"):
        build(PruneConfig, recipe)
    recipe.write_text("verb: prune\npattern: '2:4'\n")
    assert build(PruneConfig, recipe).settings().pattern == (2, 4)


def test_config_defaults_and_settings():
    assert PruneConfig().validate().settings() == PruneSettings("sparsegpt", 0.5, None, 0.01)
    assert PruneConfig(true_sequential=True).validate().settings().true_sequential
    assert PruneConfig(method="magnitude", bits=4, true_sequential=True).validate().settings().true_sequential
    settings = PruneConfig(method="wanda", pattern="2:4").validate().settings()
    assert settings.pattern == (2, 4) and settings.target == 0.5


def test_the_model_prune_returns_computes_the_logits_of_the_folder_it_saved(tmp_path, tiny_dir):
    """The model in memory is the folder's: its weights rounded to --dtype, its buffers (rotary
    inv_freq) left in float32 as a reload computes them, not rounded by the save."""
    from transformers import AutoModelForCausalLM

    from llmlite.pruning import prune

    out = tmp_path / "pruned"
    result = prune(model=str(tiny_dir), method="magnitude", sparsity=0.5, output=str(out), progress=False)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    with torch.no_grad():
        assert torch.equal(result.model(ids).logits, plain(ids).logits)
    for name, buffer in plain.named_buffers():
        assert torch.equal(result.model.get_buffer(name), buffer), name


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,n_m",
    [
        (["--method", "sparsegpt", "--pattern", "2:4"], (2, 4)),
        (["--method", "wanda", "--true-sequential"], None),
    ],
)
def test_cli_prunes_the_bundled_model_and_transformers_loads_it(tmp_path, args, n_m):
    from transformers import AutoModelForCausalLM

    from llmlite.cli import main
    from llmlite.models import load_model

    out = tmp_path / "pruned"
    common = ["--samples", "4", "--seqlen", "64", "--output", str(out), "--quiet"]
    assert main(["prune", *args, *common]) == 0
    record = json.loads((out / "llmlite.json").read_text())
    modules = record["report"]["modules"]
    path = "llama-staged" if "--true-sequential" in args else "one-pass"
    assert len(modules) == 30 * 7 and record["report"]["path"] == path
    assert record["report"]["settings"]["true_sequential"] == (path == "llama-staged")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    for m in modules:
        weight = model.model.get_submodule(m["name"]).weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3) == m["sparsity"]
        if n_m:  # 2 kept in every 4; a kept weight may round to zero in float16 (at most 2 non-zeros)
            kept = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
            assert (kept <= 2).all() and float((kept == 2).float().mean()) > 0.999
    assert model.model.layers[0].mlp.down_proj.weight.abs().sum() > 0
    ours, _ = load_model(str(out))
    q_proj = ours.model.layers[3].self_attn.q_proj.weight
    assert torch.equal(q_proj.half(), model.model.layers[3].self_attn.q_proj.weight)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
