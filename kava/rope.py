"""Moving cached (post-RoPE) keys to other positions.

The KV loss compares the student's latent keys, cached at the latent slot positions, with the teacher's
kept CoT keys, cached at their own CoT positions. RoPE rotates every key by its position, so the same
content at two positions gives two different keys. ``loss.kv_key_positions="slots"`` rotates each kept
teacher key to the slot it is matched with: RoPE rotations compose, R(a) R(p) k = R(p + a) k.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rotary_inv_freq(decoder_stack) -> Tensor:
    """The backbone's RoPE inverse frequencies [d/2], for the half-split (LLaMA / Qwen2) layout."""
    rotary = getattr(decoder_stack, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        raise ValueError("loss.kv_key_positions=slots: the backbone has no rotary_emb.inv_freq (a RoPE model is needed)")
    return inv_freq


def rotate_keys(keys: Tensor, delta: Tensor, inv_freq: Tensor) -> Tensor:
    """``R(delta) k``: the key position ``p + delta`` would cache, from the key cached at ``p``.

    keys [..., d] post-RoPE in the half-split layout (``k * cos + rotate_half(k) * sin``);
    delta: position shifts broadcastable to ``keys.shape[:-1]``; inv_freq [d/2].
    """
    d = keys.shape[-1]
    if inv_freq.numel() * 2 != d:
        raise ValueError(f"rotate_keys: {inv_freq.numel()} RoPE frequencies do not cover head dim {d} "
                         "(partial rotary is not supported)")
    angle = delta.to(torch.float32)[..., None] * inv_freq.to(device=keys.device, dtype=torch.float32)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    k = keys.to(torch.float32)
    rotated_half = torch.cat([-k[..., d // 2:], k[..., : d // 2]], -1)
    return (k * cos + rotated_half * sin).to(keys.dtype)


def slot_shifts(index: Tensor) -> Tensor:
    """Kept CoT index [..., M] (-1 at masked slots) -> shift to slot i: ``i - index`` (0 at masked slots).

    Student slot i sits at position ``n_q + i`` and CoT entry j at ``n_q + j`` (both follow the same
    ``Q <bot>``), so the shift does not depend on the question length.
    """
    slots = torch.arange(index.shape[-1], device=index.device)
    return torch.where(index >= 0, slots - index, 0)
