"""R-KV compression: a slow loop reference, properties under hypothesis, shape errors."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kava.eviction import METHODS, ORDERS, CompressedKV, compress_kv, needs_importance, rkv_scores

# ---------------------------------------------------------------------------
# Slow reference: plain python loops over example, layer, head and positions.
# ---------------------------------------------------------------------------


def _cos(a: list[float], b: list[float]) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def ref_scores(keys, importance, valid, lam):
    """Scores [B, (L,) H, N] as nested lists of floats (-inf at padding)."""
    five = keys.dim() == 5
    K = keys if five else keys.unsqueeze(1)
    I = None if importance is None else (importance if five else importance.unsqueeze(1))
    B, L, H, N, _ = K.shape
    out = [[[[-math.inf] * N for _ in range(H)] for _ in range(L)] for _ in range(B)]
    for b in range(B):
        pos = [i for i in range(N) if bool(valid[b, i])]
        for l in range(L):
            for h in range(H):
                if not pos:
                    continue
                vec = {i: K[b, l, h, i].tolist() for i in pos}
                raw = {i: -sum(_cos(vec[i], vec[j]) for j in pos) / len(pos) for i in pos}
                top = max(raw.values())
                ex = {i: math.exp(raw[i] - top) for i in pos}
                z = sum(ex.values())
                for i in pos:
                    imp = 0.0 if I is None else float(I[b, l, h, i])
                    out[b][l][h][i] = lam * imp + (1 - lam) * ex[i] / z
    return out if five else [row[0] for row in out]


def ref_crop_scores(shape, valid):
    """Earlier valid positions first."""
    B, N = valid.shape
    s = torch.where(valid, -torch.arange(N, dtype=torch.float64), -math.inf)
    return s.reshape(B, *([1] * (len(shape) - 2)), N).expand(shape).tolist()


def ref_select(scores, valid, budget, order):
    """Index lists [B, (L,) H, M] from score lists: top-M valid by score, padded with -1."""
    def rec(s, b):
        if isinstance(s[0], list):
            return [rec(x, b) for x in s]
        pos = [i for i in range(len(s)) if bool(valid[b, i])]
        pos.sort(key=lambda i: -s[i])
        top = pos[:budget]
        if order == "time":
            top.sort()
        return top + [-1] * (budget - len(top))
    return [rec(scores[b], b) for b in range(len(scores))]


def ref_gather(x, index):
    """x [B, (L,) H, N, d] gathered at index lists, zeros at -1."""
    flat_x = x.reshape(-1, *x.shape[-2:])
    idx = torch.tensor(index).reshape(flat_x.shape[0], -1)
    out = torch.zeros(flat_x.shape[0], idx.shape[1], x.shape[-1], dtype=x.dtype)
    for r in range(flat_x.shape[0]):
        for m in range(idx.shape[1]):
            if idx[r, m] >= 0:
                out[r, m] = flat_x[r, idx[r, m]]
    return out.reshape(*x.shape[:-2], idx.shape[1], x.shape[-1])


def make_inputs(ndim: int, seed: int = 0, N: int = 8):
    """Three examples: left-padded, right-padded, and one with fewer valid CoT tokens than M.

    The short one has 3 valid tokens: with 2, their redundancy scores tie exactly.
    """
    g = torch.Generator().manual_seed(seed)
    B, L, H, d = 3, 2, 3, 4
    lead = (B, L, H) if ndim == 5 else (B, H)
    keys = torch.randn(*lead, N, d, generator=g, dtype=torch.float64)
    values = torch.randn(*lead, N, d + 1, generator=g, dtype=torch.float64)
    importance = torch.rand(*lead, N, generator=g, dtype=torch.float64)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[0, :3] = False          # left padding
    valid[1, -2:] = False         # right padding
    valid[2, :] = False
    valid[2, [1, N // 2, N - 2]] = True  # fewer valid tokens than the budget
    return keys, values, importance, valid


BUDGET = 4


# ---------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [4, 5])
@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
def test_rkv_scores_match_reference(ndim, lam):
    keys, _, importance, valid = make_inputs(ndim, seed=1)
    valid[1, :] = False  # an all-padding row must give -inf, not NaN
    got = rkv_scores(keys, importance, valid, lam)
    want = torch.tensor(ref_scores(keys, importance, valid, lam), dtype=torch.float64)
    assert got.shape == importance.shape
    assert not torch.isnan(got).any()
    vm = valid.reshape(valid.shape[0], *([1] * (ndim - 3)), -1).expand_as(got)
    assert torch.isneginf(got[~vm]).all()
    torch.testing.assert_close(got[vm], want[vm], rtol=1e-10, atol=1e-12)


def test_redundancy_prefers_distinct_keys():
    # Three near-copies and one orthogonal key: the orthogonal one is least redundant.
    keys = torch.tensor([[[[1.0, 0.0], [1.0, 0.01], [1.0, -0.01], [0.0, 1.0]]]])
    s = rkv_scores(keys, None, torch.ones(1, 4, dtype=torch.bool), lam=0.0)
    assert s[0, 0].argmax().item() == 3
    assert torch.allclose(s.sum(-1), torch.ones(1, 1))


@pytest.mark.parametrize("ndim", [4, 5])
@pytest.mark.parametrize("method", ["rkv", "importance", "redundancy", "crop"])
@pytest.mark.parametrize("order", ["time", "score"])
def test_compress_matches_reference(ndim, method, order):
    keys, values, importance, valid = make_inputs(ndim, seed=2)
    if method == "importance":
        # Shrink I below the spread of R, so any leftover redundancy term would change the ranking.
        importance = importance * 1e-3
    if method == "crop":
        scores = ref_crop_scores(keys.shape[:-1], valid)
    else:
        lam = {"rkv": 0.1, "importance": 1.0, "redundancy": 0.0}[method]
        scores = ref_scores(keys, importance, valid, lam)
    index = ref_select(scores, valid, BUDGET, order)

    out = compress_kv(keys, values, importance, valid, BUDGET, lam=0.1, method=method, order=order)
    assert isinstance(out, CompressedKV)
    assert out.index.dtype == torch.long
    assert out.index.tolist() == index
    torch.testing.assert_close(out.keys, ref_gather(keys, index), rtol=0, atol=0)
    torch.testing.assert_close(out.values, ref_gather(values, index), rtol=0, atol=0)
    assert out.slot_mask.tolist() == [[True] * 4, [True] * 4, [True, True, True, False]]
    assert out.budget == BUDGET


def test_time_and_score_order_keep_the_same_set():
    keys, values, importance, valid = make_inputs(5, seed=3)
    t = compress_kv(keys, values, importance, valid, BUDGET, order="time")
    s = compress_kv(keys, values, importance, valid, BUDGET, order="score")
    assert not torch.equal(t.index, s.index)  # the orders do differ somewhere
    assert torch.equal(t.index.sort(-1).values, s.index.sort(-1).values)
    # score order: scores at the kept slots never increase
    sc = rkv_scores(keys, importance, valid, 0.1)
    kept = sc.gather(-1, s.index.clamp_min(0))
    ok = s.index >= 0
    assert ((kept[..., :-1] >= kept[..., 1:]) | ~ok[..., 1:]).all()


def test_budget_larger_than_n_still_gives_m_slots():
    keys, values, importance, valid = make_inputs(4, seed=4, N=3)
    valid = torch.tensor([[True, True, True], [False, True, False], [False, False, False]])
    out = compress_kv(keys, values, importance, valid, budget=6)
    assert out.keys.shape == (3, 3, 6, 4) and out.values.shape == (3, 3, 6, 5)
    n_valid = valid.sum(-1)
    assert out.slot_mask.tolist() == [[i < min(6, int(n)) for i in range(6)] for n in n_valid]
    assert (out.index[~out.slot_mask[:, None].expand_as(out.index)] == -1).all()


def test_random_is_reproducible_and_respects_validity():
    keys, values, _, valid = make_inputs(5, seed=5, N=40)
    valid[0, :10] = False

    def run(seed):
        return compress_kv(keys, values, None, valid, BUDGET, method="random",
                           generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.index, b.index) and torch.equal(a.keys, b.keys)
    assert not torch.equal(a.index, c.index)
    for out in (a, c):
        ok = out.index >= 0
        b_idx = torch.arange(3).view(3, 1, 1, 1).expand_as(out.index)
        assert valid[b_idx[ok], out.index[ok]].all()
        assert torch.equal(ok, out.slot_mask[:, None, None].expand_as(ok))


def test_low_precision_and_gradients_pass_through():
    keys, values, importance, valid = make_inputs(5, seed=6)
    kb, vb = keys.to(torch.bfloat16), values.to(torch.bfloat16)
    out = compress_kv(kb, vb, importance.to(torch.bfloat16), valid, BUDGET)
    assert out.keys.dtype == torch.bfloat16 and out.values.dtype == torch.bfloat16
    ok = out.index >= 0
    gathered = kb.gather(-2, out.index.clamp_min(0)[..., None].expand(*out.index.shape, kb.shape[-1]))
    assert torch.equal(out.keys[ok], gathered[ok])

    k = keys.clone().requires_grad_(True)
    out = compress_kv(k, values, importance, valid, BUDGET)
    out.keys.sum().backward()
    picked = torch.zeros_like(k[..., 0], dtype=torch.bool)
    picked.scatter_(-1, out.index.clamp_min(0), ok)
    assert torch.equal(k.grad[..., 0] != 0, picked)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3), L=st.one_of(st.none(), st.integers(1, 2)), H=st.integers(1, 3),
    N=st.integers(1, 10), d=st.integers(1, 4), budget=st.integers(1, 12),
    method=st.sampled_from(METHODS), order=st.sampled_from(ORDERS),
    seed=st.integers(0, 2**16), data=st.data(),
)
def test_properties(B, L, H, N, d, budget, method, order, seed, data):
    rows = data.draw(st.lists(st.lists(st.booleans(), min_size=N, max_size=N), min_size=B, max_size=B))
    valid = torch.tensor(rows, dtype=torch.bool).reshape(B, N)
    g = torch.Generator().manual_seed(seed)
    lead = (B, H) if L is None else (B, L, H)
    keys = torch.randn(*lead, N, d, generator=g)
    values = torch.randn(*lead, N, d, generator=g)
    importance = torch.rand(*lead, N, generator=g)
    # Garbage at padding must never be selected nor leak NaN into the scores.
    pad = ~valid.reshape(B, *([1] * (len(lead) - 1)), N).expand(*lead, N)
    importance[pad] = float("nan")

    out = compress_kv(keys, values, importance, valid, budget, method=method, order=order,
                      generator=torch.Generator().manual_seed(seed))
    M = budget
    assert out.keys.shape == (*lead, M, d) and out.values.shape == (*lead, M, d)
    assert out.index.shape == (*lead, M) and out.slot_mask.shape == (B, M)

    n_valid = valid.sum(-1)
    expect_mask = torch.arange(M)[None] < n_valid.clamp_max(M)[:, None]
    assert torch.equal(out.slot_mask, expect_mask)

    sm = out.slot_mask.reshape(B, *([1] * (len(lead) - 1)), M).expand_as(out.index)
    idx = out.index
    assert ((idx >= 0) & (idx < N))[sm].all()
    assert (idx[~sm] == -1).all()
    assert (out.keys[~sm] == 0).all() and (out.values[~sm] == 0).all()

    # never a padding position
    b_idx = torch.arange(B).reshape(B, *([1] * len(lead))).expand_as(idx)
    assert valid[b_idx[sm], idx[sm]].all()

    # unique, and ascending in time order (masked slots come last, so check pairs of valid slots)
    both = sm[..., 1:] & sm[..., :-1]
    if order == "time":
        assert (idx[..., 1:] > idx[..., :-1])[both].all()
    srt = torch.where(sm, idx, N + torch.arange(M)).sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all()

    # kept entries are exactly the inputs at index
    gi = idx.clamp_min(0)[..., None].expand(*idx.shape, d)
    assert torch.equal(out.keys[sm], keys.gather(-2, gi)[sm])
    assert torch.equal(out.values[sm], values.gather(-2, gi)[sm])


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_bad_shapes_raise_naming_the_argument():
    keys, values, importance, valid = make_inputs(4)
    with pytest.raises(ValueError, match=r"keys: expected shape \[B, H, N, d\]"):
        compress_kv(keys[0], values[0], importance[0], valid, BUDGET)
    with pytest.raises(ValueError, match=r"valid: expected shape \[B, N\]"):
        compress_kv(keys, values, importance, valid[:, :-1], BUDGET)
    with pytest.raises(ValueError, match=r"importance: expected shape \[B, H, N\]"):
        compress_kv(keys, values, importance[:, :1], valid, BUDGET)
    with pytest.raises(ValueError, match=r"values: expected shape"):
        compress_kv(keys, values[:, :, :-1], importance, valid, BUDGET)
    with pytest.raises(ValueError, match=r"importance: required"):
        compress_kv(keys, values, None, valid, BUDGET, method="rkv")
    with pytest.raises(ValueError, match=r"budget"):
        compress_kv(keys, values, importance, valid, 0)
    with pytest.raises(ValueError, match=r"method"):
        compress_kv(keys, values, importance, valid, BUDGET, method="h2o")
    with pytest.raises(ValueError, match=r"order"):
        compress_kv(keys, values, importance, valid, BUDGET, order="random")
    with pytest.raises(ValueError, match=r"importance: expected shape \[B, L, H, N\]"):
        rkv_scores(keys.unsqueeze(1), importance, valid, 0.1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
def test_needs_importance_says_when_the_selection_reads_it(method, lam):
    """Where needs_importance is False the kept entries do not depend on the importance (so training need not
    capture it); where it is True they do, and compress_kv refuses None."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    imp = torch.rand(2, 3, 9, generator=g)

    def kept(importance):
        gen = torch.Generator().manual_seed(1)
        return compress_kv(keys, values, importance, valid, 4, lam=lam, method=method, generator=gen).index

    if needs_importance(method, lam):
        with pytest.raises(ValueError, match="importance"):
            kept(None)
        # A reversed importance ranking changes the pick (this data is chosen so that it does).
        assert not torch.equal(kept(imp), kept(1 - imp))
    else:
        assert torch.equal(kept(None), kept(imp))
