"""The methods ``llmlite lowrank`` runs, behind one signature: ``basis(H, settings) -> Basis``, from
the Hessian ``H = 2XᵀX/tokens`` of a group's calibration inputs (``None`` for plain SVD, which
needs none), gives the ``spectrum`` the rank allocation reads and the ``factorize`` that splits
each linear of the group at its rank (``svd``, ``asvd``, ``svd_llm``: the pure cores)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from llmlite.errors import LlmliteError
from llmlite.lowrank.asvd import ALPHA, asvd, asvd_scale, asvd_spectrum
from llmlite.lowrank.svd import LowRank, spectrum, svd
from llmlite.lowrank.svd_llm import svd_llm, svd_llm_spectrum, whitening

ALLOCATIONS = ("global", "uniform")


@dataclass
class LowrankSettings:
    method: str = "svd-llm"
    ratio: float | None = 0.8  # of the decoder linears' weights kept (None with ``rank``)
    rank: int | None = None  # the same rank in every linear instead of ``ratio``
    allocation: str = "global"  # how ``ratio`` is shared: "global" (by the spectra) or "uniform"
    alpha: float = ALPHA  # ASVD's exponent of the input magnitude
    damp: float = 0.0  # SVD-LLM's damping of H, a fraction of mean(diag H); raised where H is singular


@dataclass
class Basis:
    spectrum: Callable[[Tensor], Tensor]  # W [out, in] -> the singular values the method truncates
    factorize: Callable[[Tensor, int], LowRank]  # (W, rank) -> U·V
    damp: float | None = None  # SVD-LLM's damping of H as used


@dataclass(frozen=True)
class LowrankMethod:
    name: str
    basis: Callable[[Tensor | None, LowrankSettings], Basis]
    calibrated: bool
    help: str


def _svd(h: Tensor | None, s: LowrankSettings) -> Basis:
    return Basis(spectrum, svd)


def _asvd(h: Tensor, s: LowrankSettings) -> Basis:
    scale = asvd_scale((h.diagonal().double() / 2).sqrt(), s.alpha)  # the input RMS, from H
    return Basis(lambda w: asvd_spectrum(w, scale), lambda w, r: asvd(w, scale, r))


def _svd_llm(h: Tensor, s: LowrankSettings) -> Basis:
    chol, damp = whitening(h, s.damp)
    return Basis(lambda w: svd_llm_spectrum(w, chol), lambda w, r: svd_llm(w, chol, r), damp)


METHODS: dict[str, LowrankMethod] = {
    m.name: m
    for m in (
        LowrankMethod("svd", _svd, False, "truncated SVD of each weight; no calibration"),
        LowrankMethod("asvd", _asvd, True, "SVD of W·diag(input RMS^alpha), the scaling undone after"),
        LowrankMethod(
            "svd-llm", _svd_llm, True, "SVD of W·L, L the Cholesky factor of XᵀX: dropped σ² = output error"
        ),
    )
}


def get(name: str) -> LowrankMethod:
    if name not in METHODS:
        raise LlmliteError(f"unknown low-rank method '{name}'; use one of: {', '.join(METHODS)}")
    return METHODS[name]
