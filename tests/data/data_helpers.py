"""Statistical checks shared by the data tests."""

import math

import numpy as np


def binomial_ok(k: int, n: int, p: float) -> bool:
    """k successes out of n are within 4.5 standard deviations of Binomial(n, p) (exact at p = 0 or 1)."""
    return abs(k - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1e-9


def same_distribution(a, b, alpha: float = 1e-3) -> bool:
    """Two-sample Kolmogorov-Smirnov test: False when the samples differ at level `alpha` (asymptotic bound)."""
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)).max()
    return d <= math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
