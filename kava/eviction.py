"""Compress the teacher's CoT KV cache to M entries per layer and KV head (R-KV style).

For every example, layer and KV head, over the valid (unpadded) CoT positions i:

    I_i = importance (mean answer->CoT attention, computed by the teacher pass)
    R_i = softmax_over_valid( -(1/N_valid) * sum_{j valid} cos(k_i, k_j) )
    S_i = lam * I_i + (1 - lam) * R_i

and keep the top-M positions by S. Padding always scores -inf, so it is never
kept. Variants for ablation: ``importance`` (lam = 1), ``redundancy`` (lam = 0),
``crop`` (first M valid tokens) and ``random``.

Shapes: B batch, L layers (optional axis), H KV heads, N CoT positions, d head
dim, M budget. Everything is batched; there are no python loops over B/L/H.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

METHODS = ("rkv", "importance", "redundancy", "crop", "random")
ORDERS = ("time", "score")


@dataclass
class CompressedKV:
    """The kept teacher KV entries.

    keys, values: ``[B, (L,) H, M, d]``; zero at masked slots.
    index: ``[B, (L,) H, M]`` long, the kept positions in ``[0, N)``; ascending
        (time order) or by descending score, valid slots first; -1 at masked slots.
    slot_mask: ``[B, M]`` bool, True for slots that hold a real CoT entry. It is
        per example only: every layer and head keeps ``min(M, N_valid)`` entries.
    """

    keys: Tensor
    values: Tensor
    index: Tensor
    slot_mask: Tensor

    @property
    def budget(self) -> int:
        return self.slot_mask.shape[-1]


def needs_importance(method: str, lam: float) -> bool:
    """Whether ``method`` (with ``lam``) reads the teacher's importance: only then is it worth capturing."""
    return method == "importance" or (method == "rkv" and lam != 0)


def _check_shapes(keys: Tensor, importance: Optional[Tensor], valid: Tensor) -> None:
    if keys.dim() not in (4, 5):
        raise ValueError(f"keys: expected shape [B, H, N, d] or [B, L, H, N, d], got {tuple(keys.shape)}")
    B, N = keys.shape[0], keys.shape[-2]
    if valid.shape != (B, N):
        raise ValueError(f"valid: expected shape [B, N] = {(B, N)} to match keys, got {tuple(valid.shape)}")
    if importance is not None and importance.shape != keys.shape[:-1]:
        want = "[B, H, N]" if keys.dim() == 4 else "[B, L, H, N]"
        raise ValueError(f"importance: expected shape {want} = {tuple(keys.shape[:-1])} "
                         f"to match keys, got {tuple(importance.shape)}")


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision softmax over a few hundred entries loses the ranking; score in >= fp32.
    return torch.promote_types(dtype, torch.float32)


def _broadcast_valid(valid: Tensor, ndim: int) -> Tensor:
    """``[B, N]`` -> ``[B, 1, (1,) N]`` so it lines up with ``[B, (L,) H, N]``."""
    return valid.reshape(valid.shape[0], *([1] * (ndim - 2)), valid.shape[-1])


def rkv_scores(keys: Tensor, importance: Optional[Tensor], valid: Tensor, lam: float) -> Tensor:
    """R-KV score ``S = lam * I + (1 - lam) * R`` per example, (layer,) head and position.

    keys: ``[B, H, N, d]`` or ``[B, L, H, N, d]``.
    importance: ``[B, H, N]`` or ``[B, L, H, N]`` (may be None only when lam == 0).
    valid: ``[B, N]`` bool, True at real (unpadded) CoT positions.
    Returns scores shaped like ``keys.shape[:-1]`` in at least float32; padding is -inf.
    A row with no valid position is all -inf (never NaN).
    """
    if importance is None and lam != 0:
        raise ValueError("importance: required (shape [B, (L,) H, N]) when lam != 0")
    _check_shapes(keys, importance, valid)
    valid = valid.to(device=keys.device, dtype=torch.bool)
    dt = _score_dtype(keys.dtype)
    vmask = _broadcast_valid(valid, keys.dim() - 1)                      # [B, 1, (1,) N]
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=keys.device)

    scores = torch.zeros(keys.shape[:-1], dtype=dt, device=keys.device)
    if lam != 1:
        kn = torch.nn.functional.normalize(keys.to(dt), dim=-1)          # [..., N, d]
        # sum_j cos(k_i, k_j) = k^_i . (sum_j k^_j): one batched mat-vec instead of an N x N matrix.
        ksum = (kn * vmask.unsqueeze(-1)).sum(dim=-2, keepdim=True)      # [..., 1, d]
        n_valid = vmask.sum(dim=-1, keepdim=True).clamp_min(1).to(dt)    # [B, 1, (1,) 1]
        mean_cos = (kn @ ksum.transpose(-1, -2)).squeeze(-1) / n_valid   # [..., N]
        # Masked softmax: -inf at padding, then zero the all-padding rows (softmax gives NaN there).
        logits = torch.where(vmask, -mean_cos, neg_inf)
        redundancy = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        scores = scores + (1 - lam) * redundancy
    if lam != 0:
        scores = scores + lam * importance.to(dt)
    # where, not multiply: garbage (even NaN) importance at padding must not leak.
    return torch.where(vmask, scores, neg_inf)


