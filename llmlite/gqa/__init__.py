"""Grouped-query attention conversion (``llmlite convert-gqa``): merge the key/value heads of a
Llama, Mistral or Qwen2 model into fewer (or repeat them into more), optionally uptrain the result
by distillation from the original, and save a model that plain transformers loads.

- ``heads``: pure cores on tensors (mean and weighted pooling, repetition, aligned merging);
- ``convert``: walks a model's attention layers, measures calibration statistics, rewrites them;
- ``uptrain``: the distillation loop;
- ``api``: ``convert_gqa_model`` and its options ``GQAConfig``.
"""

from llmlite.gqa.api import RECORD, GQAConfig, GQAResult, convert_gqa_model, kv_cache_bytes_per_token
from llmlite.gqa.convert import (
    METHODS,
    SUPPORTED,
    attention_layers,
    calibration_stats,
    check_target,
    convert_gqa,
)
from llmlite.gqa.heads import align_keys, align_values, key_weights, pool_heads, repeat_heads, value_weights
from llmlite.gqa.uptrain import UPTRAIN_PARAMS, distillation_kl, trainable_parameters, uptrain

__all__ = [
    "METHODS",
    "RECORD",
    "SUPPORTED",
    "UPTRAIN_PARAMS",
    "GQAConfig",
    "GQAResult",
    "align_keys",
    "align_values",
    "attention_layers",
    "calibration_stats",
    "check_target",
    "convert_gqa",
    "convert_gqa_model",
    "distillation_kl",
    "key_weights",
    "kv_cache_bytes_per_token",
    "pool_heads",
    "repeat_heads",
    "trainable_parameters",
    "uptrain",
    "value_weights",
]
