"""The report's efficiency task and ``llmlite compare`` on the outputs of structured pruning
(channels, heads, layers: a smaller dense model), of ``llmlite lowrank`` without ``--merge`` (each
linear two factor linears) and of magnitude pruning (dense, with zeros): parameters, MACs and size
on disk against counts taken from the saved files, latency run on each, and every model in the
compared table and Pareto points."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_tiny
from safetensors.torch import load_file

from llmlite.cli import main
from llmlite.evaluation import efficiency
from llmlite.evaluation.render import pareto_points

SHRUNK = {
    "channels": ["prune", "--structure", "channels", "--sparsity", "0.2"],
    "heads": ["prune", "--structure", "heads", "--sparsity", "0.2"],
    "layers": ["prune", "--structure", "layers", "--sparsity", "0.5"],
    "lowrank": ["lowrank", "--method", "svd", "--ratio", "0.5", "--allocation", "uniform"],
    "magnitude": ["prune", "--method", "magnitude", "--sparsity", "0.5"],
}
CTX = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """The tiny model and the five compressed folders made from it by the CLI, with a cache of their
    own for the module (calibration sets, eval results) and short latency runs."""
    root = tmp_path_factory.mktemp("shrunk")
    base = root / "base"
    make_tiny(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    settings = efficiency.LatencySettings
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLITE_CACHE", str(root / "cache"))
        # a few short timed runs: the figures are not asserted, only that they are measured
        mp.setattr(
            efficiency,
            "LatencySettings",
            lambda: settings(prompt_tokens=16, decode_tokens=3, batch_sizes=(1, 2), repeats=2),
        )
        out = {"base": base}
        for name, verb in SHRUNK.items():
            out[name] = root / name
            argv = [*verb, "--model", str(base), "--samples", "2", "--seqlen", "32"]
            assert main([*argv, "--output", str(out[name]), "--quiet"]) == 0
        yield out


def _reports(folders: dict[str, Path], tasks: str) -> dict[str, Path]:
    """``llmlite eval FOLDER --baseline TINY --tasks TASKS --report DIR`` for each compressed folder
    (the baseline's results, and the efficiency task's once run, come from the cache)."""
    reports = {}
    for name in SHRUNK:
        reports[name] = folders["base"].parent / f"report-{tasks.replace(',', '-')}-{name}"
        argv = ["eval", str(folders[name]), "--baseline", str(folders["base"]), "--tasks", tasks]
        argv += ["--limit", "2", "--ctx", str(CTX), "--quiet", "--report", str(reports[name])]
        assert main(argv) == 0
    return reports


def _compare(reports: dict[str, Path], output: Path) -> dict:
    assert main(["compare", *map(str, reports.values()), "--output", str(output)]) == 0
    return json.loads((output / "compare.json").read_text())


@pytest.fixture(scope="module")
def reports(folders):
    return _reports(folders, "efficiency")


def _efficiency(report: Path) -> tuple[dict, dict]:
    """The compressed model's efficiency metrics and details in a report (the baseline is first)."""
    model = json.loads((report / "report.json").read_text())["models"][-1]
    return model["metrics"]["efficiency"], model["details"]["efficiency"]


def _expected(folder: Path) -> dict:
    """Parameters and linear MACs per token counted from the saved tensors and config alone."""
    state = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] and "lm_head.weight" not in state  # the head is the embedding
    embed = state["model.embed_tokens.weight"].numel()
    linear = sum(t.numel() for k, t in state.items() if t.dim() == 2 and k != "model.embed_tokens.weight")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    attention = 2 * config["num_hidden_layers"] * heads * head_dim * CTX
    return {
        "params": sum(t.numel() for t in state.values()),
        "macs_per_token": linear + embed + attention,
        "size_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
    }


