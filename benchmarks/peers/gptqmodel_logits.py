"""Load a GPTQ-layout checkpoint with GPTQModel (a peer loader, run in its own venv) and save the
logits it computes for given token ids, plus the dequantized weight of every quantized layer.

Usage: python gptqmodel_logits.py CHECKPOINT TOKENS.pt OUT.pt
"""

import sys

import torch
from gptqmodel import BACKEND, GPTQModel
from gptqmodel.nn_modules.qlinear import BaseQuantLinear


def main() -> None:
    checkpoint, tokens, out = sys.argv[1:4]
    model = GPTQModel.load(checkpoint, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    ids = torch.load(tokens)
    hf = model.model
    with torch.no_grad():
        logits = hf(ids).logits.float()
        weights = {
            name: m.dequantize_weight().T.float().contiguous()
            for name, m in hf.named_modules()
            if isinstance(m, BaseQuantLinear)
        }
    torch.save(
        {
            "logits": logits,
            "weights": weights,
            "kernel": type(next(iter(m for m in hf.modules() if isinstance(m, BaseQuantLinear)))).__name__,
        },
        out,
    )


if __name__ == "__main__":
    main()
