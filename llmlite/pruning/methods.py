"""The pruning methods ``llmlite prune`` runs: each a pure core (``magnitude``, ``wanda``,
``sparsegpt``) behind one signature, ``run(W, stats, settings, rows) -> (Ŵ, damp)``, where ``W`` is
a group's stacked weight ``[Σ out, in]``, ``stats`` the group's calibration statistics (``None``
for a method without calibration, run on each linear alone), ``rows`` each linear's rows in ``W``
and ``damp`` the Hessian damping used (``None`` where there is none)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from llmlite.errors import LlmliteError
from llmlite.pruning.magnitude import magnitude
from llmlite.pruning.sparsegpt import sparsegpt
from llmlite.pruning.wanda import wanda
from llmlite.quant.method import GroupStats


@dataclass
class PruneSettings:
    method: str = "sparsegpt"
    sparsity: float = 0.5  # of each linear's weights (unused with a pattern)
    pattern: tuple[int, int] | None = None  # N:M, N kept in every M consecutive inputs of a row
    damp: float = 0.01  # SparseGPT's damping, a fraction of mean(diag H)
    block_size: int = 128  # SparseGPT's columns per block (rounded to a multiple of M for N:M)

    @property
    def target(self) -> float:
        """The fraction of each linear's weights removed."""
        return 1 - self.pattern[0] / self.pattern[1] if self.pattern else self.sparsity


@dataclass(frozen=True)
class PruneMethod:
    name: str
    run: Callable[[Tensor, GroupStats | None, PruneSettings, list[int]], tuple[Tensor, float | None]]
    calibrated: bool
    help: str


def _magnitude(w: Tensor, stats, s: PruneSettings, rows: list[int]):
    return magnitude(w, s.sparsity, s.pattern), None


def _wanda(w: Tensor, stats: GroupStats, s: PruneSettings, rows: list[int]):
    return wanda(w, stats.input_rms, s.sparsity, s.pattern), None


def _sparsegpt(w: Tensor, stats: GroupStats, s: PruneSettings, rows: list[int]):
    result = sparsegpt(w, stats.hessian, s.sparsity, s.pattern, s.block_size, s.damp, segments=rows)
    return result.weight, result.damp


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
