"""A quantized Llama-family model as one GGUF file: llmlite's codes in llama.cpp's block types
(``ggml_blocks``), with the metadata and tokenizer llama.cpp, ollama and LM Studio read.

Tensor names and the rotary row order follow llama.cpp's ``convert_hf_to_gguf.py``: the rows of
``q_proj`` and ``k_proj`` are permuted from Hugging Face's half-split rotary layout to llama.cpp's
interleaved one (exact: whole rows move). Unquantized tensors are written in float16 when that is
exact (the checkpoint's default storage), else in float32.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from llmlite.errors import LlmliteError
from llmlite.quant.compressed import is_compressed
from llmlite.quant.ggml_blocks import block_type, carried_by, to_blocks
from llmlite.quant.grid import QuantizedWeight

NAMES = {  # Hugging Face module -> llama.cpp tensor, per decoder layer
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
         "q8_0": gguf.GGMLQuantizationType.Q8_0}  # fmt: skip
FILE_TYPES = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f32": gguf.LlamaFileType.ALL_F32}  # fmt: skip


def rotary_rows(out_features: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp wants for a q/k projection of ``heads`` heads: within each head,
    the two rotary halves interleaved (``convert_hf_to_gguf``'s ``permute``)."""
    return (
        torch.arange(out_features).reshape(heads, 2, out_features // heads // 2).transpose(1, 2).reshape(-1)
    )


def check_gguf_family(model: nn.Module, name: str) -> None:
    """A one-line error for a model this writer has no llama.cpp architecture for."""
    if model.config.model_type != "llama":
        raise LlmliteError(
            f"GGUF export writes Llama-family models; {name} is a {model.config.model_type} model"
        )


def write_gguf(
    model: nn.Module,
    tokenizer_folder: Path,
    path: Path,
    name: str,
    kind: str | None = None,
    embeddings: str = "q8_0",
) -> str:
    """Write ``model`` (Llama family, its linears ``QuantLinear`` at group 32) to ``path`` with its
    weights as GGML type ``kind`` (default: the smallest that holds them exactly; a float model:
    float32, the input of llama.cpp's own quantizer); the tokenizer and its special tokens come
    from ``tokenizer_folder`` (a Hugging Face folder). The float embedding (and an unquantized
    ``lm_head``) is written as ``embeddings``: ``q8_0`` (what llama.cpp's own quantizer writes for
    it, byte for byte: a file of the same size as llama.cpp's) or ``f16`` (float16, float32 where
    that is not exact). Returns the type of the quantized weights."""
    check_gguf_family(model, name)
    cfg = model.config
    layers = model.model.layers
    weights = [m.quantized_weight() for m in model.modules() if is_compressed(m)]
    kinds = {block_type(w) for w in weights} or {"f32"}  # a float model: its tensors as they are
    if len(kinds) != 1:
        raise LlmliteError(f"GGUF export needs one weight type in {name}, found {sorted(kinds)}")
    best = kinds.pop()
    kind = kind or best
    if not all(kind in carried_by(w) for w in weights) or (kind == "f32") != (best == "f32"):
        raise LlmliteError(
            f"--type {kind} cannot hold {name}'s weights exactly (they are {best} in GGUF terms); "
            f"use --type {best}, or leave --type out"
        )
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if rope is not None:
        writer.add_rope_freq_base(float(rope))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(FILE_TYPES[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, tokenizer_folder, cfg.vocab_size)

    _embedding(writer, "token_embd.weight", model.get_input_embeddings().weight, embeddings)
    _dense(writer, "output_norm.weight", model.model.norm.weight)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        if is_compressed(head):
            _linear(writer, "output.weight", head, None, kind)
        else:
            _embedding(writer, "output.weight", head.weight, embeddings)
    for i, layer in enumerate(layers):
        for module_name, short in NAMES.items():
            module = layer.get_submodule(module_name)
            rows = None
            if module_name.endswith(("q_proj", "k_proj")):
                rows = rotary_rows(module.out_features, heads if module_name.endswith("q_proj") else kv_heads)
            if module_name.endswith("norm"):
                _dense(writer, f"blk.{i}.{short}.weight", module.weight)
            else:
                _linear(writer, f"blk.{i}.{short}.weight", module, rows, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return kind


def _linear(
    writer: gguf.GGUFWriter, name: str, module: nn.Module, rows: torch.Tensor | None, kind: str
) -> None:
    if getattr(module, "bias", None) is not None:
        raise LlmliteError(f"{name}: llama.cpp's Llama graph has no linear biases; this model has one")
    if not is_compressed(module):
        weight = module.weight.detach()
        _dense(writer, name, weight if rows is None else weight[rows])
        return
    qw = module.quantized_weight()
    if rows is not None:
        qw = QuantizedWeight(qw.codes[rows], qw.scale[rows], qw.zero[rows], qw.g_idx, qw.bits)
    writer.add_tensor(name, to_blocks(qw, kind), raw_dtype=TYPES[kind])


def _embedding(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, embeddings: str) -> None:
    if embeddings == "f16":
        return _dense(writer, name, tensor)
    if embeddings != "q8_0" or tensor.shape[-1] % 32:
        raise LlmliteError(f"{name}: embeddings are written as q8_0 (rows of whole blocks of 32) or f16")
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor(name, gguf.quants.quantize(tensor.detach().float().numpy(), q8), raw_dtype=q8)


def _dense(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor) -> None:
    values = tensor.detach().float().numpy()
    half = values.astype(np.float16)
    exact = values.ndim > 1 and np.array_equal(half.astype(np.float32), values)
    writer.add_tensor(name, half if exact else values)  # llama.cpp wants 1-D tensors in float32


def _tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2 style, as Llama 3, SmolLM and Qwen use) as llama.cpp's
    ``gpt2`` model: tokens by id, their types, merges and special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    if not (Path(folder) / "tokenizer.json").exists() or "Ġ" not in "".join(list(vocab)[:5000]):
        raise LlmliteError(f"GGUF export writes byte-level BPE tokenizers; {folder}'s is another kind")
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)
