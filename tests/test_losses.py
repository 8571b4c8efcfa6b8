"""CODI and KV losses on hand tensors, masking, gradients, and total_loss wiring."""
from __future__ import annotations

import math

import pytest
import torch

from kava.config import LossCfg
from kava.eviction import CompressedKV
from kava.losses import LossShares, codi_loss, kv_loss, total_loss

# ---------------------------------------------------------------------------
# codi_loss
# ---------------------------------------------------------------------------

# B=1, L=2, D=2. Teacher layer 0 = [0, 2] (std 1), layer 1 = [0, 4] (std 2).
T_H = torch.tensor([[[0.0, 2.0], [0.0, 4.0]]])
S_H = torch.tensor([[[0.5, 2.0], [3.0, 4.0]]])


@pytest.mark.parametrize("kind,layerwise,expected", [
    # per-layer mean distance: smooth_l1 [0.0625, 1.25], l1 [0.25, 1.5]
    ("smooth_l1", True, (0.0625 / 1 + 1.25 / 2) / 2),
    ("l1", True, (0.25 / 1 + 1.5 / 2) / 2),
    # global std of [0, 2, 0, 4] = sqrt(2.75)
    ("smooth_l1", False, (0.0625 + 1.25) / 2 / math.sqrt(2.75)),
    ("l1", False, (0.25 + 1.5) / 2 / math.sqrt(2.75)),
])
def test_codi_known_values(kind, layerwise, expected):
    got = codi_loss(S_H, T_H, kind=kind, layerwise_std=layerwise)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_codi_layerwise_differs_from_global_only_when_layer_scales_differ():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 3, 16, generator=g)
    s = torch.randn(4, 3, 16, generator=g)
    t_scaled = t * torch.tensor([1.0, 10.0, 0.1]).view(1, 3, 1)
    a = codi_loss(s, t_scaled, layerwise_std=True)
    b = codi_loss(s, t_scaled, layerwise_std=False)
    assert not torch.isclose(a, b, rtol=1e-2)
    # same std in every layer: the two normalisations agree
    t_same = torch.stack([t[:, 0], -t[:, 0], t[:, 0].flip(-1)], dim=1)
    torch.testing.assert_close(codi_loss(s, t_same, layerwise_std=True),
                               codi_loss(s, t_same, layerwise_std=False))


def test_codi_teacher_detached_student_gets_grad():
    s = S_H.clone().requires_grad_(True)
    t = T_H.clone().requires_grad_(True)
    codi_loss(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_codi_constant_teacher_is_finite():
    s = torch.ones(2, 2, 3, requires_grad=True)
    loss = codi_loss(s, torch.zeros(2, 2, 3))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_codi_bad_args():
    with pytest.raises(ValueError, match="student_h, teacher_h"):
        codi_loss(S_H, T_H[:, :1])
    with pytest.raises(ValueError, match="kind"):
        codi_loss(S_H, T_H, kind="mse")


# ---------------------------------------------------------------------------
# kv_loss
# ---------------------------------------------------------------------------

# B=1, L=1, H=1, M=3, d=2; slot 2 is masked. Valid teacher K = {0, 0, 2, 2}: std 1;
# teacher V = 2 * K: std 2.
MASK = torch.tensor([[True, True, False]])
TK = torch.tensor([[0.0, 0.0], [2.0, 2.0], [9.0, 9.0]]).view(1, 1, 1, 3, 2)
TV = 2 * TK
DK = torch.tensor([[0.5, 0.0], [0.0, -2.0], [100.0, 100.0]]).view(1, 1, 1, 3, 2)
DV = torch.tensor([[1.0, 1.0], [0.0, 0.0], [-50.0, 0.0]]).view(1, 1, 1, 3, 2)
# mean over the 4 valid elements: K deltas (0.5, 0, 0, -2), V deltas (1, 1, 0, 0)
K_DIST = {"smooth_l1": (0.125 + 1.5) / 4, "l1": 2.5 / 4, "mse": 4.25 / 4}
V_DIST = {"smooth_l1": 1.0 / 4, "l1": 2.0 / 4, "mse": 2.0 / 4}


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "mse"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_kv_known_values(kind, layerwise):
    got = kv_loss(TK + DK, TV + DV, TK, TV, MASK, kind=kind, layerwise_std=layerwise)
    std_k, std_v = (1.0, 2.0) if layerwise else (1.0, 1.0)
    expected = 0.5 * (K_DIST[kind] / std_k + V_DIST[kind] / std_v)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)


