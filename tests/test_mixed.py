"""Mixed precision: the exact allocation against brute force, the sensitivity against a float64
reference, the walk's split of a group by width, and ``--avg-bits`` / ``--budget-mb`` end to end on
a tiny Llama (checkpoint bits per module, bit-exact reload, compressed-tensors config groups)."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import random
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny
from safetensors.torch import load_file

import llmlite
from llmlite.models import load_model
from llmlite.quant.allocate import BudgetTooSmall, allocate
from llmlite.quant.driver import quantize_model
from llmlite.quant.grid import fake_quantize
from llmlite.quant.linear import QuantLinear
from llmlite.quant.method import QuantSettings
from llmlite.quant.mixed import PLOT, float_bytes, linear_bytes, targets, written_group_size
from llmlite.quant.sensitivity import fisher_increase, sensitivities

# --- the allocation ----------------------------------------------------------------------------


def brute_force(costs, sizes, budget):
    """The least total cost over every combination within the budget (``None``: none fits)."""
    best = None
    for combo in itertools.product(*(range(len(s)) for s in sizes)):
        if sum(s[c] for s, c in zip(sizes, combo, strict=True)) <= budget:
            cost = sum(k[c] for k, c in zip(costs, combo, strict=True))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(60))
def test_allocation_is_optimal_and_within_budget_against_brute_force(seed):
    """Random instances, some items sharing size vectors (a model's repeated shapes) and some not."""
    rng = random.Random(seed)
    shapes = [[rng.randint(0, 15) * rng.choice((1, 3)) for _ in range(rng.randint(1, 4))] for _ in range(3)]
    sizes = [list(rng.choice(shapes)) if rng.random() < 0.7 else [rng.randint(0, 20)] for _ in range(6)]
    costs = [[rng.random() for _ in s] for s in sizes]
    budget = rng.randint(sum(min(s) for s in sizes), sum(max(s) for s in sizes))
    picks = allocate(costs, sizes, budget)
    assert sum(s[c] for s, c in zip(sizes, picks, strict=True)) <= budget
    total = sum(k[c] for k, c in zip(costs, picks, strict=True))
    assert total == pytest.approx(brute_force(costs, sizes, budget), abs=1e-12)


def test_budget_exactly_the_smallest_allocation_takes_every_least_size():
    sizes = [[2, 3, 4, 8], [6, 9, 12, 24], [2, 3, 4, 8]]
    costs = [[5.0, 1.0, 0.5, 0.0]] * 3
    assert allocate(costs, sizes, 10) == [0, 0, 0]
    with pytest.raises(BudgetTooSmall) as e:
        allocate(costs, sizes, 9)
    assert (e.value.smallest, e.value.budget) == (10, 9)


def test_one_item_takes_the_cheapest_width_that_fits():
    assert allocate([[4.0, 2.0, 1.0, 0.5]], [[2, 3, 4, 8]], 5) == [2]
    assert allocate([[4.0, 2.0, 1.0, 0.5]], [[2, 3, 4, 8]], 8) == [3]


def test_equal_costs_go_to_the_smaller_size():
    assert allocate([[1.0, 1.0], [0.0, 0.0]], [[2, 4], [1, 3]], 7) == [0, 0]


# --- the sensitivity ---------------------------------------------------------------------------


def test_fisher_increase_matches_a_float64_loop():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    g, x, dw = (
        torch.randn(9, 5, generator=gen),
        torch.randn(9, 7, generator=gen),
        torch.randn(5, 7, generator=gen),
    )
    want = sum(float(g[t].double() @ (dw.double() @ x[t].double())) ** 2 for t in range(9))
    assert float(fisher_increase(g, x, dw)) == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return make_tiny(tokenizer, seed=random.randrange(1000))


def test_sensitivity_is_the_fisher_prediction_of_a_float64_model(tiny):
    """Each linear's prediction equals 1/(2T) Σ_t (g_t · ΔW x_t)² with ``g_t`` taken by autograd from
    a float64 copy of the model on the same windows."""
    windows = torch.randint(0, 2000, (2, 24))
    found, loss = sensitivities(tiny, targets(tiny), windows, (2, 4), 32, False, progress=False)
    model = copy.deepcopy(tiny).double()
    name = "layers.1.mlp.down_proj"
    linear = targets(model)[name]
    seen = {}

    def keep(_module, args, out):
        out.retain_grad()
        seen.update(x=args[0], y=out)

    linear.register_forward_hook(keep)
    w = linear.weight.detach().float()  # the rounding as the float32 model's, the Fisher math in float64
    dws = {bits: (fake_quantize(w, bits, 32, False) - w).double() for bits in (2, 4)}
    total, tokens, want = 0.0, 0, dict.fromkeys(dws, 0.0)
    for ids in windows:
        nll = F.cross_entropy(model(input_ids=ids[None]).logits[0, :-1], ids[1:], reduction="sum")
        nll.backward()
        total, tokens = total + float(nll.detach()), tokens + len(ids) - 1
        for bits, dw in dws.items():
            dy = seen["x"][0].detach() @ dw.T
            want[bits] += float(((seen["y"].grad[0] * dy).sum(-1) ** 2).sum())
    assert loss == pytest.approx(total / tokens, rel=1e-5)
    for bits in want:
        assert found[name][bits] == pytest.approx(want[bits] / (2 * tokens), rel=1e-3)


def test_fewer_bits_cost_more(tiny):
    windows = torch.randint(0, 2000, (2, 32))
    found, _ = sensitivities(tiny, targets(tiny), windows, (2, 3, 4, 8), 32, False, progress=False)
    totals = [sum(s[b] for s in found.values()) for b in (2, 3, 4, 8)]
    assert totals == sorted(totals, reverse=True) and totals[-1] > 0
    assert all(s[2] > s[8] for s in found.values())


# --- the walk ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_a_group_split_by_width_is_each_width_run_alone(tokenizer, method):
    """Layer 0's q/k/v group with q at 4 bits and k, v at 3: q's codes are those of a uniform 4-bit
    run and k's, v's those of a uniform 3-bit run (same inputs, rows independent)."""
    seed = random.randrange(1000)
    windows = torch.randint(0, 2000, (4, 32))
    runs = {}
    for key, module_bits in (("mixed", {"layers.0.self_attn.q_proj": 4}), ("three", None), ("four", None)):
        model = make_tiny(tokenizer, seed)
        bits = 4 if key == "four" else 3
        settings = QuantSettings(method=method, bits=bits, group_size=32, sym=False, module_bits=module_bits)
        quantize_model(model, settings, windows if method == "gptq" else None, progress=False)
        runs[key] = {n: m.quantized_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    attn = "model.layers.0.self_attn."
    assert runs["mixed"][attn + "q_proj"].bits == 4
    assert torch.equal(runs["mixed"][attn + "q_proj"].codes, runs["four"][attn + "q_proj"].codes)
    for name in ("k_proj", "v_proj"):
        assert runs["mixed"][attn + name].bits == 3
        assert torch.equal(runs["mixed"][attn + name].codes, runs["three"][attn + name].codes)


# --- end to end --------------------------------------------------------------------------------


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def on_torch(model):
    """``model`` with every ``QuantLinear`` on the torch reference backend (``auto`` picks a CPU
    kernel by timing, whose rounding differs)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_backend("torch")
    return model


def module_bits(model) -> dict[str, int]:
    return {n: m.bits for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("method", ["gptq", "awq-gptq"])
def test_avg_bits_writes_the_chosen_bits_and_reloads_exactly(tiny_dir, tmp_path, method):
    out = tmp_path / "mixed"
    result = llmlite.quantize(
        model=str(tiny_dir), method=method, avg_bits=3.5, samples=8, seqlen=32, sym=False, output=str(out),
        progress=False,
    )  # fmt: skip
    record = json.loads((out / "llmlite.json").read_text())["report"]["mixed"]
    chosen = {f"model.{n}": b for n, b in record["bits"].items()}
    assert len(chosen) == 14 and set(record["sensitivity"]) == set(record["bits"])
    assert len(set(chosen.values())) > 1  # 3.5 is not met by one width here
    sizes = {m.name: m.shape[0] * m.shape[1] for m in result.report.modules}
    average = sum(sizes[n] * b for n, b in record["bits"].items()) / sum(sizes.values())
    assert average == pytest.approx(record["average_bits"]) and average <= 3.5
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    counts = Counter(chosen.values())
    assert counts[qc["bits"]] == max(counts.values())  # the most common width on top
    others = {
        f"+:^{re.escape(n)}$": {"bits": b, "group_size": 128} for n, b in chosen.items() if b != qc["bits"]
    }
    assert qc["dynamic"] == others
    reloaded = load_model(str(out), backend="torch")[0]
    assert module_bits(reloaded) == chosen == module_bits(result.model)
    ids = torch.randint(0, 2000, (1, 11))
    assert torch.equal(logits(reloaded, ids), logits(on_torch(result.model), ids))
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_mb_compressed_tensors_carries_each_width_in_its_config_group(tiny_dir, tmp_path):
    """A budget between every linear at 4 bits and every one at 8: the written tensors take exactly
    the predicted bytes, within the budget, one config group per width, reloaded exactly."""
    model = load_model(str(tiny_dir))[0]
    linears = targets(model)
    g = written_group_size(list(linears.values()), "compressed-tensors", 32)
    low, high = (
        sum(linear_bytes(m, "compressed-tensors", b, g, True) for m in linears.values()) for b in (4, 8)
    )
    floats = float_bytes(model, {f"model.{n}" for n in linears}, torch.float16)
    budget = (floats + (low + high) / 2) / 2**20
    out = tmp_path / "ct"
    result = llmlite.quantize(
        model=str(tiny_dir), budget_mb=budget, format="compressed-tensors", group_size=32, samples=8,
        seqlen=32, output=str(out), progress=False,
    )  # fmt: skip
    plan = result.report.mixed
    written = sum(t.numel() * t.element_size() for t in load_file(out / "model.safetensors").values())
    assert written == plan["used"] <= budget * 2**20
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = {gr["weights"]["num_bits"]: gr["targets"] for gr in qc["config_groups"].values()}
    chosen = {f"model.{n}": b for n, b in plan["bits"].items()}
    assert set(groups) == {4, 8} == set(chosen.values())
    for bits, names in groups.items():
        assert sorted(names) == sorted(f"re:^{re.escape(n)}$" for n, b in chosen.items() if b == bits)
    reloaded = load_model(str(out), backend="torch")[0]
    assert module_bits(reloaded) == chosen
    ids = torch.randint(0, 2000, (1, 9))
    assert torch.equal(logits(reloaded, ids), logits(on_torch(result.model), ids))


@pytest.mark.slow  # GPTQModel compiles its CPU kernel on first use (about 2 minutes)
@pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None,
    reason="GPTQModel pins a newer torch than CI's: not installed",
)
def test_gptqmodel_reads_the_bits_of_each_module(tokenizer, tmp_path):
    """GPTQModel builds each module at the width of its ``dynamic`` entry and computes llmlite's
    logits to bfloat16 rounding (its CPU default). Symmetric: GPTQModel refuses asymmetric GPTQ-v1
    checkpoints that another quantizer wrote."""
    from gptqmodel import GPTQModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    out = tmp_path / "mixed"
    llmlite.quantize(
        model=str(tmp_path / "float"), method="rtn", avg_bits=3.5, group_size=32, samples=4, seqlen=32,
        output=str(out), progress=False,
    )  # fmt: skip
    chosen = json.loads((out / "llmlite.json").read_text())["report"]["mixed"]["bits"]
    assert len(set(chosen.values())) > 1
    theirs = GPTQModel.load(str(out), device="cpu").model.float().eval()
    for name, bits in chosen.items():
        assert theirs.get_submodule(f"model.{name}").bits == bits
    ours, _ = load_model(str(out), backend="torch")
    ids = torch.randint(0, 1000, (1, 13))
    a, b = logits(ours, ids), logits(theirs, ids).float()
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()


# --- the options -------------------------------------------------------------------------------


def test_candidates_from_the_cli_a_recipe_or_the_format(tmp_path):
    from llmlite.config import QuantizeConfig
    from llmlite.recipes import build

    assert build(QuantizeConfig, avg_bits=3.5).bits_candidates == [2, 3, 4, 8]
    assert build(QuantizeConfig, budget_mb=90, format="compressed-tensors").bits_candidates == [4, 8]
    assert build(QuantizeConfig, avg_bits=3.5, bits_candidates="8, 4,3").bits_candidates == [3, 4, 8]
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text("verb: quantize\navg-bits: 3.25\nbits-candidates: [4, 3]\n")
    config = build(QuantizeConfig, recipe=str(recipe))
    assert (config.avg_bits, config.bits_candidates, config.mixed) == (3.25, [3, 4], True)
    assert not build(QuantizeConfig).mixed
