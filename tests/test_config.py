"""Options: defaults, recipes (every bundled one), precedence and type errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlite.config import EvalConfig, QuantizeConfig
from llmlite.errors import LlmliteError
from llmlite.kvcache.generate import GenerateConfig
from llmlite.recipes import build

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_defaults_are_the_documented_job():
    c = build(QuantizeConfig)
    assert (c.model, c.method, c.bits, c.group_size, c.sym, c.samples, c.seqlen) == (
        "smollm2-135m",
        "gptq",
        4,
        128,
        True,
        128,
        512,
    )
    assert (build(EvalConfig).ctx, build(EvalConfig).ppl) == (2048, "wikitext2")


@pytest.mark.parametrize(
    "options,v2",
    [({}, True), ({"method": "rtn"}, False), ({"v2": False}, False), ({"v2": True}, True)],
)
def test_v2_is_on_for_gptq_unless_switched_off(options, v2):
    c = build(QuantizeConfig, **options)
    assert c.v2 is v2 and c.v2_windows == 0


@pytest.mark.parametrize("name", ["refit", "mse"])
@pytest.mark.parametrize("method", ["gptq", "awq-gptq"])
def test_refit_and_mse_are_on_for_gptq_unless_switched_off(method, name):
    assert getattr(build(QuantizeConfig, method=method), name) is True
    assert getattr(build(QuantizeConfig, method=method, **{name: False}), name) is False


@pytest.mark.parametrize("method", ["rtn", "rtn-clip", "awq"])
def test_mse_is_off_for_the_other_methods(method):
    assert build(QuantizeConfig, method=method).mse is False
    if method == "rtn":  # RTN reads it when asked
        assert build(QuantizeConfig, method=method, mse=True).mse is True


def test_the_default_recipe_is_the_defaults_written_out():
    recipe = Path(__file__).parent.parent / "recipes" / "gptq-w4g128.yaml"
    assert build(QuantizeConfig, recipe) == build(QuantizeConfig)


def test_the_gptq_defaults_are_the_ones_chosen_on_held_out_text():
    c = build(QuantizeConfig)  # docs/benchmarks/unseen.md: --v2-windows 0 --mse --damp 0.003
    assert (c.v2, c.v2_windows, c.mse, c.damp, c.refit) == (True, 0, True, 0.003, True)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_bundled_recipes_are_valid(recipe):
    from llmlite.training.config import FinetuneConfig

    if recipe.name.startswith("finetune"):
        assert build(FinetuneConfig, recipe, output="out")
        return
    if recipe.name.startswith("gqa"):
        from llmlite.gqa import GQAConfig

        assert build(GQAConfig, recipe, output="out").kv_heads
        return
    if recipe.name.startswith("prune"):
        from llmlite.pruning import PruneConfig

        assert build(PruneConfig, recipe, output="out").validate().settings().target == 0.5
        return
    if recipe.name.startswith("kv"):  # KV-cache options, shared by eval and generate
        assert build(EvalConfig, recipe).kv_bits
        assert build(GenerateConfig, recipe, prompt="Hello").kv_bits
        return
    cls = EvalConfig if recipe.name.startswith("eval") else QuantizeConfig
    assert build(cls, recipe)


def test_recipe_then_explicit_options(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("bits: 3\ngroup-size: 64\nact_order: true\n")
    c = build(QuantizeConfig, r, bits=8)
    assert (c.bits, c.group_size, c.act_order) == (8, 64, True)


@pytest.mark.parametrize(
    "text,message",
    [
        ("bits: four\n", "must be a whole number"),
        ("sym: maybe\n", "must be true or false"),
        ("bits: 4.0\n", "must be a whole number"),
        ("colour: red\n", "unknown option"),
        ("- a list\n", "must be a mapping"),
        ("bits: [\n", "cannot read recipe"),
        ("group-size: -3\n", "group size -3"),
        ("v2: true\nv2-alpha: 0\n", "--v2-alpha 0 is out of range"),
        ("v2: true\nmethod: rtn\n", "use it with --method awq-gptq or gptq"),
        ("v2: true\nv2-windows: -1\n", "--v2-windows -1 is invalid"),
        ("v2: sometimes\n", "option v2 must be true or false"),
        ("method: rtn\nrefit: true\n", "--refit fits scales .* use it with --method awq-gptq or gptq"),
        ("refit: 1\n", "must be true or false"),
    ],
)
def test_bad_recipes(tmp_path, text, message):
    r = tmp_path / "bad.yaml"
    r.write_text(text)
    with pytest.raises(LlmliteError, match=message):
        build(QuantizeConfig, r)


def test_missing_recipe():
    with pytest.raises(LlmliteError, match="no such recipe"):
        build(QuantizeConfig, "nope.yaml")


def test_an_unknown_api_option_is_a_one_line_error_naming_the_valid_ones():
    """``llmlite.evaluate(tasks=...)`` used to raise a TypeError where the CLI gives one line."""
    import llmlite

    with pytest.raises(LlmliteError, match=r"unknown option\(s\) tasks for EvalConfig; valid: .*max_windows"):
        llmlite.evaluate(tasks="wikitext")
    with pytest.raises(LlmliteError, match=r"unknown option\(s\) bitz for QuantizeConfig"):
        llmlite.quantize(bitz=3)


def test_the_cli_is_generated_from_the_config_fields(capsys):
    """Each verb's options are its configs' fields, with the help text and default declared
    beside the field: nothing is declared twice."""
    import dataclasses

    from llmlite.cli import VERBS, _load, _parser

    parser = _parser()
    commands = next(a for a in parser._actions if hasattr(a, "choices") and a.choices).choices
    assert set(commands) == set(VERBS) == {
        "quantize", "eval", "finetune", "generate", "convert-gqa", "merge", "compare", "export", "prune",
        "lowrank",
    }  # fmt: skip
    for verb in VERBS.values():
        actions = {}
        for action in commands[verb.name]._actions:
            actions.setdefault(action.dest, action)  # a boolean's positive flag comes first
        seen = set()  # eval: a field of both configs is described by the first (EvalConfig)
        for config in map(_load, verb.configs):
            for f in dataclasses.fields(config):
                assert f.name in actions, (verb.name, f.name)
                if f.name not in seen:
                    assert actions[f.name].help.startswith(f.metadata["help"].replace("%", "%%")), f.name
                seen.add(f.name)
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "--group-size GROUP_SIZE columns per scale; -1 = one group per output channel (default: 128)" in text
    )


@pytest.mark.parametrize(
    "verb,ok", [("verb: quantize\n", True), ("verb: [eval, quantize]\n", True), ("verb: finetune\n", False)]
)
def test_a_recipe_names_its_verb(tmp_path, verb, ok):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(verb + "bits: 8\n")
    if ok:
        assert build(QuantizeConfig, recipe).bits == 8
    else:
        with pytest.raises(
            LlmliteError, match="is for llmlite finetune, not quantize; run it with that command"
        ):
            build(QuantizeConfig, recipe)


def test_every_bundled_recipe_names_its_verb():
    from llmlite.recipes import read_recipe

    for recipe in RECIPES:
        text = recipe.read_text()
        assert "\nverb: " in text, recipe.name
        read_recipe(recipe)  # the verb line is not an option