def _random_kv(seed=0, B=2, L=3, H=2, M=4, d=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, M, d, generator=g) for _ in range(4)]


def test_kv_layerwise_std_is_per_layer():
    sk, sv, tk, tv = _random_kv()
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    scale = torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1, 1)
    # one layer at a time with its own std equals the layerwise loss on all layers
    whole = kv_loss(sk, sv, tk * scale, tv * scale, mask, layerwise_std=True)
    per = torch.stack([kv_loss(sk[:, l:l + 1], sv[:, l:l + 1], (tk * scale)[:, l:l + 1],
                               (tv * scale)[:, l:l + 1], mask, layerwise_std=True) for l in range(3)])
    torch.testing.assert_close(whole, per.mean())
    # and the std is taken over valid slots only: garbage teacher at masked slots changes nothing
    tk2 = tk.clone()
    tk2[0, :, :, 3] = 1e4
    torch.testing.assert_close(kv_loss(sk, sv, tk2, tv, mask), kv_loss(sk, sv, tk, tv, mask))
    assert not torch.isclose(whole, kv_loss(sk, sv, tk * scale, tv * scale, mask, layerwise_std=False))


def test_kv_masked_slots_do_not_count():
    sk, sv, tk, tv = _random_kv(1)
    mask = torch.tensor([[True, False, True, False], [True, True, True, False]])
    base = kv_loss(sk, sv, tk, tv, mask)
    slot = ~mask[:, None, None, :, None].expand_as(sk)
    sk2, sv2 = sk.clone(), sv.clone()
    sk2[slot] = 123.0
    sv2[slot] = float("nan")  # not even NaN leaks through
    torch.testing.assert_close(kv_loss(sk2, sv2, tk, tv, mask), base)
    # but a valid slot does count
    sk3 = sk.clone()
    sk3[0, 0, 0, 0] += 1.0
    assert not torch.isclose(kv_loss(sk3, sv, tk, tv, mask), base)
    # and masked student slots receive zero gradient
    s = sk.clone().requires_grad_(True)
    kv_loss(s, sv, tk, tv, mask).backward()
    assert (s.grad[slot] == 0).all() and (s.grad[~slot] != 0).any()


def test_kv_teacher_detached_student_gets_grad():
    sk, sv, tk, tv = [x.requires_grad_(True) for x in _random_kv(2)]
    kv_loss(sk, sv, tk, tv, torch.ones(2, 4, dtype=torch.bool)).backward()
    assert tk.grad is None and tv.grad is None
    assert sk.grad.abs().sum() > 0 and sv.grad.abs().sum() > 0


def test_kv_no_valid_slot_gives_zero_in_graph():
    sk, sv, tk, tv = _random_kv(3)
    sk.requires_grad_(True)
    loss = kv_loss(sk, sv, tk, tv, torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert sk.grad is not None and (sk.grad == 0).all()


def test_kv_bad_args():
    sk, sv, tk, tv = _random_kv()
    ok = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="student_k, teacher_k"):
        kv_loss(sk[:, :1], sv, tk, tv, ok)
    with pytest.raises(ValueError, match="student_v, teacher_v"):
        kv_loss(sk, sv[..., :2], tk, tv, ok)
    with pytest.raises(ValueError, match=r"slot_mask: expected shape \[B, M\]"):
        kv_loss(sk, sv, tk, tv, ok[:, :3])
    with pytest.raises(ValueError, match="kind"):
        kv_loss(sk, sv, tk, tv, ok, kind="huber")


