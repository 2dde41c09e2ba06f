"""Prune with llm-compressor's SparseGPT or Wanda (a peer, run in its own venv by ``benchmarks/prune.py``).

Usage: python llmcompressor_prune.py MODEL_DIR CALIB.pt OUT_DIR --method sparsegpt|wanda
       (--sparsity 0.5 | --pattern 2:4)

Reads the calibration token windows the benchmark saved (an int64 tensor ``[n, seqlen]``) and runs
``oneshot`` with ``SparseGPTModifier`` or ``WandaPruningModifier`` at their defaults (every Linear but
``lm_head``, which ``benchmarks/prune.py`` checks; SparseGPT: blocks of 128 columns, damping 0.01
of mean diag(H), as llmlite's). Writes the pruned float weights to OUT_DIR/weights.safetensors and
OUT_DIR/result.json with the wall time of ``oneshot`` and the process's peak RSS (VmHWM, reset at
start: Linux only).
"""

import argparse
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from peer_result import reset_peak_rss, write_result
from transformers import AutoModelForCausalLM

MODIFIERS = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("calibration")
    p.add_argument("output")
    p.add_argument("--method", choices=sorted(MODIFIERS), required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="0:0", help="N:M, or 0:0 for unstructured (the peer's spelling)")
    a = p.parse_args()

    reset_peak_rss()  # peak RSS of this process alone
    torch.manual_seed(0)
    windows = torch.load(a.calibration)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ds = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    n, m = (int(x) for x in a.pattern.split(":"))
    sparsity = 1 - n / m if m else a.sparsity
    # llm-compressor 0.14 names the head "lm_head." here, so ignore=["lm_head"] misses it and prunes
    # the head (tied to the embeddings on SmolLM2); its own warning asks for this pattern
    modifier = MODIFIERS[a.method](sparsity=sparsity, mask_structure=a.pattern, ignore=["re:.*lm_head"])
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=[modifier],
        max_seq_length=windows.shape[1],
        num_calibration_samples=windows.shape[0],
    )
    seconds = time.perf_counter() - start
    # cloned: tied tensors (embeddings and lm_head) must not share memory in safetensors
    out = {name: t.detach().float().clone() for name, t in model.state_dict().items()}
    write_result(a.output, out, seconds)


if __name__ == "__main__":
    main()
