"""Latent reasoning: pass 0, Jacobi iterations on the cached ``Q <bot>`` prefix (PCCoT), or sequential (CODI).

Every pass carries the attention mask and position ids that the left-padded
prefix implies, so an example gives the same latents alone or in a padded batch.

The Jacobi passes (and pass 0 on a shared question pass) all run M slots on top of a prefix KV that does not
change: :func:`fixed_shape_pass` is that pass as a function of tensors only, which ``latent.compile`` hands to
``torch.compile`` (:func:`compile_fixed_pass`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from kava.data.collate import positions_from_mask


@dataclass
class LatentTrace:
    """Result of latent reasoning for a batch.

    latents:      [B, M, D]  the latent inputs whose KV the answer pass attends to: the inputs of the last
                  pass, z^{T-1} in Jacobi mode (the <latent> embeddings when T = 0), z_1..z_M in
                  sequential mode. Re-running that pass on them rebuilds ``cache`` (``replay_final_pass``).
    latent_kv:    {iteration: (K, V)} each [B, L, H_kv, M, d]; the largest key is the final one (the KV
                  of ``latents``, which the answer pass reads)
    cache:        prefix + final latent KV, ready for the answer pass
    mask:         [B, Nq + M] attention mask of that cache
    next_position:[B] position id of the first answer token
    forward_passes: number of model calls made (batch-wide)
    history:      with ``keep_history`` (Jacobi): z^0 .. z^T, where z^t is the input of iteration t + 1
                  (z^T, the update after the last pass, is computed but feeds nothing)
    """

    latents: torch.Tensor
    latent_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    cache: DynamicCache
    mask: torch.Tensor
    next_position: torch.Tensor
    forward_passes: int
    history: list[torch.Tensor] = field(default_factory=list)


@dataclass
class QuestionState:
    """An already computed ``Q <bot>`` prefix in the student's left-padded layout.

    kv:          per layer (K [B, H, Nq, d], V [B, H, Nq, d_v]), with their autograd graph
    last_hidden: [B, D] final hidden state at <bot>
    The training step takes both from the teacher pass, whose first tokens are the same ``Q <bot>``
    at the same positions, so the student skips its own question pass.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    last_hidden: torch.Tensor


