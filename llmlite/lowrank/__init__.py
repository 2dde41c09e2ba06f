"""Low-rank factorisation (``llmlite lowrank``): replace each linear ``W`` ``[out, in]`` of the decoder
layers by ``U·V`` (``U`` ``[out, r]``, ``V`` ``[r, in]``), stored as two dense linears, or merged back.

- ``svd``, ``asvd``, ``svd_llm``: the pure cores on tensors (plain truncated SVD; the columns scaled
  by the input magnitude; whitened by the Cholesky factor of the inputs' Gram matrix);
- ``allocate``: each linear's rank from one parameter budget (``global_ranks``) or a uniform share;
- ``methods``: the three behind one signature; ``walk``: runs one over a model (statistics through
  ``quant.driver.walk_groups``, then ranks, then factors);
- ``api``: ``lowrank`` and its options ``LowrankConfig``; ``load`` a saved folder. The layer itself,
  ``LowRankLinear``, lives in ``llmlite.layers`` (which ``models`` reads folders with).
"""

from llmlite.layers.lowrank import LowRankLinear
from llmlite.lowrank.allocate import DENSE, global_ranks, max_rank, minimum_cost, uniform_ranks
from llmlite.lowrank.api import LowrankConfig, LowrankResult, load, lowrank, merge_factors
from llmlite.lowrank.asvd import asvd, asvd_scale
from llmlite.lowrank.methods import METHODS, LowrankSettings
from llmlite.lowrank.svd import LowRank, factorize, svd
from llmlite.lowrank.svd_llm import svd_llm, whitening
from llmlite.lowrank.walk import LowrankReport, check_factorizable, decoder_linears, factorize_model

__all__ = [
    "DENSE",
    "METHODS",
    "LowRank",
    "LowRankLinear",
    "LowrankConfig",
    "LowrankReport",
    "LowrankResult",
    "LowrankSettings",
    "asvd",
    "asvd_scale",
    "check_factorizable",
    "decoder_linears",
    "factorize",
    "factorize_model",
    "global_ranks",
    "load",
    "lowrank",
    "max_rank",
    "merge_factors",
    "minimum_cost",
    "svd",
    "svd_llm",
    "uniform_ranks",
    "whitening",
]
