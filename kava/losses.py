"""KaVa losses on plain tensors.

    L = CE_student + w_t * CE_teacher + a1 * L_CODI + a2 * L_KV

The model computes the two cross-entropies itself; this module adds the two
distillation terms and returns the total with its metrics. Teacher tensors are
always detached here, so callers need not remember to.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from kava.config import LossCfg
from kava.eviction import CompressedKV

EPS = 1e-6
CODI_KINDS = ("smooth_l1", "l1")
KV_KINDS = ("smooth_l1", "l1", "mse")
KV_REDUCTIONS = ("mean", "sum")


def _distance(a: Tensor, b: Tensor, kind: str) -> Tensor:
    """Elementwise distance: smooth_l1 (beta = 1), l1 (abs) or mse (squared)."""
    if kind == "smooth_l1":
        return torch.nn.functional.smooth_l1_loss(a, b, reduction="none", beta=1.0)
    if kind == "l1":
        return (a - b).abs()
    if kind == "mse":
        return (a - b).square()
    raise ValueError(f"kind: expected one of {', '.join(KV_KINDS)}, got {kind!r}")


def _upcast(x: Tensor) -> Tensor:
    # Reductions over millions of bf16 elements drift; do the loss math in >= fp32.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def codi_loss(student_h: Tensor, teacher_h: Tensor, kind: str = "smooth_l1",
              layerwise_std: bool = True) -> Tensor:
    """CODI hidden-state loss at the last answer-prompt token.

    student_h, teacher_h: ``[B, L, D]``, every layer's output (embedding excluded).
    Per layer l: ``mean_{B,D} dist(s, sg(t)) / std(t)``, with std over (B, D) of
    that layer when ``layerwise_std`` else one std over all of teacher_h
    (population std, clamped to >= 1e-6); then the mean over layers. Scalar.
    """
    if kind not in CODI_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(CODI_KINDS)}, got {kind!r}")
    if student_h.dim() != 3 or student_h.shape != teacher_h.shape:
        raise ValueError(f"student_h, teacher_h: expected equal shapes [B, L, D], got "
                         f"{tuple(student_h.shape)} and {tuple(teacher_h.shape)}")
    s, t = _upcast(student_h), _upcast(teacher_h.detach())
    per_layer = _distance(s, t, kind).mean(dim=(0, 2))                    # [L]
    if layerwise_std:
        std = t.std(dim=(0, 2), correction=0)                              # [L]
    else:
        std = t.std(correction=0)
    return (per_layer / std.clamp_min(EPS)).mean()


def kv_loss(student_k: Tensor, student_v: Tensor, teacher_k: Tensor, teacher_v: Tensor,
            slot_mask: Tensor, kind: str = "smooth_l1", layerwise_std: bool = True,
            reduction: str = "mean") -> Tensor:
    """KV distillation loss against the compressed teacher KV.

    student_k, teacher_k: ``[B, L, H, M, d]``; student_v, teacher_v: ``[B, L, H, M, d_v]``;
    slot_mask: ``[B, M]`` bool (False slots hold no teacher entry and never count).

    METHOD writes ``(1/2M) (||sg(K~) - K||_p^p + ||sg(V~) - V||_p^p)`` summed over
    layers and heads. We take the *mean* over every valid element (layers, heads,
    valid slots, d) instead of the sum over L, H, d, so the loss size (and the
    right alpha_kv) does not change with model shape; it differs from the formula
    by the constant L*H*d only. K and V terms are averaged (the 1/2).
    ``reduction="sum"`` is the paper's scale: the same value times L*H*d (d_v for
    the V term), i.e. summed over layers, heads and dims, averaged over valid slots.

    With ``layerwise_std`` each layer's mean distance is divided by the std of the
    teacher K (resp. V) of that layer over valid slots (detached, clamped to >= 1e-6);
    the std divides the distance as is, also for mse. No valid slot in the batch
    gives a zero that stays in the autograd graph.
    """
    if kind not in KV_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KV_KINDS)}, got {kind!r}")
    if reduction not in KV_REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(KV_REDUCTIONS)}, got {reduction!r}")
    if student_k.dim() != 5 or student_k.shape != teacher_k.shape:
        raise ValueError(f"student_k, teacher_k: expected equal shapes [B, L, H, M, d], got "
                         f"{tuple(student_k.shape)} and {tuple(teacher_k.shape)}")
    if student_v.shape != teacher_v.shape or student_v.shape[:-1] != student_k.shape[:-1]:
        raise ValueError(f"student_v, teacher_v: expected equal shapes {tuple(student_k.shape[:-1]) + ('d_v',)}, "
                         f"got {tuple(student_v.shape)} and {tuple(teacher_v.shape)}")
    B, _, H, M, _ = student_k.shape
    if slot_mask.shape != (B, M):
        raise ValueError(f"slot_mask: expected shape [B, M] = {(B, M)}, got {tuple(slot_mask.shape)}")
    mask = slot_mask.to(device=student_k.device, dtype=torch.bool)[:, None, None, :, None]
    n_slots = mask.sum()                       # valid (example, slot) pairs; a tensor, no sync

    def one(s: Tensor, t: Tensor) -> Tensor:
        s, t = _upcast(s), _upcast(t.detach())
        count = (n_slots * H * s.shape[-1]).clamp_min(1).to(s.dtype)       # elements per layer
        # where, not multiply: masked slots may hold anything, even NaN, and must not count.
        dist = torch.where(mask, _distance(s, t, kind), 0.0)
        per_layer = dist.sum(dim=(0, 2, 3, 4)) / count                      # [L]
        if layerwise_std:
            mean = torch.where(mask, t, 0.0).sum(dim=(0, 2, 3, 4), keepdim=True) / count
            var = torch.where(mask, (t - mean).square(), 0.0).sum(dim=(0, 2, 3, 4)) / count
            per_layer = per_layer / var.sqrt().clamp_min(EPS)
        if reduction == "sum":  # sum over layers, heads and dims instead of their mean
            return per_layer.sum() * (H * s.shape[-1])
        return per_layer.mean()

    return 0.5 * (one(student_k, teacher_k) + one(student_v, teacher_v))


@dataclass(frozen=True)
class LossShares:
    """One micro-batch's part of the step's global batch, per term: its count over the global batch's.

    With these weights each term is a sum over the micro-batch divided by the global count, so summing the
    micro-batch losses of a step (gradient accumulation, and over processes) gives the full-batch mean:
    CE per labelled token, L_CODI per example, L_KV per valid slot. The teacher-std normalisers of
    L_CODI / L_KV stay statistics of the micro-batch (docs/design.md, "Gradient accumulation").
    """

    # python floats; 0-dim float32 device tensors when several processes sum the counts (kava/train.py)
    ce_student: float = 1.0  # labelled student tokens here / in the global batch
    ce_teacher: float = 1.0  # labelled teacher tokens
    codi: float = 1.0  # examples
    kv: float = 1.0  # valid (example, slot) pairs of the compressed teacher KV


def supervised_iterations(iterations, kv_supervision: str) -> list[int]:
    """The Jacobi iterations whose KV loss is trained (the others' are metrics only): ``last``, the largest;
    ``all``, every t >= 1, or the only one, 0 (T = 0)."""
    last = max(iterations)
    return [last] if kv_supervision == "last" else [t for t in iterations if t >= 1] or [last]


def total_loss(*, ce_student: Optional[Tensor], ce_teacher: Optional[Tensor],
               student_h: Optional[Tensor], teacher_h: Optional[Tensor],
               latent_kv: Optional[dict[int, tuple[Tensor, Tensor]]],
               teacher_kv: Optional[CompressedKV], cfg: LossCfg,
               student_weight: float = 1.0, shares: Optional[LossShares] = None) -> tuple[Tensor, "Metrics"]:
    """Total training loss and its metrics.

    shares: this micro-batch's part of the global batch per term (:class:`LossShares`); each term, and its
    metric, is multiplied by its share, so the sum over a step's micro-batches is the full-batch value.
    None: every share is 1 (the micro-batch is the whole batch).

    student_weight scales the student terms (CE_student, a1 * L_CODI, a2 * L_KV) and not the teacher CE:
    ``L = s * (CE_student + a1 L_CODI + a2 L_KV) + w_t CE_teacher`` (the ramp after a teacher-only curriculum).

    latent_kv: iteration t -> (k, v), each ``[B, L, H, M, d]``; 0 is pass 0, 1..T the
    Jacobi iterations, and the largest key is the KV the answer pass used.
    ``kv_supervision="last"`` supervises that largest key; ``"all"`` the mean over
    keys >= 1 (or key 0 when it is the only one). Every iteration's KV loss is
    logged either way (unsupervised ones under no_grad).

    Any of ce_student, ce_teacher, student_h/teacher_h, latent_kv/teacher_kv may be
    None (baselines without a student or a teacher): that term is 0. A term whose
    weight is 0 is still computed for its metric, under no_grad, and not added.

    Returns ``(loss, metrics)``; metrics (:class:`Metrics`, a mapping read as python floats on first access)
    always has loss, ce_student, ce_teacher, codi, kv and ``kv_loss_iter_{t}`` for each key t.
    """
    present = [x for x in (ce_student, ce_teacher, student_h, teacher_h) if x is not None]
    if latent_kv:
        present.append(next(iter(latent_kv.values()))[0])
    device = present[0].device if present else torch.device("cpu")
    zero = torch.zeros((), device=device)

    def maybe_grad(weight: float):
        # nullcontext, not enable_grad: an outer no_grad (validation) must still win.
        return contextlib.nullcontext() if weight != 0 else torch.no_grad()

    sh = shares if shares is not None else LossShares()
    codi = zero
    if student_h is not None and teacher_h is not None:
        with maybe_grad(cfg.alpha_codi):
            codi = codi_loss(student_h, teacher_h, cfg.codi_loss, cfg.codi_layerwise_std) * sh.codi

    kv, iters = zero, {}
    if latent_kv and teacher_kv is not None:
        supervised = supervised_iterations(latent_kv, cfg.kv_supervision)
        for t in sorted(latent_kv):
            k, v = latent_kv[t]
            with maybe_grad(cfg.alpha_kv if t in supervised else 0.0):
                iters[t] = kv_loss(k, v, teacher_kv.keys, teacher_kv.values, teacher_kv.slot_mask,
                                   cfg.kv_loss, cfg.kv_layerwise_std, cfg.kv_reduction) * sh.kv
        kv = torch.stack([iters[t] for t in supervised]).mean()

    ce_s = ce_student * sh.ce_student if ce_student is not None else zero
    ce_t = ce_teacher * sh.ce_teacher if ce_teacher is not None else zero
    student = ce_s
    if cfg.alpha_codi != 0:
        student = student + cfg.alpha_codi * codi
    if cfg.alpha_kv != 0:
        student = student + cfg.alpha_kv * kv
    loss = (student if student_weight == 1.0 else student_weight * student) + cfg.teacher_weight * ce_t

    names = ["loss", "ce_student", "ce_teacher", "codi", "kv"] + [f"kv_loss_iter_{t}" for t in iters]
    vals = [loss, ce_s, ce_t, codi, kv] + list(iters.values())
    flat = torch.stack([x.detach().reshape(()).to(device=device, dtype=torch.float32) for x in vals])
    return loss, Metrics(names, flat)


class Metrics:
    """The metrics of one loss: a read-only mapping name -> python float over one device tensor.

    The floats are read (one ``.tolist()``, one device sync) on first access only; a training loop sums
    :attr:`tensor` on the device and reads it at its logging steps (kava/train.py). Deliberately not a
    ``collections.abc.Mapping``: accelerate's mixed-precision wrapper rebuilds Mapping outputs by their type
    (reading every value), and passes other objects through as they are.
    """

    def __init__(self, names: list[str], values: Tensor):
        if values.shape != (len(names),):
            raise ValueError(f"values: expected shape ({len(names)},), got {tuple(values.shape)}")
        self.names = tuple(names)
        self.tensor = values  # [len(names)] float32, detached, on the loss's device
        self._floats: dict[str, float] | None = None

    def _read(self) -> dict[str, float]:
        if self._floats is None:
            self._floats = dict(zip(self.names, self.tensor.tolist()))
        return self._floats

    def __getitem__(self, key: str) -> float:
        return self._read()[key]

    def get(self, key: str, default=None):
        return self._read().get(key, default)

    def keys(self):
        return dict.fromkeys(self.names).keys()  # the names need no read

    def items(self):
        return self._read().items()

    def values(self):
        return self._read().values()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, key) -> bool:
        return key in self.names

    def __eq__(self, other) -> bool:
        if isinstance(other, (Metrics, Mapping)):
            return self._read() == dict(other.items())
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"Metrics({self._read()!r})"
