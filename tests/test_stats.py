"""Paired statistics: exact McNemar against hand counts and a brute-force binomial, the paired bootstrap
against a slow loop that reproduces its draws."""
from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest

from kava.stats import mcnemar_exact, paired_bootstrap_ci


def outcomes(only_a: int, only_b: int, both: int = 0, neither: int = 0) -> tuple[list[bool], list[bool]]:
    """Paired outcomes with the given discordant (a right only, b right only) and concordant counts."""
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return a, b


# ---- McNemar -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("only_a, only_b, expected", [
    (3, 0, 2 * (1 / 8)),            # P(K <= 0 | n=3) = 1/8, two-sided
    (0, 3, 2 * (1 / 8)),
    (5, 1, 2 * (1 + 6) / 64),       # P(K <= 1 | n=6) = (C(6,0) + C(6,1)) / 2^6
    (1, 5, 2 * (1 + 6) / 64),
    (10, 0, 2 / 1024),
    (7, 2, 2 * (1 + 9 + 36) / 512),
    (2, 2, 1.0),                    # 2 * 11/16 > 1: capped
    (1, 0, 1.0),                    # 2 * 1/2
    (0, 0, 1.0),                    # no discordant pairs
])
def test_mcnemar_hand_values(only_a, only_b, expected):
    a, b = outcomes(only_a, only_b, both=1, neither=1)
    assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-15, abs=0)


def test_mcnemar_ignores_concordant_pairs_and_order():
    a, b = outcomes(5, 1)
    a2, b2 = outcomes(5, 1, both=7, neither=11)
    p = mcnemar_exact(a, b)
    assert mcnemar_exact(a2, b2) == p
    perm = np.random.default_rng(0).permutation(len(a2))
    assert mcnemar_exact([a2[i] for i in perm], [b2[i] for i in perm]) == p
    # Identical runs: nothing discordant.
    assert mcnemar_exact(a2, a2) == 1.0


def _two_sided_binomial_half(k: int, n: int) -> float:
    """Brute force: P(|K - n/2| >= |k - n/2|) over all 2^n sign patterns, K ~ Binomial(n, 1/2)."""
    far = abs(k - n / 2)
    hits = sum(1 for signs in product((0, 1), repeat=n) if abs(sum(signs) - n / 2) >= far - 1e-12)
    return hits / 2 ** n


def test_mcnemar_matches_brute_force_binomial_and_is_symmetric():
    for n01 in range(0, 9):
        for n10 in range(0, 9 - n01):
            a, b = outcomes(n01, n10, both=2, neither=1)
            p = mcnemar_exact(a, b)
            assert 0.0 < p <= 1.0
            assert mcnemar_exact(b, a) == p
            if n01 + n10:
                assert p == pytest.approx(_two_sided_binomial_half(n01, n01 + n10), rel=1e-12)
            else:
                assert p == 1.0


def test_mcnemar_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for n01, n10 in [(0, 1), (3, 0), (5, 1), (12, 4), (30, 41), (2, 2), (17, 0)]:
        a, b = outcomes(n01, n10, both=3)
        ref = scipy_stats.binomtest(n01, n01 + n10, 0.5, alternative="two-sided").pvalue
        assert mcnemar_exact(a, b) == pytest.approx(ref, rel=1e-9)


def test_mcnemar_rejects_bad_shapes():
    with pytest.raises(ValueError):
        mcnemar_exact([True, False], [True])
    with pytest.raises(ValueError):
        mcnemar_exact([], [])
    with pytest.raises(ValueError):
        mcnemar_exact([[True]], [[False]])


# ---- paired bootstrap --------------------------------------------------------------------------------

def _random_pairs(seed: int, sizes=(7, 12, 5)):
    rng = np.random.default_rng(seed)
    pairs = []
    for n in sizes:
        a = rng.random(n) < 0.6
        b = rng.random(n) < 0.4
        pairs.append((a.tolist(), b.tolist()))
    return pairs


