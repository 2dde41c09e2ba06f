"""Calibration of a model's confidence: expected calibration error, Brier score, reliability bins.

Pure functions on (confidence, correct) pairs, shared by the multiple-choice and next-token tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

BINS = 15


def reliability(
    confidence: Sequence[float], correct: Sequence[float], bins: int = BINS
) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) in each of ``bins`` equal-width bins over [0, 1]."""
    sums = [[0.0, 0.0, 0] for _ in range(bins)]
    for c, ok in zip(confidence, correct, strict=True):
        b = min(int(c * bins), bins - 1)  # confidence 1.0 goes in the last bin
        sums[b][0] += c
        sums[b][1] += float(ok)
        sums[b][2] += 1
    return [(s / n, a / n, n) if n else (math.nan, math.nan, 0) for s, a, n in sums]


def ece(confidence: Sequence[float], correct: Sequence[float], bins: int = BINS) -> float:
    """Expected calibration error: Σ_b |B_b| / n · |accuracy(B_b) − confidence(B_b)|."""
    n = len(confidence)
    if n == 0:
        return math.nan
    return sum(k / n * abs(acc - conf) for conf, acc, k in reliability(confidence, correct, bins) if k)


def choice_probabilities(loglikelihoods: Sequence[float]) -> list[float]:
    """Softmax over the choices' summed log-likelihoods: the model's probability of each choice."""
    top = max(loglikelihoods)
    weights = [math.exp(ll - top) for ll in loglikelihoods]
    total = sum(weights)
    return [w / total for w in weights]


def brier(probabilities: Sequence[float], gold: int) -> float:
    """Multi-class Brier score: Σ_k (p_k − [k = gold])²."""
    return sum((p - (k == gold)) ** 2 for k, p in enumerate(probabilities))