@pytest.mark.parametrize("name", list(SHRUNK))
def test_efficiency_counts_what_the_saved_folder_holds_and_measures_latency(folders, reports, name):
    metrics, details = _efficiency(reports[name])
    expected = _expected(folders[name])
    assert {k: metrics[k] for k in expected} == expected
    base = _expected(folders["base"])
    if name == "magnitude":  # zeros in dense tensors: the same parameters and MACs as the model
        assert metrics["params"] == base["params"] and metrics["macs_per_token"] == base["macs_per_token"]
    else:
        assert metrics["params"] < base["params"] and metrics["macs_per_token"] < base["macs_per_token"]
    # float32 in memory, parameters and the rotary buffers
    assert metrics["memory_bytes"] >= 4 * metrics["params"]
    latency = details["latency"]
    assert latency["loop"] == "llmlite lean loop" and [b["batch"] for b in latency["batches"]] == [1, 2]
    for key in ("prefill_ms_p50_b1", "decode_ms_p50_b1", "decode_ms_p50_b2", "decode_tokens_per_s_b1"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0
    assert metrics["peak_rss_bytes"] > 0


def test_a_factorised_folder_counts_the_two_factor_linears_not_the_dense_shape(folders, reports):
    metrics, _ = _efficiency(reports["lowrank"])
    ranks = json.loads((folders["lowrank"] / "config.json").read_text())["low_rank"]["ranks"]
    dense = load_file(folders["base"] / "model.safetensors")
    assert len(ranks) == 14  # every linear of the 2 decoder layers
    saved = 0
    for name, rank in ranks.items():
        rows, cols = dense[f"{name}.weight"].shape
        assert 0 < rank * (rows + cols) < rows * cols
        saved += rows * cols - rank * (rows + cols)
    base_params = sum(t.numel() for t in dense.values())
    assert metrics["params"] == base_params - saved
    assert metrics["macs_per_token"] == _expected(folders["base"])["macs_per_token"] - saved
    # the weights on disk are those factors in float16: 2 bytes each after the safetensors header
    file = folders["lowrank"] / "model.safetensors"
    header = int.from_bytes(file.read_bytes()[:8], "little")
    assert file.stat().st_size - 8 - header == 2 * metrics["params"]


def test_compare_places_every_model_in_its_table(folders, reports, tmp_path):
    data = _compare(reports, tmp_path / "cmp")
    names = [Path(m["model"]).name for m in data["models"]]
    assert sorted(names) == sorted(["base", *SHRUNK])  # the baseline of every report, once
    rows = {(r["task"], r["metric"]): r["values"] for r in data["table"]}
    for metric in ("params", "size_bytes", "macs_per_token", "decode_ms_p50_b1"):
        assert all(v is not None for v in rows["efficiency", metric])
    for metric in ("params", "size_bytes", "macs_per_token"):
        assert rows["efficiency", metric] == [_expected(folders[n])[metric] for n in names]
    header = (tmp_path / "cmp" / "compare.md").read_text().splitlines()[0]
    assert all(f" {n} " in header for n in names)


@pytest.mark.slow  # lm-eval's PIQA on six models (its task index alone takes seconds a run)
def test_compare_places_every_model_on_its_pareto_plots(folders, reports, tmp_path):
    data = _compare(_reports(folders, "piqa,efficiency"), tmp_path / "cmp")
    names = sorted(Path(m["model"]).name for m in data["models"])
    assert names == sorted(["base", *SHRUNK])
    for axis in ("size_bytes", "decode_ms_p50_b1"):
        points = pareto_points(data["models"], axis)
        assert sorted(Path(p[0]).name for p in points) == names
        assert any(front for *_, front in points)
    assert (tmp_path / "cmp" / "pareto_size.png").is_file()
    assert (tmp_path / "cmp" / "pareto_decode.png").is_file()


def test_default_baseline_is_the_folder_it_was_made_from(folders):
    from llmlite.evaluation.report import default_baseline

    for name in SHRUNK:
        assert default_baseline(str(folders[name])) == str(folders["base"]), name
    assert default_baseline(str(folders["base"])) is None  # a plain transformers folder: none
