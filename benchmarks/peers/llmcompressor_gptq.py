"""Quantize with llm-compressor's GPTQ (a peer, run in its own venv by the benchmark).

Usage: python llmcompressor_gptq.py MODEL_DIR CALIB.pt OUT_DIR --bits 4 --group-size 64 [--asym]
       [--actorder]

Reads calibration token windows saved by the benchmark (an int64 tensor [n, seqlen]), runs
``oneshot`` with a GPTQModifier at the given settings, and writes the *dequantized* weights of every
quantized linear layer (as llm-compressor computed them) to OUT_DIR/weights.safetensors, plus
OUT_DIR/result.json with the wall time of ``oneshot`` and the process's peak RSS (VmHWM, reset at
start: Linux only).
"""

import argparse
import time

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from peer_result import reset_peak_rss, write_result
from transformers import AutoModelForCausalLM


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("calibration")
    p.add_argument("output")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--actorder", action="store_true")
    a = p.parse_args()

    # The peak-RSS counter survives exec, so it starts at the launching process's size: reset it
    # (as llmlite's own runs do) so that the figure is this process's own.
    reset_peak_rss()
    torch.manual_seed(0)
    windows = torch.load(a.calibration)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ds = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    weights = QuantizationArgs(
        num_bits=a.bits,
        type="int",
        symmetric=not a.asym,
        strategy="group" if a.group_size > 0 else "channel",
        group_size=a.group_size if a.group_size > 0 else None,
    )
    recipe = GPTQModifier(
        config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        actorder="static" if a.actorder else None,
        dampening_frac=0.01,
        block_size=128,
    )
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        max_seq_length=windows.shape[1],
        num_calibration_samples=windows.shape[0],
    )
    seconds = time.perf_counter() - start

    # Dequantize exactly as llm-compressor's forward does (fake quantization of the weight).
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            w = forward_quantize(module, module.weight, "weight", scheme.weights)
            out[f"{name}.weight"] = w.detach().float().contiguous()
    write_result(a.output, out, seconds)


if __name__ == "__main__":
    main()
