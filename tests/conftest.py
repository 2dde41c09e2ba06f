"""Shared fixtures: the real bundled model, and a tiny random Llama with the real tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_kernels_triton.py). Triton
# reads the variable when it is first imported, which transformers does: it is set before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llmlite.models import resolve_model

# Shapes chosen to hit the edge cases: 96 and 200 are not multiples of the group sizes tested, and
# 200 is not a multiple of 32 (3-bit and 4-bit packing pad it); 2 kv heads for 4 query heads (GQA).
TINY = dict(
    hidden_size=96,
    intermediate_size=200,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="session")
def bundled_dir():
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted from GGUF on first use)."""
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(bundled_dir):
    return AutoTokenizer.from_pretrained(bundled_dir)


def make_tiny(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so that quantization matters
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama model folder with the bundled tokenizer."""
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
