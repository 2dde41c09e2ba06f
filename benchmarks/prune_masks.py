"""Where do llmlite's and llm-compressor's 2:4 Wanda masks part, and is that more than float rounding?

    .venv/bin/python benchmarks/prune_masks.py

Prunes the bundled SmolLM2-135M with llmlite's Wanda 2:4 twice, on the 128 × 512 calibration
windows of ``benchmarks/prune.py`` in their order and reversed (the same statistics up to float
rounding), and compares, layer by layer, the share of mask entries (kept or pruned) that differ:
ours reversed against ours, the peer against ours, and the peer reversed against the peer. The peer's
weights are those ``benchmarks/prune.py --only llm-compressor-wanda-2:4
llm-compressor-wanda-2:4-reordered`` saved. Writes docs/benchmarks/prune_masks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # not ROOT: its kernels/ would shadow a package

import torch  # noqa: E402
from awq import calibration_file  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from llmlite.models import load_model  # noqa: E402
from llmlite.pruning import PruneSettings, parse_pattern, prune_model  # noqa: E402
from llmlite.runinfo import environment  # noqa: E402

RUNS = ROOT / ".bench" / "runs"
PEER = {
    order: RUNS / f"llm-compressor-wanda-2:4{order}" / "weights.safetensors" for order in ("", "-reordered")
}
OUT = ROOT / "docs" / "benchmarks" / "prune_masks.md"


def ours(calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """The decoder linears' keep masks after llmlite's one-pass Wanda 2:4."""
    model = load_model("smollm2-135m")[0]
    prune_model(model, PruneSettings("wanda", 0.5, parse_pattern("2:4")), calibration)
    return {k: v != 0 for k, v in model.state_dict().items() if k.endswith("proj.weight")}


def masks(weights: dict[str, torch.Tensor], like: dict) -> dict[str, torch.Tensor]:
    """The keep masks of the linears ``like`` names."""
    return {k: weights[k] != 0 for k in like}


def disagreement(a: dict, b: dict, layer: int) -> float:
    """The share of one layer's linear weights kept in one mask and pruned in the other."""
    keys = [k for k in a if k.startswith(f"model.layers.{layer}.")]
    return sum(int((a[k] != b[k]).sum()) for k in keys) / sum(a[k].numel() for k in keys)


def main() -> None:
    missing = [str(p) for p in PEER.values() if not p.exists()]
    if missing:
        sys.exit(f"error: no peer weights at {missing[0]}: run benchmarks/prune.py with --only "
                 "llm-compressor-wanda-2:4 llm-compressor-wanda-2:4-reordered first")  # fmt: skip
    calibration = torch.load(calibration_file())
    forward, reverse = ours(calibration), ours(calibration.flip(0))
    peer, peer_rev = (masks(load_file(str(p)), forward) for p in PEER.values())
    lines = [
        "# Wanda 2:4 masks: llmlite against llm-compressor, and each against itself reordered",
        "",
        "Written by `benchmarks/prune_masks.py`. Share of each decoder layer's linear weights kept in one "
        "mask and pruned in the other. *Reversed*: the same calibration windows in reverse order, which "
        "changes the statistics by float rounding only.",
        "",
        "| layer | llmlite reversed vs llmlite | llm-compressor vs llmlite | llm-compressor reversed vs "
        "llm-compressor |",
        "|---:|---:|---:|---:|",
    ]
    for i in range(len({k.split(".")[2] for k in forward})):
        row = [
            disagreement(reverse, forward, i),
            disagreement(peer, forward, i),
            disagreement(peer_rev, peer, i),
        ]
        lines.append(f"| {i} | " + " | ".join(f"{x:.4%}" for x in row) + " |")
    env = environment()
    lines += [
        "",
        "Settings: smollm2-135m (float32); calibration wikitext2-valid, 128 windows x 512 tokens, seed 0; "
        "llmlite's default one-pass walk; the peer's weights from `benchmarks/prune.py`.",
        f"Machine: {env['cpu']} ({env['machine']}), {env['threads']} threads; llmlite {env['llmlite']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}.",
        "",
    ]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