def _kv_sum_reference(sk, sv, tk, tv, mask, kind, layerwise):
    """The paper's scale written plainly: per layer, the mean distance over valid elements (divided by the
    population std of that layer's valid teacher elements), summed over layers, times H * d."""
    def dist(a, b):
        if kind == "smooth_l1":
            x = (a - b).abs()
            return torch.where(x < 1.0, 0.5 * x * x, x - 0.5)
        return (a - b).abs() if kind == "l1" else (a - b) ** 2

    def one(s, t):
        _, L, H, _, d = s.shape
        total = 0.0
        for l in range(L):
            # [B, H, M, d] -> [B, M, H, d] -> valid slots only: [n_valid, H, d]
            sl = s[:, l].double().permute(0, 2, 1, 3)[mask]
            tl = t[:, l].double().permute(0, 2, 1, 3)[mask]
            term = dist(sl, tl).mean()
            if layerwise:
                term = term / ((tl - tl.mean()) ** 2).mean().sqrt()
            total += term.item()
        return total * H * d

    return 0.5 * (one(sk, tk) + one(sv, tv))


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "mse"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_kv_sum_reduction_matches_plain_reference(kind, layerwise):
    g = torch.Generator().manual_seed(4)
    B, L, H, M, d_k, d_v = 3, 3, 2, 5, 4, 6
    scale = torch.tensor([1.0, 3.0, 0.5]).view(1, L, 1, 1, 1)  # layers of different scales
    tk = torch.randn(B, L, H, M, d_k, generator=g) * scale
    tv = torch.randn(B, L, H, M, d_v, generator=g) * scale
    sk = tk + torch.randn(B, L, H, M, d_k, generator=g) * 1.5
    sv = tv + torch.randn(B, L, H, M, d_v, generator=g) * 1.5
    mask = torch.tensor([[True, True, False, True, False],
                         [False, True, True, False, False],
                         [True, True, True, True, True]])
    got = kv_loss(sk, sv, tk, tv, mask, kind=kind, layerwise_std=layerwise, reduction="sum")
    want = _kv_sum_reference(sk, sv, tk, tv, mask, kind, layerwise)
    assert got.shape == ()
    assert got.item() == pytest.approx(want, rel=1e-5)
    # sum = mean * L*H*d per half: with d_k != d_v the halves scale differently
    mean = kv_loss(sk, sv, tk, tv, mask, kind=kind, layerwise_std=layerwise, reduction="mean")
    assert got.item() != pytest.approx(mean.item() * L * H * d_k, rel=1e-3)
    k_only = kv_loss(sk, tv, tk, tv, mask, kind=kind, layerwise_std=layerwise)  # V half is 0
    v_only = kv_loss(tk, sv, tk, tv, mask, kind=kind, layerwise_std=layerwise)  # K half is 0
    assert got.item() == pytest.approx(k_only.item() * L * H * d_k + v_only.item() * L * H * d_v, rel=1e-5)


def test_kv_sum_reduction_keeps_masking_and_grad():
    sk, sv, tk, tv = _random_kv(5)
    mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    slot = ~mask[:, None, None, :, None].expand_as(sk)
    base = kv_loss(sk, sv, tk, tv, mask, reduction="sum")
    sv2 = sv.clone()
    sv2[slot] = float("nan")  # NaN at masked slots does not reach the value
    torch.testing.assert_close(kv_loss(sk, sv2, tk, tv, mask, reduction="sum"), base)
    sk2 = sk.clone()
    sk2[slot] = 123.0
    s = sk2.requires_grad_(True)
    loss = kv_loss(s, sv, tk, tv, mask, reduction="sum")
    torch.testing.assert_close(loss, base)
    loss.backward()
    assert (s.grad[slot] == 0).all() and (s.grad[~slot] != 0).any()
    # no valid slot: still a zero in the graph
    zero = kv_loss(sk.requires_grad_(True), sv, tk, tv, torch.zeros(2, 4, dtype=torch.bool), reduction="sum")
    assert zero.item() == 0.0 and zero.requires_grad


