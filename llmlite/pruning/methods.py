"""The pruning methods ``llmlite prune`` runs: each a pure core (``magnitude``, ``wanda``,
``sparsegpt``) behind one signature, ``run(W, stats, settings, rows) -> Pruned``, where ``W`` is
a group's stacked weight ``[Σ out, in]``, ``stats`` the group's calibration statistics (``None``
for a method without calibration, run on each linear alone) and ``rows`` each linear's rows in
``W``; ``Pruned`` holds the pruned weight, its mask and the Hessian damping used (``None`` where
there is none). With ``settings.bits``, the walk then quantizes the pruned weight with GPTQ under
the mask (``quant.gptq.gptq(..., keep=mask)``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from llmlite.errors import LlmliteError
from llmlite.pruning.magnitude import magnitude_mask
from llmlite.pruning.sparsegpt import sparsegpt
from llmlite.pruning.wanda import wanda_mask
from llmlite.quant.method import GroupStats


@dataclass
class PruneSettings:
    method: str = "sparsegpt"
    sparsity: float = 0.5  # of each linear's weights (unused with a pattern)
    pattern: tuple[int, int] | None = None  # N:M, N kept in every M consecutive inputs of a row
    damp: float = 0.01  # SparseGPT's (and GPTQ's) damping, a fraction of mean(diag H)
    block_size: int = 128  # SparseGPT's columns per block (rounded to a multiple of M for N:M)
    # False: all of a layer's groups measured in one pass through the unpruned layer, as the
    # reference codes and llm-compressor (docs/prune.md: better in 3 of 4 rows); True: each group
    # calibrated on the outputs of the layer's groups pruned before it (``quant.driver.walk_groups``)
    true_sequential: bool = False
    # Quantization of the kept weights in the same pass (GPTQ under the mask); None: float weights
    bits: int | None = None
    group_size: int = 128
    sym: bool = True
    act_order: bool = True  # GPTQ's static groups, as ``llmlite quantize``
    refit: bool = True  # each group's scale re-solved after GPTQ, as ``llmlite quantize``

    @property
    def target(self) -> float:
        """The fraction of each linear's weights removed."""
        return 1 - self.pattern[0] / self.pattern[1] if self.pattern else self.sparsity


@dataclass
class Pruned:
    weight: Tensor  # the pruned (and, for SparseGPT, updated) weight
    keep: Tensor  # its mask, True for a weight kept
    damp: float | None = None  # the Hessian damping used, where there is one


@dataclass(frozen=True)
class PruneMethod:
    name: str
    run: Callable[[Tensor, GroupStats | None, PruneSettings, list[int]], Pruned]
    calibrated: bool
    help: str


def _magnitude(w: Tensor, stats, s: PruneSettings, rows: list[int]) -> Pruned:
    # one threshold per linear, also in a stacked group (with --bits, magnitude runs on the walk)
    keep = torch.cat([magnitude_mask(part, s.sparsity, s.pattern) for part in w.split(rows)])
    return Pruned(w * keep, keep)


def _wanda(w: Tensor, stats: GroupStats, s: PruneSettings, rows: list[int]) -> Pruned:
    keep = wanda_mask(w, stats.input_rms, s.sparsity, s.pattern)
    return Pruned(w * keep, keep)


def _sparsegpt(w: Tensor, stats: GroupStats, s: PruneSettings, rows: list[int]) -> Pruned:
    result = sparsegpt(w, stats.hessian, s.sparsity, s.pattern, s.block_size, s.damp, segments=rows)
    return Pruned(result.weight, result.keep, result.damp)


METHODS: dict[str, PruneMethod] = {
    m.name: m
    for m in (
        PruneMethod("magnitude", _magnitude, False, "smallest |W| per linear; no calibration"),
        PruneMethod("wanda", _wanda, True, "smallest |W|·‖X‖ per output row; no weight update"),
        PruneMethod(
            "sparsegpt", _sparsegpt, True, "OBS mask per block of 128 columns, the kept weights updated"
        ),
    )
}


def get(name: str) -> PruneMethod:
    if name not in METHODS:
        raise LlmliteError(f"unknown pruning method '{name}'; use one of: {', '.join(METHODS)}")
    return METHODS[name]