def _method_scores(keys: Tensor, importance: Optional[Tensor], valid: Tensor, lam: float,
                   method: str, generator: Optional[torch.Generator]) -> Tensor:
    """Selection scores ``[B, (L,) H, N]``; higher is kept first, padding is -inf."""
    shape, dt = keys.shape[:-1], _score_dtype(keys.dtype)
    vmask = _broadcast_valid(valid, keys.dim() - 1)
    if method == "rkv":
        return rkv_scores(keys, importance, valid, lam)
    if method == "importance":
        return rkv_scores(keys, importance, valid, 1.0)
    if method == "redundancy":
        return rkv_scores(keys, None, valid, 0.0)
    if method == "crop":
        # Earlier positions score higher, so top-M = the first M valid tokens.
        s = -torch.arange(shape[-1], device=keys.device, dtype=dt).expand(shape)
    else:  # random
        # Draw on the generator's device so a seed reproduces across runs, then move (non-blocking: a blocking
        # copy to a GPU waits for every queued kernel; from pageable memory the data are staged at once).
        gdev = generator.device if generator is not None else keys.device
        s = torch.rand(shape, generator=generator, device=gdev, dtype=dt).to(keys.device, non_blocking=True)
    return torch.where(vmask, s, float("-inf"))


def compress_kv(keys: Tensor, values: Tensor, importance: Optional[Tensor], valid: Tensor,
                budget: int, lam: float = 0.1, method: str = "rkv",
                generator: Optional[torch.Generator] = None, order: str = "time") -> CompressedKV:
    """Keep ``budget`` (= M) CoT entries per example, (layer,) and KV head.

    keys: ``[B, H, N, d]`` or ``[B, L, H, N, d]``; values: the same leading shape
    ``[B, (L,) H, N, d_v]``. importance: ``[B, (L,) H, N]``, needed by ``rkv``
    (lam > 0) and ``importance`` only. valid: ``[B, N]`` bool (0/1 ints are accepted).
    method: rkv | importance | redundancy | crop | random (random draws from
    ``generator`` for reproducibility). order: ``time`` (ascending position) or
    ``score`` (descending score) for the kept entries.

    An example with fewer than M valid positions fills its first ``N_valid``
    slots and masks the rest (slot_mask False, index -1, zero KV). The output
    always has M slots, even when N < M. Selection is discrete and computed
    without grad; the gathered KV keeps whatever autograd history the inputs have.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {', '.join(ORDERS)}, got {order!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget: expected an int >= 1, got {budget!r}")
    _check_shapes(keys, importance, valid)
    if values.shape[:-1] != keys.shape[:-1]:
        raise ValueError(f"values: expected shape {tuple(keys.shape[:-1]) + ('d_v',)} to match keys, "
                         f"got {tuple(values.shape)}")
    if needs_importance(method, lam):
        if importance is None:
            raise ValueError(f"importance: required (shape {tuple(keys.shape[:-1])}) for method={method!r}")
    valid = valid.to(device=keys.device, dtype=torch.bool)

    M, N = budget, keys.shape[-2]
    k = min(M, N)
    with torch.no_grad():
        scores = _method_scores(keys, importance, valid, lam, method, generator)
        # Valid positions have finite scores, so topk takes all of them before any padding.
        top_scores, idx = scores.topk(k, dim=-1, sorted=True)            # [B, (L,) H, k], descending
        kept = top_scores > float("-inf")
        if order == "time":
            # Push dropped picks past every real position, then sort: valid slots first, ascending.
            idx = torch.where(kept, idx, N).sort(dim=-1).values
            kept = idx < N
        if k < M:  # N < M: pad the slot axis so the output always has M slots.
            pad = (0, M - k)
            idx = torch.nn.functional.pad(idx, pad, value=0)
            kept = torch.nn.functional.pad(kept, pad, value=False)
        index = torch.where(kept, idx, -1)
        gather_idx = torch.where(kept, idx, 0)                            # any in-range index
        n_valid = valid.sum(dim=-1, keepdim=True)                         # [B, 1]
        slot_mask = torch.arange(M, device=keys.device) < n_valid.clamp_max(M)

    def take(x: Tensor) -> Tensor:
        g = x.gather(-2, gather_idx.unsqueeze(-1).expand(*gather_idx.shape, x.shape[-1]))
        return torch.where(kept.unsqueeze(-1), g, torch.zeros((), dtype=x.dtype, device=x.device))

    return CompressedKV(keys=take(keys), values=take(values), index=index, slot_mask=slot_mask)
