"""Paired statistics for comparing two runs on the same questions.

Accuracy differences between variants are read on paired outcomes (the same held-out questions, one bool per
question and run): a paired bootstrap over questions for the confidence interval, and the exact McNemar test,
which only counts the questions on which the two runs disagree. Pooled over seeds, each seed has its own
questions, so the bootstrap resamples questions within each seed and averages the per-seed differences.
"""
from __future__ import annotations

from math import comb
from typing import Sequence

import numpy as np

N_BOOT = 10_000


def _pair(a: Sequence[bool], b: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired outcomes: expected two equally long, non-empty 1-D sequences, "
                         f"got shapes {x.shape} and {y.shape}")
    return x, y


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: the binomial test of the discordant pairs against 1/2."""
    x, y = _pair(a, b)
    n01 = int(np.sum(x & ~y))  # a right, b wrong
    n10 = int(np.sum(~x & y))
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(n01, n10) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap_ci(pairs: Sequence[tuple[Sequence[bool], Sequence[bool]]], n_boot: int = N_BOOT,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean difference, low, high) of accuracy(a) - accuracy(b), averaged over the given (a, b) pairs.

    Each pair is one seed's outcomes on its own questions; the bootstrap draws questions with replacement
    within each pair (the same draw for a and b) and averages the per-pair differences. The interval is
    the percentile interval of ``n_boot`` draws from ``numpy.random.default_rng(seed)``.
    """
    if not pairs:
        raise ValueError("paired_bootstrap_ci: no pairs")
    rng = np.random.default_rng(seed)
    diffs = [_pair(a, b) for a, b in pairs]
    diffs = [x.astype(np.float64) - y.astype(np.float64) for x, y in diffs]
    point = float(np.mean([d.mean() for d in diffs]))
    boot = np.zeros(n_boot)
    for d in diffs:
        idx = rng.integers(0, d.size, size=(n_boot, d.size))
        boot += d[idx].mean(axis=1)
    boot /= len(diffs)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(lo), float(hi)


def paired_summary(a: Sequence[bool], b: Sequence[bool], seed: int = 0) -> dict:
    """One seed's a - b on the same questions: the difference, its paired-bootstrap 95% CI, the exact McNemar p."""
    d, lo, hi = paired_bootstrap_ci([(a, b)], seed=seed)
    return {"diff": d, "diff_ci95": [lo, hi], "mcnemar_p": mcnemar_exact(a, b)}