@pytest.mark.parametrize("bad", ["avg", "none", "Sum", ""])
def test_kv_bad_reduction_is_named(bad):
    sk, sv, tk, tv = _random_kv()
    with pytest.raises(ValueError, match=rf"reduction: expected one of mean, sum, got {bad!r}"):
        kv_loss(sk, sv, tk, tv, torch.ones(2, 4, dtype=torch.bool), reduction=bad)


# ---------------------------------------------------------------------------
# total_loss
# ---------------------------------------------------------------------------

BASE_KEYS = {"loss", "ce_student", "ce_teacher", "codi", "kv"}


def _setup(T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, H, M, d, D = 2, 2, 2, 3, 4, 6
    latent = {t: (torch.randn(B, L, H, M, d, generator=g).requires_grad_(True),
                  torch.randn(B, L, H, M, d, generator=g).requires_grad_(True)) for t in range(T + 1)}
    teacher = CompressedKV(keys=torch.randn(B, L, H, M, d, generator=g),
                           values=torch.randn(B, L, H, M, d, generator=g),
                           index=torch.zeros(B, L, H, M, dtype=torch.long),
                           slot_mask=torch.tensor([[True, True, True], [True, True, False]]))
    kw = dict(ce_student=torch.tensor(2.0, requires_grad=True), ce_teacher=torch.tensor(1.5, requires_grad=True),
              student_h=torch.randn(B, L, D, generator=g).requires_grad_(True),
              teacher_h=torch.randn(B, L, D, generator=g), latent_kv=latent, teacher_kv=teacher)
    return kw


@pytest.mark.parametrize("supervision", ["last", "all"])
def test_total_metrics_and_value(supervision):
    kw = _setup()
    cfg = LossCfg(kv_supervision=supervision, alpha_codi=10.0, alpha_kv=2.0, teacher_weight=0.5)
    loss, m = total_loss(**kw, cfg=cfg)
    assert set(m) == BASE_KEYS | {f"kv_loss_iter_{t}" for t in range(4)}
    assert all(type(v) is float for v in m.values())
    assert loss.item() == pytest.approx(m["loss"], rel=1e-6)
    assert m["loss"] == pytest.approx(2.0 + 0.5 * 1.5 + 10.0 * m["codi"] + 2.0 * m["kv"], rel=1e-6)
    tk = kw["teacher_kv"]
    per = {t: kv_loss(k, v, tk.keys, tk.values, tk.slot_mask).item() for t, (k, v) in kw["latent_kv"].items()}
    for t in per:
        assert m[f"kv_loss_iter_{t}"] == pytest.approx(per[t], rel=1e-6)
    want_kv = per[3] if supervision == "last" else (per[1] + per[2] + per[3]) / 3
    assert m["kv"] == pytest.approx(want_kv, rel=1e-6)
    assert m["codi"] == pytest.approx(codi_loss(kw["student_h"], kw["teacher_h"]).item(), rel=1e-6)


def test_all_vs_last_gradients_on_earlier_iterations():
    grads = {}
    for supervision in ("last", "all"):
        kw = _setup()
        loss, _ = total_loss(**kw, cfg=LossCfg(kv_supervision=supervision))
        loss.backward()
        grads[supervision] = {t: kw["latent_kv"][t][0].grad for t in kw["latent_kv"]}
    last, all_ = grads["last"], grads["all"]
    assert last[3] is not None and last[3].abs().sum() > 0
    assert all(last[t] is None or (last[t] == 0).all() for t in (0, 1, 2))
    assert all(all_[t] is not None and all_[t].abs().sum() > 0 for t in (1, 2, 3))
    assert all_[0] is None or (all_[0] == 0).all()  # pass 0 is logged, not supervised


def test_all_with_only_pass_zero_supervises_it():
    kw = _setup(T=0)
    loss, m = total_loss(**kw, cfg=LossCfg(kv_supervision="all"))
    assert set(m) == BASE_KEYS | {"kv_loss_iter_0"}
    assert m["kv"] == pytest.approx(m["kv_loss_iter_0"]) and m["kv"] > 0
    loss.backward()
    assert kw["latent_kv"][0][0].grad.abs().sum() > 0


def test_zero_weights_log_but_do_not_add():
    kw = _setup()
    loss, m = total_loss(**kw, cfg=LossCfg(alpha_codi=0.0, alpha_kv=0.0))
    assert m["codi"] > 0 and m["kv"] > 0 and m["kv_loss_iter_0"] > 0
    assert m["loss"] == pytest.approx(2.0 + 1.5, rel=1e-6)
    loss.backward()
    assert kw["student_h"].grad is None
    assert all(k.grad is None for k, _ in kw["latent_kv"].values())


@pytest.mark.parametrize("drop", ["teacher", "student"])
def test_none_terms(drop):
    kw = _setup()
    if drop == "teacher":  # nocot: question -> answer only
        kw.update(ce_teacher=None, teacher_h=None, teacher_kv=None)
    else:                  # cot: teacher SFT only
        kw.update(ce_student=None, student_h=None, latent_kv=None)
    loss, m = total_loss(**kw, cfg=LossCfg())
    assert set(m) == BASE_KEYS
    assert m["codi"] == 0.0 and m["kv"] == 0.0
    if drop == "teacher":
        assert m["ce_teacher"] == 0.0 and m["loss"] == pytest.approx(2.0)
    else:
        assert m["ce_student"] == 0.0 and m["loss"] == pytest.approx(1.5)
    loss.backward()


def test_total_respects_outer_no_grad():
    kw = _setup()
    with torch.no_grad():
        loss, m = total_loss(**kw, cfg=LossCfg())
    assert not loss.requires_grad and m["kv"] > 0


@pytest.mark.parametrize("supervision", ["last", "all"])
def test_total_kv_reduction_sum_scales_the_kv_metric(supervision):
    from kava.config import KavaConfig

    assert LossCfg().kv_reduction == "mean"
    B, L, H, M, d = _setup()["teacher_kv"].keys.shape
    factor = L * H * d  # d_k == d_v here
    _, mean = total_loss(**_setup(), cfg=LossCfg(kv_supervision=supervision))
    loss, summed = total_loss(**_setup(), cfg=LossCfg(kv_supervision=supervision, kv_reduction="sum"))
    assert summed["kv"] == pytest.approx(mean["kv"] * factor, rel=1e-5)
    for t in range(4):
        assert summed[f"kv_loss_iter_{t}"] == pytest.approx(mean[f"kv_loss_iter_{t}"] * factor, rel=1e-5)
    # the other terms are untouched and the total uses the summed kv
    assert summed["codi"] == mean["codi"] and summed["ce_student"] == mean["ce_student"]
    cfg = LossCfg()
    assert summed["loss"] == pytest.approx(2.0 + cfg.teacher_weight * 1.5 + cfg.alpha_codi * summed["codi"]
                                           + cfg.alpha_kv * summed["kv"], rel=1e-6)
    assert loss.item() == pytest.approx(summed["loss"], rel=1e-6)
    # the config key reaches total_loss through a --set override too
    via_cfg = KavaConfig().override([f"loss.kv_supervision={supervision}", "loss.kv_reduction=sum"]).loss
    assert total_loss(**_setup(), cfg=via_cfg)[1]["kv"] == pytest.approx(summed["kv"], rel=1e-6)


# ---------------------------------------------------------------------------
# shares: gradient accumulation over micro-batches
# ---------------------------------------------------------------------------
def test_shares_scale_each_term_and_its_metric():
    cfg = LossCfg(alpha_codi=10.0, alpha_kv=2.0, teacher_weight=0.5)
    _, plain = total_loss(**_setup(), cfg=cfg)
    f = {"ce_student": 0.5, "ce_teacher": 0.25, "codi": 0.2, "kv": 0.1}
    loss, m = total_loss(**_setup(), cfg=cfg, shares=LossShares(**f))
    for key, share in f.items():
        assert m[key] == pytest.approx(plain[key] * share, rel=1e-6)
    for t in range(4):
        assert m[f"kv_loss_iter_{t}"] == pytest.approx(plain[f"kv_loss_iter_{t}"] * f["kv"], rel=1e-6)
    assert loss.item() == pytest.approx(m["ce_student"] + 0.5 * m["ce_teacher"] + 10 * m["codi"] + 2 * m["kv"], rel=1e-6)
    assert total_loss(**_setup(), cfg=cfg, shares=LossShares())[1] == plain


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kv_halves_weighted_by_valid_slots_sum_to_the_full_batch(reduction):
    """Without the std normaliser, two micro-batches weighted by their share of valid slots give the full
    batch's KV loss and gradient, although they hold different numbers of valid slots (3 + 2 vs 1 + 0)."""
    g = torch.Generator().manual_seed(3)
    B, L, H, M, d = 4, 2, 2, 3, 4
    sk, sv = (torch.randn(B, L, H, M, d, generator=g).requires_grad_(True) for _ in range(2))
    tk, tv = (torch.randn(B, L, H, M, d, generator=g) for _ in range(2))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    full = kv_loss(sk, sv, tk, tv, mask, layerwise_std=False, reduction=reduction)
    (g_full,) = torch.autograd.grad(full, sk)
    n = mask.sum()
    parts = sum(kv_loss(sk[i], sv[i], tk[i], tv[i], mask[i], layerwise_std=False, reduction=reduction) * (mask[i].sum() / n)
                for i in (slice(0, 2), slice(2, 4)))
    (g_parts,) = torch.autograd.grad(parts, sk)
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(g_parts, g_full)


def test_metrics_stay_on_the_device_until_read(monkeypatch):
    """total_loss's metrics are one device tensor, read (one .tolist()) on first access, not when returned."""
    from kava.losses import Metrics

    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or real(self))
    kw = _setup()
    loss, m = total_loss(**kw, cfg=LossCfg(alpha_codi=10.0, alpha_kv=2.0))
    assert isinstance(m, Metrics) and not reads
    assert list(m) == list(m.names) and "kv" in m and len(m) == m.tensor.numel() and not reads
    assert m.tensor.shape == (len(m),) and m.tensor.dtype == torch.float32 and not m.tensor.requires_grad
    floats = dict(m)
    assert len(reads) == 1 and all(type(v) is float for v in floats.values())
    assert floats == dict(zip(m.names, m.tensor.tolist())) and floats["loss"] == loss.item()
    assert m["codi"] == floats["codi"] and len(reads) == 2  # the test's own tolist above; m read only once
    with pytest.raises(ValueError, match="shape"):
        Metrics(["a", "b"], torch.zeros(3))


def test_metrics_pass_through_accelerates_mixed_precision_wrapper():
    """accelerate's autocast wrapper converts a model's outputs to fp32 by rebuilding each Mapping by its type;
    Metrics must come through untouched (and unread)."""
    from accelerate.utils import convert_outputs_to_fp32

    from kava.losses import Metrics

    m = Metrics(["loss", "kv"], torch.tensor([1.5, 0.25]))
    loss, out = convert_outputs_to_fp32(lambda: (torch.tensor(2.0, dtype=torch.float16), m))()
    assert out is m and m._floats is None and loss.dtype == torch.float32
    assert dict(m) == {"loss": 1.5, "kv": 0.25} and m == {"loss": 1.5, "kv": 0.25} and m.get("x", 3) == 3
