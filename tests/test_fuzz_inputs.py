"""Property-based tests of the readers of user files: recipes (every verb's config) and quantized
checkpoints, on random and mutated inputs. Whatever the bytes, the only exception is llmlite's own
one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from llmlite.cli import main
from llmlite.config import EvalConfig, QuantizeConfig
from llmlite.errors import LlmliteError
from llmlite.evaluation.report import ReportConfig
from llmlite.gqa import GQAConfig
from llmlite.kvcache.generate import GenerateConfig
from llmlite.models import load_model
from llmlite.recipes import build
from llmlite.training.config import FinetuneConfig

CONFIGS = [QuantizeConfig, EvalConfig, GenerateConfig, ReportConfig, FinetuneConfig, GQAConfig]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


def field_names(cls) -> list[str]:
    return [f.replace("_", "-") for f in cls.__dataclass_fields__]


def only_our_error(cls, recipe: Path) -> None:
    try:
        build(cls, recipe)
    except LlmliteError as e:
        assert "\n" not in str(e), str(e)


@FUZZ
@given(data=st.binary(max_size=400), cls=st.sampled_from(CONFIGS))
def test_recipe_of_random_bytes(tmp_path, data, cls):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(data)
    only_our_error(cls, recipe)


@FUZZ
@given(data=st.data(), cls=st.sampled_from(CONFIGS))
def test_recipe_of_valid_yaml_with_random_values(tmp_path, data, cls):
    import yaml

    keys = st.sampled_from(field_names(cls)) | st.text(max_size=8)
    mapping = data.draw(st.dictionaries(keys, values, max_size=4))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(mapping))
    only_our_error(cls, recipe)


@FUZZ
@given(data=st.data(), cls=st.sampled_from(CONFIGS))
def test_mutated_good_recipe(tmp_path, data, cls):
    """A valid YAML text of the right keys, then bytes flipped, cut or inserted."""
    text = "".join(
        f"{name}: {data.draw(scalars)!r}\n"
        for name in data.draw(st.lists(st.sampled_from(field_names(cls)), max_size=4))
    )
    raw = bytearray(text.encode())
    for _ in range(data.draw(st.integers(0, 4))):
        if not raw:
            break
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw)))]))
    only_our_error(cls, recipe)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_dir) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "ckpt"
    args = ["quantize", "--model", str(tiny_dir), "--method", "rtn", "--group-size", "32", "--asym"]
    assert main([*args, "--output", str(out), "--quiet"]) == 0
    return out


def load(folder: Path) -> None:
    try:
        load_model(str(folder))
    except LlmliteError as e:
        assert "\n" not in str(e), str(e)


def fresh(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "mutated"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(checkpoint, target)
    return target


@FUZZ
@given(
    key=st.sampled_from(
        ["bits", "group_size", "sym", "checkpoint_format", "desc_act", "quant_method", "dynamic"]
    ),
    value=values,
)
def test_checkpoint_with_a_mutated_quantization_config(checkpoint, tmp_path, key, value):
    folder = fresh(checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    load(folder)


@FUZZ
@given(
    dynamic=st.dictionaries(
        st.one_of(st.text(max_size=12), st.sampled_from(["+:.*", "-:.*down.*", "+:.*\\.q_proj", "+:["])),
        st.one_of(values, st.dictionaries(st.sampled_from(["bits", "group_size", "sym"]), values)),
        max_size=3,
    )
)
def test_checkpoint_with_a_mutated_dynamic_block(checkpoint, tmp_path, dynamic):
    """Per-module overrides (GPTQModel's ``dynamic``) of any shape: loaded, or one clear error."""
    folder = fresh(checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["dynamic"] = dynamic
    (folder / "config.json").write_text(json.dumps(config))
    load(folder)


TENSOR_CHANGES = ["drop", "shrink_rows", "shrink_cols", "to_float", "to_int8", "scalar", "add_rows"]


@FUZZ
@given(data=st.data(), change=st.sampled_from(TENSOR_CHANGES))
def test_checkpoint_with_a_mutated_tensor(checkpoint, tmp_path, data, change):
    folder = fresh(checkpoint, tmp_path)
    state = load_file(folder / "model.safetensors")
    name = data.draw(st.sampled_from(sorted(state)))
    t = state[name]
    if change == "drop":
        del state[name]
    elif change == "shrink_rows" and t.dim() >= 1 and t.shape[0] > 1:
        state[name] = t[:-1].contiguous()
    elif change == "shrink_cols" and t.dim() == 2 and t.shape[1] > 1:
        state[name] = t[:, :-1].contiguous()
    elif change == "add_rows" and t.dim() >= 1:
        state[name] = torch.cat([t, t[:1]]).contiguous()
    elif change == "to_float":
        state[name] = t.float()
    elif change == "to_int8":
        state[name] = t.to(torch.int8)
    elif change == "scalar":
        state[name] = t.reshape(-1)[:1].reshape(()).clone()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    load(folder)


@FUZZ
@given(data=st.data())
def test_checkpoint_with_corrupt_bytes(checkpoint, tmp_path, data):
    folder = fresh(checkpoint, tmp_path)
    file = folder / data.draw(st.sampled_from(["model.safetensors", "config.json"]))
    raw = bytearray(file.read_bytes())
    head = min(len(raw), 4096)  # the header and the start: where a flip changes the structure
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, head - 1))] = data.draw(st.integers(0, 255))
    file.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw)))]))
    load(folder)