def _cache_from(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache that holds the given per-layer (K, V) tensors themselves.

    ``DynamicCache(ddp_cache_data=kv)`` would copy every layer's prefix KV (its first ``update`` concatenates
    it onto an empty tensor) in every Jacobi iteration; the prefix never changes, so the layers reference it.
    The layer's own ``update`` still concatenates the new slots (one contiguous K/V for the attention kernel);
    that copy cannot go to a preallocated static buffer in training, as each iteration's attention saves its
    K/V for backward and an in-place write of the next iteration's slots would invalidate them.
    """
    cache = DynamicCache(ddp_cache_data=[(None, None)] * len(kv))  # empty DynamicLayers, one per layer
    for layer, (k, v) in zip(cache.layers, kv):
        layer.lazy_initialization(k, v)  # device/dtype bookkeeping, as update() does
        layer.keys, layer.values = k, v
    return cache


def _split_cache(cache: DynamicCache, at: int) -> tuple[list, tuple[torch.Tensor, torch.Tensor]]:
    """-> (per-layer (K, V) before `at`, stacked (K, V) [B, L, H, n, d] from `at` on)."""
    head = [(layer.keys[..., :at, :], layer.values[..., :at, :]) for layer in cache.layers]
    k = torch.stack([layer.keys[..., at:, :] for layer in cache.layers], dim=1)
    v = torch.stack([layer.values[..., at:, :] for layer in cache.layers], dim=1)
    return head, (k, v)


# The backend of ``latent.compile``. Tests set "aot_eager" (dynamo + AOTAutograd without code generation) to check
# the traced graph in seconds; inductor's own numerics are checked by a slow test (tests/test_latent.py).
COMPILE_BACKEND = "inductor"

FixedPass = Callable[..., tuple[torch.Tensor, list, tuple[torch.Tensor, torch.Tensor]]]


def fixed_shape_pass(decoder: Callable) -> FixedPass:
    """The M-slot latent pass on a prefix KV, as a function of tensors only.

    ``run(z [B, M, D], mask [B, Nq + M], positions [B, M], prefix_kv per layer (K, V) [B, H, Nq, d])``
    -> (last hidden [B, M, D], per layer (K, V) of prefix + slots [B, H, Nq + M, d], the slots' (K, V) stacked
    [B, L, H, M, d]). Shapes depend on B, Nq and M only, so every Jacobi iteration of every step with the same
    question length runs the same graph. The DynamicCache lives inside the function (no cache object crosses
    its boundary), so ``torch.compile`` needs no StaticCache: a static in-place cache would not do in training
    anyway (``_cache_from``). Eager, it is exactly what the passes did before (bit-identical).
    """

    def run(z, mask, positions, prefix_kv):
        h, cache = decoder(z, mask, positions, _cache_from(prefix_kv))
        at = prefix_kv[0][0].shape[-2]
        _, stacked = _split_cache(cache, at)
        return h, [(layer.keys, layer.values) for layer in cache.layers], stacked

    return run


def compile_fixed_pass(decoder: Callable, backend: str | None = None, dynamic: bool | None = None) -> FixedPass:
    """``torch.compile`` of :func:`fixed_shape_pass` (``latent.compile``).

    Shapes: ``dynamic=None`` (torch's automatic dynamic shapes, what ``latent.compile`` uses): the first call
    compiles for its question length Nq, the first call with another length recompiles once with the varying
    sizes symbolic, later lengths reuse it. ``dynamic=False`` (benchmarks): one graph per shape. Grad mode and
    train/eval are guarded: inference (no grad) compiles its own graph. LoRA dropout inside a compiled graph
    draws from inductor's RNG (seeded from torch's), not the eager stream: the same distribution, other masks.
    The weights are graph inputs (dynamo inlines the modules), so another model of the same architecture in the
    same process reuses the graphs.
    """
    return torch.compile(fixed_shape_pass(decoder), backend=backend or COMPILE_BACKEND, dynamic=dynamic)


def run_latents(
    decoder: Callable,
    embed: Callable[[torch.Tensor], torch.Tensor],
    project: Callable[[torch.Tensor], torch.Tensor],
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    latent_id: int,
    num_tokens: int,
    num_iterations: int,
    mode: str = "jacobi",
    keep_history: bool = False,
    question: QuestionState | None = None,
    fixed_pass: FixedPass | None = None,
) -> LatentTrace:
    """Run latent reasoning on ``Q <bot>`` (left-padded prefix_ids/prefix_mask [B, Nq]).

    decoder(inputs_embeds, attention_mask, position_ids, cache) -> (last hidden [B, n, D], cache)
    question: the prefix already computed (its KV and <bot> hidden state); pass 0 then runs the
    latent slots only, on top of it. Same values as computing the prefix here.
    fixed_pass: runs the Jacobi passes (and pass 0 on ``question``); default ``fixed_shape_pass(decoder)``,
    eager; ``latent.compile`` gives :func:`compile_fixed_pass`. Sequential mode does not use it.
    """
    B, Nq = prefix_ids.shape
    M = num_tokens
    n_valid = prefix_mask.long().sum(-1)  # [B]
    latent_pos = n_valid[:, None] + torch.arange(M, device=prefix_ids.device)[None]  # [B, M]
    full_mask = torch.cat([prefix_mask, prefix_mask.new_ones(B, M)], dim=1)
    history: list[torch.Tensor] = []

    if mode == "sequential":
        # CODI: one latent per pass, each fed back as the next input.
        if question is None:
            h, cache = decoder(embed(prefix_ids), prefix_mask, positions_from_mask(prefix_mask), None)
            z = project(h[:, -1:])
        else:
            cache, z = _cache_from(question.kv), project(question.last_hidden[:, None])
        latents = []
        for i in range(M):
            latents.append(z)
            h, cache = decoder(z, full_mask[:, : Nq + i + 1], latent_pos[:, i : i + 1], cache)
            z = project(h)
        latents_t = torch.cat(latents, dim=1)
        _, kv = _split_cache(cache, Nq)
        return LatentTrace(latents_t, {max(num_iterations, 1): kv}, cache, full_mask,
                           n_valid + M, M + (question is None), history)

    # Pass 0: Q <bot> then M copies of <latent>, in one call; keep the prefix KV.
    fixed_pass = fixed_pass or fixed_shape_pass(decoder)
    latent_emb = embed(torch.full((B, M), latent_id, dtype=torch.long, device=prefix_ids.device))
    if question is None:
        h0, cache = decoder(
            torch.cat([embed(prefix_ids), latent_emb], dim=1),
            full_mask,
            torch.cat([positions_from_mask(prefix_mask), latent_pos], dim=1),
            None,
        )
        h_bot, h_slots = h0[:, Nq - 1 : Nq], h0[:, Nq:]
        prefix_kv, kv = _split_cache(cache, Nq)
    else:
        h_slots, full_kv, kv = fixed_pass(latent_emb, full_mask, latent_pos, question.kv)
        # The iterations read the question's own KV: equal to the cache's first Nq slots, and in the same
        # (contiguous) layout as pass 0's input, so one compiled graph serves pass 0 and the iterations.
        cache, prefix_kv = _cache_from(full_kv), question.kv
        h_bot = question.last_hidden[:, None]
    latent_kv = {0: kv}
    consumed = latent_emb
    if num_iterations == 0 and not keep_history:
        # T = 0: the answer reads pass 0's KV; z^0 would feed nothing (and leave prj out of the loss graph).
        return LatentTrace(consumed, latent_kv, cache, full_mask, n_valid + M, 1, history)
    # z^0_1 = prj(h at <bot>); z^0_i = prj(h at slot i-1).
    z = project(torch.cat([h_bot, h_slots[:, : M - 1]], dim=1))
    if keep_history:
        history.append(z)
    for t in range(1, num_iterations + 1):
        # Iteration t: all M latents in one pass on top of the (never recomputed) prefix cache.
        h, full_kv, latent_kv[t] = fixed_pass(z, full_mask, latent_pos, prefix_kv)
        cache = _cache_from(full_kv)
        consumed = z
        if t == num_iterations and not keep_history:
            break  # the update after the last pass would feed nothing
        # Causal shift: slot 1 keeps its value; slot i takes prj(h at slot i-1).
        z = torch.cat([z[:, :1], project(h[:, :-1])], dim=1)
        if keep_history:
            history.append(z)
    # The answer attends to the KV of the last pass, whose inputs were `consumed` (not the final update z).
    return LatentTrace(consumed, latent_kv, cache, full_mask, n_valid + M, 1 + num_iterations, history)


def replay_final_pass(decoder: Callable, trace: LatentTrace, z: torch.Tensor) -> DynamicCache:
    """Re-run the last latent pass of ``trace`` with other latent inputs ``z`` [B, M, D].

    Same prefix cache, mask and positions as the pass that produced ``trace.cache``; with
    ``z = trace.latents`` it rebuilds that cache (in sequential mode too: one causal pass over
    z_1..z_M gives the KV the M one-token passes gave). -> prefix + latent cache for the answer pass.
    """
    M = z.shape[1]
    prefix_len = trace.mask.shape[1] - M
    prefix_kv, _ = _split_cache(trace.cache, prefix_len)
    latent_pos = trace.next_position[:, None] - M + torch.arange(M, device=z.device)[None]
    _, cache = decoder(z, trace.mask, latent_pos, _cache_from(prefix_kv))
    return cache