def _quantile(sorted_x: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), by hand."""
    h = (len(sorted_x) - 1) * q
    i = math.floor(h)
    j = min(i + 1, len(sorted_x) - 1)
    return sorted_x[i] + (h - i) * (sorted_x[j] - sorted_x[i])


def _slow_bootstrap(pairs, n_boot: int, seed: int, level: float):
    """Reference loop: same generator, same draws (one (n_boot, n) matrix per pair, pairs in order)."""
    rng = np.random.default_rng(seed)
    draws = []
    for a, b in pairs:
        n = len(a)
        draws.append(rng.integers(0, n, size=(n_boot, n)))
    boot = []
    for r in range(n_boot):
        per_pair = []
        for (a, b), idx in zip(pairs, draws):
            acc_a = sum(1.0 for i in idx[r] if a[i]) / len(a)
            acc_b = sum(1.0 for i in idx[r] if b[i]) / len(b)
            per_pair.append(acc_a - acc_b)
        boot.append(sum(per_pair) / len(per_pair))
    boot.sort()
    point = sum(sum(a) / len(a) - sum(b) / len(b) for a, b in pairs) / len(pairs)
    return point, _quantile(boot, (1 - level) / 2), _quantile(boot, 1 - (1 - level) / 2)


def test_bootstrap_point_estimate_is_mean_of_per_pair_differences():
    # Pair 1: acc(a) = 3/4, acc(b) = 1/4 -> +0.5; pair 2: 1/2 - 1/2 = 0; pair 3: 0/3 - 2/3.
    pairs = [([True, True, True, False], [False, True, False, False]),
             ([True, False], [False, True]),
             ([False, False, False], [True, True, False])]
    point, lo, hi = paired_bootstrap_ci(pairs, n_boot=500, seed=3)
    assert point == pytest.approx((0.5 + 0.0 - 2 / 3) / 3, abs=1e-15)
    assert lo <= point <= hi
    # Not pooled over questions: that would be (3+1+0)/9 - (1+1+2)/9 = 0.
    assert point != pytest.approx(0.0)


def test_bootstrap_matches_slow_reference():
    for seed, level, sizes in [(0, 0.95, (7, 12, 5)), (5, 0.8, (1, 9)), (11, 0.99, (20,))]:
        pairs = _random_pairs(seed, sizes)
        got = paired_bootstrap_ci(pairs, n_boot=400, seed=seed, level=level)
        ref = _slow_bootstrap(pairs, n_boot=400, seed=seed, level=level)
        for g, r in zip(got, ref):
            assert g == pytest.approx(r, abs=1e-12)


def test_bootstrap_degenerate_cases():
    a = [True, False, True, True, False]
    assert paired_bootstrap_ci([(a, a), (a[::-1], a[::-1])], n_boot=200, seed=0) == (0.0, 0.0, 0.0)
    # a always right, b always wrong: every resample has difference 1.
    assert paired_bootstrap_ci([([True] * 6, [False] * 6), ([True] * 3, [False] * 3)], n_boot=200, seed=1) \
        == (1.0, 1.0, 1.0)
    assert paired_bootstrap_ci([([False] * 4, [True] * 4)], n_boot=50, seed=2) == (-1.0, -1.0, -1.0)


def test_bootstrap_deterministic_and_levels_nest():
    pairs = _random_pairs(7, (30, 25))
    first = paired_bootstrap_ci(pairs, n_boot=2000, seed=4)
    assert paired_bootstrap_ci(pairs, n_boot=2000, seed=4) == first
    assert paired_bootstrap_ci(pairs, n_boot=2000, seed=5) != first
    _, lo80, hi80 = paired_bootstrap_ci(pairs, n_boot=2000, seed=4, level=0.8)
    _, lo95, hi95 = paired_bootstrap_ci(pairs, n_boot=2000, seed=4, level=0.95)
    _, lo99, hi99 = paired_bootstrap_ci(pairs, n_boot=2000, seed=4, level=0.99)
    assert lo99 <= lo95 <= lo80 <= first[0] <= hi80 <= hi95 <= hi99
    assert hi99 - lo99 > hi80 - lo80
    # Default level is 0.95.
    assert (lo95, hi95) == first[1:]


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="no pairs"):
        paired_bootstrap_ci([])
    with pytest.raises(ValueError):
        paired_bootstrap_ci([([True, False], [True])])
    with pytest.raises(ValueError):
        paired_bootstrap_ci([([True], [False]), ([], [])])
