"""Unstructured and N:M pruning (``llmlite prune``): set weights of the decoder layers' linears to
zero and save a dense model with those zeros.

- ``masks``: which weights a score keeps (per row, per tensor, N of every M);
- ``magnitude``, ``wanda``, ``sparsegpt``: the pure cores on tensors;
- ``methods``: the three behind one signature; ``walk``: runs one over a model through the
  quantizer's layer walk (``quant.driver.walk_groups``);
- ``api``: ``prune`` and its options ``PruneConfig`` (``--bits``: the kept weights quantized by
  GPTQ under the mask in the same pass, ``quant.gptq.gptq(..., keep=)``);
- ``structured``: the cores of structured pruning (``--structure``: each unit's importance, Block
  Influence); ``shrink``: whole MLP channels, key/value groups or layers removed from a model, its
  config updated.
"""

from llmlite.pruning.api import PruneConfig, PruneResult, prune
from llmlite.pruning.magnitude import magnitude, magnitude_mask
from llmlite.pruning.masks import (
    drop_lowest,
    keep_n_of_m,
    keep_per_row,
    keep_per_tensor,
    parse_pattern,
    pruned_count,
)
from llmlite.pruning.methods import METHODS, Pruned, PruneSettings
from llmlite.pruning.shrink import StructuredPlan, StructuredReport, check_structured, prune_structured
from llmlite.pruning.sparsegpt import SparseGPTResult, sparsegpt
from llmlite.pruning.structured import (
    STRUCTURES,
    BlockInfluence,
    channel_scores,
    contribution_norms,
    group_scores,
    lowest,
)
from llmlite.pruning.walk import PruneReport, check_prunable, prune_model, remeasure
from llmlite.pruning.wanda import wanda, wanda_mask, wanda_scores

__all__ = [
    "METHODS",
    "STRUCTURES",
    "BlockInfluence",
    "PruneConfig",
    "PruneReport",
    "PruneResult",
    "PruneSettings",
    "Pruned",
    "SparseGPTResult",
    "StructuredPlan",
    "StructuredReport",
    "channel_scores",
    "check_prunable",
    "check_structured",
    "contribution_norms",
    "drop_lowest",
    "group_scores",
    "keep_n_of_m",
    "keep_per_row",
    "keep_per_tensor",
    "lowest",
    "magnitude",
    "magnitude_mask",
    "parse_pattern",
    "prune",
    "prune_model",
    "prune_structured",
    "pruned_count",
    "remeasure",
    "sparsegpt",
    "wanda",
    "wanda_mask",
    "wanda_scores",
]
