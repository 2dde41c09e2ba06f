"""Quantize with llm-compressor's AWQ (a peer, run in its own venv by ``benchmarks/awq.py``).

Usage: python llmcompressor_awq.py MODEL_DIR CALIB.pt OUT_DIR --bits 3 --group-size 64 [--asym]
       [--then rtn|gptq]

Reads the calibration token windows the benchmark saved (an int64 tensor ``[n, seqlen]``) and runs
``oneshot`` with ``AWQModifier`` (its defaults: the mappings it infers for Llama, duo scaling, a
20-point grid), stacked, as llm-compressor requires, with a quantizer: ``QuantizationModifier``
(round to nearest, ``--then rtn``) or ``GPTQModifier`` (``--then gptq``). Writes every weight the
float model reads (the smoothed norms and the *dequantized* linears, as llm-compressor's forward
computes them) to OUT_DIR/weights.safetensors, and OUT_DIR/result.json with the wall time of
``oneshot`` and the process's peak RSS (VmHWM, reset at start: Linux only). Without a GPU,
llm-compressor's AWQ fails while pinning memory for transfers to one; that step is skipped here.
"""

import argparse
import time

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.pipelines.cache import IntermediatesCache
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
    p.add_argument("--then", choices=("rtn", "gptq"), default="rtn")
    a = p.parse_args()

    reset_peak_rss()  # peak RSS of this process alone
    if not torch.cuda.is_available():
        # llm-compressor 0.14.0.1's AWQ pins its cached activations before each mapping's grid search
        # (a host-to-GPU transfer speed-up) and fails on a machine without an accelerator; pinning
        # changes no value, so skip it here.
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    torch.manual_seed(0)
    windows = torch.load(a.calibration)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    plain = set(model.state_dict())
    ds = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    weights = QuantizationArgs(
        num_bits=a.bits, type="int", symmetric=not a.asym, strategy="group", group_size=a.group_size
    )
    groups = {"g": QuantizationScheme(targets=["Linear"], weights=weights)}
    if a.then == "gptq":
        quantizer = GPTQModifier(
            config_groups=groups, ignore=["lm_head"], dampening_frac=0.01, block_size=128
        )
    else:
        quantizer = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=[AWQModifier(), quantizer],
        max_seq_length=windows.shape[1],
        num_calibration_samples=windows.shape[0],
    )
    seconds = time.perf_counter() - start

    out = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in plain:  # cloned: tied tensors (embeddings and lm_head) must not share memory
                out[name] = tensor.detach().float().clone()
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None:
                w = forward_quantize(module, module.weight, "weight", scheme.weights)
                out[f"{name}.weight"] = w.detach().float().clone()
    write_result(a.output, out, seconds)


if __name__ == "__main__":
    main()
